"""Rewrite an MHS checkpoint as a plain fairseq ``transformer`` checkpoint.

An ``--mhce-method mhs`` model is an ordinary Transformer (its output layer
``decoder.mhce_head`` holds a ``V x d`` projection, ``proj``, and decodes
with the full softmax) plus the codec that defined the sampled groups in
training.  ``mhce-export`` drops everything plugin-specific so that stock
fairseq loads the result without ``--user-dir``:

* state dict: ``decoder.mhce_head.proj.weight`` becomes fairseq's
  ``decoder.output_projection.weight``; the codec buffers and the method id
  (``decoder.mhce_head.codec.*``, ``decoder.mhce_head.method_id``, or
  ``decoder.mhs_codec.*`` in checkpoints of the earlier layout) are dropped;
* saved config (``cfg`` and legacy ``args``): ``arch`` / ``_name``
  ``<arch>_mhce`` -> ``<arch>`` (``transformer_mhce`` -> ``transformer``),
  every ``mhce_*`` setting, ``common.user_dir``; the criterion becomes
  ``label_smoothed_cross_entropy`` (same ``--label-smoothing``);
* ``optimizer_history``: the criterion name, so that stock fairseq-train can
  also resume from it (the parameters, hence the optimizer state, are those
  of a plain Transformer, in the same order).

Usage::

    mhce-export checkpoints/checkpoint_best.pt plain.pt
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 fairseq-generate data-bin --path plain.pt ...

(stock fairseq on torch >= 2.6 needs ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
to load any checkpoint; with the plugin imported, fairseq reads checkpoints
with the plugin's safe loader instead, :mod:`fairseq_mhce.safe_load`).  The
output must be a new file: the command refuses to overwrite anything.
MHP / MHE checkpoints cannot be exported: they have no ``V x d`` projection.

The input is read with :mod:`fairseq_mhce.safe_load` (no code it carries is
run; one holding a type fairseq does not write is refused unless
``FAIRSEQ_MHCE_TRUST_CHECKPOINTS=1``).  Bad input -- a missing, empty,
truncated or foreign input, an MHP / MHE checkpoint, an existing output or
one under a file -- is one ``mhce-export: error: ...`` line, exit status 2,
nothing written.
"""

import argparse
import os
import pickle
import sys

import torch

from fairseq_mhce.cfg_access import cfg_delete, cfg_get, cfg_keys, cfg_set
from fairseq_mhce.checkpoint_io import checkpoint_problem
from fairseq_mhce.safe_load import UntrustedCheckpointError, load_checkpoint

PLAIN_CRITERION = "label_smoothed_cross_entropy"
PLAIN_CRITERION_CLASS = "LabelSmoothedCrossEntropyCriterion"
PLUGIN_CRITERIA = {"mhce_label_smoothed_cross_entropy": PLAIN_CRITERION}
HEAD_PREFIX = "decoder.mhce_head."
LEGACY_CODEC_PREFIX = "decoder.mhs_codec."
MHS_METHOD_ID = 3  # fairseq_mhce.modules.mhs.MultiHeadSampling.method_code
PROG = "mhce-export"


def plain_arch(arch: str) -> str:
    if not arch:
        raise ValueError("the checkpoint's config names no architecture")
    if arch.endswith("_mhce"):
        arch = arch[: -len("_mhce")]
    return arch


def _clean_model_cfg(model_cfg):
    """arch/_name -> the plain twin; drop mhce_* (in place)."""
    if model_cfg is None:
        return
    for key in ("arch", "_name"):
        if cfg_get(model_cfg, key) is not None:
            cfg_set(model_cfg, key, plain_arch(str(cfg_get(model_cfg, key))))
    for key in cfg_keys(model_cfg):
        if key.startswith("mhce_"):
            cfg_delete(model_cfg, key)
    # a legacy (flat) namespace also carries the common/criterion settings
    if cfg_get(model_cfg, "user_dir") is not None:
        cfg_set(model_cfg, "user_dir", None)
    crit = cfg_get(model_cfg, "criterion")
    if isinstance(crit, str) and crit in PLUGIN_CRITERIA:
        cfg_set(model_cfg, "criterion", PLUGIN_CRITERIA[crit])


def _method_of(state) -> str:
    cfg = state.get("cfg")
    for model_cfg in (cfg_get(cfg, "model"), state.get("args")):
        m = cfg_get(model_cfg, "mhce_method")
        if m is not None:
            return str(m)
    return ""


