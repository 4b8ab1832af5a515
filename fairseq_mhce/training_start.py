"""The code table of a model when training starts.

fairseq builds the model before it knows whether a checkpoint will be
restored, and a checkpoint loaded for decoding brings its own table (a
buffer of the state dict).  So the model's table is settled where fairseq
decides that, in ``Trainer.load_checkpoint`` (called once by
``fairseq-train`` and ``fairseq-hydra-train`` before the first update, with
the file it would restore):

* a checkpoint is restored: its table is used (decoding and resuming never
  rebuild it); a ``--mhce-code-table`` file that differs from it is refused,
  naming both; another ``--mhce-code-order`` / ``--mhce-code-seed`` changes
  nothing, which one log line says, and the config saved in the run's
  checkpoints keeps the values it was started with; a checkpoint of another
  tie layout is refused as soon as it is read;
* training starts from scratch: ``--mhce-code-order ppmi`` (the default of
  MHP / MHE) gets the PPMI table of the task's training targets
  (:func:`~fairseq_mhce.modules.ppmi_codes.ppmi_code_table`), read from
  ``SAVE_DIR/mhce_code_table.json`` when that cache matches (dictionary, head
  sizes, shortlist, seed, training data), else built and cached there (the
  data-bin is never written).  Under DDP rank 0 builds it and broadcasts it.
  A ``--mhce-code-table`` file that does not exist is an error here, before
  the first update.
"""

import contextlib
import contextvars
import logging
import os
import time
from typing import Optional

import numpy as np
import torch
from fairseq.distributed import utils as dist_utils
from fairseq.file_io import PathManager

from .cfg_access import cfg_get, cfg_set
from .codes import table as ct
from .codes.ppmi import missing_split, ppmi_code_table, split_prefix, training_targets
from .models.transformer_mhce import layout_code, pending_table_error
from .modules.tied_embedding import checkpoint_tie_layout, model_tie_layout, tie_layout_error
from .safe_load import load_checkpoint_mapped

logger = logging.getLogger(__name__)

CACHE_NAME = "mhce_code_table.json"


def _head_and_settings(model):
    decoder = getattr(model, "decoder", None)
    head = getattr(decoder, "mhce_head", None)
    settings = getattr(decoder, "_mhce_settings", None)
    return head, settings


