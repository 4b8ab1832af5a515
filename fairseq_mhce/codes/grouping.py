"""Balanced grouping: a code table from token vectors, offline.

:func:`balanced_codes` turns (V, k) token vectors into a code table (see
:mod:`.table`) in which similar tokens share prefixes and a digit of a
head below the first means one thing under every prefix;
:func:`digit_coherence` scores a table on the same vectors.  Users: the PPMI
code table (:mod:`.ppmi`: the model's automatic table and
``mhce-build-codes --source ppmi``) and ``mhce-build-codes --source
checkpoint``.

The grouping works level by level, coarse to fine.  At level ``h`` every
group of level ``h-1`` (a range of ``C_h * P_h`` codes) is split into its
``C_h`` sub-ranges of ``P_h`` codes; a sub-range's capacity is the number of
its codes that are valid (``< V``) and not fixed (the specials keep codes
``0..fixed_first-1``), so every group is exactly full except the very last
one at each level, and the used codes are exactly ``[0, V)``.  The tokens of
each group are assigned to its sub-ranges under those capacities by
distance to *column centroids* that are shared by all groups of the level
(centroids of the residuals ``vector - centroid of its group``), alternating
with recomputing those centroids: at level 1 (one group, the whole
vocabulary) this is balanced k-means; below, digit ``j`` of head ``h`` gets
one meaning across prefixes, which is what a head shared by all prefixes
(MHP, the shared last head of MHE) needs.  Small groups are assigned exactly
(scipy's ``linear_sum_assignment`` on the capacity-expanded cost matrix),
large ones by a price-balanced greedy matching.  A level too large for
exact matchings in every round (V = 224k: 474 groups of 473 tokens) is
matched greedily, all groups at once, and, when its groups are small
enough, exactly once more on the centroids of its last round.  The starting
centroids come from k-means on a seeded sample of the rows.

scipy and scikit-learn are imported by the functions that need them.
"""

import math
from typing import List, Optional, Sequence

import numpy as np

from ..modules.codec import radix_strides
from .parallel import for_each
from .table import check_code

# groups up to this many tokens are assigned exactly (Hungarian on an n x n
# matrix); larger ones by the price-balanced greedy matching
EXACT_MAX = 1200
# a level whose per-group cost matrices hold more entries than this in all is
# matched greedily, all groups at once, in its rounds; groups of at most
# EXACT_MAX tokens then get one exact pass on the final centroids (at
# V = 224k: 474 groups of 473, about 10 ms each)
EXACT_BUDGET = 4_000_000
# the greedy matching's shared column prices come from this many rows
PRICE_SAMPLE = 20_000
# ... and then per group from this many cheapest columns of every row: few
# for a single group (its prices are the shared ones), more for many groups
# (their own prices need them; fewer rows are left over)
PRICE_CANDIDATES = 4
GROUP_CANDIDATES = 16
# k-means for the starting centroids runs on a seeded sample of
# max(KMEANS_SAMPLE * k, KMEANS_MIN) rows; the balanced rounds use every row
KMEANS_SAMPLE = 20
KMEANS_MIN = 10_000
# rows per block of a distance matrix (a few 10 MB)
BLOCK = 16384


