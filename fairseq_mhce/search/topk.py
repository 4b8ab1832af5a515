"""Exact per-row top-k of a multi-head output distribution, without the
``V``-wide row.

Both routines return, for every row of ``x``, the ``k`` best tokens with id
``>= min_token`` (fairseq's special symbols are scored separately through
``extra``) and their log-probabilities, computed with the same floating-point
operations, in the same order, as the dense row of the head's ``log_probs``
(MHP: ``((lp_1 + lp_2) + lp_3) - log Z``; MHE: ``((0 + lp_1) + lp_2) + lp_3``),
so that a candidate's score equals its dense value: bit for bit for MHP; for
MHE up to float32 rounding, a few ulps of the larger of the score and the
heads' logits (the dense row and the search score prefixes in matmuls of
other shapes: the search's prefix batches and row chunks, and for the
per-token last head one ``V x d`` matmul against one per group; BLAS rounds
them differently).

Ties: exactly equal scores (common when the decoder runs in bf16 / fp16) may
be returned in any order, but the set is always a valid top-``k``: no digit or
prefix is ranked twice (``tests/test_topk_ties.py``).

* :func:`mhp_topk` (product-key search): the best sums of independent head
  scores lie in the product of each head's top-``m`` digits.  Invalid codes and
  excluded tokens are dropped from the product; the result is certified exact
  when the ``k``-th found score is ``>=`` the best score any code outside the
  product can reach, ``max_h (s_h[m+1] + sum_{i != h} s_i[1])`` (summed in the
  dense order, so the bound holds in floating point too: rounding is
  monotone).  Rows that fail are redone with each failing head widened to the
  digits that can still reach the ``k``-th score (:func:`_certify_and_widen`,
  the loop shared with MHE's search of three heads or more).
* :func:`mhe_topk` (prefix expansion): no completion of a prefix scores above
  the prefix itself (each head adds a log-probability ``<= 0``, and rounding
  keeps that).  With ``tau`` the ``k``-th best full candidate found, the
  result is exact once every prefix left unexpanded scores ``<= tau``.  Two
  heads: first digits are expanded in rank order, in growing batches, until
  none above ``tau`` is left (at most twice the necessary work, nothing
  expanded twice).  More heads: the top-``m_j`` prefixes of every level are
  expanded, levels that left a prefix above ``tau`` are widened and the
  failing rows redone (prefixes below an unexpanded parent are bounded by it).

Memory per row is ``O(m^H + sum C_h)`` (MHP) or ``O(m (C_h + d))`` (MHE),
where ``m`` is the number of digits / prefixes the certificate needed: a
handful for a confident model.  Every pass is also capped at ``budget``
elements by processing rows in chunks.  MHE's ``m`` grows as its heads get
flatter: for a uniform head every prefix is needed, and the cost is then the
dense row's ``O(V d)`` (still chunked).
"""

import math
from typing import Callable, List, Optional, Tuple

import torch

NEG_INF = float("-inf")


def _extra_values(head, x, extra: Optional[torch.Tensor], **kw) -> Optional[torch.Tensor]:
    """(N, S) log-probabilities of the ``extra`` tokens (S,) in every row."""
    if extra is None or extra.numel() == 0:
        return None
    return _no_nan(head.token_log_probs(x, extra.unsqueeze(0).expand(x.size(0), -1), **kw))


