"""Turn a plain-text parallel corpus into a fairseq data-bin.

Input files follow fairseq-preprocess's naming: ``PREFIX.SRC`` / ``PREFIX.TGT``
for each of ``--trainpref`` (required), ``--validpref`` and ``--testpref``,
one untokenized sentence per line, line *i* of the source aligned with line
*i* of the target.

Two tokenizers:

``--tokenizer spm`` (default)
    Train a sentencepiece model on the training data (one shared model with
    ``--joint``, else one per language), encode every split to pieces under
    ``--workdir`` and binarize with fairseq-preprocess.  The fairseq
    dictionary is written from the sentencepiece vocabulary and passed as
    ``--srcdict``/``--tgtdict``, so its size is exactly ``--vocab-size`` (+1
    for fairseq's ``<pad>``) and does not depend on what the training data
    happens to contain.

``--tokenizer moses-word``
    Word-level vocabulary (for very large output vocabularies): sacremoses
    tokenization (no escaping, case kept), then fairseq-preprocess keeps the
    ``--vocab-size`` most frequent types per side (0 keeps all of them).

The destination directory gets the binarized data, the dictionaries, the
sentencepiece model(s) (``spm.model`` or ``spm.SRC.model``/``spm.TGT.model``),
the untokenized valid/test text under ``raw/`` (references for sacreBLEU) and
``prepare_data.json`` describing the run.

A non-empty ``--destdir`` (or ``--workdir``) is never overwritten without
``--force``; everything is built in hidden sibling directories and renamed
into place only once all steps succeeded, so a failed run leaves the previous
data untouched and nothing half-written.  A ``--destdir`` or ``--workdir``
that contains an input file is refused even with ``--force``.

Inputs must be UTF-8 (otherwise: an error naming the file and line, exit 2).
Lines end at ``\\n`` only (``\\r\\n`` too); a byte-order mark at the start of a
line is removed and a carriage return inside a line becomes a space, so
neither becomes a token nor splits a pair (the rest of the pipeline then reads
cleaned copies).  Empty splits and pairs with an empty side are refused (see
``--drop-empty``) before fairseq-preprocess runs.

Example::

    mhce-prepare-data --source-lang de --target-lang en \\
        --trainpref text/train --validpref text/valid --testpref text/test \\
        --destdir work/bin --vocab-size 8000 --joint --workers 4

From Python, :func:`prepare` takes the same arguments and returns the
summary (it raises :class:`DataError` on bad input); :func:`main` is the
command (exit status 2 and one line on bad input).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPLITS = ("train", "valid", "test")
# Symbols fairseq's Dictionary adds by itself (bos, pad, eos, unk); they must
# not appear in a dictionary file or fairseq would index them twice.
FAIRSEQ_SPECIALS = {"<s>", "<pad>", "</s>", "<unk>"}
MIN_VOCAB = 10
PROG = "mhce-prepare-data"


class DataError(Exception):
    """Bad input or a failed step; the message is meant for the user."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-s", "--source-lang", required=True, help="file suffix of the source, e.g. de")
    p.add_argument("-t", "--target-lang", required=True, help="file suffix of the target, e.g. en")
    p.add_argument("--trainpref", required=True, help="files PREFIX.SRC and PREFIX.TGT")
    p.add_argument("--validpref", help="optional validation split prefix")
    p.add_argument("--testpref", help="optional test split prefix")
    p.add_argument("--destdir", required=True, help="the fairseq data-bin to create")
    p.add_argument(
        "--workdir",
        help="where tokenized text (and the spm model) go; "
        "default: DESTDIR's sibling DESTDIR-spm (or DESTDIR-tok for moses-word)",
    )
    p.add_argument("--tokenizer", choices=("spm", "moses-word"), default="spm")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=8000,
        help="spm: pieces per model; moses-word: types kept per side (0 = all)",
    )
    p.add_argument("--joint", action="store_true", help="one vocabulary (and spm model) shared by source and target")
    p.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "char", "word"), help="spm model type")
    p.add_argument(
        "--character-coverage", type=float, default=1.0, help="spm; 1.0 suits alphabetic scripts, 0.9995 CJK"
    )
    p.add_argument(
        "--spm-max-sentences",
        type=int,
        default=2_000_000,
        help="spm input_sentence_size: sentences sampled for training (0 = all)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of spm's sentence sampling, for reproducible models")
    p.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, os.cpu_count() or 1)),
        help="processes for tokenization and fairseq-preprocess",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty DESTDIR / WORKDIR")
    p.add_argument(
        "--drop-empty",
        action="store_true",
        help="drop line pairs whose source or target is empty (after stripping white "
        "space) from every split; without it such pairs are an error",
    )
    p.add_argument("--quiet", action="store_true", help="hide fairseq-preprocess's log")
    return p


