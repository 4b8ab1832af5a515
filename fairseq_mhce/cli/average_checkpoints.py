"""Average the parameters of several fairseq checkpoints into a new one.

fairseq's own ``scripts/average_checkpoints.py`` is not in its pip wheel; this
one (the console script ``mhce-average-checkpoints``) takes the same options
and also handles the plugin's checkpoints (``--user-dir fairseq_mhce``)::

    mhce-average-checkpoints --inputs A.pt B.pt C.pt --output avg.pt
    mhce-average-checkpoints --inputs SAVEDIR --num-update-checkpoints 5 --output avg.pt
    mhce-average-checkpoints --inputs SAVEDIR --num-epoch-checkpoints 5 --output avg.pt

``--num-update-checkpoints N`` takes the N newest ``checkpoint_E_U.pt`` of
SAVEDIR (written with ``--save-interval-updates``; keep them with
``--keep-interval-updates``), ``--num-epoch-checkpoints N`` the N newest
``checkpoint<E>.pt`` (``--checkpoint-upper-bound`` caps U or E).

Floating-point tensors are averaged (accumulated in float64, written in their
own dtype).  Every other tensor -- the multi-head output's code table and head
sizes (``decoder.mhce_head.codec.*``), ``method_id``, any integer or bool
buffer -- must be identical in every input and is written unchanged.  Inputs
that differ in their parameter names, shapes or dtypes, in such a buffer, or
in the architecture / output-layer method of their saved config, or in how
they share their embeddings (untied, ``--share-decoder-input-output-embed``,
``--share-all-embeddings``, read from the tensors) are an error
that names the files and the key.  Everything but the parameters (config,
optimizer state, ...) is copied from the first input, as fairseq's script
does.

Dictionaries: a plugin checkpoint records its dictionaries' fingerprint
(``decoder.mhce_dict_fingerprint``), so two trained on different vocabularies
are refused even when the sizes agree.  A plain fairseq checkpoint records no
dictionary: inputs whose saved config (``cfg.task.data``) names different
data-bins are refused when those data-bins' ``dict.*.txt`` differ (a warning
when they cannot be read); inputs that name the same data-bin are taken to
share its dictionary -- a data-bin rebuilt in place between them, with other
words of the same count, cannot be detected.

The inputs are only read, with the plugin's safe loader
(:mod:`fairseq_mhce.safe_load`: no code a checkpoint carries is run; one that
holds a type fairseq does not write is refused unless
``FAIRSEQ_MHCE_TRUST_CHECKPOINTS=1``); an existing ``--output`` is never
overwritten.  Decode the result as any checkpoint (with ``--user-dir`` for a
plugin architecture).
"""

import argparse
import collections
import os
import re
import sys
from pathlib import Path

import torch

from fairseq_mhce.cfg_access import cfg_get
from fairseq_mhce.modules.tied_embedding import TIE_LAYOUT_FLAGS, checkpoint_tie_layout

PROG = "mhce-average-checkpoints"


class AverageError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def checkpoint_paths(inputs, num, update_based, upper_bound=None):
    """The ``num`` newest update (``checkpoint_E_U.pt``) or epoch
    (``checkpoint<E>.pt``) checkpoints of the one directory in ``inputs``."""
    if len(inputs) != 1 or not os.path.isdir(inputs[0]):
        raise AverageError(
            "--num-update-checkpoints / --num-epoch-checkpoints need --inputs to be one directory, "
            f"got {' '.join(inputs)}"
        )
    folder = inputs[0]
    pattern = re.compile(r"checkpoint_\d+_(\d+)\.pt" if update_based else r"checkpoint(\d+)\.pt")
    found = []
    for name in os.listdir(folder):
        m = pattern.fullmatch(name)
        if m and (upper_bound is None or int(m.group(1)) <= upper_bound):
            found.append((int(m.group(1)), name))
    kind = "checkpoint_EPOCH_UPDATE.pt" if update_based else "checkpointEPOCH.pt"
    if num < 1:
        raise AverageError(f"the number of checkpoints to average must be >= 1, got {num}")
    if len(found) < num:
        raise AverageError(
            f"{folder} has {len(found)} {kind} file(s)"
            + (f" at or below {upper_bound}" if upper_bound is not None else "")
            + f" but {num} were asked for"
            + ("" if not found else f": {', '.join(n for _, n in sorted(found))}")
            + (
                " (train with --save-interval-updates N --keep-interval-updates K)"
                if update_based
                else " (train without --no-epoch-checkpoints, with --keep-last-epochs K)"
            )
        )
    return [os.path.join(folder, name) for _, name in sorted(found, reverse=True)[:num]]


