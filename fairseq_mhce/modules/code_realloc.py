"""Training-time re-allocation of an MHP code table (LightRNN).

:func:`reallocate_codes` moves every token to the code that minimizes the
NLL of its collected training targets under the current heads (an exact
assignment).  Its user is :class:`~.multihead_output.MultiHeadProduct`
(``--mhce-realloc-updates``), which also refuses a vocabulary above
:data:`REALLOC_MAX_VOCAB` when the model is built.
"""

from typing import Sequence

import numpy as np

from .code_table import check_code
from .codec import radix_strides

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
    from scipy.optimize import linear_sum_assignment

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
