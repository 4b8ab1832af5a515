"""Training-time re-allocation of an MHP code table (LightRNN).

:func:`reallocate_codes` moves every token to the code that minimizes the
NLL of its collected training targets under the current heads (an exact
assignment).  :class:`ReallocationCollector` is the schedule and the
collected statistics of one :class:`~fairseq_mhce.modules.multihead_output.MultiHeadProduct`
(``--mhce-realloc-updates``); it refuses a vocabulary above
:data:`REALLOC_MAX_VOCAB` when the model is built.
"""

import logging
import time
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..modules.codec import MixedRadixCodec, radix_strides
from .table import check_code

logger = logging.getLogger(__name__)

# the dense V x V assignment of :func:`reallocate_codes` (float64: 8 V^2 bytes)
REALLOC_MAX_VOCAB = 16384


def reallocate_codes(
    costs: Sequence[np.ndarray], code, head_sizes: Sequence[int], fixed_first: int = 4, move_penalty: float = 1e-6
):
    """LightRNN's re-allocation for a product of independent heads (MHP).

    ``costs[h][v, j]`` is the sum, over the collected training targets equal
    to token ``v``, of ``-log p_h(j | x)`` under the current heads.  Placing
    ``v`` at code ``c`` then costs ``sum_h costs[h][v, d_h(c)]``: the NLL of
    its collected targets up to ``log Z_valid``, which does not depend on the
    table (the valid codes are ``[0, V)`` whatever the table).  The new
    table is the exact minimum-cost perfect matching of tokens to codes
    (scipy's ``linear_sum_assignment`` on the dense cost matrix), so the
    NLL of the collected targets under the same heads can only go down.
    Tokens ``0..fixed_first-1`` (fairseq's specials) keep their codes; a
    token with no collected target (a zero cost row) stays where it is when
    its code is free (``move_penalty`` breaks the ties).

    Args:
        costs: H arrays (V, C_h); code: (V,) the current table
    Returns:
        (new code (V,), collected NLL before, after) -- the NLLs summed over
        the collected targets without ``log Z_valid``
    """
    code = np.asarray(code, dtype=np.int64)
    V = int(code.size)
    sizes = [int(c) for c in head_sizes]
    check_code(code, V, "reallocate_codes")
    if V > REALLOC_MAX_VOCAB:
        raise ValueError(
            f"code re-allocation solves a dense V x V assignment; V = {V} is above {REALLOC_MAX_VOCAB}. "
            f"Use a table from mhce-build-codes (--mhce-code-table) at this vocabulary size."
        )
    if len(costs) != len(sizes) or any(np.shape(c) != (V, s) for c, s in zip(costs, sizes)):
        raise ValueError(f"reallocate_codes: costs must be {len(sizes)} arrays (V, C_h) for sizes {sizes}, V = {V}")
    from scipy.optimize import linear_sum_assignment  # heavy: only when a re-allocation runs

    nfix = max(0, min(int(fixed_first), V))
    tokens = np.arange(nfix, V)
    slots = np.sort(code[tokens])  # the codes the movable tokens hold now
    strides = radix_strides(sizes)
    cost = np.zeros((tokens.size, slots.size))
    for h, c in enumerate(costs):
        cost += np.asarray(c, dtype=np.float64)[tokens][:, (slots // strides[h]) % sizes[h]]
    here = np.searchsorted(slots, code[tokens])  # column of each token's current code
    before = float(cost[np.arange(tokens.size), here].sum())
    cost += move_penalty
    cost[np.arange(tokens.size), here] -= move_penalty
    rows, cols = linear_sum_assignment(cost)
    new = code.copy()
    new[tokens[rows]] = slots[cols]
    after = float((cost[rows, cols] - move_penalty * (cols != here[rows])).sum())
    check_code(new, V, "reallocate_codes")
    return new, before, after


class ReallocationCollector:
    """The re-allocation state of an MHP head: its schedule
    (``--mhce-realloc-updates``), and, over the ``--mhce-realloc-window``
    updates before each scheduled one, the sums per token of its training
    targets' ``-log p_h(. | x)`` rows (H tensors (V, C_h) float64; not saved:
    a resumed run collects afresh).  At a scheduled update the codec's table
    is replaced in place (:func:`reallocate_codes`).

    A plain object, not a module: it holds no parameters or buffers (the
    table it changes is the codec's), so the head's state dict is unchanged.
    """

    def __init__(self, updates: Sequence[int], window: int, vocab_size: int):
        if vocab_size > REALLOC_MAX_VOCAB:
            raise ValueError(
                f"--mhce-realloc-updates solves a dense V x V assignment; the target dictionary has "
                f"{vocab_size} types, above {REALLOC_MAX_VOCAB}. Drop it and use a table from "
                f"mhce-build-codes (--mhce-code-table) at this vocabulary size."
            )
        if int(window) < 1:
            raise ValueError(f"--mhce-realloc-window must be >= 1, got {window}")
        self.updates = sorted(int(u) for u in updates)
        self.window = int(window)
        self.vocab_size = int(vocab_size)
        self.num_updates = 0
        self.last = -1  # the update of the last re-allocation
        self.stats: Optional[List[torch.Tensor]] = None

    def collecting(self) -> bool:
        """Within the window before the next re-allocation."""
        nxt = next((u for u in self.updates if u > self.num_updates), None)
        return nxt is not None and self.num_updates >= nxt - self.window

    @torch.no_grad()
    def collect(self, lps: List[torch.Tensor], target: torch.Tensor) -> None:
        """Add each target's ``-log p_h(. | x)`` rows to its token's row
        (a training step inside the window; otherwise nothing).

        Args:
            lps: H tensors (N, C_h), the head's digit log-softmaxes
            target: (N,) token ids
        """
        if not self.collecting():
            return
        if self.stats is None:
            self.stats = [lp.new_zeros(self.vocab_size, lp.size(-1), dtype=torch.float64) for lp in lps]
        for acc, lp in zip(self.stats, lps):
            acc.index_add_(0, target, -lp.detach().double())

    def set_num_updates(self, num_updates: int, codec: MixedRadixCodec) -> None:
        """The number of finished updates, before the forward of the next
        one: re-allocate ``codec``'s table at the scheduled updates, from the
        targets collected over the window."""
        self.num_updates = int(num_updates)
        # fairseq's task.train_step calls this before every forward, so once
        # per micro-batch with --update-freq > 1: re-allocate once per update
        if self.num_updates in self.updates and self.stats is not None and self.num_updates != self.last:
            self.last = self.num_updates
            self.reallocate(codec)

    @torch.no_grad()
    def reallocate(self, codec: MixedRadixCodec) -> None:
        """Move every token to the code that minimizes the NLL of its
        collected targets under the current heads; the table changes in place
        (buffers ``codec.code`` / ``codec.token``, saved in the checkpoint).
        Workers sum their statistics first, so every one computes the same
        table."""
        stats, self.stats = self.stats, None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for acc in stats:
                torch.distributed.all_reduce(acc)
        t0 = time.time()
        old = codec.code.cpu().numpy().copy()  # on CPU .numpy() shares the buffer that set_code overwrites
        new, before, after = reallocate_codes([a.cpu().numpy() for a in stats], old, codec.sizes)
        codec.set_code(torch.from_numpy(new))
        logger.info(
            f"mhce: re-allocated the code table at update {self.num_updates}: {int((new != old).sum())} of "
            f"{self.vocab_size} tokens moved; NLL of the targets collected over the last {self.window} "
            f"updates under the current heads {before:.1f} -> {after:.1f} nats "
            f"(without log Z_valid; {time.time() - t0:.1f} s)"
        )
