"""Learned code tables: which code (and so which digits) each target token gets.

A code table is a permutation ``code`` of ``[0, V)`` over the ids of a fairseq
target dictionary; :class:`~fairseq_mhce.modules.codec.MixedRadixCodec` writes
``code[v]`` in the big-endian mixed radix of the head sizes ``C_1 .. C_H``.
The default (identity) makes head 1 a frequency band of the dictionary; this
module builds tables that put *similar* tokens under the same prefix and make
a digit of a shared head mean the same thing under every prefix.

File format (JSON, written by :func:`save_code_table`)::

    {"format": "fairseq_mhce.code_table", "version": 1,
     "vocab_size": V, "head_sizes": [C_1, .., C_H],
     "dictionary_sha1": sha1("\\n".join(dictionary symbols), utf-8),
     "code": [code of token 0, .., code of token V-1],
     "meta": {...free-form: how it was built...}}

Grouping (:func:`balanced_codes`) works level by level, coarse to fine.  At
level ``h`` every group of level ``h-1`` (a range of ``C_h * P_h`` codes) is
split into its ``C_h`` sub-ranges of ``P_h`` codes; a sub-range's capacity is
the number of its codes that are valid (``< V``) and not fixed (the specials
keep codes ``0..fixed_first-1``), so every group is exactly full except the
very last one at each level, and the used codes are exactly ``[0, V)``.  The
tokens of each group are assigned to its sub-ranges under those capacities by
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

Token vectors come from :func:`ppmi_svd_vectors` (co-occurrence in the
training targets) or :func:`checkpoint_vectors` (a trained model's output or
input embeddings).  ``scripts/build_codes.py`` is the command line.

Only numpy and torch are imported at module import time; scipy, scikit-learn
and fairseq are imported by the functions that need them.
"""

import hashlib
import json
import math
import os
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

FORMAT = "fairseq_mhce.code_table"
VERSION = 1
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq Dictionary ids 0..3

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
# power iterations of the randomized SVD of the PPMI matrix
SVD_ITERS = 4


# --------------------------------------------------------------------------
# dictionary and file
# --------------------------------------------------------------------------


def dictionary_symbols(d) -> List[str]:
    """The symbols of a fairseq target dictionary, in id order.

    ``d``: a ``fairseq.data.Dictionary`` (anything with ``.symbols``) or the
    path of a ``dict.XX.txt``, loaded with ``Dictionary.load`` so that the
    four specials ``<s> <pad> </s> <unk>`` come first exactly as in the model.
    """
    if hasattr(d, "symbols"):
        return [str(s) for s in d.symbols]
    path = os.fspath(d)
    if not os.path.isfile(path):
        raise ValueError(f"no dictionary file {path}")
    from fairseq.data import Dictionary

    return [str(s) for s in Dictionary.load(path).symbols]


def dictionary_sha1(symbols: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(symbols).encode("utf-8")).hexdigest()


def _check_code(code: np.ndarray, vocab_size: int, what: str) -> None:
    if code.shape != (vocab_size,) or not np.array_equal(np.sort(code), np.arange(vocab_size)):
        raise ValueError(
            f"{what}: the code table must be a permutation of [0, {vocab_size}) "
            f"(one distinct code per token of the target dictionary)"
        )