def _no_nan(t: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf, as fairseq's generator treats the dense row: a NaN score
    (an fp16 overflow in the decoder state) must neither rank first nor make
    the exactness test undecidable."""
    return t.masked_fill(t != t, NEG_INF)


def _distinct_padding(values: torch.Tensor, tokens: torch.Tensor, min_token: int, vocab_size: int):
    """Rows with fewer than k finite candidates (NaN states, masked tokens)
    end in ``-inf`` entries; give those distinct token ids (the smallest ids
    ``>= min_token`` not already returned), never a duplicate or ``-1``."""
    short = torch.isinf(values[:, -1]) & (values[:, -1] < 0)
    if not bool(short.any()):
        return tokens
    tokens = tokens.clone()
    for r in short.nonzero().squeeze(-1).tolist():
        fin = torch.isfinite(values[r])
        keep = set(tokens[r][fin].tolist())
        free = (t for t in range(min_token, vocab_size) if t not in keep)
        slots = (~fin).nonzero().squeeze(-1).tolist()
        tokens[r, slots] = torch.tensor([next(free) for _ in slots], dtype=tokens.dtype, device=tokens.device)
    return tokens


def _check_k(k: int, min_token: int, vocab_size: int):
    if k > vocab_size - max(min_token, 0):
        raise ValueError(
            f"top-{k} asked of {vocab_size - max(min_token, 0)} candidate tokens (V={vocab_size}, "
            f"min_token={min_token}): use a smaller beam"
        )


def _chunk(pending: torch.Tensor, per_row: int, budget: int) -> int:
    """How many pending rows to process now so that a pass holds at most
    ``budget`` elements (at least one row)."""
    return max(1, min(pending.numel(), budget // max(per_row, 1)))


def _top_k(scores: torch.Tensor, tok: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of each row of ``scores`` (r, w) and their tokens from
    ``tok`` (r, w): values (r, k) descending, tokens (r, k).  A row of fewer
    than ``k`` candidates is padded with ``-inf`` scores (token ``-1``)."""
    if scores.size(1) < k:
        r = scores.size(0)
        scores = torch.cat([scores, scores.new_full((r, k - scores.size(1)), NEG_INF)], 1)
        tok = torch.cat([tok, tok.new_full((r, k - tok.size(1)), -1)], 1)
    kv, ki = scores.topk(k, dim=-1)
    return kv, tok.gather(1, ki)


# a search pass over some rows: (the top-k values (r, k) and tokens (r, k)
# among the candidates it scored, per level the rows whose certificate fails
# there (None: the level is complete), need(level, bad rows) -> width)
_SearchPass = Tuple[torch.Tensor, torch.Tensor, List[Optional[torch.Tensor]], Callable[[int, torch.Tensor], int]]


def _certify_and_widen(
    search: Callable[[torch.Tensor, List[int]], _SearchPass],
    n: int,
    k: int,
    widths: List[int],
    caps: List[int],
    per_row: Callable[[List[int]], int],
    budget: int,
    like: torch.Tensor,
    what: str,
    level: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exact top-``k`` of ``n`` rows from a search that scores only part
    of each row: compute candidates, certify, widen and redo the rows that
    fail.  The driver of :func:`mhp_topk` and :func:`mhe_topk` (three heads
    or more).

    A search has levels ``j`` (MHP: the heads; MHE: the prefix levels), each
    ranked best first and searched to a width ``widths[j] <= caps[j]``.
    ``search(rows, widths)`` scores the candidates those widths admit, in
    the dense row's floating-point order, and returns their top-``k``
    (``kv``, ``kt``; ``tau = kv[:, -1]``), and for every level ``fails[j]``:
    the rows where some candidate the level left out may score above
    ``tau``, by a bound that floating point keeps (None when the level is
    searched to its full width).

    Invariant (why the result is exact): a row no level fails has no
    candidate outside the searched set above ``tau``, so the ``k`` found
    are a top-``k`` of the whole row (ties at ``tau`` may be any of the tied
    tokens).  Rows that fail are redone with each failing level widened to
    ``need(j, bad rows)`` (the entries that can still reach ``tau``), and at
    least one more.  Widths only grow, up to ``caps`` where nothing is left
    out, so every row is certified after finitely many passes.

    Rows are processed in chunks of at most ``budget`` elements
    (``per_row(widths)`` each).  Returns values (n, k) (dtype and device of
    ``like``) and tokens (n, k); ``widths`` is widened in place.  ``what``
    and ``level`` name the search and its levels in the error raised if a
    failing row had nothing left to widen (a bug)."""
    values = like.new_empty(n, k)
    tokens = torch.empty(n, k, dtype=torch.long, device=like.device)
    pending = torch.arange(n, device=like.device)
    while pending.numel() > 0:
        rows = pending[: _chunk(pending, per_row(widths), budget)]
        pending = pending[rows.numel() :]
        kv, kt, fails, need = search(rows, widths)
        ok = torch.ones_like(kv[:, -1], dtype=torch.bool)
        for f in fails:
            if f is not None:
                ok &= ~f
        done = rows[ok]
        values[done] = kv[ok]
        tokens[done] = kt[ok]
        bad = ~ok
        if bad.any():
            grown = False
            for j, f in enumerate(fails):
                if f is None or not bool(f[bad].any()):
                    continue
                new = min(caps[j], max(need(j, bad), widths[j] + 1))
                grown |= new > widths[j]
                widths[j] = new
            if not grown:
                raise RuntimeError(f"{what}: a row failed its exactness test but no {level} can widen; please report")
            pending = torch.cat([pending, rows[bad]])
    return values, tokens


@torch.no_grad()
def mhp_topk(
    head,
    x: torch.Tensor,
    k: int,
    min_token: int = 0,
    extra: Optional[torch.Tensor] = None,
    budget: int = 1 << 24,
    lps: Optional[List[torch.Tensor]] = None,
    offset: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Exact top-``k`` of a :class:`MultiHeadProduct` head, per row.

    Args:
        head: the MHP head
        x: (N, d) decoder states
        k: candidates per row (``<= V - min_token``)
        min_token: only tokens with id ``>= min_token`` are candidates
        extra: (S,) token ids whose log-probabilities are also returned
        budget: most elements of the candidate product in one pass (rows are
            processed in chunks when it would be larger)
        lps: the head's digit log-probs of ``x`` when already computed
        offset: (N,) added to every value after ``- log Z`` (a shortlist
            head's ``log p(tail | x)``), as the dense row adds it
    Returns:
        values (N, k) float32 log-probabilities, descending; tokens (N, k);
        extra_values (N, S) or None
    """
    codec = head.codec
    sizes: List[int] = codec.sizes
    H = len(sizes)
    strides: List[int] = list(codec.stride_list)
    _check_k(k, min_token, codec.vocab_size)
    lps = [_no_nan(lp) for lp in (head.digit_log_probs(x) if lps is None else lps)]
    lz = head.log_z(lps)
    extra_values = _extra_values(head, x, extra, lps=lps)
    n = x.size(0)

    def search(rows, m):
        """The product of every head's top-``m[h]`` digits, and the bound:
        the best score of a code outside it is one head beyond its top-m,
        every other head at its best (summed in the dense order)."""
        sub = [lp.index_select(0, rows) if rows.numel() < n else lp for lp in lps]
        tops, nexts = [], []
        for lp, c, mh in zip(sub, sizes, m):
            tv, ti = lp.topk(min(mh + 1, c), dim=-1)
            tops.append((tv[:, :mh], ti[:, :mh]))
            nexts.append(tv[:, mh] if mh < c else None)
        # the product, summed in the dense row's order
        s, codes = tops[0][0], tops[0][1] * strides[0]
        for h in range(1, H):
            v, i = tops[h]
            s = (s.unsqueeze(-1) + v.unsqueeze(-2)).flatten(1)
            codes = (codes.unsqueeze(-1) + (i * strides[h]).unsqueeze(-2)).flatten(1)
        tok = codec.token[codes]  # -1 for invalid codes
        drop = tok < max(min_token, 0)
        if head.shortlist:  # the shortlist's codes [T, V) are not the product's
            drop |= codes >= head.tail_size
        kv, kt = _top_k(s.masked_fill(drop, NEG_INF), tok, k)
        tau = kv[:, -1]
        fails = []
        for h in range(H):
            if nexts[h] is None:
                fails.append(None)
                continue
            b = nexts[0] if h == 0 else tops[0][0][:, 0]
            for i in range(1, H):
                b = b + (nexts[i] if i == h else tops[i][0][:, 0])
            fails.append(b > tau)

        def need(h, bad):
            """Digits of head h that could still reach tau (the others at their best)."""
            best = torch.stack([t[0][bad, 0] for t in tops], -1)  # (b, H)
            rest = best.sum(-1, keepdim=True) - best  # the other heads' best
            return int((sub[h][bad] + rest[:, h : h + 1] >= tau[bad].unsqueeze(-1)).sum(-1).max())

        return kv, kt, fails, need

    # digits kept per head: the top-k sums always lie in the product of every
    # head's top-k (less invalid / excluded codes); the bound may ask for more
    m = [min(k, c) for c in sizes]
    values, tokens = _certify_and_widen(search, n, k, m, list(sizes), math.prod, budget, lps[0], "mhp_topk", "head")
    if lz is not None:
        values = _no_nan(values - lz.unsqueeze(-1))  # a row with no valid mass: lz = -inf
    if offset is not None:
        values = _no_nan(values + offset.unsqueeze(-1))
    return values, _distinct_padding(values, tokens, max(min_token, 0), codec.vocab_size), extra_values


@torch.no_grad()
def mhp_shortlist_topk(
    head, x: torch.Tensor, k: int, min_token: int = 0, extra: Optional[torch.Tensor] = None, budget: int = 1 << 24
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Exact top-``k`` of an MHP head with a shortlist of ``S`` tokens (those
    on the codes ``[T, V)``): the best of the shortlist's own top-``k`` and
    the tail's product-key top-``k`` (:func:`mhp_topk` without the codes
    ``>= T``, offset by ``log p(tail | x)``), each value computed as the
    dense row computes it.  Arguments and returns as :func:`mhp_topk`."""
    V, S, T = head.vocab_size, head.shortlist, head.tail_size
    lo = max(min_token, 0)
    _check_k(k, lo, V)
    lps, short = head.parts(x)
    short = _no_nan(short)
    listed = head.codec.token[T:V]  # (S,) the shortlist's tokens, in class order
    s_vals = short[:, :S].masked_fill(listed < lo, NEG_INF)
    v, i = s_vals.topk(min(k, S), dim=-1)
    vals, toks = [v], [listed[i]]
    # the tail has at most T candidates; rows short of k end in -inf
    v, t, _ = mhp_topk(head, x, min(k, T), lo, None, budget, lps=lps, offset=short[:, S])
    vals.append(v)
    toks.append(t)
    v, t = torch.cat(vals, -1), torch.cat(toks, -1)
    values, idx = v.topk(k, dim=-1)
    tokens = t.gather(-1, idx)
    extra_values = _extra_values(head, x, extra, lps=lps, short=short)
    return values, _distinct_padding(values, tokens, lo, V), extra_values


@torch.no_grad()
def mhe_topk(
    head,
    x: torch.Tensor,
    k: int,
    min_token: int = 0,
    extra: Optional[torch.Tensor] = None,
    budget: int = 1 << 24,
    first_width: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Exact top-``k`` of a :class:`MultiHeadEmbedding` head, per row.

    Arguments and return value as :func:`mhp_topk`; ``first_width`` is the
    number of prefixes expanded per level in the first pass (default: about
    ``k / 3`` for two heads, which then need at most two passes, ``k`` for more).
    The cost is set by how many prefixes score above the ``k``-th best token:
    a handful for a confident (trained) model, every prefix for a uniform one
    (then it is the dense row's ``O(V d)``, in row chunks of ``budget``).
    """
    codec = head.codec
    sizes: List[int] = codec.sizes
    H = len(sizes)
    d = x.size(-1)
    n = x.size(0)
    _check_k(k, min_token, codec.vocab_size)
    lp0 = _no_nan(head.level_log_probs(0, x, torch.zeros(n, 1, dtype=torch.long, device=x.device)).squeeze(1))
    if H == 2:
        return _mhe2_topk(head, x, lp0, k, min_token, budget, first_width, extra)
    extra_values = _extra_values(head, x, extra)

    def search(rows, m):
        """Expand the top-``m[j]`` prefixes of every level j; the bound: the
        best prefix left unexpanded at each level (no completion of a
        prefix scores above it)."""
        r = rows.numel()
        xr = x.index_select(0, rows) if r < n else x
        # level 0 as the dense row computes it: 0 + lp_1
        cur = lp0.new_zeros(r, 1) + (lp0.index_select(0, rows) if r < n else lp0)
        ids = torch.arange(sizes[0], device=x.device).unsqueeze(0).expand(r, -1)
        level_scores = []  # the prefixes scored at each level
        best_left = []  # best prefix left unexpanded at each level
        for h in range(1, H):
            width = cur.size(1)
            mm = min(m[h - 1], width)
            tv, ti = cur.topk(min(mm + 1, width), dim=-1)
            level_scores.append(cur)
            best_left.append(tv[:, mm] if mm < width else None)
            prefix = ids.gather(1, ti[:, :mm])  # (r, mm)
            lp = _no_nan(head.level_log_probs(h, xr, prefix))  # (r, mm, C_h)
            cur = (tv[:, :mm].unsqueeze(-1) + lp).flatten(1)
            ids = (prefix.unsqueeze(-1) * sizes[h] + torch.arange(sizes[h], device=x.device)).flatten(1)
        tok = codec.token[ids]  # ids are full codes now; -1 = invalid
        # too few candidates (a narrow first pass): padded, the row fails and widens
        kv, kt = _top_k(cur.masked_fill(tok < max(min_token, 0), NEG_INF), tok, k)
        tau = kv[:, -1]
        # exact iff no unexpanded prefix (hence none of its completions) beats
        # tau; the same predicate says which levels to widen (scores carry no NaN)
        fails = [None if b is None else b > tau for b in best_left]

        def need(j, bad):
            """Every prefix of level j above tau."""
            return int((level_scores[j][bad] > tau[bad].unsqueeze(-1)).sum(-1).max())

        return kv, kt, fails, need

    # prefixes expanded at level j (the first j+1 digits), j = 0 .. H-2
    caps = [math.prod(sizes[: j + 1]) for j in range(H - 1)]
    m = [min(first_width or k, c) for c in caps]

    def per_row(m):
        return max(m) * (d + max(sizes))

    values, tokens = _certify_and_widen(search, n, k, m, caps, per_row, budget, lp0, "mhe_topk", "level")
    return values, _distinct_padding(values, tokens, max(min_token, 0), codec.vocab_size), extra_values


def _mhe2_topk(head, x, lp0, k: int, min_token: int, budget: int, first_width: Optional[int], extra=None):
    """Two heads: expand first digits in rank order, in growing batches, no
    prefix twice.

    The first pass expands each row's top ``m0`` first digits (and those of
    the ``extra`` tokens, whose scores are read off them).  Then, while a row
    has unexpanded first digits scoring above its current ``k``-th best token
    ``tau`` (only those can hold a better token), the next ones in rank order
    are expanded, as many again as are already expanded (at most those above
    ``tau``), and ``tau`` is updated.  Every first digit left then scores
    ``<= tau``: exact.  The work is at most twice the necessary (the first
    digits above the final ``tau``), in O(log) passes.

    The certificate is :func:`_certify_and_widen`'s, but the loop is not: a
    failing row is not redone wider, it expands only the first digits it has
    not expanded yet and merges their tokens into its top-``k`` (nothing
    expanded twice), each row at its own width."""
    codec = head.codec
    c1, c2 = codec.sizes
    n, d = x.shape
    dev = x.device
    arange2 = torch.arange(c2, device=dev)
    lo = max(min_token, 0)
    # first digits of the extra tokens: expanded up front, out of the ranking
    fixed = torch.zeros(0, dtype=torch.long, device=dev)
    if extra is not None and extra.numel() > 0:
        e_digits = codec.encode(extra)  # (S, 2)
        fixed, inv = torch.unique(e_digits[:, 0], return_inverse=True)  # sorted
        e_cols = inv * c2 + e_digits[:, 1]  # column of each extra token in the candidate row
    u = fixed.numel()
    # only the other first digits are ranked: a fixed digit can never be
    # picked again (topk fills spare slots with -inf entries in no fixed order)
    is_free = torch.ones(c1, dtype=torch.bool, device=dev)
    is_free[fixed] = False
    free = is_free.nonzero().squeeze(-1)  # (F,) digit of each ranked column
    nfree = free.numel()
    m0 = min(nfree, first_width or max(2, k // 4))
    # at least k candidates in pass 1 (every valid first digit has >= 1 child)
    while m0 < nfree and (m0 + u) * c2 < k + lo + 1:
        m0 += 1
    ranked = lp0.index_select(1, free) if u else lp0  # (n, F)
    # the ranking of first digits (columns of `ranked`), extended on demand (a
    # full sort costs more than the search; torch's CPU topk is much faster for k <= 8)
    width_sorted = min(nfree, max(2 * m0, 8))
    sv, si = ranked.topk(width_sorted, dim=-1)
    first_i = torch.cat([fixed.unsqueeze(0).expand(n, -1), free[si[:, :m0]]], 1)  # (n, u + m0) digits
    first_v = lp0.gather(1, first_i)
    lp1 = _no_nan(head.level_log_probs(1, x, first_i))  # (n, u + m0, C2)
    cand = (first_v.unsqueeze(-1) + lp1).flatten(1)  # the dense row's (0 + lp_1) + lp_2
    extra_values = cand.index_select(1, e_cols) if u else None
    tok = codec.token[(first_i.unsqueeze(-1) * c2 + arange2).flatten(1)]
    kv, kt = _top_k(cand.masked_fill(tok < lo, NEG_INF), tok, k)
    done = torch.full((n,), m0, dtype=torch.long, device=dev)  # ranked first digits expanded, per row
    while True:
        # unexpanded first digits above tau (those above tau are the top ranks)
        need = ((ranked > kv[:, -1:]).sum(-1) - done).clamp(min=0)
        rows = need.nonzero().squeeze(-1)
        if rows.numel() == 0:
            return kv, _distinct_padding(kv, kt, lo, codec.vocab_size), extra_values
        add = torch.minimum(need[rows], done[rows].clamp(min=1))
        width = int(add.max())
        reach = int((done[rows] + add).max())
        if reach > width_sorted:
            # extend the ranking with the best of the columns not ranked yet.  A
            # wider top-k of all columns would not do: torch.topk orders tied
            # values arbitrarily, so its ranks past the old width could repeat a
            # digit already ranked and skip its tied partner (issue 24)
            grow = min(nfree, max(reach, 2 * width_sorted)) - width_sorted
            rest = ranked.scatter(1, si, NEG_INF)  # (n, F): ranked columns out
            sv2, si2 = rest.topk(grow, dim=-1)
            # every rank the loop expands is above tau, so finite: a column
            # masked above (-inf) can only fill ranks that are never expanded
            sv, si = torch.cat([sv, sv2], 1), torch.cat([si, si2], 1)
            width_sorted += grow
        step = max(1, budget // (width * (c2 + d)))
        for a in range(0, rows.numel(), step):
            # the next `add` ranks of each row, padded to `width` (padding: -inf)
            rows_a, add_a = rows[a : a + step], add[a : a + step]
            slot = torch.arange(width, device=dev).unsqueeze(0)
            rank = (done[rows_a].unsqueeze(-1) + slot).clamp(max=width_sorted - 1)
            pad = slot >= add_a.unsqueeze(-1)
            pre = free[si.index_select(0, rows_a).gather(1, rank)]  # (r, width) digits
            pv = sv.index_select(0, rows_a).gather(1, rank).masked_fill(pad, NEG_INF)
            lp = _no_nan(head.level_log_probs(1, x.index_select(0, rows_a), pre))  # (r, width, C2)
            more = (pv.unsqueeze(-1) + lp).flatten(1)
            more_tok = codec.token[(pre.unsqueeze(-1) * c2 + arange2).flatten(1)]
            # padding slots repeat an expanded digit: their tokens must never enter
            more = more.masked_fill((more_tok < lo) | pad.repeat_interleave(c2, 1), NEG_INF)
            v2, kt_a = _top_k(
                torch.cat([kv.index_select(0, rows_a), more], 1),
                torch.cat([kt.index_select(0, rows_a), more_tok], 1),
                k,
            )
            kv = kv.index_copy(0, rows_a, v2)
            kt = kt.index_copy(0, rows_a, kt_a)
        done = done.index_add(0, rows, add)
