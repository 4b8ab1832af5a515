"""The experiment and data drivers refuse what would lose or silently change a
user's files (issue 24, items 3, 5, 6, 7, 9, 12, 13), through the real
scripts and console scripts, without training:

* scripts/benchmarks/compare.py: a missing --extend-from, or one equal to --workdir, is
  refused; methods absent from --extend-from are said to train from scratch;
  an existing method folder is never deleted (refused, or with --reuse an
  unfinished one set aside); train.sh's refusal is shown, not a traceback;
* mhce-prepare-data: a byte-order mark is no token and a stray carriage
  return splits no pair; --destdir / --workdir holding an input is refused even
  with --force; non-UTF-8 input names its file and line; empty valid / test
  splits are refused before fairseq-preprocess;
* mhce-average-checkpoints: plain fairseq checkpoints trained on two
  different dictionaries of one size are refused.

Every refusal checks the sha256 of every user file before and after.
"""

import json
import os
import subprocess
import sys

import pytest

from .utils import REPO, cli, tree_hashes, words_argv

pytestmark = pytest.mark.e2e  # compare.py, the recipes and the mhce-* tools on real files
SCRIPTS = REPO / "scripts" / "benchmarks"


def script(name, *args, cwd=None):
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def tool(name, *args):
    """One of the package's console scripts (mhce-*), run as every test runs
    them (:func:`tests.utils.cli`: its entry function, in this process);
    ``.stderr`` is what it wrote to stderr."""
    return cli(name, *args, check=False)


# ------------------------------------------------------------------ compare.py
def fake_databin(root):
    """A folder compare.py takes as a data-bin but train.sh refuses at once
    (no train.SRC-TGT.*.idx): no training ever starts."""
    databin = root / "bin"
    (databin / "raw").mkdir(parents=True)
    (databin / "raw" / "test.tgt").write_text("a b\n")
    return databin


def fake_run(savedir, finished=False, extra=()):
    """A method folder as train.sh + translate.sh leave it (checkpoints are
    placeholder bytes: nothing here loads them)."""
    savedir.mkdir(parents=True)
    (savedir / "checkpoint_last.pt").write_bytes(b"last " + savedir.name.encode())
    (savedir / "checkpoint_best.pt").write_bytes(b"best " + savedir.name.encode())
    log = "===== train.sh start 2025-01-01 00:00:00 UTC: train.sh =====\n| train_inner | epoch 001\n"
    (savedir / "train.log").write_text(log + ("done training in 12.0 seconds\n" if finished else ""))
    if finished:
        (savedir / "score.test.json").write_text(
            json.dumps({"bleu": 1.0, "chrf": 2.0, "bleu_signature": "s", "chrf_signature": "c"}) + "\n"
        )
    for name in extra:
        (savedir / name).write_text(f"the user's {name}\n")
    return savedir


def compare(tmp_path, databin, *args):
    return script(
        "compare.py",
        "--databin",
        databin,
        "--name",
        "t",
        "--out",
        tmp_path / "out",
        "--speed-batches",
        "0",
        "--max-update",
        "2",
        *args,
    )


def test_compare_extend_from_missing_dir_is_refused(tmp_path):
    """Item 5: --extend-from a folder that does not exist used to train from scratch."""
    databin = fake_databin(tmp_path)
    before = tree_hashes(tmp_path)
    missing = tmp_path / "no_such_run"
    p = compare(tmp_path, databin, "--workdir", tmp_path / "wd", "--extend-from", missing, "--methods", "mhp")
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"--extend-from {missing}: no such directory" in p.stderr
    assert "Traceback" not in p.stderr and "=== mhp: train" not in p.stdout
    assert tree_hashes(tmp_path) == before  # nothing written: no workdir, no tables
    assert sorted(os.listdir(tmp_path)) == ["bin"]


def test_compare_extend_from_says_which_methods_train_from_scratch(tmp_path):
    """Item 5: a method absent from OLD_WORKDIR trains from scratch, and says so."""
    databin = fake_databin(tmp_path)
    old = tmp_path / "old"
    fake_run(old / "mhp", finished=True)
    before = tree_hashes(old)
    p = compare(tmp_path, databin, "--workdir", tmp_path / "wd", "--extend-from", old, "--methods", "softmax,mhp")
    assert f"compare: {old / 'softmax'} has no checkpoint_last.pt: softmax is trained from scratch" in p.stdout, (
        p.stdout + p.stderr
    )
    assert p.returncode == 2  # then train.sh refuses the fake data-bin (item 13's message)
    assert tree_hashes(old) == before


