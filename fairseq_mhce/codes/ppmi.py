"""The learned code table of a data-bin, in one implementation for both of
its users: ``mhce-build-codes`` (a file, for inspection or other
vector sources) and the model's automatic table (``--mhce-code-order ppmi``,
the default for MHP / MHE, built when training starts).

Steps: the binarized training targets (:func:`training_targets`) -> PPMI-SVD
token vectors (:func:`ppmi_svd_vectors`: co-occurrence counts, positive PMI,
a randomized truncated SVD) -> balanced grouping
(:func:`~.grouping.balanced_codes`, through
:func:`codes_from_vectors`, which ``mhce-build-codes --source checkpoint``
shares).  Types that never occur in the training targets (source-only
pieces of a joint dictionary) get the highest codes, so they fill groups of
their own.  With a shortlist of ``S`` tokens (MHP), the specials and the
``S - 4`` most frequent training targets take the top codes ``[V - S, V)``
and only the tail is grouped.

Only numpy and torch are imported at module import time; scipy and fairseq
are imported by the functions that need them.
"""

import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .grouping import balanced_codes
from .parallel import for_each, worker_threads

PPMI_DIM, PPMI_WINDOW = 64, 2
# power iterations of the randomized SVD of the PPMI matrix
SVD_ITERS = 4
# rows per block of the float64 Gram matrix of the SVD's Cholesky QR
GRAM_BLOCK = 65536


def split_prefix(databin: str, split: str, src: str, tgt: str, lang: str) -> str:
    """The binarized ``split`` of language ``lang`` of the pair ``src``,
    ``tgt`` (the path without ``.bin`` / ``.idx``), found as fairseq's
    ``load_langpair_dataset`` finds it: ``SPLIT.SRC-TGT.LANG``, else
    ``SPLIT.TGT-SRC.LANG`` (a data-bin binarized for the other direction,
    trained with ``-s TGT -t SRC``).  The first name when neither exists."""
    names = [os.path.join(databin, f"{split}.{a}-{b}.{lang}") for a, b in ((src, tgt), (tgt, src))]
    for prefix in names:
        if os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin"):
            return prefix
    return names[0]


def missing_split(databin: str, split: str, src: str, tgt: str, lang: str) -> str:
    """The two names :func:`split_prefix` tried, for a message."""
    return (
        f"{os.path.join(databin, f'{split}.{src}-{tgt}.{lang}')}.{{bin,idx}} (or {split}.{tgt}-{src}.{lang}, "
        "as fairseq reads a data-bin of the other direction)"
    )


def training_targets(databin: str, src: str, tgt: str, dictionary, split: str = "train") -> List[np.ndarray]:
    """The binarized ``split`` targets (:func:`split_prefix`:
    ``DATABIN/SPLIT.SRC-TGT.TGT`` or ``DATABIN/SPLIT.TGT-SRC.TGT``) as int
    arrays (``FileNotFoundError`` naming the files when absent)."""
    from fairseq.data import data_utils  # heavy (fairseq): only when a data-bin is read

    prefix = split_prefix(databin, split, src, tgt, tgt)
    if not os.path.isfile(prefix + ".idx"):
        raise FileNotFoundError(f"no training targets {missing_split(databin, split, src, tgt, tgt)}")
    ds = data_utils.load_indexed_dataset(prefix, dictionary)
    if ds is None:
        raise FileNotFoundError(f"cannot read the training targets {prefix}.{{bin,idx}}")
    # one read of the whole file: a per-sentence loop costs minutes at 10M tokens
    sizes = np.asarray(ds.sizes, dtype=np.int64)
    flat = np.asarray(ds[0].new_empty(0)) if len(ds) == 0 else _flat_tokens(ds, sizes)
    return np.split(flat, np.cumsum(sizes)[:-1]) if len(ds) else []


def _flat_tokens(ds, sizes: np.ndarray) -> np.ndarray:
    """All sentences of an indexed dataset, concatenated (int64)."""
    inner = getattr(ds, "_bin_buffer", None)
    if inner is not None and hasattr(ds, "_index"):  # MMapIndexedDataset: one view of the data
        dtype = ds._index.dtype
        start = int(ds._index._pointers[0]) // np.dtype(dtype).itemsize
        return np.frombuffer(
            inner, dtype=dtype, count=int(sizes.sum()), offset=start * np.dtype(dtype).itemsize
        ).astype(np.int64)
    return np.concatenate([ds[i].numpy() for i in range(len(ds))]).astype(np.int64)