def _unit_rows(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = np.array(x, dtype=np.float64, copy=True)
    x[~np.isfinite(x)] = 0.0
    n = np.linalg.norm(x, axis=1)
    zero = n < 1e-12
    if zero.any():  # no information: a random direction
        x[zero] = rng.standard_normal((int(zero.sum()), x.shape[1]))
        n[zero] = np.linalg.norm(x[zero], axis=1)
    return x / n[:, None]


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared distances (n, m) between the rows of a and b, in their dtype."""
    d = a @ b.T
    d *= -2.0
    d += (a * a).sum(1)[:, None]
    d += (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0, out=d)


def _group_sum(idx: np.ndarray, x: np.ndarray, n: int) -> np.ndarray:
    """(n, k) float64 sums of the rows of x (m, k) by group idx (m,): one
    sparse product (np.add.at is an order of magnitude slower), in x's
    float dtype (no float64 copy of a float32 x)."""
    import scipy.sparse as sp  # heavy (scipy): only when a table is built

    idx = np.asarray(idx, dtype=np.int64)
    x = np.asarray(x)
    dt = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    m = sp.csr_matrix((np.ones(idx.size, dtype=dt), (idx, np.arange(idx.size))), shape=(n, idx.size))
    return np.asarray(m @ x.astype(dt, copy=False), dtype=np.float64).reshape(n, -1)


def _prices(cost: np.ndarray, cap: np.ndarray, iters: int = 30) -> np.ndarray:
    """Column prices (K,) that spread the rows' cheapest choices (argmin of
    cost + price; cost (m, K), inf where closed) towards the capacities cap
    (K,), possibly fractional: a few dual ascent steps on the over- and
    under-full columns."""
    m, K = cost.shape
    price = np.zeros(K, dtype=cost.dtype)
    if m == 0:
        return price
    fin = np.isfinite(cost)
    step = float(np.median((cost - cost.min(1, keepdims=True))[fin])) + 1e-9
    cap = np.asarray(cap, dtype=np.float64)
    buf = np.empty_like(cost)
    for _ in range(iters):
        excess = np.bincount(np.add(cost, price, out=buf).argmin(1), minlength=K) - cap
        if not (excess > 0).any():
            break
        price += (step * np.clip(excess / np.maximum(cap, 1), -1.0, 1.0)).astype(price.dtype)
        step *= 0.85
    return price


def _accept(rows: np.ndarray, col: np.ndarray, val: np.ndarray, left: np.ndarray) -> np.ndarray:
    """Proposals of rows to columns col at cost val: each column keeps its
    cheapest proposers (ties by row) up to its room ``left`` (updated in
    place).  Returns which proposals were accepted."""
    order = np.lexsort((rows, val, col))
    cs = col[order]
    first = np.searchsorted(cs, cs, side="left")
    ok = np.empty(cs.size, dtype=bool)
    ok[order] = np.arange(cs.size) - first < left[cs]
    left -= np.bincount(col[ok], minlength=left.size)
    return ok


def _greedy_capacitated(cost: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Assign each row of ``cost`` (n, K) to a column with ``caps`` (K,)
    capacities (sum = n).  Column prices are first raised on over-full
    columns (a few dual ascent steps), then unassigned rows propose to their
    cheapest open column and each column keeps its cheapest proposers, until
    all rows are placed.  Deterministic."""
    n, K = cost.shape
    caps = np.asarray(caps, dtype=np.int64)
    cost = np.where(caps[None, :] > 0, cost, np.inf)
    adj = cost + _prices(cost, caps)
    out = np.full(n, -1, dtype=np.int64)
    left = caps.copy()
    todo = np.arange(n)
    while todo.size:
        sub = np.where(left[None, :] > 0, adj[todo], np.inf)
        j = sub.argmin(1)
        ok = _accept(todo, j, sub[np.arange(todo.size), j], left)
        out[todo[ok]] = j[ok]
        todo = todo[~ok]
    return out


def _cheapest(r, owner, M, price, shut, rows, t: int = 1):
    """For each of ``rows``: its t cheapest columns by squared distance of
    r[row] to M plus ``price`` (n_groups, C) of its group, among the columns
    not ``shut`` (n_groups, C), cheapest first (inf where fewer are open);
    returns their indices (n, t) and values (n, t).  Blockwise (a few 10
    MB), t argmin passes (argpartition over C columns costs far more)."""
    M = np.asarray(M, dtype=np.float32)
    price = np.asarray(price, dtype=np.float32)
    C = M.shape[0]
    t = min(int(t), C)
    best = np.empty((rows.size, t), dtype=np.int64)
    val = np.empty((rows.size, t), dtype=np.float32)
    one = shut.shape[0] == 1
    # -2 x.M folded into the product; |M|^2, the price and the shut columns
    # (inf) into one row per group; |x|^2 (the same for all columns of a
    # row) is added to the values only
    mt = np.ascontiguousarray(-2.0 * M.T)
    mp = np.where(shut, np.float32(np.inf), (M * M).sum(1)[None, :] + price).astype(np.float32)
    # reused buffers: a fresh 30 MB array per block costs as much in page
    # faults as the product itself
    buf = np.empty((min(BLOCK, rows.size), C), dtype=np.float32)
    add = None if one else np.empty_like(buf)
    for a in range(0, rows.size, BLOCK):
        rr = rows[a : a + BLOCK]
        x = np.asarray(r[rr], dtype=np.float32)
        d = np.matmul(x, mt, out=buf[: rr.size])
        if one:
            d += mp[0]
        else:
            d += np.take(mp, owner[rr], axis=0, out=add[: rr.size])
        i = np.arange(rr.size)
        xx = (x * x).sum(1)
        for k in range(t):
            j = d.argmin(1)
            best[a : a + rr.size, k] = j
            val[a : a + rr.size, k] = d[i, j] + xx
            d[i, j] = np.inf
    return best, val