def test_compare_refuses_an_existing_method_folder(tmp_path):
    """Item 7: compare.py used to rmtree WORKDIR/METHOD (checkpoints, logs, the
    user's files) without --reuse."""
    databin = fake_databin(tmp_path)
    wd = tmp_path / "wd"
    fake_run(wd / "softmax", finished=False, extra=["my_notes.txt"])
    fake_run(wd / "mhp", finished=True)
    (wd / "softmax.train.out").write_text("the earlier run's train.sh output\n")
    before = tree_hashes(tmp_path)
    p = compare(tmp_path, databin, "--workdir", wd, "--methods", "softmax,mhp")
    assert p.returncode == 2, p.stdout + p.stderr
    err = p.stderr
    assert f"{wd / 'softmax'} exists and is not empty" in err and f"{wd / 'mhp'} exists and is not empty" in err
    assert "--reuse" in err and "--extend-from" in err and "never deletes" in err
    assert "Traceback" not in err and "=== softmax: train" not in p.stdout
    assert tree_hashes(tmp_path) == before


def test_compare_extend_from_its_own_workdir_is_refused(tmp_path):
    """Item 7: --extend-from equal to --workdir deleted the very run it was to continue."""
    databin = fake_databin(tmp_path)
    wd = tmp_path / "wd"
    fake_run(wd / "mhp", finished=True, extra=["my_notes.txt"])
    before = tree_hashes(tmp_path)
    for extend in (wd, tmp_path / "wd" / ".." / "wd"):  # the same folder spelled another way too
        p = compare(tmp_path, databin, "--workdir", wd, "--extend-from", extend, "--methods", "mhp")
        assert p.returncode == 2, p.stdout + p.stderr
        assert "is --workdir itself" in p.stderr and "Traceback" not in p.stderr
        assert tree_hashes(tmp_path) == before


def test_compare_reuse_keeps_finished_and_sets_unfinished_aside(tmp_path):
    """Item 7: with --reuse an unfinished method folder was deleted and retrained;
    now it is renamed (every file kept) and the finished one is left alone."""
    databin = fake_databin(tmp_path)
    wd = tmp_path / "wd"
    fake_run(wd / "mhp", finished=True)
    fake_run(wd / "softmax", finished=False, extra=["my_notes.txt"])
    (wd / "softmax.train.out").write_text("the killed run's train.sh output\n")
    finished, unfinished = tree_hashes(wd / "mhp"), tree_hashes(wd / "softmax")
    unfinished["softmax.train.out"] = tree_hashes(wd / "softmax.train.out")[""]
    p = compare(tmp_path, databin, "--workdir", wd, "--methods", "mhp,softmax", "--reuse")
    assert f"compare: reusing {wd / 'mhp'}" in p.stdout, p.stdout + p.stderr
    aside = sorted(wd.glob("softmax.unfinished-*"))
    assert len(aside) == 1 and f"moved to {aside[0]}, softmax is trained from scratch" in p.stdout
    assert tree_hashes(aside[0]) == unfinished  # every file of the unfinished run, unchanged
    assert tree_hashes(wd / "mhp") == finished
    assert p.returncode == 2  # the fake data-bin: train.sh refuses the retraining


def test_compare_shows_train_sh_refusal_not_a_traceback(tmp_path):
    """Item 13: train.sh's reason was only in WORKDIR/METHOD.train.out, behind a
    CalledProcessError traceback."""
    databin = fake_databin(tmp_path)
    before = tree_hashes(databin)
    wd = tmp_path / "wd"
    p = compare(tmp_path, databin, "--workdir", wd, "--methods", "softmax")
    assert p.returncode == 2, p.stdout + p.stderr  # train.sh's own exit status
    assert "Traceback" not in p.stderr and "CalledProcessError" not in p.stderr
    assert "compare.py: error: train.sh failed (exit status 2)" in p.stderr
    assert f"the last lines of its log {wd / 'softmax.train.out'}" in p.stderr
    assert f"train.sh: {databin} has no train.SRC-TGT.*.idx" in p.stderr  # the reason itself
    assert tree_hashes(databin) == before


