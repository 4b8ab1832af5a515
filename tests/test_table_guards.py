"""Code-table guards (issue 24, items 1, 2, 3, 6, 11, 14), through the real
CLIs where the item is about one:

* resuming with another ``--mhce-code-table`` is refused, naming both tables,
  and writes nothing (item 1);
* a mistyped ``--mhce-code-table`` path is refused before training with the
  stock and the plugin's criterion, exit 1, a one-line reason (item 2);
* ``mhce-build-codes --source checkpoint`` refuses a checkpoint of
  another dictionary of the same size (item 3);
* ``--mhce-shortlist -5``, ``mhce-build-codes --window 0`` / ``--dim 0`` are
  refused (item 6);
* ``mhce-build-codes`` exits 2 with one line (no traceback) on truncated or
  foreign files, names its own flags, refuses useless heads, and reads a
  per-token MHE checkpoint's vectors in token order (item 11);
* malformed code-table fields name the file and the field (item 14).

Every failing case leaves the user's files (data-bin, tables, save dir,
checkpoints) byte-identical.  Tiny data, a few updates per run.
"""

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

from fairseq_mhce.cli import build_codes as build_codes_cli
from fairseq_mhce.codes import table as ct
from fairseq_mhce.codes.checkpoint_vectors import checkpoint_vectors

from .utils import (
    cli,
    fairseq_train,
    last_line,
    make_copy_data,
    make_dictionary,
    model_cfg,
    read_checkpoint,
    tree_hashes,
)

pytestmark = pytest.mark.e2e


