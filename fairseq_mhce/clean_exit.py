"""Stop fairseq's background data threads before the interpreter exits.

``fairseq-train`` reads batches through ``fairseq.data.iterators.
BufferedIterator``, whose ``BackgroundConsumer`` is a *daemon* thread that
keeps pulling batches from the ``torch.utils.data.DataLoader`` into a queue of
up to 20.  ``--max-update`` (or an exception) ends training in the middle of
an epoch, so that thread is still alive when the process exits.  If it is
inside a torch call that released the GIL (receiving or collating a batch)
when Python finalizes, the call's attempt to take the GIL back ends the thread
with ``pthread_exit``, whose unwinding through torch's C++ frames calls
``std::terminate``: ``terminate called without an active exception`` and exit
status 134 (SIGABRT) after a run that finished and saved its checkpoint.
Whether it happens depends on where the thread is at that instant, so it comes
and goes with the machine's load and the model's step time.

:func:`stop_background_consumers`, registered with :mod:`atexit` when the
plugin is imported (by :mod:`fairseq_mhce.fairseq_patches`, so it runs
before torch's and multiprocessing's own exit handlers, with the interpreter
still whole), asks every live consumer to stop
after the batch it is fetching, empties its queue so it is not blocked, and
joins it: the thread ends, its DataLoader iterator shuts its workers down
normally, and no thread is left inside torch at finalization.
"""

import logging
import queue
import threading
import time

logger = logging.getLogger(__name__)

# longest wait for the consumers at exit: one batch from a DataLoader worker
STOP_TIMEOUT_S = 30.0


def _live_consumers() -> list:
    try:
        # optional: this runs at exit, where fairseq may be gone or never imported
        from fairseq.data.iterators import BackgroundConsumer
    except ImportError:  # fairseq not importable: nothing of it to stop
        return []
    me = threading.current_thread()
    return [t for t in threading.enumerate() if isinstance(t, BackgroundConsumer) and t.is_alive() and t is not me]


def stop_background_consumers(timeout: float = STOP_TIMEOUT_S) -> int:
    """Stop and join every live ``fairseq.data.iterators.BackgroundConsumer``
    thread (the batches still queued are dropped: the process is ending).
    Returns how many were stopped; a consumer that does not stop within
    ``timeout`` seconds (a hung DataLoader worker) is left as it was, with a
    warning."""
    live = _live_consumers()
    if not live:
        return 0
    for t in live:
        # its loop stops after putting the item it is fetching now (count >= 0)
        t._max_len = 0
    deadline = time.monotonic() + timeout
    for t in live:
        while t.is_alive() and time.monotonic() < deadline:
            try:  # room in the queue, so its put (item, then end marker) returns
                while True:
                    t._queue.get_nowait()
            except queue.Empty:
                pass
            t.join(0.01)
    stuck = [t for t in live if t.is_alive()]
    if stuck:
        logger.warning(
            f"{len(stuck)} fairseq data-loading thread(s) did not stop within {timeout:.0f} s at exit; "
            f"the process may end with 'terminate called without an active exception'"
        )
    return len(live) - len(stuck)
