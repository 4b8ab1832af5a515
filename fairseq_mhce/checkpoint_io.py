"""Checkpoint files that a kill cannot leave half-written, and a clear error
for one that is.

fairseq writes the first checkpoint of a save (for instance
``checkpoint_best.pt``) atomically, to ``NAME.tmp`` then renamed, but copies it
to the others (``checkpoint_last.pt``, ``checkpointN.pt``, ...) with a plain
``shutil.copyfile`` (``fairseq.file_io.PathManager.copy``): a kill, a full
disk or a crash during that copy leaves an empty or truncated
``checkpoint_last.pt``, and the next ``fairseq-train`` in that ``--save-dir``
dies on it with an ``EOFError`` / zip traceback.

While the plugin is imported (the patches themselves are in
:mod:`fairseq_mhce.fairseq_patches`):

* fairseq's copies between local checkpoint files are :func:`atomic_copy`:
  the bytes go to a temporary file in the destination's folder, fsynced, then
  renamed over the destination (``os.replace``): the destination holds either
  its old content or the whole new one, never a part.  The temporary file
  (``checkpoint_last.pt.PID.XXXXXXXX.tmp``) is removed on an error, on
  SIGINT and on SIGTERM; one that a SIGKILL left is removed by the next
  ``fairseq-train`` in that folder (:func:`clean_save_dir`, only names of
  that pattern whose process is gone).
* when fairseq cannot read a checkpoint that is empty or truncated, the
  error (:func:`unreadable_error`) says so and names the newest intact
  checkpoint of the same folder to resume from (``--restore-file``) or
  decode with (``--path``).  Nothing is written or removed.
"""

import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import zipfile
from typing import List, Optional

logger = logging.getLogger(__name__)

