"""Nothing a user had is lost (issue 11, items 4, 5, 9), through the real
scripts on tiny copy data:

* scripts/recipes/train.sh appends to SAVEDIR/train.log (one separator line per start)
  instead of truncating it;
* scripts/recipes/train.sh refuses a SAVEDIR holding another run's checkpoints
  (another method, head sizes, data-bin) before anything is written, unless
  REUSE_SAVEDIR=1;
* mhce-average-checkpoints averages plugin checkpoints (code table and
  other integer buffers unchanged), the average decodes, and mismatches or an
  existing --output are errors that change nothing.
"""

import os
import re
import shutil

import pytest
import torch

from .utils import arch_sizes, cli, generate, hypotheses, make_copy_data, read_checkpoint, recipe, tree_hashes

pytestmark = pytest.mark.e2e

# tiny model (train.sh's extra arguments come last and override its sizes)
TINY = [*arch_sizes(1, 32), "--log-interval", "4", "--max-tokens", "300"]
# 12 updates, a checkpoint_E_U.pt every 4 (kept); an epoch is ~18 updates, so
# none of them falls on an epoch's end (where fairseq writes no checkpoint_E_U.pt)
SAVES = ["--save-interval-updates", "4", "--keep-interval-updates", "10"]
START = "===== train.sh start "


def average(*args):
    """mhce-average-checkpoints (in this process, :func:`tests.utils.cli`), its output merged."""
    return cli("mhce-average-checkpoints", *args, check=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_copy_data(tmp_path_factory.mktemp("guards"), n_train=600, n_valid=30, n_test=20)


@pytest.fixture(scope="module")
def mhe_run(data, tmp_path_factory):
    """One tiny MHE run through train.sh (its default PPMI code table), 12
    updates, checkpoints at 4, 8, 12.  Tests copy from it, never write into it."""
    save = tmp_path_factory.mktemp("mhe_run") / "mhe"
    p = recipe("train.sh", "mhe", data, save, "--max-update", "12", *SAVES, *TINY, check=False)
    assert p.returncode == 0, p.stdout[-4000:]
    for u in (4, 8, 12):
        assert list(save.glob(f"checkpoint_*_{u}.pt")), sorted(os.listdir(save))
    assert (save / "checkpoint_best.pt").exists() and (save / "checkpoint_last.pt").exists()
    return save


def other_runs_dir(mhe_run, dest, *names):
    """``dest`` holding copies of the MHE run's ``names`` and its train.log."""
    dest.mkdir()
    for n in (*names, "train.log"):
        shutil.copyfile(mhe_run / n, dest / n)
    return dest


# ------------------------------------------------------------ item 4: train.log
def test_train_log_is_appended_on_resume(mhe_run, data, tmp_path):
    """A second start into the same SAVEDIR (a resume) keeps the first start's
    log and adds its own, after a separator naming the date and the command."""
    save = tmp_path / "resumed"
    shutil.copytree(mhe_run, save)
    first = (save / "train.log").read_text()
    assert first.startswith(START) and "done training in" in first
    p = recipe("train.sh", "mhe", data, save, "--max-update", "14", *SAVES, *TINY, check=False)
    assert p.returncode == 0, p.stdout[-4000:]
    log = (save / "train.log").read_text()
    assert log.startswith(first), "the first start's log was not kept"
    second = log[len(first) :]
    assert second.startswith(START) and log.count("\n" + START) == 1
    head = second.splitlines()[0]
    assert re.match(
        rf"{START}\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d .*: \S*scripts/recipes/train.sh mhe {re.escape(str(data))} "
        rf"{re.escape(str(save))} --max-update 14 ",
        head,
    ), head
    assert second.splitlines()[1].startswith("# fairseq-train: ") and "--max-update 14" in second.splitlines()[1]
    # the same run resumed (the guard let it through) and finished
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 12 updates\)", second), second[-3000:]
    assert "done training in" in second and "num_updates 14" in second


# ------------------------------------------------- item 5: another run's SAVEDIR
def test_refuses_another_methods_checkpoint_best(mhe_run, data, tmp_path):
    """Only checkpoint_best.pt (no checkpoint_last.pt): fairseq would start from
    scratch and overwrite it.  train.sh refuses before anything is written."""
    save = other_runs_dir(mhe_run, tmp_path / "other", "checkpoint_best.pt")
    before = tree_hashes(save)
    p = recipe("train.sh", "mhp", data, save, "--max-update", "2", *TINY, check=False)
    assert p.returncode == 2, p.stdout[-4000:]
    assert "holds checkpoints that are not this run's" in p.stdout
    assert "checkpoint_best.pt: trained with METHOD mhe" in p.stdout and "this run is METHOD mhp" in p.stdout
    assert "fairseq_cli.train" not in p.stdout  # fairseq never started
    assert tree_hashes(save) == before  # no file changed, none added (no code table, no log line)