# ----------------------------------------------------------- mhce-prepare-data
def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def corpus(n=30):
    return [f"w{i % 7} w{i % 5} w{i % 3}" for i in range(n)]


def test_prepare_data_byte_order_mark_and_carriage_returns(tmp_path):
    """Item 6: a UTF-8 BOM became part of a dictionary token; a carriage return
    inside a line split one pair into two (Python's universal newlines)."""
    src, tgt = corpus(), corpus()
    src[4], tgt[4] = "a b\rc d", "e f\rg h"  # a stray CR in both sides of one pair
    write(tmp_path / "text" / "train.de", "\ufeff".encode() + "\n".join(src).encode() + b"\n")
    # the target: a BOM and Windows line ends
    write(tmp_path / "text" / "train.en", "\ufeff".encode() + "\r\n".join(tgt).encode() + b"\r\n")
    before = tree_hashes(tmp_path / "text")
    prefix = tmp_path / "text" / "train"
    p = tool("mhce-prepare-data", *words_argv(prefix, tmp_path / "bin", "--validpref", prefix))
    assert p.returncode == 0, p.stderr
    assert tree_hashes(tmp_path / "text") == before  # the inputs are only read
    info = json.loads((tmp_path / "bin" / "prepare_data.json").read_text())
    assert info["lines"] == {"train": len(src), "valid": len(src)}
    for lang, lines in (("de", src), ("en", tgt)):
        tokenized = (tmp_path / "bin-tok" / f"train.{lang}").read_text(encoding="utf-8").split("\n")[:-1]
        assert tokenized == [line.replace("\r", " ") for line in lines]  # one line per pair, aligned
        symbols = [line.split(" ")[0] for line in (tmp_path / "bin" / f"dict.{lang}.txt").read_text().splitlines()]
        assert not [s for s in symbols if "\ufeff" in s or "\r" in s], symbols
        assert "w0" in symbols  # the first line's first word, without the BOM
        # the sacreBLEU references: the same cleaned lines
        raw = (tmp_path / "bin" / "raw" / f"valid.{lang}").read_bytes()
        assert raw == "".join(line.replace("\r", " ") + "\n" for line in lines).encode()
    # a carriage return in one side only: it was "not parallel" (one line more)
    src[9] = "x\ry"
    write(tmp_path / "one" / "train.de", "\n".join(src).encode() + b"\n")
    write(tmp_path / "one" / "train.en", "\n".join(tgt).encode() + b"\n")
    p = tool("mhce-prepare-data", *words_argv(tmp_path / "one" / "train", tmp_path / "bin2"))
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "bin2" / "prepare_data.json").read_text())["lines"] == {"train": len(src)}


def test_prepare_data_force_refuses_a_destdir_holding_the_inputs(tmp_path):
    """Item 9: --force with --destdir (or --workdir) the folder of the input
    corpus deleted the training text it was reading."""
    src = "\n".join(corpus()) + "\n"
    write(tmp_path / "corpus" / "text" / "train.de", src.encode())
    write(tmp_path / "corpus" / "text" / "train.en", src.encode())
    write(tmp_path / "corpus" / "notes.txt", b"the user's notes\n")
    prefix = tmp_path / "corpus" / "text" / "train"
    before = tree_hashes(tmp_path)
    for extra in (
        ["--destdir", tmp_path / "corpus" / "text"],  # the inputs' own folder
        ["--destdir", tmp_path / "corpus"],  # a folder above it
        ["--destdir", tmp_path / "bin", "--workdir", tmp_path / "corpus"],  # the work folder
    ):
        argv = words_argv(prefix, tmp_path / "bin", "--force")
        p = tool("mhce-prepare-data", *argv, *extra)
        assert p.returncode == 2, p.stdout + p.stderr
        assert "contains the input file" in p.stderr and str(prefix) + ".de" in p.stderr
        assert "Traceback" not in p.stderr
        assert tree_hashes(tmp_path) == before