def build_codes(*args, script=True):
    """mhce-build-codes: (exit status, stdout+stderr).  ``script``: as a user
    runs it (the console script, a process of its own); else its ``main`` in
    this process (the same code, without the seconds of a fresh fairseq
    import)."""
    args = [str(a) for a in args]
    if not script:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc = build_codes_cli.main(args)
        return rc, out.getvalue()
    p = cli("mhce-build-codes", *args, check=False, env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return p.returncode, p.stdout


def codes_from_checkpoint(databin, ckpt, out, *extra, script=True):
    """mhce-build-codes --source checkpoint (see :func:`build_codes`)."""
    return build_codes(
        "--databin", databin, "--source", "checkpoint", "--checkpoint", ckpt, "--out", out, *extra, script=script
    )


def train(data, save, *extra, updates=2, criterion="mhce_label_smoothed_cross_entropy", arch="transformer_mhce"):
    """fairseq-train on tiny data (the plugin's --user-dir for its own archs);
    returns the CompletedProcess (never checked)."""
    plugin = arch.endswith("mhce")
    return fairseq_train(
        data, save, *extra, updates=updates, arch=arch, criterion=criterion, plugin=plugin, check=False
    )


def refused(p, *needles):
    """A clean refusal: exit status 1 or 2 (not a crash), every needle in the
    output; returns the output."""
    assert p.returncode in (1, 2), (p.returncode, p.stdout[-3000:])
    for n in needles:
        assert n in p.stdout, (n, p.stdout[-3000:])
    return p.stdout


@pytest.fixture(scope="module")
def databin(tmp_path_factory):
    return make_copy_data(tmp_path_factory.mktemp("tables"), n_train=200, n_valid=20, n_test=20, n_words=40)


@pytest.fixture(scope="module")
def V(databin):
    return len(ct.dictionary_symbols(databin / "dict.tgt.txt"))


@pytest.fixture(scope="module")
def tables(databin, tmp_path_factory):
    """Two valid tables for the data-bin (2 heads): PPMI seeds 1 and 2."""
    root = tmp_path_factory.mktemp("codes")
    out = {}
    for seed in (1, 2):
        path = root / f"seed{seed}.json"
        rc, text = build_codes(
            "--databin", databin, "--heads", 2, "--dim", 8, "--seed", seed, "--out", path, script=False
        )
        assert rc == 0, text
        out[seed] = path
    assert json.loads(out[1].read_text())["code"] != json.loads(out[2].read_text())["code"]
    return out


@pytest.fixture(scope="module")
def mhe_run(databin, tables, tmp_path_factory):
    """A per-token MHE model trained 2 updates with table seed 1."""
    save = tmp_path_factory.mktemp("mhe")
    p = train(databin, save, "--mhce-method", "mhe", "--mhce-code-table", tables[1])
    assert p.returncode == 0, p.stdout[-3000:]
    return save


# ---------------------------------------------------------------- item 1
def test_resume_with_another_table_is_refused(databin, tables, mhe_run):
    before = {
        "save": tree_hashes(mhe_run),
        "data": tree_hashes(databin),
        "t1": tree_hashes(tables[1]),
        "t2": tree_hashes(tables[2]),
    }
    p = train(databin, mhe_run, "--mhce-method", "mhe", "--mhce-code-table", tables[2], updates=4)
    out = refused(p, str(tables[2]), str(tables[1]), "checkpoint_last.pt")
    assert "--mhce-code-table" in last_line(out), last_line(out)
    after = {
        "save": tree_hashes(mhe_run),
        "data": tree_hashes(databin),
        "t1": tree_hashes(tables[1]),
        "t2": tree_hashes(tables[2]),
    }
    assert after == before, "the refused run wrote a file"
    saved = read_checkpoint(mhe_run / "checkpoint_last.pt")
    assert saved["cfg"]["model"].mhce_code_table == str(tables[1])  # the saved config names the run's table
    assert saved["optimizer_history"][-1]["num_updates"] == 2


# ---------------------------------------------------------------- item 2
@pytest.mark.parametrize("criterion", ["label_smoothed_cross_entropy", "mhce_label_smoothed_cross_entropy"])
def test_missing_table_path_is_refused_before_training(databin, tables, tmp_path, criterion):
    save = tmp_path / "save"
    typo = tables[1].parent / "seed1.jsn"
    before = {"data": tree_hashes(databin), "tables": tree_hashes(tables[1].parent)}
    p = train(databin, save, "--mhce-method", "mhp", "--mhce-code-table", typo, criterion=criterion, updates=1)
    out = refused(p, str(typo), "no such file")
    assert str(typo) in last_line(out) and "no such file" in last_line(out), last_line(out)
    assert "begin training" not in out and "num_updates" not in out
    assert not list(save.glob("*.pt")) if save.exists() else True
    assert {"data": tree_hashes(databin), "tables": tree_hashes(tables[1].parent)} == before


# ---------------------------------------------------------------- item 6
def test_negative_shortlist_is_refused(databin, tmp_path):
    before = tree_hashes(databin)
    p = train(databin, tmp_path / "save", "--mhce-method", "mhp", "--mhce-shortlist", "-5", updates=1)
    out = refused(p, "--mhce-shortlist -5")
    assert "--mhce-shortlist -5" in last_line(out)
    assert not (tmp_path / "save").exists() or not list((tmp_path / "save").glob("*.pt"))
    assert tree_hashes(databin) == before


@pytest.mark.parametrize("flag,value", [("--window", 0), ("--window", -2), ("--dim", 0), ("--dim", -3)])
def test_build_codes_refuses_nonpositive_window_and_dim(databin, tmp_path, flag, value):
    before = tree_hashes(databin)
    out = tmp_path / "c.json"
    rc, text = build_codes("--databin", databin, flag, value, "--out", out)
    assert rc == 2, text
    assert f"{flag} {value}" in last_line(text) and "Traceback" not in text, text
    assert not out.exists() and tree_hashes(databin) == before


# ---------------------------------------------------------------- item 3
@pytest.fixture(scope="module")
def other_databin(databin, tmp_path_factory):
    """A data-bin whose target dictionary has the same size as ``databin``'s
    but other counts, so another order."""
    other = make_copy_data(tmp_path_factory.mktemp("other"), n_train=200, n_valid=20, n_test=20, n_words=40, seed=7)
    mine, theirs = (ct.dictionary_symbols(d / "dict.tgt.txt") for d in (databin, other))
    assert len(mine) == len(theirs) and mine != theirs
    return other


def test_checkpoint_of_another_dictionary_is_refused(databin, other_databin, mhe_run, tmp_path):
    """The plugin's checkpoint (dictionary fingerprint) of ``databin`` given
    with the data-bin ``other_databin`` of the same size."""
    ckpt = mhe_run / "checkpoint_last.pt"
    before = {"ckpt": tree_hashes(ckpt), "data": tree_hashes(other_databin)}
    out = tmp_path / "c.json"
    for vectors in ("input", "output"):
        rc, text = codes_from_checkpoint(other_databin, ckpt, out, "--vectors", vectors, script=vectors == "input")
        assert rc == 2, text
        line = last_line(text)
        assert "another target dictionary" in line and "same size" in line and str(ckpt) in line, text
        assert "Traceback" not in text and not out.exists()
    assert {"ckpt": tree_hashes(ckpt), "data": tree_hashes(other_databin)} == before
    # the data-bin it was trained on: accepted
    rc, text = codes_from_checkpoint(databin, ckpt, out, "--vectors", "input", script=False)
    assert rc == 0 and "warning" not in text, text


def test_plain_checkpoint_of_another_dictionary_is_refused(databin, other_databin, tmp_path):
    """A plain fairseq checkpoint has no fingerprint: the dictionary of the
    data-bin its config names is compared; none there: a warning."""
    save = tmp_path / "plain"
    p = train(databin, save, arch="transformer", criterion="label_smoothed_cross_entropy", updates=1)
    assert p.returncode == 0, p.stdout[-3000:]
    ckpt = save / "checkpoint_last.pt"
    before = {"ckpt": tree_hashes(ckpt), "data": tree_hashes(other_databin)}
    out = tmp_path / "c.json"
    rc, text = codes_from_checkpoint(other_databin, ckpt, out)
    assert rc == 2 and "Traceback" not in text, text
    line = last_line(text)
    assert str(databin) in line and str(other_databin / "dict.tgt.txt") in line and "is not" in line, line
    assert not out.exists() and {"ckpt": tree_hashes(ckpt), "data": tree_hashes(other_databin)} == before
    # the data-bin its config names is gone: built, with a warning
    V = len(ct.dictionary_symbols(other_databin / "dict.tgt.txt"))
    gone = tmp_path / "gone.pt"
    torch.save(
        {
            "cfg": {"task": {"data": str(tmp_path / "moved"), "target_lang": "tgt"}},
            "model": {"decoder.embed_tokens.weight": torch.randn(V, 8)},
        },
        gone,
    )
    rc, text = codes_from_checkpoint(other_databin, gone, out, "--vectors", "input", script=False)
    assert rc == 0, text
    assert "warning: cannot check" in text and str(tmp_path / "moved") in text, text


# ---------------------------------------------------------------- item 11
def one_line_refusal(rc, text, *needles):
    assert rc == 2, text
    assert "Traceback" not in text and "Exception ignored" not in text, text
    line = last_line(text)
    assert line.startswith("mhce-build-codes: error: "), text
    for n in needles:
        assert n in line, (n, line)
    return line


def test_build_codes_unreadable_checkpoint(databin, mhe_run, tmp_path):
    whole = (mhe_run / "checkpoint_last.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole[: len(whole) // 2])
    text_file = tmp_path / "notes.pt"
    text_file.write_text("not a checkpoint\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    table = tmp_path / "table.pt"  # a pickle, but not a checkpoint
    torch.save({"format": "x", "code": [1, 2]}, table)
    before = {"dir": tree_hashes(tmp_path), "data": tree_hashes(databin)}
    for bad in (cut, text_file, empty, table):
        out = tmp_path / "c.json"
        rc, text = codes_from_checkpoint(databin, bad, out, script=bad is cut)
        one_line_refusal(rc, text, str(bad))
        assert not out.exists()
    assert {"dir": tree_hashes(tmp_path), "data": tree_hashes(databin)} == before


def test_build_codes_truncated_training_data(databin, tmp_path):
    for name, keep in (("train.src-tgt.tgt.bin", 100), ("train.src-tgt.tgt.bin", 0), ("train.src-tgt.tgt.idx", 10)):
        copy = tmp_path / f"{name}-{keep}"
        shutil.copytree(databin, copy)
        f = copy / name
        f.write_bytes(f.read_bytes()[:keep])
        before = tree_hashes(copy)
        out = tmp_path / "c.json"
        rc, text = build_codes("--databin", copy, "--out", out, script=keep == 0)
        one_line_refusal(rc, text, "cannot read the training targets", str(copy / "train.src-tgt.tgt"))
        assert not out.exists() and tree_hashes(copy) == before


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--head-sizes", "9,x"], "--head-sizes must be comma-separated"),
        (["--head-sizes", "1,64"], "--head-sizes: every head needs at least 2"),
        (["--heads", "0"], "--heads must be >= 1"),
        (["--heads", "20"], "--heads 20 for a target dictionary of"),
    ],
)
def test_build_codes_names_its_own_head_flags(databin, tmp_path, args, needle):
    out = tmp_path / "c.json"
    rc, text = build_codes("--databin", databin, *args, "--out", out, script=False)
    line = one_line_refusal(rc, text, needle)
    assert "--mhce-" not in line, line
    assert not out.exists()


def test_build_codes_heads_like_the_model(databin, V, tmp_path):
    """--heads refuses the head count the model's --mhce-heads refuses (one
    more than max_useful_heads)."""
    from fairseq_mhce.models.transformer_mhce import build_output_layer, max_useful_heads

    too_many = max_useful_heads(V) + 1
    with pytest.raises(ValueError, match="always predict digit 0"):
        build_output_layer(model_cfg(mhce_heads=too_many), 8, make_dictionary(V))
    out = tmp_path / "c.json"
    rc, text = build_codes("--databin", databin, "--heads", too_many, "--out", out)
    line = one_line_refusal(rc, text, f"--heads {too_many} for a target dictionary of {V}", "always predict digit 0")
    assert "--mhce-" not in line and not out.exists()


def test_per_token_mhe_checkpoint_vectors(databin, V, mhe_run, tmp_path):
    """--vectors output of a per-token MHE checkpoint: its last head's
    vectors (rows in code order in the checkpoint), in token order."""
    ckpt = mhe_run / "checkpoint_last.pt"
    state = read_checkpoint(ckpt)["model"]
    code = state["decoder.mhce_head.codec.code"]
    rows = state["decoder.mhce_head.token_vectors"]
    assert rows.shape[0] > V and not torch.equal(code, torch.arange(V))  # padding rows, a learned table
    got = checkpoint_vectors(ckpt, "output", vocab_size=V)
    assert got.shape == (V, rows.shape[1])
    assert np.allclose(got, rows[code].numpy()), "row code[v] is token v"
    emb = state["decoder.embed_tokens.weight"]
    assert np.allclose(checkpoint_vectors(ckpt, "input", vocab_size=V), emb.numpy())  # untied: token order
    out = tmp_path / "from_mhe.json"
    rc, text = codes_from_checkpoint(databin, ckpt, out, "--vectors", "output", script=False)
    assert rc == 0, text
    assert json.loads(out.read_text())["meta"]["vectors"] == "output"


def test_tied_checkpoint_vectors_in_token_order(databin, V, tables, tmp_path):
    """A tied per-token MHE checkpoint keeps the shared embedding in code
    order: both --vectors read it back in token order."""
    save = tmp_path / "tied"
    p = train(
        databin,
        save,
        "--mhce-method",
        "mhe",
        "--mhce-code-table",
        tables[2],
        "--share-decoder-input-output-embed",
        updates=1,
    )
    assert p.returncode == 0, p.stdout[-3000:]
    ckpt = save / "checkpoint_last.pt"
    state = read_checkpoint(ckpt)["model"]
    assert "decoder.mhce_head.tied_output" in state and "decoder.mhce_head.token_vectors" not in state
    code = state["decoder.mhce_head.codec.code"]
    emb = state["decoder.embed_tokens.weight"]
    assert not torch.equal(code, torch.arange(V))
    for which in ("output", "input"):
        assert np.allclose(checkpoint_vectors(ckpt, which, vocab_size=V), emb[code].numpy()), which


# ---------------------------------------------------------------- item 14
BAD_FIELDS = [
    ("head_sizes", lambda o: dict(o, head_sizes=[o["head_sizes"][0], "x"])),
    ("vocab_size", lambda o: dict(o, vocab_size="sixty")),
    ("code", lambda o: dict(o, code=o["code"][:5] + ["a"] + o["code"][6:])),
    ("code", lambda o: dict(o, code=o["code"][:5] + [5.5] + o["code"][6:])),
    ("code", lambda o: dict(o, code="0 1 2")),
    ("meta", lambda o: dict(o, meta="ppmi")),
    ("meta.shortlist", lambda o: dict(o, meta={"shortlist": "many"})),
]


def write_bad(tables, tmp_path, i):
    field, spoil = BAD_FIELDS[i]
    obj = json.loads(tables[1].read_text())
    path = tmp_path / f"bad{i}.json"
    path.write_text(json.dumps(spoil(obj)))
    return field, path, obj


@pytest.mark.parametrize("i", range(len(BAD_FIELDS)))
def test_malformed_table_fields_name_file_and_field(tables, V, tmp_path, i):
    field, path, obj = write_bad(tables, tmp_path, i)
    for read in (lambda: ct.read_code_table(path), lambda: ct.load_code_table(path, V, obj["head_sizes"])):
        with pytest.raises(ValueError) as e:
            read()
        msg = str(e.value)
        assert str(path) in msg and f"field {field!r}" in msg, msg


def test_null_meta_is_no_metadata(databin, tables, V, tmp_path):
    """ "meta": null reads as {} (no shortlist recorded): the model's build
    with a shortlist lays the table out itself instead of failing."""
    from fairseq.data import Dictionary

    from fairseq_mhce.models.transformer_mhce import build_output_layer

    obj = json.loads(tables[1].read_text())
    path = tmp_path / "null_meta.json"
    path.write_text(json.dumps(dict(obj, meta=None)))
    assert ct.read_code_table(path)["meta"] == {}
    assert ct.load_code_table(path, V, obj["head_sizes"]).tolist() == obj["code"]
    cfg = model_cfg(mhce_method="mhp", mhce_code_table=str(path), mhce_shortlist=8)
    head = build_output_layer(cfg, 8, Dictionary.load(str(databin / "dict.tgt.txt")))
    assert head.codec.code[:8].tolist() == list(range(V - 8, V))  # the shortlist on the top codes


@pytest.mark.parametrize("i", [0, 1])
def test_train_with_malformed_table_names_file_and_field(databin, tables, tmp_path, i):
    field, path, _ = write_bad(tables, tmp_path, i)
    save = tmp_path / "save"
    before = {"data": tree_hashes(databin), "table": tree_hashes(path)}
    p = train(databin, save, "--mhce-method", "mhp", "--mhce-code-table", path, updates=1)
    out = refused(p)
    line = last_line(out)
    assert str(path) in line and f"field {field!r}" in line, line
    assert not save.exists() or not list(save.glob("*.pt"))
    assert {"data": tree_hashes(databin), "table": tree_hashes(path)} == before
