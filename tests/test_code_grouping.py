"""balanced_codes on inputs large enough for its greedy paths
(fairseq_mhce/codes/grouping.py): the guarantees of its docstring,
determinism for a seed, and grouping quality well above identity codes.

A few seconds: V = 5000, 16-dim clustered vectors.
"""

import numpy as np
import pytest

from fairseq_mhce.codes import grouping as bg

from .utils import check_balanced


def clustered(V, k=16, n_clusters=60, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, k)) * 2
    return centres[rng.integers(0, n_clusters, V)] + rng.standard_normal((V, k))


@pytest.mark.parametrize("sizes", [[71, 71], [18, 17, 17]])
@pytest.mark.parametrize("greedy_last_level", [False, True])
def test_guarantees_and_determinism(sizes, greedy_last_level, monkeypatch):
    V = 5000
    if greedy_last_level:
        # the V = 224k path at this size: every level matched greedily from
        # sampled prices, then one exact pass on the small groups
        monkeypatch.setattr(bg, "EXACT_BUDGET", 10_000)
        monkeypatch.setattr(bg, "PRICE_SAMPLE", 1_000)
    x = clustered(V)
    last = np.random.default_rng(1).choice(np.arange(4, V), 37, replace=False)
    a = bg.balanced_codes(x, sizes, seed=3, last=last)
    check_balanced(a, V, sizes, last=last)
    assert np.array_equal(a, bg.balanced_codes(x, sizes, seed=3, last=last)), "not deterministic for a seed"
    b = bg.balanced_codes(x, sizes, seed=4, last=last)
    check_balanced(b, V, sizes, last=last)
    assert not np.array_equal(a, b)  # another seed, another start
    learned = bg.digit_coherence(x, a, sizes, skip=last)
    ident = bg.digit_coherence(x, np.arange(V), sizes, skip=last)
    assert learned[0] > ident[0] + 0.3, (learned, ident)
    assert all(lc > ic + 0.02 for lc, ic in zip(learned[1:], ident[1:])), (learned, ident)


def test_no_specials_and_a_partial_last_group():
    # the shortlist's tail: no fixed tokens, V far from a multiple of the sizes
    V, sizes = 4321, [71, 71]
    x = clustered(V, seed=2)
    code = bg.balanced_codes(x, sizes, seed=1, fixed_first=0)
    check_balanced(code, V, sizes, nfix=0)


def test_greedy_capacitated_fills_every_column_exactly():
    rng = np.random.default_rng(0)
    n, K = 3000, 40
    caps = rng.multinomial(n - 2 * 75, np.ones(K - 2) / (K - 2))
    caps = np.concatenate([[75, 0], caps, [75]])[:K]
    caps[-1] += n - caps.sum()
    cost = rng.random((n, K))
    col = bg._greedy_capacitated(cost, caps)
    assert np.array_equal(np.bincount(col, minlength=K), caps)
    assert np.array_equal(col, bg._greedy_capacitated(cost, caps))
    # far better than a random assignment with the same capacities
    rand = rng.permutation(np.repeat(np.arange(K), caps))
    assert cost[np.arange(n), col].sum() < 0.5 * cost[np.arange(n), rand].sum()


def test_exact_assignment_is_optimal():
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(1)
    n, K = 60, 7
    caps = np.array([10, 5, 0, 15, 10, 10, 10])
    cost = rng.random((n, K))
    col = bg._assign_group(cost, caps)
    assert np.array_equal(np.bincount(col, minlength=K), caps)
    slots = np.repeat(np.arange(K), caps)
    r, c = linear_sum_assignment(cost[:, slots])
    assert np.isclose(cost[np.arange(n), col].sum(), cost[:, slots][r, c].sum())