def _greedy_level(
    r: np.ndarray, owner: np.ndarray, M: np.ndarray, caps: np.ndarray, seed: int, t: int = PRICE_CANDIDATES
) -> np.ndarray:
    """The columns (n,) of the rows r (n, k) of all groups of a level
    (``owner``: the group of each row), column j of group p taking exactly
    caps[p, j] rows, by squared distance to the shared centroids M (C, k).

    Prices first: shared by the groups from dual ascent on a seeded sample
    of ``PRICE_SAMPLE`` rows against the columns' total capacities, then
    per group and column from dual ascent on every row's t cheapest columns
    under the shared prices.  Then rows propose to their cheapest candidate
    with room and each column keeps its cheapest proposers; rows whose
    candidates all fill up go on proposing on their dense rows.  No (n, C)
    matrix is kept."""
    n = r.shape[0]
    n_par, C = caps.shape
    caps = caps.astype(np.int64)
    m = min(n, PRICE_SAMPLE)
    idx = np.arange(n) if m == n else np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
    d = _sqdist(np.asarray(r[idx], dtype=np.float32), np.asarray(M, dtype=np.float32))
    d[caps[owner[idx]] <= 0] = np.inf
    shared = _prices(d, caps.sum(0) * (m / n))
    del d
    price = np.tile(shared.astype(np.float64), (n_par, 1))  # (n_par, C)
    shut = caps <= 0
    j, v = _cheapest(r, owner, M, price, shut, np.arange(n), t)
    cols = owner[:, None] * C + j
    cost = v - shared[j]  # distances again
    price = price.reshape(-1)
    price = _prices_on(cost, cols, caps.reshape(-1), price)
    left = caps.reshape(-1).copy()
    g = _propose(cost + price[cols].astype(np.float32), cols, left)
    out = np.where(g >= 0, g % C, -1)
    todo = np.flatnonzero(g < 0)
    room = left.reshape(n_par, C)
    by_group = np.bincount(owner[todo], minlength=n_par)
    if todo.size and by_group.max() <= EXACT_MAX:
        # the rows left over fill exactly the room left in their group:
        # matched exactly there (at V = 224k, 474 small matchings beat the
        # dense proposal rounds in time and in cost)
        todo = todo[np.argsort(owner[todo], kind="stable")]
        ends = np.cumsum(by_group)

        def one(p):
            rows = todo[ends[p] - by_group[p] : ends[p]]
            ok = np.flatnonzero(room[p] > 0)
            out[rows] = ok[_assign_group(_sqdist(np.asarray(r[rows], dtype=np.float64), M[ok]), room[p][ok])]

        for_each(one, np.flatnonzero(by_group))
        return out
    price = price.reshape(n_par, C)
    while todo.size:
        j, v = _cheapest(r, owner, M, price, room <= 0, todo)
        j, v = j[:, 0], v[:, 0]
        ok = _accept(todo, owner[todo] * C + j, v, left)
        out[todo[ok]] = j[ok]
        todo = todo[~ok]
    return out


