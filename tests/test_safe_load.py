"""Loading a checkpoint runs no code it carries, unless the user says it is
trusted (issue 30), and ``mhce-export``'s bad input (issue 30, defect 4).

* :mod:`fairseq_mhce.safe_load`: ``torch.load(weights_only=True)`` with an
  allow-list of the types fairseq and the plugin write; anything else is
  refused with an error naming the file, the type and the one opt-in,
  ``FAIRSEQ_MHCE_TRUST_CHECKPOINTS=1``.
* A crafted checkpoint (a real MHS checkpoint of the suite plus one object
  whose unpickling writes a marker file) through every entry point:
  ``fairseq-generate``, ``fairseq-interactive``, ``fairseq-train
  --restore-file``, the hub API, ``mhce-average-checkpoints``,
  ``mhce-export``, ``mhce-build-codes --source checkpoint`` and the recipes'
  save-dir check (``python -m fairseq_mhce.recipes.recipe_checks
  savedir-guard``, as ``scripts/recipes/train.sh`` runs it): none runs the
  payload, each names the type and the opt-in; with the opt-in, three of them (fairseq, a plugin
  tool, the recipe check) load it and the payload runs.
* Every kind of checkpoint the suite writes loads with the default: each
  method, decoder-tied and share-all layouts, ``--eval-bleu`` metrics (numpy
  arrays), a resumed run, a stock fairseq transformer with adaptive softmax
  (no --user-dir), an averaged and an exported checkpoint.
"""

import argparse
import os
import pickle
import subprocess
import sys

import pytest
import torch
from fairseq import checkpoint_utils

import fairseq_mhce  # noqa: F401  (routes fairseq's checkpoint reads through the safe loader)
from fairseq_mhce import safe_load
from fairseq_mhce.checkpoint_io import TEMP_NAME
from fairseq_mhce.cli import export as export_cli
from fairseq_mhce.safe_load import TRUST_ENV, UntrustedCheckpointError, load_checkpoint

from .utils import (
    MICRO_ARCH,
    REPO,
    SHARED_MODELS,
    TINY_ARCH,
    TRAIN_COMMON,
    USER_DIR,
    cli,
    read_checkpoint,
    run_in_process,
)

PAYLOAD = "tests.test_safe_load._leave_marker"  # the type the refusals must name


def _leave_marker(path):
    """What the crafted checkpoint runs when it is unpickled without the
    allow-list: writes ``path``; returns a harmless value, so that a trusted
    load goes on with a valid checkpoint."""
    with open(path, "a") as f:
        f.write("payload ran\n")
    return {"payload": "ran"}


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_leave_marker, (self.marker,))


def craft(src, dst, marker):
    """``src`` (a real checkpoint) plus the payload in its extra state."""
    state = read_checkpoint(src)
    state["extra_state"]["mhce_payload"] = Payload(marker)
    torch.save(state, dst)
    return dst


@pytest.fixture(autouse=True)
def no_trust(monkeypatch):
    """Every test starts without the opt-in (and without torch's overrides)."""
    for var in (TRUST_ENV, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD"):
        monkeypatch.delenv(var, raising=False)


# --------------------------------------------------------------------------
# the loader
# --------------------------------------------------------------------------
def test_allow_list_is_the_types_fairseq_writes():
    names = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in safe_load.allowed_globals()}
    for name in (
        "argparse.Namespace",
        "omegaconf.dictconfig.DictConfig",
        "omegaconf.listconfig.ListConfig",
        "omegaconf.base.ContainerMetadata",
        "omegaconf.base.Metadata",
        "omegaconf.nodes.AnyNode",
        "typing.Any",
        "collections.defaultdict",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy.dtypes.Float64DType",
        "numpy.dtypes.Int64DType",
    ):
        assert name in names, name
    # data types only: nothing that runs code or reaches the system, no object arrays
    risky = ("os.", "posix.", "sys.", "subprocess.", "builtins.eval", "builtins.exec", "builtins.getattr",
             "builtins.__import__", "builtins.object", "numpy.dtypes.ObjectDType", "functools.", "operator.")  # fmt: skip
    assert not [n for n in names if n.startswith(risky)], names
    builtin = sorted(n for n in names if n.startswith("builtins."))
    assert builtin == ["builtins.dict", "builtins.int", "builtins.list"], builtin