def save_code_table(
    path,
    code,
    head_sizes: Sequence[int],
    dictionary_symbols: Sequence[str],
    meta: Optional[Dict] = None,
) -> None:
    """Write a code table (JSON, see the module docstring).

    Never overwrites: an existing ``path`` raises ``FileExistsError``.  The
    file appears atomically (written to a temporary file in the same folder,
    then hard-linked to ``path``, which fails if ``path`` exists).
    """
    path = os.fspath(path)
    code = np.asarray(code, dtype=np.int64).reshape(-1)
    vocab_size = int(code.shape[0])
    sizes = [int(c) for c in head_sizes]
    symbols = [str(s) for s in dictionary_symbols]
    if len(symbols) != vocab_size:
        raise ValueError(f"the code table has {vocab_size} entries but the dictionary has {len(symbols)} symbols")
    if not sizes or any(c < 1 for c in sizes) or math.prod(sizes) < vocab_size:
        raise ValueError(
            f"head sizes {sizes} (product {math.prod(sizes) if sizes else 0}) cannot give "
            f"{vocab_size} tokens distinct codes"
        )
    _check_code(code, vocab_size, path)
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "vocab_size": vocab_size,
        "head_sizes": sizes,
        "dictionary_sha1": dictionary_sha1(symbols),
        "code": [int(c) for c in code],
        "meta": dict(meta or {}),
    }
    text = json.dumps(obj, sort_keys=False) + "\n"
    if os.path.lexists(path):
        raise FileExistsError(
            f"{path} already exists; a code table is never overwritten (choose another path or delete it)"
        )
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a normal file's mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails if path exists
        except FileExistsError:
            raise FileExistsError(
                f"{path} already exists; a code table is never overwritten (choose another path or delete it)"
            ) from None
        except OSError:  # no hard links on this file system: exclusive create
            with open(path, "x", encoding="utf-8") as f:
                f.write(text)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _is_int(value) -> bool:
    """A JSON integer (``60``, or ``60.0``; not ``true``, not ``"60"``)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _field_error(path: str, field: str, what: str, value) -> ValueError:
    return ValueError(
        f"the code table {path}: field {field!r} must be {what}, got {_short(value)}; the file is damaged or "
        f"was edited by hand: rebuild it with scripts/build_codes.py"
    )


def _check_fields(path: str, obj: Dict) -> None:
    """Types of the fields of a code table; ``meta`` null becomes ``{}``."""
    vocab_size = obj["vocab_size"]
    if not _is_int(vocab_size) or vocab_size < 1:
        raise _field_error(path, "vocab_size", "a positive integer (the target dictionary size)", vocab_size)
    obj["vocab_size"] = int(vocab_size)
    sizes = obj["head_sizes"]
    if not isinstance(sizes, list) or not sizes or not all(_is_int(c) and c >= 1 for c in sizes):
        raise _field_error(path, "head_sizes", "a list of positive integers (one size per head)", sizes)
    obj["head_sizes"] = [int(c) for c in sizes]
    code = obj["code"]
    if not isinstance(code, list):
        raise _field_error(path, "code", "a list of integers (the code of each token id)", code)
    bad = next((i for i, c in enumerate(code) if not _is_int(c)), None)
    if bad is not None:
        raise _field_error(path, "code", f"a list of integers (the code of each token id); entry {bad}", code[bad])
    sha = obj.get("dictionary_sha1")
    if sha is not None and not isinstance(sha, str):
        raise _field_error(path, "dictionary_sha1", "a string (sha1 of the dictionary)", sha)
    meta = obj.get("meta")
    if meta is None:
        obj["meta"] = meta = {}
    if not isinstance(meta, dict):
        raise _field_error(path, "meta", "an object (how the table was built) or null", meta)
    shortlist = meta.get("shortlist")
    if shortlist is not None and not (_is_int(shortlist) and shortlist >= 0):
        raise _field_error(path, "meta.shortlist", "a non-negative integer (the MHP shortlist it was built for)",
                           shortlist)  # fmt: skip


def read_code_table(path) -> Dict:
    """The parsed JSON of a code table file: format and field types checked
    (``ValueError`` naming the file and the field), ``meta`` always an
    object; nothing is compared with a model here."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no code table file {path} (build one with scripts/build_codes.py)")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a code table (not JSON: {e}); build one with scripts/build_codes.py") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f'{path} is not a code table (no "format": "{FORMAT}"); build one with scripts/build_codes.py')
    if obj.get("version") != VERSION:
        raise ValueError(f"{path}: code table version {obj.get('version')!r}, this plugin reads version {VERSION}")
    for key in ("vocab_size", "head_sizes", "code"):
        if key not in obj:
            raise ValueError(f"{path} is not a complete code table (no {key!r})")
    _check_fields(path, obj)
    return obj