def _prices_on(cost: np.ndarray, cols: np.ndarray, caps: np.ndarray, price: np.ndarray, iters: int = 20) -> np.ndarray:
    """Dual ascent of the column prices (G,) from ``price`` on candidate
    lists: rows (n, t) of costs (inf: closed) and global column ids, towards
    the capacities caps (G,)."""
    n = cost.shape[0]
    price = price.copy()
    if n == 0:
        return price
    fin = np.isfinite(cost)
    step = float(np.median((cost - cost.min(1, keepdims=True))[fin])) + 1e-9
    i = np.arange(n)
    for _ in range(iters):
        a = cols[i, (cost + price[cols]).argmin(1)]
        excess = np.bincount(a, minlength=caps.size) - caps
        if not (excess > 0).any():
            break
        price += step * np.clip(excess / np.maximum(caps, 1), -1.0, 1.0)
        step *= 0.85
    return price


def _propose(adj: np.ndarray, cols: np.ndarray, left: np.ndarray) -> np.ndarray:
    """Rows propose to their cheapest candidate column (adj, cols: (n, t))
    with room (``left``, updated in place), each column keeps its cheapest
    proposers, until every row is placed or none of its candidates has room
    (then -1)."""
    n = adj.shape[0]
    out = np.full(n, -1, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        g = cols[todo]
        sub = np.where(left[g] > 0, adj[todo], np.inf)
        k = sub.argmin(1)
        i = np.arange(todo.size)
        bc = sub[i, k]
        live = np.isfinite(bc)
        if not live.any():
            break
        todo, best, bc = todo[live], g[i, k][live], bc[live]
        ok = _accept(todo, best, bc, left)
        out[todo[ok]] = best[ok]
        todo = todo[~ok]
    return out


def _assign_group(cost: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Rows of ``cost`` (n, K) -> columns, column j taking exactly caps[j]
    rows (sum caps = n): exact for small n, greedy for large n."""
    n, K = cost.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n <= EXACT_MAX:
        try:
            from scipy.optimize import linear_sum_assignment  # optional, heavy (scipy): greedy without it
        except ImportError:  # pragma: no cover - scipy ships with sklearn
            return _greedy_capacitated(cost, caps)
        slots = np.repeat(np.arange(K), caps)
        c = cost[:, slots]
        # every slot and every row is used once: subtracting column and row
        # minima keeps the optimum and makes the solver 2-3x faster
        c -= c.min(0, keepdims=True)
        c -= c.min(1, keepdims=True)
        rows, cols = linear_sum_assignment(c)
        out = np.empty(n, dtype=np.int64)
        out[rows] = slots[cols]
        return out
    return _greedy_capacitated(cost, caps)


def _assign_level(r, owner, offsets, M, caps, seed: int, exact: Optional[bool] = None) -> np.ndarray:
    """The columns (n,) of the rows r (n, k) of all groups of a level (rows
    of group p: ``offsets[p]:offsets[p+1]``, ``owner`` their group) under the
    capacities caps (n_groups, C), by distance to the shared centroids M.
    Groups of at most EXACT_MAX rows exactly (:func:`_assign_group`) when the
    level is small (or ``exact``); the others in one greedy matching
    (:func:`_greedy_level`)."""
    n_par, C = caps.shape
    sizes = np.diff(offsets)
    col = np.empty(r.shape[0], dtype=np.int64)
    ex = sizes <= EXACT_MAX
    if not exact and int((sizes * C).sum()) > EXACT_BUDGET:
        ex[:] = False

    def one(p):
        a, b = offsets[p], offsets[p + 1]
        ok = np.flatnonzero(caps[p] > 0)
        col[a:b] = ok[_assign_group(_sqdist(np.asarray(r[a:b], dtype=np.float64), M[ok]), caps[p][ok])]

    for_each(one, np.flatnonzero(ex & (sizes > 0)))
    rows = np.flatnonzero(~ex[owner])
    if rows.size:
        sub = np.cumsum(~ex) - 1  # the greedy groups, renumbered
        t = PRICE_CANDIDATES if (~ex).sum() == 1 else GROUP_CANDIDATES
        col[rows] = _greedy_level(r[rows], sub[owner[rows]], M, caps[~ex], seed, t)
    return col


def _init_centroids(r: np.ndarray, k: int, seed: int):
    """k starting centroids for the rows of r and the number of rows nearest
    to each: k-means (scikit-learn, one k-means++ start, on a seeded sample
    of ``max(KMEANS_SAMPLE * k, KMEANS_MIN)`` rows when r is larger) where
    possible, else a seeded sample of rows."""
    n = r.shape[0]
    rng = np.random.default_rng(seed)
    if n >= k:
        try:
            from sklearn.cluster import KMeans  # optional, heavy (scikit-learn): a row sample without it

            # the balanced rounds refine the centroids on every row; k-means
            # on all of them costs a minute at V = 224k
            m = max(k, KMEANS_SAMPLE * k, KMEANS_MIN)
            s = r if n <= m else r[np.sort(rng.choice(n, size=m, replace=False))]
            km = KMeans(n_clusters=k, n_init=1, max_iter=30, random_state=seed % (2**31))
            labels = km.fit_predict(np.asarray(s, dtype=np.float64))  # float32 is slower (upcast in chunks)
            return np.asarray(km.cluster_centers_, dtype=np.float64), np.bincount(labels, minlength=k)
        except ImportError:  # pragma: no cover
            cents = r[rng.choice(n, size=k, replace=False)].copy()
    else:
        cents = r[rng.choice(n, size=k, replace=True)] + 1e-3 * rng.standard_normal((k, r.shape[1]))
    return cents, np.bincount(_sqdist(r, cents).argmin(1), minlength=k)


def balanced_codes(
    vectors,
    head_sizes: Sequence[int],
    seed: int = 1,
    fixed_first: int = 4,
    rounds: int = 6,
    last: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """A code table (V,) from token vectors (V, k): similar tokens share
    prefixes, digit j of a head below the first means one thing across all
    prefixes, every group is exactly full except the last one of each level,
    the used codes are exactly ``[0, V)``, and tokens ``0..fixed_first-1``
    (fairseq's specials) keep codes ``0..fixed_first-1``.  Deterministic for
    a given ``seed``.  See the module docstring for the algorithm.

    ``last``: token ids that are not clustered but get the highest codes, in
    id order (for instance the types that never occur in the training
    targets of a joint dictionary: they then fill whole groups of their own
    instead of diluting the groups of real target tokens)."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"token vectors must be a (V, k) matrix, got shape {x.shape}")
    V = int(x.shape[0])
    sizes = [int(c) for c in head_sizes]
    if not sizes or any(c < 1 for c in sizes):
        raise ValueError(f"bad head sizes {sizes}")
    if math.prod(sizes) < V:
        raise ValueError(f"the product of the head sizes {sizes} is {math.prod(sizes)}, below the vocabulary size {V}")
    nfix = max(0, min(int(fixed_first), V))
    code = np.full(V, -1, dtype=np.int64)
    code[:nfix] = np.arange(nfix)
    tail = np.zeros(V, dtype=bool)
    if last is not None:
        last = np.asarray(last, dtype=np.int64).reshape(-1)
        if last.size and (last.min() < nfix or last.max() >= V):
            raise ValueError(f"balanced_codes: the ids in last must lie in [{nfix}, {V})")
        tail[last] = True
    n_tail = int(tail.sum())
    code[tail] = np.arange(V - n_tail, V)  # in id order
    free = np.flatnonzero(~tail[nfix:]) + nfix
    V_eff = V - n_tail  # the clustered tokens use the codes [nfix, V_eff)
    H = len(sizes)
    if free.size == 0:
        return code
    if H == 1:  # a single head: every permutation is the same model
        code[free] = np.arange(nfix, V_eff)
        return code
    rng = np.random.default_rng(seed)
    u = _unit_rows(x, rng)
    strides = radix_strides(sizes)

    # the groups of the current level: first codes, and their tokens, group
    # by group (ids ascending within a group)
    starts = np.zeros(1, dtype=np.int64)
    toks = free
    offsets = np.array([0, free.size], dtype=np.int64)
    for h in range(H):
        C, S = sizes[h], strides[h]
        n_par = starts.size
        lo = starts[:, None] + np.arange(C)[None, :] * S  # (n_par, C) first code of child
        hi = lo + S
        caps = np.clip(np.minimum(hi, V_eff) - np.maximum(lo, nfix), 0, None)
        counts = np.diff(offsets)
        assert np.array_equal(caps.sum(1), counts), (h, caps.sum(1), counts)
        owner = np.repeat(np.arange(n_par), counts)
        # residuals from each parent's centroid (float32: distances only)
        ut = u[toks]
        cents = _group_sum(owner, ut, n_par) / counts[:, None]
        res = (ut - cents[owner]).astype(np.float32)
        del ut
        used_cols = np.flatnonzero(caps.sum(0) > 0)
        M = np.zeros((C, u.shape[1]))
        init, size = _init_centroids(res, used_cols.size, seed + 7919 * h)
        # smaller clusters to the columns with less room (group 0 beside the
        # specials, the partial last group): a k-means cluster must not be
        # split only because it was dealt to a column too small for it
        col_cap = caps.sum(0)[used_cols]
        M[used_cols[np.argsort(col_cap, kind="stable")]] = init[np.argsort(size, kind="stable")]
        n_rounds = rounds if h == 0 else max(2, rounds // 2)
        # a level matched greedily whose groups are small enough gets one
        # exact pass on the centroids of its last round
        final_exact = int((counts * C).sum()) > EXACT_BUDGET and counts.max() <= EXACT_MAX
        prev = None
        for rnd in range(n_rounds):
            col = _assign_level(res, owner, offsets, M, caps, seed + 7919 * h + 131 * rnd)
            if prev is not None and np.array_equal(prev, col):
                break
            prev = col
            cnt = np.bincount(col, minlength=C)
            has = cnt > 0
            M[has] = _group_sum(col, res, C)[has] / cnt[has, None]
        if final_exact:
            col = _assign_level(res, owner, offsets, M, caps, seed, exact=True)
        # children become the next level's groups, in code order
        key = owner * C + col
        order = np.lexsort((toks, key))
        toks, key = toks[order], key[order]
        uk, first = np.unique(key, return_index=True)
        starts = starts[uk // C] + (uk % C) * S
        offsets = np.append(first, toks.size).astype(np.int64)
    assert (np.diff(offsets) == 1).all()
    code[toks] = starts
    check_code(code, V, "balanced_codes")
    return code


def digit_coherence(
    vectors, code, head_sizes: Sequence[int], fixed_first: int = 4, skip: Optional[Sequence[int]] = None
) -> List[float]:
    """Per head h: mean cosine similarity between tokens that share digit
    ``d_h`` (head 1: share the group), each token taken as its vector minus
    the mean of its prefix group ``d_<h`` (unit vectors), averaged over the
    digit classes with at least two members; specials (and the ids in
    ``skip``) left out.  Higher is
    better; a random table scores about 0.  Cheap: O(V k)."""
    rng = np.random.default_rng(0)
    u = _unit_rows(np.asarray(vectors, dtype=np.float64), rng)
    code = np.asarray(code, dtype=np.int64)
    V = u.shape[0]
    keep = np.arange(V) >= min(int(fixed_first), V)
    if skip is not None:
        keep[np.asarray(skip, dtype=np.int64)] = False
    u, c = u[keep], code[keep]
    sizes = [int(s) for s in head_sizes]
    strides = radix_strides(sizes)
    out = []
    for h, (C, S) in enumerate(zip(sizes, strides)):
        prefix = c // (S * C)
        digit = (c // S) % C
        _, pinv = np.unique(prefix, return_inverse=True)
        cent = _group_sum(pinv, u, int(pinv.max()) + 1) / np.bincount(pinv)[:, None]
        r = u - cent[pinv] if h > 0 else u
        r = _unit_rows(r, rng)
        sums = _group_sum(digit, r, C)
        n = np.bincount(digit, minlength=C).astype(np.float64)
        m = n >= 2
        if not m.any():
            out.append(0.0)
            continue
        pair = ((sums[m] ** 2).sum(1) - n[m]) / (n[m] * (n[m] - 1))
        out.append(float(pair.mean()))
    return out