def _data_identity(path: str) -> dict:
    st = os.stat(path)
    return {"bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _cache_matches(obj: dict, want: dict) -> Optional[str]:
    """None when the cached table ``obj`` is the one ``want`` describes,
    else the first difference."""
    meta = obj.get("meta") or {}
    checks = [
        ("vocab_size", obj.get("vocab_size"), want["vocab_size"]),
        ("head sizes", [int(c) for c in obj.get("head_sizes", [])], want["head_sizes"]),
        ("dictionary", obj.get("dictionary_sha1"), want["dictionary_sha1"]),
        ("source", meta.get("source"), "ppmi"),
        ("seed", meta.get("seed"), want["seed"]),
        ("shortlist", int(meta.get("shortlist", 0) or 0), want["shortlist"]),
        ("training data", meta.get("train_data"), want["train_data"]),
    ]
    for what, have, need in checks:
        if have != need:
            return f"{what} {have!r} != {need!r}"
    return None


def build_auto_table(
    head, seed: int, databin: str, src: str, tgt: str, split: str, dictionary, save_dir: Optional[str]
) -> np.ndarray:
    """The PPMI code table (V,) for ``head``'s codec and shortlist: from the
    cache ``SAVE_DIR/mhce_code_table.json`` when it matches, else built from
    ``DATABIN/SPLIT.SRC-TGT.TGT`` (or ``SPLIT.TGT-SRC.TGT``, as fairseq
    reads a data-bin of the other direction) and cached (atomically; a failure to write
    the cache is logged, not fatal).  Logs one line with the cost."""
    t0 = time.time()
    symbols = ct.dictionary_symbols(dictionary)
    prefix = split_prefix(databin, split, src, tgt, tgt)  # the file fairseq reads (either direction)
    if not os.path.isfile(prefix + ".bin"):
        raise FileNotFoundError(
            f"the automatic code table (--mhce-code-order ppmi) is built from the training targets "
            f"{missing_split(databin, split, src, tgt, tgt)}, which do not exist; pass --mhce-code-order "
            f"identity (or a --mhce-code-table file)"
        )
    shortlist = int(getattr(head, "shortlist", 0) or 0)
    want = {
        "vocab_size": head.vocab_size,
        "head_sizes": list(head.sizes),
        "dictionary_sha1": ct.dictionary_sha1(symbols),
        "seed": int(seed),
        "shortlist": shortlist,
        "train_data": {"path": os.path.abspath(prefix + ".bin"), **_data_identity(prefix + ".bin")},
    }
    cache = os.path.join(save_dir, CACHE_NAME) if save_dir else None
    where = f"V={head.vocab_size}, head sizes {list(head.sizes)}" + (f", shortlist {shortlist}" if shortlist else "")
    if cache and os.path.isfile(cache):
        try:
            obj = ct.read_code_table(cache)
            why = _cache_matches(obj, want)
            if why is None:
                code = ct.load_code_table(cache, head.vocab_size, head.sizes, symbols).numpy()
                logger.info(f"mhce: PPMI code table ({where}) reused from {cache} ({time.time() - t0:.1f} s)")
                return code
            logger.info(f"mhce: the cached code table {cache} does not match ({why}); rebuilding it")
        except ValueError as e:
            logger.info(f"mhce: the cached code table {cache} is unusable ({e}); rebuilding it")
    seqs = training_targets(databin, src, tgt, dictionary, split)
    code, _, meta = ppmi_code_table(seqs, head.vocab_size, head.sizes, seed=seed, shortlist=shortlist)
    meta["train_data"] = want["train_data"]
    cached = ""
    if cache:
        try:
            os.makedirs(save_dir, exist_ok=True)
            tmp = f"{cache}.{os.getpid()}.tmp"
            ct.save_code_table(tmp, code, head.sizes, symbols, meta)
            os.replace(tmp, cache)  # the cache is the plugin's own file: replace it whole
            cached = f", cached in {cache}"
        except OSError as e:
            logger.warning(f"mhce: could not cache the code table in {cache}: {e}")
    logger.info(
        f"mhce: PPMI code table ({where}) built from {prefix} ({meta['train_tokens']} target tokens, "
        f"seed {seed}) in {time.time() - t0:.1f} s{cached}"
    )
    return code


def install_code(head, code) -> None:
    """Make ``code`` (V,) the table of ``head`` before training: the codec's
    buffers in place, and a shared embedding's rows moved with it."""
    code = torch.as_tensor(np.asarray(code), dtype=torch.long)
    old = head.codec.code.clone()
    head.codec.set_code(code)
    if head.tied:
        emb = head._tied_embed
        with torch.no_grad():
            token_order = emb.weight.data.index_select(0, old.to(emb.weight.device))
            emb.weight.data.copy_(token_order.index_select(0, torch.argsort(head.codec.code)))
    head.codec.pending_table = None


def settle_code_table(
    model, task, save_dir: Optional[str], train_subset: str = "train", rank: int = 0, world_size: int = 1, group=None
) -> None:
    """Give a model that starts training from scratch its pending code table
    (see the module docstring); a no-op for any other model."""
    head, settings = _head_and_settings(model)
    if head is None or head.codec.pending_table is None:
        return
    kind, _ = head.codec.pending_table
    if kind == "table":
        raise FileNotFoundError(pending_table_error(head.codec.pending_table))
    code = None
    if rank == 0:
        data = str(task.cfg.data).split(os.pathsep)[0]
        code = build_auto_table(
            head,
            settings.mhce_code_seed,
            data,
            task.cfg.source_lang,
            task.cfg.target_lang,
            train_subset,
            task.target_dictionary,
            save_dir,
        )
    if world_size > 1:
        code = dist_utils.broadcast_object(code, src_rank=0, group=group)
    code = layout_code(
        settings,
        head.vocab_size,
        torch.as_tensor(np.asarray(code)),
        head.shortlist if getattr(head, "shortlist", 0) else 0,
    )
    install_code(head, code)


def check_resumed_table(head, settings, before: torch.Tensor, checkpoint: str) -> None:
    """A run resumed with a ``--mhce-code-table`` file that differs from the
    table of the checkpoint it resumes: refused, naming both."""
    if settings is None or settings.code_order != "table" or settings.mhce_realloc_updates:
        return
    if before is None or torch.equal(before, head.codec.code.cpu()):
        return
    new = settings.mhce_code_table
    old = _started_with(checkpoint)
    if old is None:
        started = "its config does not say which table it was started with"
    elif old.startswith("--mhce-code-table ") and os.path.abspath(old.split(" ", 1)[1]) == os.path.abspath(new):
        started = f"it was started with {old}, whose content has changed since"
    else:
        started = f"it was started with {old}"
    raise ValueError(
        f"--mhce-code-table {new} is not the code table of the checkpoint being resumed ({checkpoint}; "
        f"{started}): a run keeps the table it started with. Resume without --mhce-code-table (the checkpoint "
        f"brings its table), or train with the new table in a new --save-dir."
    )


def _started_with(checkpoint: str) -> Optional[str]:
    """How the checkpoint's saved config chose its code table
    (``--mhce-code-table PATH`` or ``--mhce-code-order ORDER``); None when
    it cannot be read.  Only called to word a refusal."""
    try:
        state = load_checkpoint_mapped(PathManager.get_local_path(checkpoint))  # its config: tensors not read
        model = _saved_model_config(state)
        if model is None:
            return None
        table = cfg_get(model, "mhce_code_table")
        if table not in (None, "", "None"):
            return f"--mhce-code-table {table}"
        order = cfg_get(model, "mhce_code_order")
        return f"--mhce-code-order {order}" if order not in (None, "") else None
    except Exception:  # a best effort: the refusal stands without it
        return None


CODE_SETTINGS = ("mhce_code_order", "mhce_code_seed")


def _saved_model_config(state):
    """The saved model config of a checkpoint's state (``cfg.model``, or
    the legacy ``args``); None when it has none."""
    cfg = state.get("cfg") if isinstance(state, dict) else None
    model = cfg_get(cfg, "model") if cfg is not None else None
    return model if model is not None else (state.get("args") if isinstance(state, dict) else None)


# the model whose Trainer.load_checkpoint is reading the checkpoint it resumes,
# and what check_resumed_state saw of it (see code_table_settled)
_RESUMING = contextvars.ContextVar("fairseq_mhce_resuming", default=None)


def check_resumed_state(state) -> None:
    """A checkpoint state that fairseq just read (``load_checkpoint_to_cpu``):
    while ``Trainer.load_checkpoint`` resumes a multi-head model
    (:func:`code_table_settled`), one of another tie layout is refused as
    soon as it is read (fairseq's own load would replace the reason by
    "Cannot load model parameters"), and its saved model config is kept for
    :func:`keep_started_code_settings`; a no-op otherwise."""
    resuming = _RESUMING.get()
    if resuming is None:
        return
    model, seen = resuming
    params = state.get("model") if isinstance(state, dict) else None
    theirs = checkpoint_tie_layout(params) if isinstance(params, dict) else None
    mine = model_tie_layout(model)
    if theirs is not None and theirs != mine:
        raise RuntimeError(tie_layout_error(theirs, mine))
    seen["model_cfg"] = _saved_model_config(state)


def keep_started_code_settings(model_cfg, saved_cfg, checkpoint: str) -> None:
    """A resumed run keeps the code table of its checkpoint, whatever
    ``--mhce-code-order`` / ``--mhce-code-seed`` it is given now: put the
    values it was started with back into ``model_cfg`` (the config saved in
    its next checkpoints) and say so in one line."""
    if model_cfg is None or saved_cfg is None:
        return
    old = {k: cfg_get(saved_cfg, k) for k in CODE_SETTINGS}
    new = {k: cfg_get(model_cfg, k) for k in CODE_SETTINGS}
    changed = [k for k in CODE_SETTINGS if old[k] is not None and new[k] is not None and str(old[k]) != str(new[k])]
    if not changed:
        return
    for k in changed:
        cfg_set(model_cfg, k, old[k])

    def flags(values):
        return " ".join(f"--{k.replace('_', '-')} {values[k]}" for k in CODE_SETTINGS if values[k] is not None)

    logger.info(
        f"mhce: resuming {checkpoint}, which keeps the code table it was started with ({flags(old)}): "
        f"{flags(new)} given now change nothing and are not saved in its checkpoints (a new table needs a "
        f"new --save-dir)"
    )


@contextlib.contextmanager
def code_table_settled(trainer, filename: str):
    """Around ``Trainer.load_checkpoint(filename)`` (fairseq's own load runs
    in the block): a multi-head model that resumes ``filename`` has its
    checkpoint checked as it is read (:func:`check_resumed_state`) and its
    code settings kept (:func:`check_resumed_table`,
    :func:`keep_started_code_settings`); one that starts from scratch gets
    its pending code table first (:func:`settle_code_table`).  Any other
    model: nothing."""
    head, settings = _head_and_settings(trainer._model)
    if head is None:
        yield
        return
    if PathManager.isfile(filename):
        before = None if head.codec.pending_table else head.codec.code.detach().cpu().clone()
        seen = {}
        token = _RESUMING.set((trainer._model, seen))
        try:
            yield
        finally:
            _RESUMING.reset(token)
        check_resumed_table(head, settings, before, filename)
        keep_started_code_settings(getattr(trainer.cfg, "model", None), seen.get("model_cfg"), filename)
        return
    settle_code_table(
        trainer._model,
        trainer.task,
        trainer.cfg.checkpoint.save_dir if not trainer.cfg.checkpoint.no_save else None,
        trainer.cfg.dataset.train_subset,
        trainer.data_parallel_rank,
        trainer.data_parallel_world_size,
        trainer.data_parallel_process_group if trainer.data_parallel_world_size > 1 else None,
    )
    yield