def load_code_table(
    path,
    vocab_size: int,
    head_sizes: Sequence[int],
    dictionary_symbols: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """Read a code table for a model with target dictionary size
    ``vocab_size`` and head sizes ``head_sizes``; returns the (V,) long tensor
    ``code`` (token id -> code).  Raises ``ValueError`` naming both sides on
    any mismatch; ``dictionary_symbols`` (e.g. ``dictionary.symbols``), when
    given, must be the very dictionary the table was built for."""
    path = os.fspath(path)
    obj = read_code_table(path)
    vocab_size = int(vocab_size)
    sizes = [int(c) for c in head_sizes]
    if int(obj["vocab_size"]) != vocab_size:
        raise ValueError(
            f"the code table {path} was built for a target dictionary of {obj['vocab_size']} types, "
            f"this model's has {vocab_size}; rebuild it with scripts/build_codes.py for this data-bin"
        )
    table_sizes = [int(c) for c in obj["head_sizes"]]
    if table_sizes != sizes:
        spec = ",".join(map(str, table_sizes))
        raise ValueError(
            f"the code table {path} was built for head sizes {table_sizes}, this model has {sizes}; "
            f"pass --mhce-head-sizes {spec} to use it, or rebuild it with "
            f"scripts/build_codes.py --head-sizes {','.join(map(str, sizes))}"
        )
    if dictionary_symbols is not None:
        want = dictionary_sha1([str(s) for s in dictionary_symbols])
        have = obj.get("dictionary_sha1")
        if have != want:
            raise ValueError(
                f"the code table {path} was built for another target dictionary of the same size "
                f"(dictionary sha1 {have}, this model's {want}); rebuild it with "
                f"scripts/build_codes.py for this data-bin"
            )
    try:
        code = np.asarray(obj["code"], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"the code table {path}: field 'code' is not a list of integers") from None
    _check_code(code, vocab_size, f"the code table {path}")
    return torch.from_numpy(code).long()


def shortlist_code(code, shortlist: int, listed=None) -> torch.Tensor:
    """The code table of an MHP head with a shortlist of ``N`` tokens: the
    ``listed`` token ids (default ``[0, N)``, a fairseq dictionary's most
    frequent) get the codes ``[V - N, V)`` in the given order (the product
    never scores them), every other token a code in ``[0, V - N)``, in the
    order of its code in ``code``.  Idempotent: a table already laid out so
    is returned unchanged."""
    code = torch.as_tensor(code, dtype=torch.long).reshape(-1)
    V, N = code.numel(), int(shortlist)
    if not 0 <= N <= V:
        raise ValueError(f"a shortlist of {N} tokens for a vocabulary of {V}")
    listed = torch.arange(N) if listed is None else torch.as_tensor(listed, dtype=torch.long).reshape(-1)
    on = torch.zeros(V, dtype=torch.bool)
    on[listed] = True
    if listed.numel() != N or int(on.sum()) != N:
        raise ValueError(f"the shortlist must name {N} distinct token ids of [0, {V})")
    out = torch.empty_like(code)
    out[listed] = torch.arange(V - N, V)
    rest = (~on).nonzero().squeeze(-1)
    out[rest[code[rest].argsort()]] = torch.arange(V - N)
    return out


# --------------------------------------------------------------------------
# grouping
# --------------------------------------------------------------------------


def _strides(sizes: Sequence[int]) -> List[int]:
    return [math.prod(sizes[h + 1 :]) for h in range(len(sizes))]


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
    import scipy.sparse as sp

    idx = np.asarray(idx, dtype=np.int64)
    x = np.asarray(x)
    dt = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    m = sp.csr_matrix((np.ones(idx.size, dtype=dt), (idx, np.arange(idx.size))), shape=(n, idx.size))
    return np.asarray(m @ x.astype(dt, copy=False), dtype=np.float64).reshape(n, -1)


def _threads() -> int:
    """Worker threads for GIL-free work (scipy's assignment solver and
    sparse products): torch's intra-op thread count (OMP_NUM_THREADS)."""
    return max(1, int(torch.get_num_threads()))


def _each(fn, items) -> None:
    """fn(item) for every item, on _threads() threads; fn writes disjoint
    outputs, so the result does not depend on the schedule."""
    items = list(items)
    n = min(_threads(), len(items))
    if n <= 1:
        for it in items:
            fn(it)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(n) as ex:
        for _ in ex.map(fn, items):
            pass


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

        _each(one, np.flatnonzero(by_group))
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
            from scipy.optimize import linear_sum_assignment
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

    _each(one, np.flatnonzero(ex & (sizes > 0)))
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
            from sklearn.cluster import KMeans

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
    strides = _strides(sizes)

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
    _check_code(code, V, "balanced_codes")
    return code


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
    _check_code(code, V, "reallocate_codes")
    if V > REALLOC_MAX_VOCAB:
        raise ValueError(
            f"code re-allocation solves a dense V x V assignment; V = {V} is above {REALLOC_MAX_VOCAB}. "
            f"Use a table from scripts/build_codes.py (--mhce-code-table) at this vocabulary size."
        )
    if len(costs) != len(sizes) or any(np.shape(c) != (V, s) for c, s in zip(costs, sizes)):
        raise ValueError(f"reallocate_codes: costs must be {len(sizes)} arrays (V, C_h) for sizes {sizes}, V = {V}")
    from scipy.optimize import linear_sum_assignment

    nfix = max(0, min(int(fixed_first), V))
    tokens = np.arange(nfix, V)
    slots = np.sort(code[tokens])  # the codes the movable tokens hold now
    strides = _strides(sizes)
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
    _check_code(new, V, "reallocate_codes")
    return new, before, after


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
    strides = _strides(sizes)
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


# --------------------------------------------------------------------------
# token vectors
# --------------------------------------------------------------------------


def _left_counts(toks: np.ndarray, lens: np.ndarray, V: int, window: int):
    """(V, V) csr: entry [b, a] = sum over the positions where token a stands
    o <= window places to the left of token b in the same sentence of 1/o."""
    import scipy.sparse as sp

    pos = np.arange(toks.size) - np.repeat(np.cumsum(lens) - lens, lens)  # index within the sentence
    idx = np.int32 if V < 2**31 else np.int64
    rows, cols, vals = [], [], []
    for o in range(1, window + 1):
        ok = pos[o:] >= o  # toks[i] and toks[i + o] share a sentence
        rows.append(toks[o:][ok].astype(idx))
        cols.append(toks[:-o][ok].astype(idx))
        vals.append(np.full(rows[-1].size, 1.0 / o))
    # one conversion sums the duplicates (a csr sum per offset costs more)
    return sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(V, V)).tocsr()


