"""Checkpoint copies are atomic, and an unreadable checkpoint_last.pt is
reported as such (issue 24, item 8).

fairseq writes the first checkpoint of a save atomically but copies it to
``checkpoint_last.pt`` (and the others) with a plain ``shutil.copyfile``; a
kill during that copy left an empty ``checkpoint_last.pt`` and the next run
died with an ``EOFError`` traceback.  With the plugin the copy is a temporary
file renamed over the destination (:mod:`fairseq_mhce.checkpoint_io`), and an
empty or truncated checkpoint gets a message naming the intact one to resume
from, with every file of the save dir left as it was.
"""

import os
import signal

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.file_io import PathManager as FairseqPathManager

import fairseq_mhce  # noqa: F401  (patches fairseq.checkpoint_utils)
from fairseq_mhce import checkpoint_io, fairseq_patches

from .utils import make_copy_data, train_micro, tree_hashes

OLD = b"old checkpoint " * 1000
NEW = os.urandom(3 << 20)  # 3 MiB: several chunks of the copy


def write_pair(tmp_path):
    src, dst = tmp_path / "checkpoint_best.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(NEW)
    dst.write_bytes(OLD)
    return src, dst


def partial_copy(fsrc, fdst):
    """The copy dies after writing part of the file."""
    fdst.write(fsrc.read(1 << 20))
    fdst.flush()
    raise OSError(28, "No space left on device (simulated)")


def test_only_checkpoint_utils_sees_the_atomic_copy():
    assert getattr(checkpoint_utils.PathManager, "fairseq_mhce_patch", None) == "atomic checkpoint copies"
    assert not hasattr(FairseqPathManager, "fairseq_mhce_patch")  # fairseq.file_io itself unchanged
    assert checkpoint_utils.PathManager.exists is FairseqPathManager.exists  # everything else is fairseq's


def test_copy_failing_midway_leaves_the_destination_intact(tmp_path, monkeypatch):
    src, dst = write_pair(tmp_path)
    monkeypatch.setattr(checkpoint_io, "_copy_contents", partial_copy)
    with pytest.raises(OSError, match="simulated"):
        checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)  # fairseq's call
    assert dst.read_bytes() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_best.pt", "checkpoint_last.pt"]  # no temp left
    monkeypatch.undo()
    os.chmod(src, 0o640)
    assert checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == NEW
    assert os.stat(dst).st_mode & 0o777 == 0o640  # the source's mode, as a plain copy of fairseq's file would have
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_best.pt", "checkpoint_last.pt"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_copy_signalled_midway_leaves_the_destination_intact(tmp_path, sig):
    """The process ends by a signal while the copy is half written: SIGKILL
    (issue 24, no cleanup possible) or SIGTERM (issue 30, defect 11).  The
    destination is intact either way; after SIGTERM the temporary file is
    gone too (SIGINT's KeyboardInterrupt already removed it; SIGTERM left
    it); what SIGKILL leaves is removed at the next start (the next test)."""
    src, dst = write_pair(tmp_path)

    def signalled(fsrc, fdst):
        fdst.write(fsrc.read(1 << 20))
        fdst.flush()
        os.kill(os.getpid(), sig)
        fdst.write(fsrc.read())  # not reached

    pid = os.fork()
    if pid == 0:  # the child copies and dies mid-copy
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a fairseq-train process
            checkpoint_io._copy_contents = signalled
            checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
        finally:
            os._exit(3)  # not reached
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig
    assert dst.read_bytes() == OLD  # with shutil.copyfile: 1 MiB of the new file
    assert src.read_bytes() == NEW
    if sig == signal.SIGTERM:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_best.pt", "checkpoint_last.pt"]


