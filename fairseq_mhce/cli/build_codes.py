"""Build a learned code table for the multi-head output layer.

The table maps every type of a data-bin's target dictionary to its code (the
digits the heads predict); a model uses it with ``--mhce-code-table PATH``.
Similar tokens get the same prefix (the same head-1 group, ...) and a digit
of a head below the first means one thing under every prefix.  See
``fairseq_mhce/modules/balanced_grouping.py`` for the algorithm and
``fairseq_mhce/modules/code_table.py`` for the file format.

Token vectors (``--source``):

``ppmi`` (default)
    Co-occurrence of the target tokens of the binarized training split
    (``train.SRC-TGT.TGT``) within ``--window`` positions, PPMI, truncated SVD
    to ``--dim`` dimensions.  Needs nothing but the data-bin.
``checkpoint``
    A trained fairseq model's vectors (``--checkpoint PATH``): ``--vectors
    output`` (default) the per-token output vectors (a softmax or MHS
    model's projection, a per-token MHE model's last head, a tied model's
    shared embedding), ``--vectors input`` the decoder's input embedding
    (any model); always in token order.  The checkpoint must have been
    trained with the data-bin's target dictionary (the plugin's dictionary
    fingerprint, else the dictionary of the data-bin its config names; a
    warning when neither can be checked).

Types that never occur in the training targets (the source-only pieces of
a joint dictionary) get the highest codes by default (``--unseen last``), so
they fill groups of their own.

Head sizes: ``--head-sizes 90,90``, or ``--heads H`` (default 2) for the same
balanced sizes the model picks from ``--mhce-heads H``.  The output file is
never overwritten.

Example::

    mhce-build-codes --databin work/bible-de-en/bin --heads 2 \\
        --source ppmi --out work/codes/ppmi_h2.json

(``python -m fairseq_mhce.cli.build_codes`` is the same command.)

Exit status 2 with a one-line message on bad input (missing data-bin or
dictionary, truncated training data, head sizes too small or heads that
would always predict 0, --dim / --window below 1, existing --out, a
truncated checkpoint or one of another dictionary).
"""

import argparse
import gc
import glob
import json
import math
import os
import re
import struct
import sys
import time

import numpy as np
from fairseq.data import Dictionary

from fairseq_mhce.cfg_access import cfg_get
from fairseq_mhce.codes import ppmi as ppmi_codes
from fairseq_mhce.codes import table as ct
from fairseq_mhce.codes.checkpoint_vectors import checkpoint_state, checkpoint_vectors, read_checkpoint
from fairseq_mhce.codes.grouping import digit_coherence
from fairseq_mhce.codes.ppmi import split_prefix, training_targets
from fairseq_mhce.config import check_shortlist
from fairseq_mhce.models.transformer_mhce import FINGERPRINT_KEY, check_head_sizes, dictionary_fingerprint
from fairseq_mhce.modules.codec import auto_head_sizes, parse_head_sizes

PROG = "mhce-build-codes"