def test_crafted_pickle_refused_with_its_type_and_the_opt_in(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    before = set(torch.serialization.get_safe_globals())
    for legacy in (False, True):
        torch.save(
            {"model": {"w": torch.zeros(2)}, "x": Payload(marker)}, path, _use_new_zipfile_serialization=not legacy
        )
        with pytest.raises(UntrustedCheckpointError) as e:
            load_checkpoint(path)
        assert not marker.exists()
        msg = str(e.value)
        assert f"checkpoint {path} holds {PAYLOAD}" in msg and f"{TRUST_ENV}=1" in msg, msg
        assert e.value.types == [PAYLOAD] and e.value.path == str(path)
        assert isinstance(e.value, pickle.UnpicklingError)
        with open(path, "rb") as f:  # an open file (as fairseq passes it) is named too
            with pytest.raises(UntrustedCheckpointError, match=f"checkpoint {path} holds {PAYLOAD}"):
                load_checkpoint(f)
    assert set(torch.serialization.get_safe_globals()) == before  # the allow-list is added only while loading
    # a plain torch.load in the same process keeps torch's default: it refuses an argparse.Namespace
    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "ns.pt")
    assert load_checkpoint(tmp_path / "ns.pt")["args"].a == 1
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "ns.pt")
    # the opt-in: weights_only=False, the payload runs
    for value in ("1", "true", "yes"):
        monkeypatch.setenv(TRUST_ENV, value)
        assert load_checkpoint(path)["x"] == {"payload": "ran"} and marker.exists()
        marker.unlink()
    monkeypatch.setenv(TRUST_ENV, "0")
    with pytest.raises(UntrustedCheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_garbage_is_not_reported_as_a_type(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\xff" + os.urandom(4096))  # 0xff: no pickle opcode, so no type can be read from it
    with pytest.raises(Exception) as e:
        load_checkpoint(junk)
    assert not getattr(e.value, "types", None)  # no type named: damaged, not crafted


# --------------------------------------------------------------------------
# mhce-export's bad input (issue 30, defect 4): one error line, exit 2
# --------------------------------------------------------------------------
def mhs_like(path):
    state = {
        "model": {"decoder.mhce_head.proj.weight": torch.zeros(4, 2), "decoder.embed_tokens.weight": torch.ones(4, 2)},
        "cfg": {"model": argparse.Namespace(arch="transformer_mhce", _name="transformer_mhce", mhce_method="mhs")},
        "extra_state": {},
    }
    torch.save(state, path)
    return path


def run_export(capsys, *args):
    code = export_cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("case", ["missing", "empty", "random", "truncated", "folder", "crafted"])
def test_export_bad_input_is_one_error_line(tmp_path, capsys, case):
    src = tmp_path / "in.pt"
    whole = mhs_like(tmp_path / "whole.pt")
    if case == "empty":
        src.write_bytes(b"")
    elif case == "random":
        src.write_bytes(b"\xff" + os.urandom(5000))
    elif case == "truncated":
        src.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    elif case == "folder":
        src = tmp_path
    elif case == "crafted":
        state = torch.load(whole, weights_only=False)
        state["extra_state"]["x"] = Payload(tmp_path / "marker")
        torch.save(state, src)
    out = tmp_path / "out.pt"
    code, text = run_export(capsys, src, out)
    lines = text.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mhce-export: error: "), text
    assert "Traceback" not in text and not out.exists() and not (tmp_path / "marker").exists()
    expect = {
        "missing": f"no checkpoint file {src}",
        "empty": "is empty (0 bytes)",
        "random": "is truncated or not a checkpoint",
        "truncated": "is truncated or not a checkpoint",
        "folder": "is a folder",
        "crafted": f"holds {PAYLOAD}",
    }[case]
    assert expect in lines[0], lines[0]


def test_export_output_under_a_file_or_existing(tmp_path, capsys):
    src = mhs_like(tmp_path / "whole.pt")
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    for out, expect in (
        (blocker / "plain.pt", f"{blocker} is a file, not a folder"),
        (blocker / "sub" / "plain.pt", f"{blocker} is a file, not a folder"),
        (blocker, "exists; refusing to overwrite it"),
        (src, "exists; refusing to overwrite it"),
    ):
        code, text = run_export(capsys, src, out)
        lines = text.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expect in lines[0], text
    assert blocker.read_text() == "a file"
    # a good one still works, into a new folder
    code, text = run_export(capsys, src, tmp_path / "new" / "plain.pt")
    assert code == 0 and (tmp_path / "new" / "plain.pt").is_file(), text
    assert "decoder.output_projection.weight" in load_checkpoint(tmp_path / "new" / "plain.pt")["model"]


# --------------------------------------------------------------------------
# every entry point on a crafted checkpoint
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crafted(tmp_path_factory, trained_mhs):
    """(folder, its checkpoint_last.pt crafted from the shared MHS model's,
    the marker file its payload writes)."""
    save, _ = trained_mhs
    root = tmp_path_factory.mktemp("crafted")
    folder = root / "evil"
    folder.mkdir()
    marker = root / "marker"
    return folder, craft(save / "checkpoint_last.pt", folder / "checkpoint_last.pt", marker), marker


@pytest.fixture
def marker(crafted):
    m = crafted[2]
    if m.exists():
        m.unlink()
    yield m
    if m.exists():
        m.unlink()


def mhs_train_args(data, save_dir):
    updates, flags = SHARED_MODELS["mhs"]
    return [
        data, "--user-dir", USER_DIR, "--arch", "transformer_mhce", "--mhce-method", "mhs", *TINY_ARCH,
        "--criterion", "mhce_label_smoothed_cross_entropy", "--label-smoothing", "0.1", *TRAIN_COMMON,
        *flags, "--max-update", updates + 1, "--save-dir", save_dir,
    ]  # fmt: skip


def guard(savedir, data):
    """``python -m fairseq_mhce.recipes.recipe_checks savedir-guard``, as the recipes run it."""
    V = len((data / "dict.tgt.txt").read_text().splitlines()) + 4
    e = {k: v for k, v in os.environ.items() if k != TRUST_ENV}
    e.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "fairseq_mhce.recipes.recipe_checks", "savedir-guard", "train.sh",
         str(savedir), str(data), str(V), "--arch", "transformer_iwslt_de_en_mhce", "--mhce-method", "mhs"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e,
    )  # fmt: skip


def refused(text, path):
    return f"checkpoint {path} holds {PAYLOAD}" in text and f"{TRUST_ENV}=1" in text


@pytest.mark.e2e
def test_crafted_checkpoint_refused_by_every_entry_point(crafted, marker, copy_bin, tmp_path):
    folder, ckpt, _ = crafted
    data = copy_bin
    runs = {
        "fairseq-generate": cli(
            "fairseq-generate", data, "--user-dir", USER_DIR, "--path", ckpt, "--beam", "1", check=False
        ),
        "fairseq-interactive": cli(
            "fairseq-interactive", data, "--user-dir", USER_DIR, "--path", ckpt, "--beam", "1",
            "--source-lang", "src", "--target-lang", "tgt", stdin="w1 w2\n", check=False,
        ),
        "fairseq-train --restore-file": cli(
            "fairseq-train", *mhs_train_args(data, tmp_path / "resume"), "--restore-file", ckpt, check=False
        ),
        "mhce-average-checkpoints": cli(
            "mhce-average-checkpoints", "--inputs", ckpt, ckpt, "--output", tmp_path / "avg.pt", check=False
        ),
        "mhce-export": cli("mhce-export", ckpt, tmp_path / "plain.pt", check=False),
        "mhce-build-codes": cli(
            "mhce-build-codes", "--databin", data, "--heads", "2", "--source", "checkpoint", "--checkpoint", ckpt,
            "--out", tmp_path / "codes.json", check=False,
        ),
        "recipe savedir-guard": guard(folder, data),
    }  # fmt: skip
    for name, p in runs.items():
        assert p.returncode != 0, (name, p.stdout[-2000:])
        assert refused(p.stdout, ckpt), (name, p.stdout[-3000:])
        assert "\nH-" not in p.stdout and not marker.exists(), name
    for name in ("mhce-average-checkpoints", "mhce-export", "mhce-build-codes"):  # the plugin's tools: one line
        assert runs[name].returncode == 2 and "Traceback" not in runs[name].stdout, name
    assert runs["recipe savedir-guard"].returncode == 2
    assert not any((tmp_path / n).exists() for n in ("avg.pt", "plain.pt", "codes.json"))

    from fairseq.models.transformer import TransformerModel

    with pytest.raises(UntrustedCheckpointError) as e:
        TransformerModel.from_pretrained(
            str(folder), checkpoint_file=ckpt.name, data_name_or_path=str(data), user_dir=USER_DIR
        )
    assert refused(str(e.value), ckpt) and not marker.exists()


@pytest.mark.e2e
def test_crafted_checkpoint_loads_with_the_opt_in(crafted, marker, copy_bin, tmp_path, monkeypatch):
    folder, ckpt, _ = crafted
    monkeypatch.setenv(TRUST_ENV, "1")
    # fairseq's loader (two sentences of the test set)
    p = cli(
        "fairseq-generate", copy_bin, "--user-dir", USER_DIR, "--path", ckpt, "--beam", "1",
        "--num-shards", "50", "--shard-id", "0", check=False,
    )  # fmt: skip
    assert p.returncode == 0 and "\nH-" in p.stdout and marker.exists(), p.stdout[-2000:]
    marker.unlink()
    # a plugin tool
    p = cli("mhce-export", ckpt, tmp_path / "plain.pt", check=False)
    assert p.returncode == 0 and (tmp_path / "plain.pt").is_file() and marker.exists(), p.stdout[-2000:]
    marker.unlink()
    # the recipes' check (in this process: run as a program, trusting, it would import this
    # test module to unpickle the payload; the refusal above ran it as the recipes do)
    from fairseq_mhce.recipes import recipe_checks

    V = len((copy_bin / "dict.tgt.txt").read_text().splitlines()) + 4
    problems = recipe_checks.foreign_checkpoints("train.sh", str(folder), str(copy_bin), V, ["--mhce-method", "mhs"])
    assert marker.exists() and TRUST_ENV not in str(problems), problems


# --------------------------------------------------------------------------
# every kind of checkpoint the suite writes loads with the default
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_kinds(tmp_path_factory, copy_bin):
    """{kind: save dir}: a stock fairseq transformer with adaptive softmax
    (no --user-dir: fairseq's own architecture and criterion) and an
    MHE model with --share-all-embeddings resumed once; 2 updates each.
    Before the resume, a temporary file that a killed checkpoint copy left
    (issue 30, defect 11) is put into its folder."""
    root = tmp_path_factory.mktemp("kinds")
    common = [*MICRO_ARCH, *TRAIN_COMMON, "--max-update", "2"]
    runs = {
        "stock transformer, adaptive softmax": [
            "--arch", "transformer", "--criterion", "adaptive_loss", "--adaptive-softmax-cutoff", "20,40",
            "--ddp-backend", "legacy_ddp",
        ],
        "mhe share-all resumed": [
            "--user-dir", USER_DIR, "--arch", "transformer_mhce", "--mhce-method", "mhe", "--share-all-embeddings",
            "--criterion", "mhce_label_smoothed_cross_entropy",
        ],
    }  # fmt: skip
    out = {}
    for kind, args in runs.items():
        save = root / "".join(c if c.isalnum() else "_" for c in kind)
        # in this process, also the stock run (cli() would start stock fairseq in its own, which can abort
        # at exit in its prefetch thread, status 134, the plugin's clean_exit aside): fairseq's own
        # transformer, criterion and checkpoint writing, no --user-dir, the same checkpoint
        p = run_in_process("fairseq-train", [str(a) for a in (copy_bin, *args, *common, "--save-dir", save)])
        assert p.returncode == 0 and (save / "checkpoint_last.pt").is_file(), p.stdout[-3000:]
        out[kind] = save
    save = out["mhe share-all resumed"]
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = save / f"checkpoint_last.pt.{dead.pid}.a1b2c3d4.tmp"
    assert TEMP_NAME.match(stale.name)
    stale.write_bytes(b"half a checkpoint")
    resumed = cli(
        "fairseq-train", copy_bin, *runs["mhe share-all resumed"], *MICRO_ARCH, *TRAIN_COMMON,
        "--max-update", "3", "--save-dir", save,
    ).stdout  # fmt: skip
    assert "Loaded checkpoint" in resumed and "@ 2 updates)" in resumed, resumed[-2000:]
    assert not stale.exists() and "removed 1 temporary file(s) that an interrupted checkpoint copy left" in resumed
    return out


@pytest.mark.e2e
def test_every_kind_of_checkpoint_loads_by_default(trained_mhp, trained_mhe, trained_mhs, other_kinds, tmp_path):
    saves = {"mhp": trained_mhp[0], "mhe (--eval-bleu)": trained_mhe[0], "mhs tied": trained_mhs[0], **other_kinds}
    files = {f"{kind}: {p.name}": p for kind, save in saves.items() for p in sorted(save.glob("*.pt"))}
    averaged, exported = tmp_path / "averaged.pt", tmp_path / "exported.pt"
    mhe = trained_mhe[0]
    cli("mhce-average-checkpoints", "--inputs", mhe / "checkpoint_best.pt", mhe / "checkpoint_last.pt",
        "--output", averaged)  # fmt: skip
    cli("mhce-export", trained_mhs[0] / "checkpoint_last.pt", exported)
    files.update(averaged=averaged, exported=exported)
    assert len(files) >= 11, sorted(files)
    globals_seen = set()
    for name, path in files.items():
        globals_seen |= set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        state = load_checkpoint(path)
        assert torch.is_tensor(next(iter(state["model"].values()))), name
        assert checkpoint_utils.load_checkpoint_to_cpu(str(path))["model"].keys() == state["model"].keys(), name
    # what these checkpoints hold beyond torch's defaults: the Namespace of a saved
    # model config and --eval-bleu's numpy count arrays, all on the allow-list
    assert {"argparse.Namespace", "numpy.ndarray"} <= globals_seen, globals_seen
    allowed = {
        g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in safe_load.allowed_globals()
    }
    assert globals_seen <= allowed, globals_seen - allowed