def _orth(y: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns of the tall y (n, l), in y's
    dtype: Cholesky QR with the l x l Gram matrix accumulated in float64 by
    row blocks (LAPACK's QR of a 448k x 74 float32 matrix takes seconds,
    this a tenth of one)."""
    g = np.zeros((y.shape[1], y.shape[1]))
    buf = np.empty((min(4 * BLOCK, y.shape[0]), y.shape[1]))
    for a in range(0, y.shape[0], buf.shape[0]):
        b = buf[: min(buf.shape[0], y.shape[0] - a)]
        np.copyto(b, y[a : a + b.shape[0]])
        g += b.T @ b
    try:
        c = np.linalg.cholesky(g)
    except np.linalg.LinAlgError:
        c = None
    d = np.abs(np.diag(c)) if c is not None else None
    if d is None or d.min() < 1e-5 * d.max():  # (nearly) rank deficient: a tiny corpus
        return np.linalg.qr(y)[0]
    return y @ np.linalg.inv(c).T.astype(y.dtype)


def _row_blocks(A, n: int) -> list:
    """The csr A cut into n row blocks of about equal nnz."""
    if n <= 1:
        return [A]
    cuts = np.searchsorted(A.indptr, np.linspace(0, A.nnz, n + 1)[1:-1]).tolist()
    bounds = [0] + cuts + [A.shape[0]]
    return [A[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _spmm(blocks: list, x: np.ndarray) -> np.ndarray:
    """(row blocks of a csr matrix) @ x, a thread per block (scipy's sparse
    product runs without the GIL but on one core)."""
    if len(blocks) == 1:
        return blocks[0] @ x
    ends = np.cumsum([b.shape[0] for b in blocks])
    out = np.empty((int(ends[-1]), x.shape[1]), dtype=np.result_type(blocks[0].dtype, x.dtype))

    def one(i):
        out[ends[i] - blocks[i].shape[0] : ends[i]] = blocks[i] @ x

    _each(one, range(len(blocks)))
    return out


def _top_left_singular(A, k: int, seed: int, n_iter: Optional[int] = None, oversample: int = 10):
    """The k leading left singular vectors (m, k) and values (k,) of the
    sparse A (m, n), float32: a randomized range finder with n_iter power
    iterations, orthonormalized by Cholesky QR (Halko et al. 2011), then the
    SVD of the small projected matrix.  Signs fixed (each vector's largest
    entry positive), so the result depends on the seed only."""
    n_iter = SVD_ITERS if n_iter is None else int(n_iter)
    m, n = A.shape
    width = min(k + oversample, m, n)
    nb = _threads()
    Ab, ATb = _row_blocks(A, nb), _row_blocks(A.T.tocsr(), nb)  # csr products beat csc ones
    q = _orth(_spmm(Ab, np.random.default_rng(seed).standard_normal((n, width), dtype=np.float32)))
    for _ in range(n_iter):
        # one orthonormalization per A A^T step is enough: the columns'
        # conditioning grows by (s_1 / s_l)^2, a few hundred here
        q = _orth(_spmm(Ab, _spmm(ATb, q)))
    q = _orth(q)  # twice: orthonormal to float32 precision (CholeskyQR2)
    b = _spmm(ATb, q).astype(np.float64)  # (Q^T A)^T = Q_b r, so Q^T A = r^T Q_b^T
    try:
        r = np.linalg.cholesky(b.T @ b).T
    except np.linalg.LinAlgError:  # rank deficient (a tiny corpus)
        r = np.linalg.qr(b, mode="r")
    ur, s, _ = np.linalg.svd(r.T.astype(np.float64))
    u = q.astype(np.float64) @ ur[:, :k]
    big = np.abs(u).argmax(0)
    u *= np.sign(u[big, np.arange(u.shape[1])])[None, :]
    return u, s[:k]


def ppmi_svd_vectors(
    token_id_sequences: Iterable,
    vocab_size: int,
    dim: int = 64,
    window: int = 2,
    seed: int = 1,
    smoothing: float = 0.75,
    chunk_tokens: int = 2_000_000,
) -> np.ndarray:
    """(V, dim) token vectors from co-occurrence in a corpus of token id
    sequences: counts of each token with the tokens up to ``window``
    positions to its left and to its right (left and right neighbours are
    separate context features, weight 1/distance), positive PMI with
    context-distribution smoothing ``smoothing``, truncated SVD (``U S^0.5``;
    randomized, float32, seeded).
    Tokens never seen get small random (seeded) vectors."""
    import scipy.sparse as sp

    V = int(vocab_size)
    window = max(1, int(window))
    left = None  # left[b, a]: a seen on the left of b; the right contexts are its transpose
    seen = np.zeros(V, dtype=bool)

    def flush(buf):
        nonlocal left
        seqs = [np.asarray(s).reshape(-1) for s in buf]
        if not seqs:
            return
        toks = np.concatenate(seqs).astype(np.int64, copy=False)
        if toks.size == 0:
            return
        if toks.min() < 0 or toks.max() >= V:
            raise ValueError(f"token id out of range [0, {V}) in the corpus")
        seen[toks] = True
        m = _left_counts(toks, np.array([s.size for s in seqs], dtype=np.int64), V, window)
        left = m if left is None else left + m

    buf, n = [], 0
    for s in token_id_sequences:
        buf.append(s)
        n += len(s)
        if n >= chunk_tokens:
            flush(buf)
            buf, n = [], 0
    flush(buf)

    dim = max(1, min(int(dim), V - 1, 2 * V - 1))
    out = np.zeros((V, dim))
    if left is not None and left.nnz > 0:
        counts = sp.hstack([left, left.T.tocsr()], format="csr")  # [left | right] contexts
        del left
        total = counts.data.sum()
        row = np.asarray(counts.sum(1)).ravel()
        ctx = np.asarray(counts.sum(0)).ravel() ** smoothing
        ctx = ctx / ctx.sum()
        r_of = np.repeat(np.arange(V), np.diff(counts.indptr))
        pmi = np.log(counts.data / total) - np.log(row[r_of] / total) - np.log(ctx[counts.indices])
        keep = pmi > 0
        indptr = np.concatenate([[0], np.cumsum(np.bincount(r_of[keep], minlength=V))])
        ppmi = sp.csr_matrix((pmi[keep].astype(np.float32), counts.indices[keep], indptr), shape=counts.shape)
        del counts, r_of, pmi, keep
        if ppmi.nnz > 0:
            u, s = _top_left_singular(ppmi, dim, seed % (2**31))
            out[:, : u.shape[1]] = u * np.sqrt(np.maximum(s, 1e-12))[None, :]
    rng = np.random.default_rng(seed)
    has = np.linalg.norm(out, axis=1) > 1e-12
    scale = float(np.linalg.norm(out[has], axis=1).mean()) if has.any() else 1.0
    missing = ~has | ~seen
    if missing.any():
        out[missing] = 1e-3 * scale * rng.standard_normal((int(missing.sum()), dim))
    return out


OUTPUT_KEYS = (
    "decoder.output_projection.weight",  # softmax, and MHS in the legacy layout
    "decoder.mhce_head.proj.weight",  # MHS in the plugin's layout
    "decoder.mhce_head.output_projection.weight",
)
INPUT_KEYS = ("decoder.embed_tokens.weight",)
CODE_KEY = "decoder.mhce_head.codec.code"  # (V,) token id -> code
TOKEN_VECTORS_KEY = "decoder.mhce_head.token_vectors"  # per-token MHE, rows in code order
TIED_KEY = "decoder.mhce_head.tied_output"  # the decoder embedding is the output, rows in code order


def read_checkpoint(path) -> Dict:
    """A fairseq checkpoint loaded on the CPU (a trusted file: fairseq
    checkpoints are pickles).  ``ValueError`` naming the file when it is
    missing, unreadable (truncated: an interrupted save or copy) or not a
    fairseq checkpoint."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint file {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, a text file, an empty file, ...
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"cannot read the checkpoint {path} ({type(e).__name__}{': ' + why if why else ''}): it is truncated "
            f"(an interrupted save or copy) or not a fairseq checkpoint; pass a complete checkpoint_*.pt"
        ) from None
    checkpoint_state(ckpt, path)
    return ckpt