# --------------------------------------------------------------------------
# input checks


BOM = "\ufeff"
BOM_BYTES = BOM.encode("utf-8")


def clean_line(text: str) -> str:
    """One input line as every step sees it: its newline (``\\n`` or ``\\r\\n``)
    and a UTF-8 byte-order mark at its start removed (it would become a
    dictionary token), any other carriage return made a space (Python's and
    fairseq's universal newlines would split the line there, one pair
    becoming two)."""
    if text.endswith("\n"):
        text = text[:-1]
    if text.endswith("\r"):
        text = text[:-1]
    return text.lstrip(BOM).replace("\r", " ")


def _decode(path, i: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}, line {i}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
            f"{PROG} reads UTF-8 text only: convert the file (e.g. iconv -f latin1 -t utf-8) and run again"
        ) from None


def iter_lines(path):
    """The lines of a UTF-8 text file, split on ``\\n`` only and cleaned
    (:func:`clean_line`).  A line that is not valid UTF-8 is a DataError
    naming the file and the line."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            yield clean_line(_decode(path, i, raw))


def scan_file(path: Path) -> tuple:
    """(lines, needs cleaning): the line count as every later step sees it
    (fairseq's binarizer reads the cleaned text), and whether the file holds a
    carriage return or a byte-order mark, which the file as it is would carry
    into sentencepiece training and the raw/ references.  Not valid UTF-8: a
    DataError naming the line."""
    n, dirty = 0, False
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            _decode(path, n, raw)
            dirty = dirty or b"\r" in raw or BOM_BYTES in raw
    return n, dirty


def count_lines(path: Path) -> int:
    return scan_file(path)[0]


def empty_pairs(paths) -> list[int]:
    """0-based numbers of the lines that are blank in any of the parallel files."""
    return [
        i for i, lines in enumerate(zip(*(iter_lines(p) for p in paths))) if any(not line.strip() for line in lines)
    ]


LANGUAGE_NAME = re.compile(r"\w[\w-]*")


def check_language_name(flag: str, lang: str) -> None:
    """A language name is a file-name suffix (``PREFIX.LANG``, and fairseq's
    ``train.SRC-TGT.LANG.bin``): letters, digits, ``_`` and ``-`` only, so
    that it names no other folder and no other file."""
    if not LANGUAGE_NAME.fullmatch(lang or ""):
        raise DataError(
            f"{flag} {lang!r}: a language name is the suffix of the input files and of fairseq's "
            f"train.SRC-TGT.LANG files, so it may hold letters, digits, '_' and '-' only (no '/', '.' or "
            f"spaces), e.g. de"
        )


def check_inputs(args) -> dict:
    """Validate arguments and files; return {split: (prefix, n_lines)}.

    Sets ``args.empty_pairs`` to {split: [0-based line numbers]} of the pairs
    with an empty side (only non-empty lists; only with --drop-empty), and
    ``args.needs_cleaning`` to the splits whose files hold a carriage return or
    a byte-order mark (:func:`clean_line`; build() works on cleaned copies)."""
    for flag, lang in (("--source-lang", args.source_lang), ("--target-lang", args.target_lang)):
        check_language_name(flag, lang)
    if args.source_lang == args.target_lang:
        raise DataError(f"source and target language are both {args.source_lang!r}")
    if args.tokenizer == "spm" and args.vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size {args.vocab_size} is too small (minimum {MIN_VOCAB})")
    if args.tokenizer == "moses-word" and (0 < args.vocab_size < MIN_VOCAB or args.vocab_size < 0):
        raise DataError(f"--vocab-size {args.vocab_size} is too small (minimum {MIN_VOCAB}, or 0 = all types)")
    splits, empties, dirty = {}, {}, set()
    for split, prefix in zip(SPLITS, (args.trainpref, args.validpref, args.testpref)):
        if prefix is None:
            continue
        paths = [Path(f"{prefix}.{lang}") for lang in (args.source_lang, args.target_lang)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"{split} input file(s) not found: {', '.join(missing)}")
        (n_src, dirty_src), (n_tgt, dirty_tgt) = (scan_file(p) for p in paths)
        if n_src != n_tgt:
            raise DataError(
                f"{split} files are not parallel: {paths[0]} has {n_src} lines " f"but {paths[1]} has {n_tgt}"
            )
        if split == "train" and n_src == 0:
            raise DataError(f"training set is empty: {paths[0]} and {paths[1]} have no lines")
        if n_src == 0:  # fairseq-preprocess would write it, and training die on "cannot mmap an empty file"
            raise DataError(
                f"{split} set is empty: {paths[0]} and {paths[1]} have no lines; give files with at least one "
                f"line pair, or leave out --{split}pref"
            )
        # An empty source has nothing to translate and an empty reference
        # scores nothing; fairseq would binarize both without a word.
        empty = empty_pairs(paths)
        if empty and not getattr(args, "drop_empty", False):
            shown = ", ".join(str(i + 1) for i in empty[:5]) + (", ..." if len(empty) > 5 else "")
            raise DataError(
                f"{split}: {len(empty)} line pair(s) of {paths[0]} / {paths[1]} have an empty side "
                f"(line {shown}); remove them from both files, or pass --drop-empty to drop them"
            )
        if len(empty) == n_src:
            raise DataError(
                f"{split}: every one of the {n_src} line pair(s) of {paths[0]} / {paths[1]} has an empty side; "
                f"--drop-empty would leave nothing (give non-empty files, or leave out --{split}pref)"
            )
        if empty:
            empties[split] = empty
        if dirty_src or dirty_tgt:
            dirty.add(split)
        splits[split] = (prefix, n_src)
    args.empty_pairs = empties
    args.needs_cleaning = dirty
    return splits


def check_inputs_outside(splits: dict, langs, outputs: dict) -> None:
    """No input file may lie inside (at any depth) a directory this run
    replaces (--destdir, --workdir): --force would delete the text being read."""
    for what, out in outputs.items():
        outs = {Path(out).absolute(), Path(out).resolve()}
        for prefix, _ in splits.values():
            for lang in langs:
                path = Path(f"{prefix}.{lang}")
                if any(o in p.parents for o in outs for p in (path.absolute(), path.resolve())):
                    raise DataError(
                        f"{what} {out} contains the input file {path}; replacing {what} (--force) would delete "
                        f"it. Give a {what} outside the folders of the input files (or move the inputs out "
                        f"of {out}); nothing was changed"
                    )


def check_output_dir(path: Path, what: str, force: bool) -> None:
    if path.exists() and not path.is_dir():
        raise DataError(f"{what} {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise DataError(f"{what} {path} exists and is not empty; pass --force to replace it " "(it is left untouched)")


# --------------------------------------------------------------------------
# tokenization


def read_lines(path: Path) -> list[str]:
    """The cleaned lines of a UTF-8 file (:func:`iter_lines`)."""
    return list(iter_lines(path))


def write_lines(path: Path, lines) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


def train_spm(inputs: list[Path], model_prefix: Path, args) -> Path:
    import sentencepiece as spm  # only the sentencepiece tokenizer needs it

    # Without a fixed seed spm samples its training sentences differently
    # each run, and the vocabulary (hence every id) changes.
    spm.set_random_generator_seed(args.seed)
    try:
        spm.SentencePieceTrainer.train(
            input=[str(p) for p in inputs],
            model_prefix=str(model_prefix),
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            input_sentence_size=args.spm_max_sentences,
            shuffle_input_sentence=True,
            num_threads=args.workers,
            minloglevel=2,  # spm is very chatty on stderr
        )
    except (RuntimeError, OSError) as e:
        files = ", ".join(map(str, inputs))
        raise DataError(f"sentencepiece training on {files} failed: {e}") from e
    # Not with_suffix(): "spm.de" + ".model" must not become "spm.model".
    return Path(f"{model_prefix}.model")


def spm_encode(model: Path, src: Path, dst: Path, workers: int) -> collections.Counter:
    """Encode one file to space-separated pieces; return piece counts."""
    import sentencepiece as spm  # only the sentencepiece tokenizer needs it

    sp = spm.SentencePieceProcessor(model_file=str(model))
    pieces = sp.encode(read_lines(src), out_type=str, num_threads=workers)
    write_lines(dst, (" ".join(p) for p in pieces))
    return collections.Counter(p for sent in pieces for p in sent)


def write_fairseq_dict(vocab_file: Path, counts: collections.Counter, dst: Path) -> int:
    """fairseq dict from an spm .vocab file (piece<TAB>score), in spm order.

    Counts are the pieces' frequencies in the encoded training data; fairseq
    only uses them for display, but 0 for a piece spm never emits is honest.
    """
    n = 0
    with open(vocab_file, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in f:
            piece = line.rstrip("\n").split("\t")[0]
            if piece in FAIRSEQ_SPECIALS:
                continue
            out.write(f"{piece} {counts.get(piece, 0)}\n")
            n += 1
    return n


def _moses_tokenize_chunk(job):
    from sacremoses import MosesTokenizer  # only the moses-word tokenizer needs it (in a worker)

    lang, lines = job
    tok = MosesTokenizer(lang=lang)
    # escape=False: keep & < > ' " as they are, fairseq has no use for XML entities.
    return [tok.tokenize(line, escape=False, return_str=True) for line in lines]


def moses_tokenize(src: Path, dst: Path, lang: str, workers: int) -> None:
    lines = read_lines(src)
    chunk = 2000
    jobs = [(lang, lines[i : i + chunk]) for i in range(0, len(lines), chunk)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing  # only for more than one worker

        with multiprocessing.Pool(min(workers, len(jobs))) as pool:
            out = pool.map(_moses_tokenize_chunk, jobs)
    else:
        out = [_moses_tokenize_chunk(j) for j in jobs]
    write_lines(dst, (line for part in out for line in part))


# --------------------------------------------------------------------------
# the steps


def run_preprocess(cmd_args: list[str], quiet: bool) -> None:
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", *cmd_args]
    out = subprocess.DEVNULL if quiet else None
    res = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE if quiet else None, text=True)
    if res.returncode != 0:
        detail = f":\n{res.stderr[-3000:]}" if quiet and res.stderr else ""
        raise DataError(f"fairseq-preprocess failed (exit {res.returncode}){detail}")


def dict_size(path: Path) -> int:
    """Size of the fairseq Dictionary in ``path``: its lines + the 4 specials."""
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f) + len(FAIRSEQ_SPECIALS)


def build(args, splits: dict, dest: Path, work: Path) -> dict:
    """Do all the work into the (temporary) directories dest and work."""
    src, tgt = args.source_lang, args.target_lang
    langs = (src, tgt)
    info: dict = {"tokenizer": args.tokenizer}
    splits = dict(splits)  # the caller's copy keeps naming the user's files
    dropped = getattr(args, "empty_pairs", {})
    dirty = getattr(args, "needs_cleaning", set())
    if dropped or dirty:
        # --drop-empty, or carriage returns / byte-order marks (clean_line): cleaned
        # (and filtered) copies of the inputs stand in for them from here on
        (work / "input").mkdir()
        for split in [s for s in splits if s in dropped or s in dirty]:
            prefix, n = splits[split]
            skip = set(dropped.get(split, ()))
            for lang in langs:
                kept = (line for i, line in enumerate(iter_lines(Path(f"{prefix}.{lang}"))) if i not in skip)
                write_lines(work / "input" / f"{split}.{lang}", kept)
            splits[split] = (str(work / "input" / split), n - len(skip))
            if skip:
                print(
                    f"| {split}: dropped {len(skip)} pair(s) with an empty side (--drop-empty)",
                    file=sys.stderr,
                    flush=True,
                )
            if split in dirty:
                print(
                    f"| {split}: byte-order marks removed, carriage returns inside lines made spaces "
                    f"(line ends \\r\\n read as \\n)",
                    file=sys.stderr,
                    flush=True,
                )
        if dropped:
            info["dropped_empty_pairs"] = {s: len(d) for s, d in dropped.items()}
        if dirty:
            info["cleaned_splits"] = sorted(dirty, key=SPLITS.index)
    info["lines"] = {s: n for s, (_, n) in splits.items()}

    # Untokenized references, so BLEU can be computed on detokenized output.
    raw = dest / "raw"
    raw.mkdir()
    for split in ("valid", "test"):
        if split in splits:
            for lang in langs:
                shutil.copyfile(f"{splits[split][0]}.{lang}", raw / f"{split}.{lang}")

    pre = [
        "--source-lang",
        src,
        "--target-lang",
        tgt,
        "--destdir",
        str(dest),
        "--workers",
        str(args.workers),
        "--thresholdsrc",
        "0",
        "--thresholdtgt",
        "0",
    ]
    for split in splits:
        pre += [f"--{split}pref", str(work / split)]
    if args.joint:
        pre.append("--joined-dictionary")

    if args.tokenizer == "spm":
        train_files = {lang: Path(f"{splits['train'][0]}.{lang}") for lang in langs}
        # model name -> languages it serves
        groups = {"spm": langs} if args.joint else {f"spm.{lang}": (lang,) for lang in langs}
        models = {}
        for name, group in groups.items():
            t0 = time.time()
            model = train_spm([train_files[lang] for lang in group], work / name, args)
            print(
                f"| trained {name}.model on {'+'.join(group)} ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True
            )
            shutil.copyfile(model, dest / model.name)
            models[name] = model
            counts = collections.Counter()
            for lang in group:
                for split, (prefix, _) in splits.items():
                    c = spm_encode(model, Path(f"{prefix}.{lang}"), work / f"{split}.{lang}", args.workers)
                    if split == "train":
                        counts.update(c)
            write_fairseq_dict(work / f"{name}.vocab", counts, work / f"{name}.dict.txt")
        if args.joint:
            pre += ["--srcdict", str(work / "spm.dict.txt")]
        else:
            pre += ["--srcdict", str(work / f"spm.{src}.dict.txt"), "--tgtdict", str(work / f"spm.{tgt}.dict.txt")]
        info["spm_models"] = sorted(m.name for m in models.values())
    else:
        for split, (prefix, _) in splits.items():
            for lang in langs:
                moses_tokenize(Path(f"{prefix}.{lang}"), work / f"{split}.{lang}", lang, args.workers)
        n = str(args.vocab_size if args.vocab_size > 0 else -1)
        pre += ["--nwordssrc", n, "--nwordstgt", n]

    t0 = time.time()
    run_preprocess(pre, args.quiet)
    info["preprocess_seconds"] = round(time.time() - t0, 1)
    info["dict_sizes"] = {lang: dict_size(dest / f"dict.{lang}.txt") for lang in langs}
    return info


def default_workdir(dest: Path, tokenizer: str) -> Path:
    """DESTDIR-spm (or DESTDIR-tok) next to DESTDIR."""
    dest = Path(dest).absolute()
    return dest.with_name(dest.name + ("-spm" if tokenizer == "spm" else "-tok"))


def make_tmp_sibling(final: Path) -> Path:
    """An empty hidden directory next to ``final`` (same filesystem: rename works)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    # mkdtemp makes it 0700; the final directory should get the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an old final is removed only after that worked."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old)


def run(args) -> dict:
    """Prepare the data-bin described by parsed ``args``; return a summary."""
    t_start = time.time()
    dest = Path(args.destdir).absolute()
    work = Path(args.workdir).absolute() if args.workdir else default_workdir(dest, args.tokenizer)
    if work == dest or dest in work.parents or work in dest.parents:
        raise DataError(f"--workdir {work} and --destdir {dest} must not contain each other")
    splits = check_inputs(args)
    check_inputs_outside(splits, (args.source_lang, args.target_lang), {"--destdir": dest, "--workdir": work})
    check_output_dir(dest, "--destdir", args.force)
    check_output_dir(work, "--workdir", args.force)

    tmps = []
    try:
        for final in (dest, work):
            tmps.append(make_tmp_sibling(final))
        tmp_dest, tmp_work = tmps
        info = build(args, splits, tmp_dest, tmp_work)
        info.update(
            source_lang=args.source_lang,
            target_lang=args.target_lang,
            joint=args.joint,
            vocab_size=args.vocab_size,
            workdir=str(work),
            inputs={s: p for s, (p, _) in splits.items()},
        )
        with open(tmp_dest / "prepare_data.json", "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, sort_keys=True)
            f.write("\n")
        swap_into_place(tmp_work, work)
        swap_into_place(tmp_dest, dest)
        tmps = []
    finally:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)

    info["seconds"] = round(time.time() - t_start, 1)
    report(info, dest, work)
    return info


def report(info: dict, dest: Path, work: Path) -> None:
    src, tgt = info["source_lang"], info["target_lang"]
    print(f"data-bin:       {dest}")
    print(f"tokenized text: {work}")
    print("lines:          " + ", ".join(f"{s} {n}" for s, n in info["lines"].items()))
    print(
        "dictionaries:   "
        + ", ".join(f"dict.{lang}.txt {n}" for lang, n in info["dict_sizes"].items())
        + " symbols (with fairseq's <s> <pad> </s> <unk>)"
    )
    if (dest / "raw").is_dir() and any((dest / "raw").iterdir()):
        print(f"references:     {dest / 'raw'} (untokenized, for sacreBLEU)")
    if info["tokenizer"] == "spm":
        model = dest / ("spm.model" if info["joint"] else f"spm.{tgt}.model")
        print(f"spm models:     {', '.join(str(dest / m) for m in info['spm_models'])}")
        print(
            f"decode with:    fairseq-generate {dest} -s {src} -t {tgt} "
            f"--bpe sentencepiece --sentencepiece-model {model} ..."
        )
    else:
        print(f"decode with:    fairseq-generate {dest} -s {src} -t {tgt} --tokenizer moses ...")
    print(f"took {info['seconds']} s")


def prepare(argv=None) -> dict:
    """Parse ``argv`` (default: sys.argv) and run; return the summary, raise
    DataError on bad input."""
    return run(build_parser().parse_args(argv))


def main(argv=None) -> int:
    """The command: :func:`prepare`; exit status 2 and one line on bad input."""
    try:
        prepare(argv)
    except DataError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