def test_stale_temporary_files_removed_at_the_next_train_start(tmp_path):
    """What a SIGKILL leaves (the temporary file of a process that is gone)
    is removed when fairseq-train next starts in that folder; nothing else is
    (a live process's copy, fairseq's own NAME.tmp, other files).  The real
    fairseq-train does it in tests/test_safe_load.py's resumed run."""
    import subprocess
    import types

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [f"checkpoint_last.pt.{dead.pid}.ab_c12yz.tmp", "checkpoint3.pt.k9x0q1w2.tmp"]  # the second: older name
    kept = [
        f"checkpoint_last.pt.{os.getpid()}.abcdefgh.tmp",  # a live process's copy in progress
        "checkpoint_last.pt.tmp",  # fairseq's own atomic save
        "checkpoint_best.pt",
        "notes.abcdefgh.tmp",
        f"model.pt.{dead.pid}.abcdefgh.tmp",
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    assert all(checkpoint_io.TEMP_NAME.match(n) for n in stale)
    assert "fairseq.checkpoint_utils.load_checkpoint" in fairseq_patches.patched()  # wired into fairseq-train
    calls = []
    load = fairseq_patches.wrap_load_checkpoint(lambda cfg, trainer: calls.append(cfg) or "loaded")
    assert load(types.SimpleNamespace(save_dir=str(tmp_path)), None) == "loaded" and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert load(types.SimpleNamespace(save_dir=str(tmp_path / "missing")), None) == "loaded"


def test_checkpoint_problem_tells_empty_truncated_and_whole(tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save({"model": {"w": torch.zeros(100)}}, whole)
    assert checkpoint_io.checkpoint_problem(str(whole)) is None
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert checkpoint_io.checkpoint_problem(str(empty)) == "is empty (0 bytes)"
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert "truncated" in checkpoint_io.checkpoint_problem(str(cut))


# -- the real fairseq-train ------------------------------------------------------


def train(data, save_dir, *extra, updates=3):
    return train_micro(data, save_dir, "mhp", "--num-workers", "0", *extra, updates=updates, check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 3 updates, validated, saved: (data, save dir)."""
    root = tmp_path_factory.mktemp("ckio")
    data = make_copy_data(root / "data", n_train=600, n_valid=20, n_test=20, n_words=300)
    save = root / "save"
    p = train(data, save)
    assert p.returncode == 0, p.stdout[-3000:]
    names = sorted(x.name for x in save.iterdir())
    assert {"checkpoint_best.pt", "checkpoint_last.pt"} <= set(names), names
    assert not [n for n in names if n.endswith(".tmp")], names
    # the copy fairseq made is the whole checkpoint
    assert (save / "checkpoint_last.pt").read_bytes() == (save / "checkpoint_best.pt").read_bytes()
    return data, save


@pytest.mark.e2e
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_unreadable_last_checkpoint_is_named_and_nothing_changes(trained, tmp_path, damage):
    data, trained_save = trained
    save = tmp_path / "save"
    save.mkdir()
    for f in trained_save.iterdir():
        (save / f.name).write_bytes(f.read_bytes())
    last = save / "checkpoint_last.pt"
    whole = last.read_bytes()
    last.write_bytes(b"" if damage == "empty" else whole[: len(whole) // 2])
    before = tree_hashes(save)
    p = train(data, save, updates=6)
    assert p.returncode != 0, p.stdout[-3000:]
    assert tree_hashes(save) == before  # nothing written, moved or removed
    what = "is empty (0 bytes)" if damage == "empty" else "is truncated"
    message = [line for line in p.stdout.splitlines() if "UnreadableCheckpointError" in line]
    assert message and f"checkpoint_last.pt {what}" in message[-1], p.stdout[-3000:]
    assert "EOFError" not in message[-1]
    intact = [n for n in os.listdir(save) if n != "checkpoint_last.pt" and n.endswith(".pt")]
    named = [n for n in intact if f"--restore-file {save / n}" in message[-1]]
    assert named, message[-1]
    assert "Do not just remove the broken file" in message[-1]
    if damage == "truncated":
        return
    # the advice works: resuming from the named checkpoint trains on
    p = train(data, save, "--restore-file", save / named[0], updates=6)
    assert p.returncode == 0, p.stdout[-3000:]
    assert "num_updates 6" in p.stdout or "@ 6 updates" in p.stdout, p.stdout[-3000:]
    assert checkpoint_io.checkpoint_problem(str(last)) is None  # rewritten whole