def test_prepare_data_non_utf8_names_file_and_line(tmp_path):
    """Item 12: a bare UnicodeDecodeError naming neither file nor line."""
    lines = corpus(6)
    write(tmp_path / "train.de", ("\n".join(lines[:2]) + "\n").encode() + b"Gr\xfc\xdfe\n")  # latin-1, line 3
    write(tmp_path / "train.en", ("\n".join(lines[:3]) + "\n").encode())
    before = tree_hashes(tmp_path)
    p = tool("mhce-prepare-data", *words_argv(tmp_path / "train", tmp_path / "bin"))
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"{tmp_path / 'train.de'}, line 3: not valid UTF-8" in p.stderr
    assert "Traceback" not in p.stderr
    assert tree_hashes(tmp_path) == before and not (tmp_path / "bin").exists()


@pytest.mark.parametrize("split", ["valid", "test"])
def test_prepare_data_refuses_an_empty_split(tmp_path, split):
    """Item 12: an empty valid file was binarized, and training then died with
    'cannot mmap an empty file'."""
    text = "\n".join(corpus()) + "\n"
    for lang in ("de", "en"):
        write(tmp_path / f"train.{lang}", text.encode())
        write(tmp_path / f"{split}.{lang}", b"")
        write(tmp_path / f"blank.{lang}", b"\n\n")
    before = tree_hashes(tmp_path)
    p = tool("mhce-prepare-data", *words_argv(tmp_path / "train", tmp_path / "bin", f"--{split}pref", tmp_path / split))
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"{split} set is empty" in p.stderr and f"--{split}pref" in p.stderr and "Traceback" not in p.stderr
    # only blank pairs: --drop-empty would leave the split empty
    p = tool(
        "mhce-prepare-data",
        *words_argv(tmp_path / "train", tmp_path / "bin", f"--{split}pref", tmp_path / "blank", "--drop-empty"),
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert "--drop-empty would leave nothing" in p.stderr
    assert tree_hashes(tmp_path) == before and not (tmp_path / "bin").exists()


# ---------------------------------------------------- mhce-average-checkpoints
def plain_checkpoint(path, databin, seed):
    """A checkpoint laid out as fairseq's (cfg as a plain dict, as
    checkpoint_utils.save_state writes it) of a stock transformer."""
    import torch

    g = torch.Generator().manual_seed(seed)
    v = len((databin / "dict.tgt.txt").read_text().splitlines()) + 4
    state = {
        "cfg": {
            "model": {"_name": "transformer_iwslt_de_en", "arch": "transformer_iwslt_de_en"},
            "task": {"_name": "translation", "data": str(databin), "source_lang": "src", "target_lang": "tgt"},
        },
        "model": {
            "encoder.embed_tokens.weight": torch.randn(v, 8, generator=g),
            "decoder.embed_tokens.weight": torch.randn(v, 8, generator=g),
            "decoder.output_projection.weight": torch.randn(v, 8, generator=g),
            "encoder.version": torch.tensor([3.0]),
        },
    }
    torch.save(state, path)
    return path


def test_average_refuses_plain_checkpoints_of_two_same_size_dictionaries(tmp_path):
    """Item 3: two plain checkpoints of different vocabularies of one size
    (same shapes) were averaged into a checkpoint of garbage."""
    words = [f"w{i}" for i in range(12)]
    for name, order in (("bin_a", words), ("bin_b", words[::-1]), ("bin_a_copy", words)):
        for lang in ("src", "tgt"):
            write(tmp_path / name / f"dict.{lang}.txt", "".join(f"{w} 1\n" for w in order).encode())
    a = plain_checkpoint(tmp_path / "a.pt", tmp_path / "bin_a", 1)
    b = plain_checkpoint(tmp_path / "b.pt", tmp_path / "bin_b", 2)
    before = tree_hashes(tmp_path)
    p = tool("mhce-average-checkpoints", "--inputs", a, b, "--output", tmp_path / "avg.pt")
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"{a} and {b} were trained with different dictionaries" in p.stderr
    assert f"{tmp_path / 'bin_a'}/dict.src.txt" in p.stderr and "Traceback" not in p.stderr
    assert tree_hashes(tmp_path) == before and not (tmp_path / "avg.pt").exists()
    # the same dictionary in another folder (a copied data-bin) is fine
    c = plain_checkpoint(tmp_path / "c.pt", tmp_path / "bin_a_copy", 3)
    p = tool("mhce-average-checkpoints", "--inputs", a, c, "--output", tmp_path / "avg.pt")
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "avg.pt").exists() and "warning" not in p.stderr
