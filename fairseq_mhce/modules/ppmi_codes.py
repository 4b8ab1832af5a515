"""The learned code table of a data-bin, in one implementation for both of
its users: ``mhce-build-codes`` (a file, for inspection or other
vector sources) and the model's automatic table (``--mhce-code-order ppmi``,
the default for MHP / MHE, built when training starts).

Steps: the binarized training targets -> PPMI-SVD token vectors
(:func:`~.code_table.ppmi_svd_vectors`) -> balanced grouping
(:func:`~.code_table.balanced_codes`).  Types that never occur in the
training targets (source-only pieces of a joint dictionary) get the highest
codes, so they fill groups of their own.  With a shortlist of ``S`` tokens
(MHP), the specials and the ``S - 4`` most frequent training targets take the
top codes ``[V - S, V)`` and only the tail is grouped.
"""

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import code_table as ct

PPMI_DIM, PPMI_WINDOW = 64, 2


def training_targets(databin: str, src: str, tgt: str, dictionary, split: str = "train") -> List[np.ndarray]:
    """The binarized ``split`` targets ``DATABIN/SPLIT.SRC-TGT.TGT`` as int
    arrays (``FileNotFoundError`` naming the file when absent)."""
    from fairseq.data import data_utils

    prefix = os.path.join(databin, f"{split}.{src}-{tgt}.{tgt}")
    if not os.path.isfile(prefix + ".idx"):
        raise FileNotFoundError(f"no training targets {prefix}.{{bin,idx}}")
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
        return ct.balanced_codes(vectors, sizes, seed=seed, fixed_first=4, last=last), meta
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
    tail = ct.balanced_codes(vectors[rest], sizes, seed=seed, fixed_first=4 - nspec, last=tail_last)
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
    vectors = ct.ppmi_svd_vectors(seqs, V, dim=dim, window=window, seed=seed)
    code, meta = codes_from_vectors(vectors, sizes, seed, counts, shortlist, unseen_last)
    meta.update(
        source="ppmi", seed=int(seed), dim=int(vectors.shape[1]), window=int(window), train_tokens=int(toks.size)
    )
    return code, vectors, meta