def export(state: dict) -> dict:
    """Turn a loaded MHS checkpoint dict into a plain Transformer one (in place)."""
    model = state["model"]
    method = _method_of(state)
    if not method and HEAD_PREFIX + "method_id" in model:
        method = "mhs" if int(model[HEAD_PREFIX + "method_id"]) == MHS_METHOD_ID else "mhp/mhe"
    if method != "mhs" and not any(k.startswith(LEGACY_CODEC_PREFIX) for k in model):
        raise ValueError(
            f"this is an --mhce-method {method or 'mhp/mhe'} checkpoint: its output layer is "
            "multi-head, with no V x d projection, so it has no plain-Transformer form. "
            "Only --mhce-method mhs checkpoints can be exported."
        )
    proj = model.pop(HEAD_PREFIX + "proj.weight", None)
    if proj is not None:
        model["decoder.output_projection.weight"] = proj
    if "decoder.output_projection.weight" not in model:
        raise ValueError("no V x d projection (decoder.mhce_head.proj.weight) in the checkpoint: not an MHS model")
    for k in [
        k for k in model if k.startswith((HEAD_PREFIX, LEGACY_CODEC_PREFIX)) or k == "decoder.mhce_dict_fingerprint"
    ]:
        del model[k]

    cfg = state.get("cfg")
    if cfg is not None:
        _clean_model_cfg(cfg_get(cfg, "model"))
        common = cfg_get(cfg, "common")
        if common is not None and cfg_get(common, "user_dir") is not None:
            cfg_set(common, "user_dir", None)
        crit = cfg_get(cfg, "criterion")
        if crit is not None and str(cfg_get(crit, "_name")) in PLUGIN_CRITERIA:
            cfg_set(crit, "_name", PLUGIN_CRITERIA[str(cfg_get(crit, "_name"))])
            for key in cfg_keys(crit):
                if key.startswith("mhce_"):
                    cfg_delete(crit, key)
    if state.get("args") is not None:
        _clean_model_cfg(state["args"])

    for entry in state.get("optimizer_history") or []:
        if str(entry.get("criterion_name", "")).startswith("MHCE"):
            entry["criterion_name"] = PLAIN_CRITERION_CLASS

    # nothing outside the tensors may still need the plugin to unpickle
    meta = {k: v for k, v in state.items() if k not in ("model", "last_optimizer_state")}
    if b"fairseq_mhce" in pickle.dumps(meta):
        raise RuntimeError("the exported config still references fairseq_mhce; please report this")
    return state


class ExportError(Exception):
    """A user-facing error: one ``mhce-export: error: ...`` line, exit status 2."""


def _check_output(output: str, input_path: str):
    """``output`` must be a new file whose folder exists or can be made."""
    if os.path.lexists(output) or os.path.abspath(output) == os.path.abspath(input_path):
        raise ExportError(f"{output} exists; refusing to overwrite it (choose a new file name)")
    folder = os.path.dirname(os.path.abspath(output))
    existing = folder
    while not os.path.exists(existing):  # the nearest folder above it that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ExportError(
            f"cannot write {output}: {existing} is a file, not a folder (choose an output path in a folder)"
        )


def _read_input(path: str) -> dict:
    """The checkpoint to export, read with the plugin's safe loader (no code it
    carries is run); :class:`ExportError` when it is missing, empty,
    truncated, not a fairseq checkpoint, or holds a type fairseq does not
    write (naming the opt-in ``FAIRSEQ_MHCE_TRUST_CHECKPOINTS=1``)."""
    if os.path.isdir(path):
        raise ExportError(
            f"{path} is a folder; give a checkpoint file (e.g. {os.path.join(path, 'checkpoint_best.pt')})"
        )
    if not os.path.isfile(path):
        raise ExportError(f"no checkpoint file {path}")
    try:
        state = load_checkpoint(path, map_location="cpu")
    except Exception as e:
        if isinstance(e, UntrustedCheckpointError) and e.types:
            raise ExportError(str(e)) from None
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ExportError(f"checkpoint {path} {problem}: it cannot be exported") from None
        why = (str(e).strip().splitlines() or [""])[0][:300]
        raise ExportError(f"{path} cannot be read as a checkpoint ({type(e).__name__}: {why})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ExportError(f"{path} is not a fairseq checkpoint (no 'model' state dict)")
    return state


def _write_new(state: dict, output: str):
    """torch.save to ``output``, created exclusively (never clobbers a file
    that appeared in the meantime); a failed write leaves no partial file."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        f = open(output, "xb")
    except FileExistsError:
        raise ExportError(f"{output} exists; refusing to overwrite it") from None
    except OSError as e:
        raise ExportError(f"cannot write {output} ({e.strerror or e})") from None
    try:
        with f:
            torch.save(state, f)
    except BaseException:
        try:
            os.unlink(output)
        except OSError:
            pass
        raise


def main(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="an --mhce-method mhs checkpoint (.pt)")
    p.add_argument("output", help="the plain transformer checkpoint to write (must not exist)")
    p.add_argument(
        "--no-optimizer-state",
        action="store_true",
        help="drop the optimizer state (smaller file; enough for decoding and for fine-tuning with --reset-optimizer)",
    )
    a = p.parse_args(argv)

    try:
        _check_output(a.output, a.input)
        state = _read_input(a.input)
        try:
            export(state)
        except ValueError as e:
            raise ExportError(str(e)) from None
        if a.no_optimizer_state:
            state["last_optimizer_state"] = None
        _write_new(state, a.output)
    except ExportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    arch = cfg_get(cfg_get(state.get("cfg"), "model"), "arch") or cfg_get(state.get("args"), "arch")
    print(f"wrote {a.output}: plain fairseq '{arch}' (load with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 on torch >= 2.6)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