def checkpoint_state(ckpt, path) -> Dict:
    """The model state dict of a loaded checkpoint (``ValueError`` when it
    has none)."""
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{os.fspath(path)} is not a fairseq checkpoint (no 'model' state dict)")
    return state


def _token_order(w: np.ndarray, code, key: str, path: str) -> np.ndarray:
    """(R, d) rows in code order -> (V, d) rows in token order."""
    code = np.asarray(code.cpu() if torch.is_tensor(code) else code, dtype=np.int64).reshape(-1)
    if code.size == 0 or code.min() < 0 or code.max() >= w.shape[0]:
        raise ValueError(
            f"{path}: {key} has {w.shape[0]} rows, fewer than the codes of {CODE_KEY} need "
            f"({int(code.max()) + 1 if code.size else 0}): a damaged checkpoint"
        )
    return w[code]


def checkpoint_vectors(path, which: str = "output", vocab_size: Optional[int] = None, ckpt=None) -> np.ndarray:
    """(V, d) token vectors from a fairseq checkpoint.

    ``which="output"``: the per-token output vectors (a softmax model's
    ``decoder.output_projection.weight``, an MHS model's full classifier;
    with shared input/output embeddings the decoder's embedding); ``"input"``:
    ``decoder.embed_tokens.weight`` (any model).  ``vocab_size``, when given,
    must be the number of rows (an MHP/MHE head's ``sum(C_h) x d`` projection
    is not a per-token table).

    A plugin checkpoint keeps some tables in *code order* (row ``code[v]`` is
    token ``v``; ``decoder.mhce_head.codec.code`` gives ``code``): a per-token
    MHE head's ``decoder.mhce_head.token_vectors`` (rows past ``V`` are
    padding) and, when the output is tied (``decoder.mhce_head.tied_output``),
    the decoder's embedding.  Those are returned in token order.

    ``ckpt``: the checkpoint already loaded by :func:`read_checkpoint` (else
    ``path`` is read)."""
    path = os.fspath(path)
    if which not in ("output", "input"):
        raise ValueError(f"which must be 'output' or 'input', got {which!r}")
    if ckpt is None:
        ckpt = read_checkpoint(path)
    state = checkpoint_state(ckpt, path)
    code = state.get(CODE_KEY)
    code_ordered = set()
    keys = list(INPUT_KEYS) if which == "input" else list(OUTPUT_KEYS)
    if code is not None:
        if which == "output":
            keys.append(TOKEN_VECTORS_KEY)  # per-token MHE's last head
        code_ordered.add(TOKEN_VECTORS_KEY)
        if TIED_KEY in state:  # the decoder's embedding, shared with the output layer
            code_ordered.add(INPUT_KEYS[0])
    if which == "output" and (_shares_decoder_embed(ckpt) or TIED_KEY in state):
        keys += list(INPUT_KEYS)  # tied: the embedding is the output projection
    for key in keys:
        if key not in state:
            continue
        w = state[key]
        w = w.detach().float().cpu().numpy() if torch.is_tensor(w) else np.asarray(w, dtype=np.float64)
        if w.ndim != 2:
            continue
        if key in code_ordered:
            w = _token_order(w, code, key, path)
        if vocab_size is not None and w.shape[0] != int(vocab_size):
            if key == "decoder.mhce_head.proj.weight":
                continue  # an MHP/MHE head: sum(C_h) rows, not one per token
            raise ValueError(
                f"{path}: {key} has {w.shape[0]} {'tokens' if key in code_ordered else 'rows'}, the target "
                f"dictionary has {int(vocab_size)} types (a checkpoint of another data-bin?)"
            )
        return w.astype(np.float64)
    weights = sorted(k for k, v in state.items() if getattr(v, "ndim", 0) == 2
                     and (k.endswith("weight") or k == TOKEN_VECTORS_KEY))  # fmt: skip
    hint = (" (an MHP model, or an MHE model with --mhce-last-head shared, has no per-token output vectors: "
            "use --vectors input)") if which == "output" else ""  # fmt: skip
    raise ValueError(
        f"{path}: no {which} token vectors: none of {keys} with one row per token{hint}; "
        f"its 2-d weights are: {', '.join(weights[:40])}{' ...' if len(weights) > 40 else ''}"
    )


def _shares_decoder_embed(ckpt) -> bool:
    """Whether the checkpoint's model ties the decoder's input embedding and
    output projection (then fairseq may leave output_projection.weight out)."""
    if not isinstance(ckpt, dict):
        return False
    cfgs = []
    if ckpt.get("cfg") is not None:
        try:
            cfgs.append(ckpt["cfg"]["model"])
        except (KeyError, TypeError):
            pass
    if ckpt.get("args") is not None:
        cfgs.append(ckpt["args"])
    for c in cfgs:
        for name in ("share_decoder_input_output_embed", "share_all_embeddings"):
            try:
                v = c[name] if isinstance(c, dict) else getattr(c, name)
            except (KeyError, AttributeError, TypeError):
                try:
                    v = getattr(c, name)
                except Exception:
                    v = None
            if v:
                return True
    return False