COPY_CHUNK = 1 << 20


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint file is empty or truncated (an interrupted save or copy)."""


# -- atomic copies -------------------------------------------------------------


def _copy_contents(fsrc, fdst):
    """Copy every byte of the open file ``fsrc`` to the open file ``fdst``."""
    shutil.copyfileobj(fsrc, fdst, COPY_CHUNK)


def _fsync_dir(path: str):
    """Make a rename in ``path`` durable (best effort: not every file system
    lets a folder be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# the temporary file of an atomic copy: DEST.PID.XXXXXXXX.tmp (mkstemp's 8
# random characters) beside DEST, a checkpoint*.pt; DEST.XXXXXXXX.tmp as
# plugin versions before the PID was in the name wrote it
TEMP_NAME = re.compile(r"^(?P<dest>checkpoint[^/]*\.pt)\.(?:(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp$")


class _Terminated(BaseException):
    """SIGTERM arrived during an atomic copy (see :func:`_sigterm_cleans_up`)."""


@contextlib.contextmanager
def _sigterm_cleans_up():
    """While the block runs, SIGTERM raises :class:`_Terminated` (so the
    block's clean-up runs), after which the signal is delivered again with
    its previous handler: the process still ends by SIGTERM, as it would have,
    minus the temporary file.  Only where SIGTERM has its default action (a
    handler someone installed, or SIG_IGN, is left alone) and in the main
    thread (the only one that can set a handler; a copy in another thread,
    ``--write-checkpoints-asynchronously``, leaves its file to
    :func:`remove_stale_copies`)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminated(signum, frame):
        raise _Terminated()

    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # the default action: the process ends here
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def atomic_copy(src_path: str, dst_path: str) -> str:
    """Copy ``src_path`` to ``dst_path`` so that ``dst_path`` never holds a
    partial copy: the bytes go to a temporary file beside ``dst_path``
    (``DEST.PID.XXXXXXXX.tmp``, fsynced), which then replaces it in one
    rename.  On any error, and on SIGTERM, the temporary file is removed and
    ``dst_path`` is untouched (the one a SIGKILL leaves is removed by
    :func:`remove_stale_copies` at the next ``fairseq-train`` in that
    folder).  Returns ``dst_path`` (as ``shutil.copyfile`` does)."""
    folder = os.path.dirname(os.path.abspath(dst_path))
    with _sigterm_cleans_up():
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{os.path.basename(dst_path)}.{os.getpid()}.", suffix=".tmp")
            with open(src_path, "rb") as fsrc, os.fdopen(fd, "wb") as fdst:
                _copy_contents(fsrc, fdst)
                fdst.flush()
                os.fsync(fdst.fileno())
            shutil.copymode(src_path, tmp)  # mkstemp makes it 0600; keep the mode fairseq's file has
            os.replace(tmp, dst_path)
        except BaseException:
            try:
                if tmp is not None:
                    os.unlink(tmp)
            except OSError:
                pass
            raise
    _fsync_dir(folder)
    return dst_path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def stale_copies(folder: str) -> List[str]:
    """The temporary files that interrupted atomic copies (:func:`atomic_copy`)
    left in ``folder``: names of its pattern (:data:`TEMP_NAME`) whose
    process is gone.  Nothing else (fairseq's own ``NAME.tmp``, a user's
    files) ever matches."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = []
    for name in sorted(names):
        m = TEMP_NAME.match(name)
        if m is None or (m.group("pid") and _pid_alive(int(m.group("pid")))):
            continue
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not os.path.islink(path):
            found.append(path)
    return found


def remove_stale_copies(folder: str) -> List[str]:
    """Remove :func:`stale_copies` of ``folder`` (logged); returns them."""
    removed = []
    for path in stale_copies(folder):
        try:
            os.unlink(path)
        except FileNotFoundError:  # another rank of the same job removed it
            continue
        except OSError as e:
            logger.warning(f"cannot remove {path}, left by an interrupted checkpoint copy: {e}")
            continue
        removed.append(path)
    if removed:
        logger.info(
            f"removed {len(removed)} temporary file(s) that an interrupted checkpoint copy left in {folder}: "
            f"{', '.join(os.path.basename(p) for p in removed)}"
        )
    return removed


def clean_save_dir(save_dir) -> List[str]:
    """At the start of a ``fairseq-train`` (``checkpoint_utils.load_checkpoint``,
    with its ``--save-dir``): :func:`remove_stale_copies` of that folder when
    it exists; returns what was removed."""
    if isinstance(save_dir, str) and save_dir and os.path.isdir(save_dir):
        return remove_stale_copies(save_dir)
    return []


# -- unreadable checkpoints ------------------------------------------------------


def checkpoint_problem(path: str) -> Optional[str]:
    """Why the checkpoint file ``path`` cannot be a whole torch checkpoint
    ("is empty (0 bytes)", "is truncated or not a checkpoint ..."), or None
    when it looks whole.  Cheap: reads the zip archive's directory (at the
    end of the file, so a truncated file has none), not the tensors."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if size == 0:
        return "is empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as z:
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist()):
                return f"is not a torch checkpoint ({size} bytes, a zip archive without data.pkl)"
    except (zipfile.BadZipFile, OSError, ValueError):
        return f"is truncated or not a checkpoint ({size} bytes, no complete torch zip archive)"
    return None


def intact_checkpoints(folder: str, exclude: str = "") -> List[str]:
    """The checkpoints ``checkpoint*.pt`` of ``folder`` that look whole,
    newest (modification time) first, ``exclude`` left out."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    skip = os.path.abspath(exclude) if exclude else None
    found = []
    for name in names:
        p = os.path.join(folder, name)
        if not (name.startswith("checkpoint") and name.endswith(".pt")) or os.path.abspath(p) == skip:
            continue
        if os.path.isfile(p) and checkpoint_problem(p) is None:
            found.append((os.path.getmtime(p), p))
    return [p for _, p in sorted(found, reverse=True)]


def unreadable_message(path: str, problem: str) -> str:
    """The error for an unreadable checkpoint: what is wrong, what to do."""
    folder = os.path.dirname(os.path.abspath(path))
    intact = intact_checkpoints(folder, exclude=path)
    msg = (
        f"checkpoint {path} {problem}: it cannot be loaded. An interrupted save or copy (a kill, a full disk) "
        f"leaves a file like this."
    )
    if intact:
        others = f" (other intact ones: {', '.join(os.path.basename(p) for p in intact[1:4])})" if intact[1:] else ""
        msg += (
            f" The newest intact checkpoint in {folder} is {intact[0]}{others}: resume training from it "
            f"with --restore-file {intact[0]} (or decode with --path {intact[0]}). Do not just remove the "
            f"broken file: a run that starts from scratch in this folder overwrites the intact checkpoints."
        )
    else:
        msg += (
            f" {folder} holds no other intact checkpoint: restore the file from a backup, or remove it to "
            f"train from scratch."
        )
    return msg


def unreadable_error(path, local_path) -> Optional[UnreadableCheckpointError]:
    """When reading the checkpoint ``path`` (on disk at ``local_path``) failed:
    the :class:`UnreadableCheckpointError` (:func:`unreadable_message`) to
    raise instead when the file is empty or truncated, else None (the
    original error stands)."""
    if not (isinstance(local_path, str) and os.path.isfile(local_path)):
        return None
    problem = checkpoint_problem(local_path)
    return None if problem is None else UnreadableCheckpointError(unreadable_message(path, problem))