# --------------------------------------------------------------------------
# PPMI-SVD token vectors
# --------------------------------------------------------------------------


def _left_counts(toks: np.ndarray, lens: np.ndarray, V: int, window: int):
    """(V, V) csr: entry [b, a] = sum over the positions where token a stands
    o <= window places to the left of token b in the same sentence of 1/o."""
    import scipy.sparse as sp  # heavy (scipy): only when a table is built

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
    buf = np.empty((min(GRAM_BLOCK, y.shape[0]), y.shape[1]))
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

    for_each(one, range(len(blocks)))
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
    nb = worker_threads()
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
    import scipy.sparse as sp  # heavy (scipy): only when a table is built

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


# --------------------------------------------------------------------------
# the code table
# --------------------------------------------------------------------------


def shortlist_tokens(counts: np.ndarray, shortlist: int, nspec: int = 4) -> np.ndarray:
    """The shortlist's token ids: the specials, then the most frequent
    training targets (ties by id)."""
    V = counts.size
    k = min(nspec, shortlist)
    rank = np.lexsort((np.arange(V - nspec), -counts[nspec:])) + nspec
    return np.concatenate([np.arange(k), rank[: shortlist - k]])


def codes_from_vectors(
    vectors: np.ndarray,
    sizes: Sequence[int],
    seed: int,
    counts: Optional[np.ndarray] = None,
    shortlist: int = 0,
    unseen_last: bool = True,
) -> Tuple[np.ndarray, Dict]:
    """(V,) code table from (V, k) token vectors and, when known, the (V,)
    training target counts; returns the table and its metadata."""
    V = vectors.shape[0]
    meta: Dict = {}
    unseen = None
    if counts is not None:
        unseen = np.flatnonzero(counts[4:] == 0) + 4
        meta["unseen_types"] = int(unseen.size)
        meta["unseen"] = "last" if unseen_last else "cluster"  # mhce-build-codes --unseen
    last = unseen if (unseen_last and unseen is not None) else None
    if not shortlist:
        return balanced_codes(vectors, sizes, seed=seed, fixed_first=4, last=last), meta
    if counts is None:
        raise ValueError("a shortlist needs the training target counts")
    if not 1 <= shortlist <= V - 2:
        raise ValueError(f"shortlist {shortlist}: must lie between 1 and V - 2 = {V - 2} (V = {V})")
    listed = shortlist_tokens(counts, shortlist)
    rest = np.setdiff1d(np.arange(V), listed)  # sorted ids
    pos = np.full(V, -1)
    pos[rest] = np.arange(rest.size)
    tail_last = None if last is None else pos[np.intersect1d(last, rest)]
    nspec = min(4, shortlist)
    tail = balanced_codes(vectors[rest], sizes, seed=seed, fixed_first=4 - nspec, last=tail_last)
    code = np.empty(V, dtype=np.int64)
    code[listed] = np.arange(V - shortlist, V)
    code[rest] = tail
    meta["shortlist"] = int(shortlist)
    meta["shortlist_train_coverage"] = round(float(counts[listed].sum() / max(counts.sum(), 1)), 4)
    return code, meta


def ppmi_code_table(
    seqs: Sequence[np.ndarray],
    vocab_size: int,
    sizes: Sequence[int],
    seed: int = 1,
    shortlist: int = 0,
    dim: int = PPMI_DIM,
    window: int = PPMI_WINDOW,
    unseen_last: bool = True,
) -> Tuple[np.ndarray, np.ndarray, Dict]:
    """The PPMI code table of the training targets ``seqs``.

    Returns:
        code (V,), vectors (V, dim), meta (the settings, token counts)
    """
    V = int(vocab_size)
    toks = np.concatenate(seqs).astype(np.int64) if len(seqs) else np.zeros(0, np.int64)
    counts = np.bincount(toks, minlength=V)
    vectors = ppmi_svd_vectors(seqs, V, dim=dim, window=window, seed=seed)
    code, meta = codes_from_vectors(vectors, sizes, seed, counts, shortlist, unseen_last)
    meta.update(
        source="ppmi", seed=int(seed), dim=int(vectors.shape[1]), window=int(window), train_tokens=int(toks.size)
    )
    return code, vectors, meta