def test_another_methods_checkpoint_last_names_both_ways_out(mhe_run, data, tmp_path):
    save = other_runs_dir(mhe_run, tmp_path / "other", "checkpoint_last.pt", "checkpoint_best.pt")
    before = tree_hashes(save)
    p = recipe("train.sh", "mhp", data, save, "--max-update", "2", *TINY, check=False)
    assert p.returncode == 2, p.stdout[-4000:]
    out = p.stdout
    assert "checkpoint_best.pt, checkpoint_last.pt: trained with METHOD mhe" in out, out
    # way out 1: the method it was trained with; way out 2: a new SAVEDIR
    assert f"continue that run with METHOD mhe (scripts/recipes/train.sh mhe {data} {save} ...)" in out, out
    assert "or train mhp in a new SAVEDIR" in out and "REUSE_SAVEDIR=1" in out
    assert "fairseq_cli.train" not in out
    assert tree_hashes(save) == before


@pytest.mark.parametrize("case", ["head-sizes", "mhce-heads", "data-bin", "unreadable"])
def test_refuses_other_sizes_data_bin_or_unreadable(mhe_run, data, tmp_path, case):
    """The same method, but other head sizes (explicit or via MHCE_HEADS),
    another data-bin, or a checkpoint that cannot be read."""
    save = other_runs_dir(mhe_run, tmp_path / "other", "checkpoint_best.pt")
    args, env, expect = ["--max-update", "2", *TINY], {}, None
    if case == "head-sizes":  # V = 48: automatic H = 2 sizes are 7,7
        args += ["--mhce-head-sizes", "8,8"]
        expect = "trained with head sizes 7,7 (--mhce-heads 2); this run has --mhce-head-sizes 8,8"
    elif case == "mhce-heads":
        env = {"MHCE_HEADS": "3"}
        expect = "trained with head sizes 7,7 (--mhce-heads 2); this run has automatic sizes for --mhce-heads 3"
    elif case == "data-bin":
        expect = f"trained on the data-bin {data}; this run's is {tmp_path / 'bin2'}"
        data = shutil.copytree(data, tmp_path / "bin2")  # equal content, another data-bin
    else:
        (save / "checkpoint_best.pt").write_bytes(b"not a checkpoint\n" * 100)
        expect = "checkpoint_best.pt: cannot be read"
    before = tree_hashes(save)
    p = recipe("train.sh", "mhe", data, save, *args, env=env, check=False)
    assert p.returncode == 2, p.stdout[-4000:]
    assert expect in p.stdout, p.stdout
    assert "new SAVEDIR" in p.stdout and "fairseq_cli.train" not in p.stdout
    assert tree_hashes(save) == before


def test_empty_checkpoint_last_names_the_intact_checkpoint(mhe_run, data, tmp_path):
    """A kill during fairseq's copy of checkpoint_best.pt over checkpoint_last.pt
    leaves it empty: train.sh names this run's intact checkpoint and the
    --restore-file that resumes from it (not "move it out"), changes nothing,
    and resuming that way trains on."""
    save = other_runs_dir(mhe_run, tmp_path / "cut", "checkpoint_best.pt")
    (save / "checkpoint_last.pt").write_bytes(b"")
    before = tree_hashes(save)
    p = recipe("train.sh", "mhe", data, save, "--max-update", "14", *TINY, check=False)
    assert p.returncode == 2 and tree_hashes(save) == before, p.stdout[-3000:]
    assert "checkpoint_last.pt: cannot be read" in p.stdout and "checkpoint_best.pt beside it is this run's" in p.stdout
    assert f"--restore-file {save / 'checkpoint_best.pt'}" in p.stdout and "move it out" not in p.stdout
    p = recipe(
        "train.sh", "mhe", data, save, "--max-update", "14", *TINY, "--restore-file", save / "checkpoint_best.pt",
        check=False,
    )  # fmt: skip
    assert p.returncode == 0 and "num_updates 14" in p.stdout.replace("num_updates=", "num_updates "), p.stdout[-3000:]


def test_reuse_savedir_lets_it_train(mhe_run, data, tmp_path):
    """REUSE_SAVEDIR=1: the user asked for it; fairseq trains (here from
    scratch: no checkpoint_last.pt) and the old train.log is kept."""
    save = other_runs_dir(mhe_run, tmp_path / "other", "checkpoint_best.pt")
    old_log = (save / "train.log").read_text()
    p = recipe("train.sh", "mhp", data, save, "--max-update", "2", *TINY, env={"REUSE_SAVEDIR": "1"}, check=False)
    assert p.returncode == 0, p.stdout[-4000:]
    assert "not this run's" not in p.stdout
    assert read_checkpoint(save / "checkpoint_best.pt")["cfg"]["model"].mhce_method == "mhp"
    assert (save / "train.log").read_text().startswith(old_log)


