"""Worker threads for the GIL-free numpy / scipy work of the offline code
table build: the per-group assignments of :mod:`.grouping` and the
sparse products of the PPMI-SVD vectors (:mod:`.ppmi`).

The thread count is torch's intra-op count (``OMP_NUM_THREADS``), so one
setting governs every library the build uses.
"""

from concurrent.futures import ThreadPoolExecutor

import torch


def worker_threads() -> int:
    """Worker threads for GIL-free work (scipy's assignment solver and
    sparse products): torch's intra-op thread count (OMP_NUM_THREADS)."""
    return max(1, int(torch.get_num_threads()))


def for_each(fn, items) -> None:
    """fn(item) for every item, on :func:`worker_threads` threads; fn writes
    disjoint outputs, so the result does not depend on the schedule."""
    items = list(items)
    n = min(worker_threads(), len(items))
    if n <= 1:
        for it in items:
            fn(it)
        return
    with ThreadPoolExecutor(n) as ex:
        for _ in ex.map(fn, items):
            pass