class UsageError(Exception):
    """Bad input: reported in one message, exit status 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Build a learned code table (token -> code) for fairseq_mhce's --mhce-code-table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--databin", required=True, help="fairseq data-bin (dict.TGT.txt, train.SRC-TGT.TGT.{bin,idx})")
    p.add_argument("--target-lang", default=None, help="target language (default: from the data-bin)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--head-sizes", default=None, help="comma-separated head sizes, e.g. 90,90 (product >= V)")
    g.add_argument(
        "--heads",
        type=int,
        default=None,
        help="number of heads; balanced sizes as the model's --mhce-heads (default 2)",
    )
    p.add_argument("--source", choices=("ppmi", "checkpoint"), default="ppmi", help="where the token vectors come from")
    p.add_argument("--checkpoint", default=None, help="fairseq checkpoint for --source checkpoint")
    p.add_argument("--vectors", choices=("output", "input"), default="output", help="which checkpoint vectors")
    p.add_argument("--dim", type=int, default=64, help="ppmi: SVD dimensions")
    p.add_argument("--window", type=int, default=2, help="ppmi: co-occurrence window (each side)")
    p.add_argument(
        "--unseen",
        choices=("last", "cluster"),
        default="last",
        help="types that never occur in the training targets (e.g. source-only pieces of a joint "
        "dictionary): 'last' gives them the highest codes, so they fill groups of their own; "
        "'cluster' groups them like the others",
    )
    p.add_argument(
        "--shortlist",
        type=int,
        default=0,
        help="for an MHP model with --mhce-shortlist N: the N most frequent types (ids 0..N-1) get the codes "
        "V-N..V-1 and the other types are grouped, balanced, on the codes 0..V-N-1",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True, help="output JSON (never overwritten)")
    return p.parse_args(argv)


def detect_langs(databin, target_lang=None):
    """(source_lang, target_lang) of a data-bin: the target from the argument,
    else prepare_data.json, else the train.SRC-TGT.TGT.idx files.  A target
    that is the source side of the binarized pair (``train.TGT-SRC.TGT``,
    trained with ``-s SRC -t TGT``) is read from there, as fairseq does."""
    pairs, reverse = [], []
    for f in sorted(glob.glob(os.path.join(glob.escape(databin), "train.*-*.*.idx"))):
        m = re.fullmatch(r"train\.([^.]+)-([^.]+)\.([^.]+)\.idx", os.path.basename(f))
        if m and m.group(3) == m.group(2):
            pairs.append((m.group(1), m.group(2)))
        elif m and m.group(3) == m.group(1):
            reverse.append((m.group(2), m.group(1)))
    if target_lang is None:
        meta = os.path.join(databin, "prepare_data.json")
        if os.path.isfile(meta):
            try:
                with open(meta) as f:
                    info = json.load(f)
            except (OSError, ValueError):
                info = {}
            if not isinstance(info, dict) or not isinstance(info.get("target_lang"), (str, type(None))):
                raise UsageError(
                    f"{meta} is not the prepare_data.json that mhce-prepare-data writes (a JSON object whose "
                    f"target_lang is a string; this one holds {str(json.dumps(info))[:80]}): pass --target-lang, "
                    f"or move the file away"
                )
            target_lang = info.get("target_lang")
    if target_lang is None:
        tgts = sorted({t for _, t in pairs})
        if len(tgts) == 1:
            target_lang = tgts[0]
        elif not tgts:
            dicts = sorted(glob.glob(os.path.join(glob.escape(databin), "dict.*.txt")))
            raise UsageError(
                f"cannot tell the target language of {databin}: no train.SRC-TGT.TGT.idx there "
                f"(dictionaries: {', '.join(os.path.basename(d) for d in dicts) or 'none'}); pass --target-lang"
            )
        else:
            raise UsageError(f"{databin} holds several language pairs {pairs}; pass --target-lang")
    srcs = sorted({s for s, t in pairs if t == target_lang}) or sorted({s for s, t in reverse if t == target_lang})
    return (srcs[0] if srcs else None), target_lang


def training_sequences(databin, src, tgt, dictionary):
    """The binarized training targets as a list of int arrays."""
    prefix = split_prefix(databin, "train", src, tgt, tgt)  # as fairseq reads it
    why = None
    # fairseq's half-built dataset objects complain from their destructors
    # about a damaged file ("Exception ignored in ... __del__"): the one
    # message below says it
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        try:
            seqs = training_targets(databin, src, tgt, dictionary)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        except (
            ValueError,
            AssertionError,
            OSError,
            EOFError,
            IndexError,
            struct.error,
        ) as e:  # a truncated .bin / .idx
            why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        if why is not None:
            gc.collect()
    finally:
        sys.unraisablehook = hook
    if why is not None:
        raise UsageError(
            f"cannot read the training targets {prefix}.{{bin,idx}} ({why}): the files are truncated or damaged "
            f"(an interrupted fairseq-preprocess or copy?); binarize the data again"
        )
    V = len(dictionary)
    flat = np.concatenate(seqs) if len(seqs) else np.zeros(0, np.int64)
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= V):
        raise UsageError(
            f"the training targets {prefix}.bin hold token ids outside [0, {V}) of "
            f"{os.path.join(databin, f'dict.{tgt}.txt')} (largest {int(flat.max())}): they were binarized with "
            f"another dictionary; binarize the data again"
        )
    return seqs


def check_checkpoint_dictionary(ckpt, path, dictionary, dict_path, tgt):
    """Refuse a checkpoint trained with another target dictionary than
    ``dict_path`` (its vectors would be the wrong words' vectors): by the
    plugin's dictionary fingerprint when the checkpoint has one, else by the
    ``dict.TGT.txt`` of the data-bin its config names (``cfg.task.data``)
    when that exists; else a warning that it cannot be checked."""
    state = checkpoint_state(ckpt, path)
    fp = state.get(f"decoder.{FINGERPRINT_KEY}")
    if fp is not None:
        try:
            saved = tuple(int(x) for x in fp.reshape(2, 2)[1].tolist())  # [[src size, hash], [tgt size, hash]]
        except Exception:
            raise UsageError(
                f"--checkpoint {path}: its decoder.{FINGERPRINT_KEY} is damaged (expected 2 x 2 numbers)"
            ) from None
        mine = tuple(int(x) for x in dictionary_fingerprint(dictionary))
        if saved != mine:
            raise UsageError(
                f"--checkpoint {path} was trained with another target dictionary than {dict_path} "
                f"({saved[0]} symbols there, {mine[0]} here"
                + (", same size but other symbols or another order" if saved[0] == mine[0] else "")
                + "): its vectors would belong to other words. Pass the data-bin the checkpoint was trained on "
                "(--databin), or a checkpoint trained on this one"
            )
        return
    cfg = cfg_get(ckpt, "cfg") if isinstance(ckpt, dict) else None
    task = cfg_get(cfg, "task") or (cfg_get(ckpt, "args") if isinstance(ckpt, dict) else None)
    data = cfg_get(task, "data")
    lang = cfg_get(task, "target_lang") or tgt
    theirs = os.path.join(str(data).split(os.pathsep)[0], f"dict.{lang}.txt") if data else None
    if theirs is None or not os.path.isfile(theirs):
        print(
            f"{PROG}: warning: cannot check that --checkpoint {path} was trained with the dictionary "
            f"{dict_path}: it holds no dictionary fingerprint (a plain fairseq checkpoint, or one of an older fairseq_mhce) and "
            + (
                f"the dictionary of the data-bin its config names ({theirs}) does not exist"
                if theirs
                else "its config names no data-bin"
            )
            + "; make sure it was trained on this data-bin",
            file=sys.stderr,
        )
        return
    if os.path.realpath(theirs) == os.path.realpath(dict_path):
        return
    if ct.dictionary_symbols(theirs) != ct.dictionary_symbols(dictionary):
        raise UsageError(
            f"--checkpoint {path} was trained on the data-bin {data} (its config), whose target dictionary {theirs} "
            f"is not {dict_path}: its vectors would belong to other words. Pass the data-bin the checkpoint was "
            f"trained on (--databin), or a checkpoint trained on this one"
        )


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    try:
        return run(args, t0)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def run(args, t0):
    databin = args.databin
    if os.path.lexists(args.out):
        raise UsageError(f"--out {args.out} already exists; a code table is never overwritten")
    if not os.path.isdir(databin):
        raise UsageError(f"no data-bin directory {databin}")
    for flag, value, what in (("--dim", args.dim, "SVD dimensions"), ("--window", args.window, "co-occurrence window")):
        if value < 1:
            raise UsageError(f"{flag} {value}: the {what} must be >= 1")
    src, tgt = detect_langs(databin, args.target_lang)
    dict_path = os.path.join(databin, f"dict.{tgt}.txt")
    if not os.path.isfile(dict_path):
        raise UsageError(f"no target dictionary {dict_path}")
    try:
        dictionary = Dictionary.load(dict_path)
    except Exception as e:  # a damaged dict.txt
        raise UsageError(f"cannot read the target dictionary {dict_path} ({type(e).__name__}: {e})") from None
    symbols = ct.dictionary_symbols(dictionary)
    V = len(symbols)
    try:
        sizes = parse_head_sizes(args.head_sizes, flag="--head-sizes")
        if sizes is None:
            sizes = auto_head_sizes(V, 2 if args.heads is None else args.heads, flag="--heads")
            # the model refuses balanced sizes with a head that always predicts digit 0
            check_head_sizes(sizes, V, explicit=False)
    except ValueError as e:
        raise UsageError(str(e).replace("--mhce-heads", "--heads")) from None
    if math.prod(sizes) < V:
        raise UsageError(
            f"the product of the head sizes {sizes} is {math.prod(sizes)}, below the target "
            f"dictionary size {V}: pass --head-sizes with product >= {V} (or --heads)"
        )
    meta = {
        "databin": os.path.abspath(databin),
        "target_lang": tgt,
        "source": args.source,
        "seed": args.seed,
    }
    seqs = None
    if src is not None:
        seqs = training_sequences(databin, src, tgt, dictionary)
    elif args.source == "ppmi":
        raise UsageError(
            f"no training targets train.SRC-{tgt}.{tgt}.idx (or train.{tgt}-SRC.{tgt}.idx) in {databin} "
            "(needed by --source ppmi)"
        )
    unseen, counts = None, None
    if seqs is not None:
        counts = np.bincount(np.concatenate(seqs).astype(np.int64), minlength=V) if seqs else np.zeros(V, int)
        unseen = np.flatnonzero(counts[4:] == 0) + 4
    try:
        S = check_shortlist(args.shortlist, V, flag="--shortlist")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if S and counts is None:
        raise UsageError(f"--shortlist needs the training targets train.SRC-{tgt}.{tgt}.idx in {databin}")
    if args.source == "ppmi":
        # the same implementation as the model's automatic table (--mhce-code-order ppmi)
        code, vectors, m = ppmi_codes.ppmi_code_table(
            seqs,
            V,
            sizes,
            seed=args.seed,
            shortlist=S,
            dim=args.dim,
            window=args.window,
            unseen_last=args.unseen == "last",
        )
        meta.update(m)
        meta["train_split"] = os.path.basename(ppmi_codes.split_prefix(databin, "train", src, tgt, tgt))
        what = f"ppmi (window {args.window}, dim {vectors.shape[1]}, {m['train_tokens']} training tokens)"
    else:
        if not args.checkpoint:
            raise UsageError("--source checkpoint needs --checkpoint PATH")
        try:
            ckpt = read_checkpoint(args.checkpoint)
            check_checkpoint_dictionary(ckpt, args.checkpoint, dictionary, dict_path, tgt)
            vectors = checkpoint_vectors(args.checkpoint, args.vectors, vocab_size=V, ckpt=ckpt)
        except ValueError as e:
            raise UsageError(str(e)) from None
        meta.update(checkpoint=os.path.abspath(args.checkpoint), vectors=args.vectors)
        what = f"checkpoint {args.vectors} vectors ({vectors.shape[1]} dims)"
    if args.source != "ppmi":
        code, m = ppmi_codes.codes_from_vectors(vectors, sizes, args.seed, counts, S, args.unseen == "last")
        meta.update(m)
    listed = ppmi_codes.shortlist_tokens(counts, S) if S else None
    t2 = time.time()
    skip = unseen if not S else np.union1d(listed, unseen if unseen is not None else []).astype(np.int64)
    learned = digit_coherence(vectors, code, sizes, skip=skip)
    ident = np.arange(V) if not S else ct.shortlist_code(np.arange(V), S, listed).numpy()
    identity = digit_coherence(vectors, ident, sizes, skip=skip)
    meta["coherence"] = {"learned": [round(x, 4) for x in learned], "identity": [round(x, 4) for x in identity]}
    try:
        ct.save_code_table(args.out, code, sizes, symbols, meta)
    except FileExistsError as e:
        raise UsageError(str(e)) from None
    short_msg = (
        (
            f"shortlist {S} (codes {V - S}..{V - 1}, {meta['shortlist_train_coverage']:.1%} of the "
            f"training targets); "
        )
        if S
        else ""
    )
    fmt = lambda xs: "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"  # noqa: E731
    print(
        f"wrote {args.out}: V={V} head sizes {sizes} from {what}, seed {args.seed}; "
        f"{short_msg}"
        f"{'' if unseen is None else f'{unseen.size} types unseen in training ({args.unseen}); '}"
        f"mean within-digit cosine per head {fmt(learned)} (identity codes {fmt(identity)}); "
        f"{time.time() - t0:.1f} s (table {t2 - t0:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