# ------------------------------------------------- item 9: checkpoint averaging
def test_average_last_three_update_checkpoints_decodes(mhe_run, data, tmp_path):
    before = tree_hashes(mhe_run)
    out = tmp_path / "avg.pt"
    p = average("--inputs", mhe_run, "--num-update-checkpoints", "3", "--output", out)
    assert p.returncode == 0, p.stdout
    inputs = [next(mhe_run.glob(f"checkpoint_*_{u}.pt")) for u in (12, 8, 4)]
    assert f"averaging 3 checkpoints: {' '.join(map(str, inputs))}" in p.stdout
    assert tree_hashes(mhe_run) == before  # inputs untouched
    avg = read_checkpoint(out)["model"]
    states = [read_checkpoint(f)["model"] for f in inputs]
    assert list(avg) == list(states[0])
    codec = [k for k in avg if ".mhce_head.codec." in k]
    assert {k.rsplit(".", 1)[1] for k in codec} >= {"code", "token", "head_sizes"}
    # the PPMI code table of train.sh is not the identity: a real table survived
    code = avg["decoder.mhce_head.codec.code"]
    assert not torch.equal(code, torch.arange(code.numel(), dtype=code.dtype))
    n_float = 0
    for k, v in avg.items():
        assert v.dtype == states[0][k].dtype and v.shape == states[0][k].shape, k
        if torch.is_floating_point(v):
            n_float += 1
            mean = torch.stack([s[k].double() for s in states]).mean(0)
            assert torch.allclose(v.double(), mean, rtol=1e-5, atol=1e-7), k
        else:  # code table, head sizes, method_id, ...: identical to every input
            assert all(torch.equal(v, s[k]) for s in states), k
    assert n_float > 10 and not torch.equal(
        avg["decoder.embed_tokens.weight"], states[0]["decoder.embed_tokens.weight"]
    )
    gen = generate(
        data, out, "--beam", "2", "--batch-size", "16", "--required-batch-size-multiple", "1",
        "--max-len-a", "0", "--max-len-b", "12",
    ).stdout  # fmt: skip
    assert len(hypotheses(gen)) == 20, gen[-3000:]


def test_average_refuses_mismatched_code_tables(mhe_run, tmp_path):
    """Another code table (two tokens' codes swapped) is another model: an
    error naming the key and both files; nothing written, inputs unchanged."""
    a = next(mhe_run.glob("checkpoint_*_8.pt"))
    b = tmp_path / "checkpoint_swapped.pt"
    state = read_checkpoint(next(mhe_run.glob("checkpoint_*_12.pt")))
    code = state["model"]["decoder.mhce_head.codec.code"]
    token = state["model"]["decoder.mhce_head.codec.token"]
    code[[4, 5]] = code[[5, 4]].clone()
    token[code[[4, 5]]] = torch.tensor([4, 5], dtype=token.dtype)
    torch.save(state, b)
    before = {**tree_hashes(mhe_run), **{"b": tree_hashes(tmp_path)["checkpoint_swapped.pt"]}}
    out = tmp_path / "avg.pt"
    p = average("--inputs", a, b, "--output", out)
    assert p.returncode == 2, p.stdout
    assert "key decoder.mhce_head.codec.code: the code tables differ (2 of 48 entries)" in p.stdout, p.stdout
    assert str(a) in p.stdout and str(b) in p.stdout and "Traceback" not in p.stdout
    assert not out.exists() and not list(tmp_path.glob(".avg.pt*"))
    assert {**tree_hashes(mhe_run), **{"b": tree_hashes(tmp_path)["checkpoint_swapped.pt"]}} == before


def test_average_never_overwrites_output(mhe_run, tmp_path):
    out = tmp_path / "avg.pt"
    out.write_text("someone's file\n")
    p = average("--inputs", mhe_run, "--num-update-checkpoints", "2", "--output", out)
    assert p.returncode == 2 and "avg.pt exists; it is not overwritten" in p.stdout, p.stdout
    assert out.read_text() == "someone's file\n"
    # too few checkpoints for N: a clear error too
    p = average("--inputs", mhe_run, "--num-update-checkpoints", "4", "--output", tmp_path / "new.pt")
    assert p.returncode == 2 and "has 3 checkpoint_EPOCH_UPDATE.pt file(s) but 4 were asked for" in p.stdout, p.stdout
    assert not (tmp_path / "new.pt").exists()