def _load(path, mapped=False):
    """The checkpoint ``path``, read with the plugin's safe loader; ``mapped``:
    its tensors memory-mapped (an input after the first is only compared and
    summed: its optimizer state is never read from disk)."""
    if not os.path.isfile(path):
        raise AverageError(f"no checkpoint file {path}")
    # torch, omegaconf: imported when a checkpoint is read, not for --help
    from fairseq_mhce.safe_load import UntrustedCheckpointError, load_checkpoint, load_checkpoint_mapped

    try:
        # runs no code the file carries
        state = load_checkpoint_mapped(path) if mapped else load_checkpoint(path, map_location="cpu")
    except Exception as e:
        if isinstance(e, UntrustedCheckpointError) and e.types:
            raise AverageError(str(e)) from None
        raise AverageError(f"{path} cannot be read as a checkpoint ({type(e).__name__}: {str(e)[:300]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise AverageError(f"{path} is not a fairseq checkpoint (no 'model' state dict)")
    return state


def _model_identity(state):
    """(architecture, output-layer method) from a checkpoint's saved config."""
    model = cfg_get(state.get("cfg"), "model") or state.get("args")
    arch = cfg_get(model, "arch") or cfg_get(model, "_name")
    method = cfg_get(model, "mhce_method") if str(arch).endswith("_mhce") else None
    return arch, method


FINGERPRINT_KEY = "decoder.mhce_dict_fingerprint"  # fairseq_mhce's record of its dictionaries


def _dictionaries(state):
    """(data-bin, {dict file name: its symbols in order, or None if unreadable})
    of the data a plain fairseq checkpoint was trained on, from its saved
    config (``cfg.task`` or the legacy ``args``: ``data``, ``source_lang``,
    ``target_lang``); (None, {}) when the config names no data."""
    task = cfg_get(state.get("cfg"), "task") or state.get("args")
    data = cfg_get(task, "data")
    if not data:
        return None, {}
    data = str(data).split(os.pathsep)[0]  # sharded data: fairseq reads the dictionaries from the first
    langs = [x for x in (cfg_get(task, "source_lang"), cfg_get(task, "target_lang")) if x]
    names = (
        [f"dict.{x}.txt" for x in langs]
        if langs
        else (sorted(n for n in os.listdir(data) if re.fullmatch(r"dict\..+\.txt", n)) if os.path.isdir(data) else [])
    )
    out = {}
    for name in names:
        try:
            with open(os.path.join(data, name), encoding="utf-8") as f:
                out[name] = [line.split(" ")[0].rstrip("\n") for line in f]
        except (OSError, UnicodeDecodeError):
            out[name] = None
    return data, out


def _check_same_dictionaries(first_path, first_state, path, state):
    """Plain fairseq checkpoints store no dictionary: same-size dictionaries
    give same-shape embeddings.  When the two saved configs name different
    data-bins, their dict.*.txt files (if still there) must hold the same
    symbols in the same order; plugin checkpoints carry their own fingerprint
    (compared with the other integer buffers)."""
    if FINGERPRINT_KEY in first_state["model"] or FINGERPRINT_KEY in state["model"]:
        return
    data_a, dicts_a = _dictionaries(first_state)
    data_b, dicts_b = _dictionaries(state)
    if data_a is None or data_b is None or os.path.realpath(data_a) == os.path.realpath(data_b):
        return  # the same files now; what they held at training time is not recorded
    unknown = []
    for name in sorted(set(dicts_a) | set(dicts_b)):
        a, b = dicts_a.get(name), dicts_b.get(name)
        if a is None or b is None:
            unknown.append(name)
        elif a != b:
            diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise AverageError(
                f"{first_path} and {path} were trained with different dictionaries: {data_a}/{name} and "
                f"{data_b}/{name} differ ({len(a)} vs {len(b)} lines; first difference at line {diff + 1}). "
                "Same-shape embeddings of two vocabularies are different words; only checkpoints of one "
                "run (one data-bin) can be averaged"
            )
    if unknown:
        print(
            f"{PROG}: warning: {first_path} was trained on {data_a}, {path} on {data_b}; "
            f"{', '.join(unknown)} cannot be read in both, so it is not known whether their dictionaries "
            "are the same (only the parameter shapes were checked)",
            file=sys.stderr,
        )


def _describe_buffer_mismatch(key, a, b):
    if key.endswith("mhce_dict_fingerprint"):
        sides = [s for s, x, y in zip(("source", "target"), a.tolist(), b.tolist()) if x != y]
        return f"the {' and '.join(sides)} dictionaries differ (the checkpoints' dictionary fingerprints)"
    if key.endswith("codec.head_sizes"):
        return f"the head sizes differ ({','.join(map(str, a.tolist()))} vs {','.join(map(str, b.tolist()))})"
    if key.endswith(("codec.code", "codec.token")):
        n = int((a != b).sum()) if a.shape == b.shape else "?"
        return f"the code tables differ ({n} of {a.numel()} entries)"
    if key.endswith("method_id"):
        return f"the output-layer methods differ (method_id {int(a)} vs {int(b)})"
    return "the values differ"


def average_checkpoints(paths):
    """The first checkpoint's state with ``model`` replaced by the average of
    all ``paths`` (float tensors) and their common non-float tensors."""
    if not paths:
        raise AverageError("no input checkpoints")
    first_path, new_state = paths[0], None
    sums, fixed, meta = collections.OrderedDict(), {}, {}
    for path in paths:
        state = _load(path, mapped=new_state is not None)
        params = state["model"]
        if new_state is None:
            new_state = state
            keys = list(params)
            ident = _model_identity(state)
            layout = checkpoint_tie_layout(params)
            for k, v in params.items():
                if torch.is_tensor(v):
                    meta[k] = (tuple(v.shape), v.dtype)
                    if torch.is_floating_point(v):
                        sums[k] = v.detach().to(torch.float64).clone()
                    else:
                        fixed[k] = v.detach().clone()
                else:
                    fixed[k] = v
            continue
        other = _model_identity(state)
        if other != ident:
            raise AverageError(
                f"{path} is a model of --arch {other[0]}"
                + (f" --mhce-method {other[1]}" if other[1] else "")
                + f" but {first_path} of --arch {ident[0]}"
                + (f" --mhce-method {ident[1]}" if ident[1] else "")
                + "; only checkpoints of one run (one architecture and output layer) can be averaged"
            )
        _check_same_dictionaries(first_path, new_state, path, state)
        other_layout = checkpoint_tie_layout(params)
        if other_layout != layout:
            raise AverageError(
                f"{first_path} was trained with {TIE_LAYOUT_FLAGS.get(layout, 'no decoder embedding')}, {path} with "
                f"{TIE_LAYOUT_FLAGS.get(other_layout, 'no decoder embedding')}: their embeddings are laid out "
                "differently (a multi-head output shared with them stores the rows in code order); only "
                "checkpoints of one run (one tie layout) can be averaged"
            )
        if set(params) != set(keys):
            missing = sorted(set(keys) - set(params))
            extra = sorted(set(params) - set(keys))
            raise AverageError(
                f"{path} and {first_path} hold different parameters: "
                + (f"missing in {path}: {', '.join(missing[:10])}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"only in {path}: {', '.join(extra[:10])}" if extra else "")
            )
        for k in keys:
            v = params[k]
            if not torch.is_tensor(v) or k not in meta:
                if torch.is_tensor(v) != (k in meta) or (not torch.is_tensor(v) and v != fixed[k]):
                    raise AverageError(f"key {k}: {path} and {first_path} differ")
                continue
            shape, dtype = meta[k]
            if tuple(v.shape) != shape or v.dtype != dtype:
                raise AverageError(
                    f"key {k}: {path} has shape {tuple(v.shape)} {v.dtype}, {first_path} has {shape} {dtype}"
                )
            if k in sums:
                sums[k] += v.detach().to(torch.float64)
            elif not torch.equal(v, fixed[k]):
                raise AverageError(
                    f"key {k}: {_describe_buffer_mismatch(k, fixed[k], v)} between {first_path} and {path}; "
                    f"a non-float tensor must be identical in every checkpoint averaged (different head "
                    f"sizes, code tables or methods are different models)"
                )
        del state, params
    n = len(paths)
    averaged = collections.OrderedDict()
    for k in keys:
        if k in sums:
            averaged[k] = (sums[k] / n).to(meta[k][1])
        else:
            averaged[k] = fixed[k]
    new_state["model"] = averaged
    return new_state


def save_new(state, output):
    """torch.save to ``output``, which must not exist (never overwritten, even
    if it appears while saving): written beside it, then hard-linked."""
    out = Path(output)
    if out.exists() or out.is_symlink():
        raise AverageError(f"{out} exists; it is not overwritten (choose another --output or remove it)")
    if not out.parent.is_dir():
        raise AverageError(f"the directory of --output {out} does not exist")
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        try:
            os.link(tmp, out)  # fails if out exists
        except FileExistsError:
            raise AverageError(f"{out} appeared while saving; it is not overwritten") from None
        except OSError:  # a file system without hard links
            if out.exists():
                raise AverageError(f"{out} appeared while saving; it is not overwritten") from None
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def main(argv=None):
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Average the parameters of fairseq checkpoints (plugin ones too) into a new checkpoint.",
        epilog="Dictionaries: plugin checkpoints are compared by their dictionary fingerprint. Plain fairseq "
        "checkpoints store no dictionary: when their saved configs name different data-bins, those "
        "data-bins' dict.*.txt must match (a warning if they cannot be read); two checkpoints that name "
        "the same data-bin are assumed to share it (a data-bin rebuilt in place in between cannot be "
        "detected).",
    )
    p.add_argument(
        "--inputs",
        required=True,
        nargs="+",
        help="checkpoint files, or one directory with --num-update-checkpoints / --num-epoch-checkpoints",
    )
    p.add_argument("--output", required=True, metavar="FILE", help="the averaged checkpoint (must not exist)")
    num = p.add_mutually_exclusive_group()
    num.add_argument(
        "--num-update-checkpoints",
        type=int,
        metavar="N",
        help="average the N newest checkpoint_EPOCH_UPDATE.pt in the --inputs directory",
    )
    num.add_argument(
        "--num-epoch-checkpoints",
        type=int,
        metavar="N",
        help="average the N newest checkpointEPOCH.pt in the --inputs directory",
    )
    p.add_argument(
        "--checkpoint-upper-bound",
        type=int,
        metavar="K",
        help="with --num-*-checkpoints: only checkpoints of update (epoch) <= K",
    )
    args = p.parse_args(argv)
    try:
        if (
            args.checkpoint_upper_bound is not None
            and args.num_update_checkpoints is None
            and args.num_epoch_checkpoints is None
        ):
            raise AverageError("--checkpoint-upper-bound needs --num-update-checkpoints or --num-epoch-checkpoints")
        paths = list(args.inputs)
        if args.num_update_checkpoints is not None:
            paths = checkpoint_paths(paths, args.num_update_checkpoints, True, args.checkpoint_upper_bound)
        elif args.num_epoch_checkpoints is not None:
            paths = checkpoint_paths(paths, args.num_epoch_checkpoints, False, args.checkpoint_upper_bound)
        elif any(os.path.isdir(x) for x in paths):
            raise AverageError("--inputs is a directory: give --num-update-checkpoints N or --num-epoch-checkpoints N")
        if len(set(map(os.path.realpath, paths))) < len(paths):
            print(
                f"{PROG}: warning: a checkpoint is given more than once " "(it gets that much more weight)",
                file=sys.stderr,
            )
        out = Path(args.output)
        if out.exists() or out.is_symlink():  # before the (slow) loading
            raise AverageError(f"{out} exists; it is not overwritten (choose another --output or remove it)")
        print(f"averaging {len(paths)} checkpoints: {' '.join(paths)}", flush=True)
        state = average_checkpoints(paths)
        save_new(state, out)
    except AverageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the average of {len(paths)} checkpoints to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
