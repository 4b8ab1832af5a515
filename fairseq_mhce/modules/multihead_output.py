"""The multi-head output layers MHP and MHE (MHS lives in :mod:`.mhs`).

Both work on flat decoder states ``x: (N, d)`` and implement
:class:`~.output_layer.OutputLayer`.  All log-probabilities are computed in
float32 whatever the input dtype: the head outputs are small, and fp16/bf16
log-sum-exp over a product of heads loses the precision that beam scores need.
"""

import itertools
import logging
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import LAST_HEAD_CHOICES, MHCEConfig
from .codec import MixedRadixCodec
from .output_layer import NEG_INF, OutputLayer, _init_linear, register_output_layer, tie_error

logger = logging.getLogger(__name__)


def parse_update_list(spec) -> List[int]:
    """``"300,600"`` -> ``[300, 600]``; empty / None -> ``[]``."""
    if spec is None or str(spec).strip() in ("", "None"):
        return []
    try:
        out = sorted({int(u) for u in str(spec).replace(" ", "").split(",") if u})
    except ValueError:
        raise ValueError(
            f"--mhce-realloc-updates must be comma-separated update numbers such as 300,600; got {spec!r}"
        ) from None
    if any(u < 1 for u in out):
        raise ValueError(f"--mhce-realloc-updates: update numbers must be >= 1; got {spec!r}")
    return out


# --mhce-shortlist -1 (the default): a 2048-token shortlist once the target
# dictionary has 4096 types (the best MHP of the Bible spm 8k ablation,
# scripts/bible/results/compare_bible_spm8k_ablation_shortlist*.md); the plain product
# below that, where a shortlist would be half the vocabulary or more
AUTO_SHORTLIST, AUTO_SHORTLIST_MIN_VOCAB = 2048, 4096


def resolve_shortlist(value, vocab_size: int) -> int:
    """``--mhce-shortlist`` for a target dictionary of ``vocab_size`` types:
    ``-1`` (auto) -> 2048 when ``V >= 4096``, else 0; ``None`` (a config
    saved before the option existed) -> 0; anything else as given, if it
    lies in ``[1, V - 2]`` (else ``ValueError``)."""
    if value is None:
        return 0
    value = int(value)
    if value < 0:
        return AUTO_SHORTLIST if vocab_size >= AUTO_SHORTLIST_MIN_VOCAB else 0
    if value and not 1 <= value <= vocab_size - 2:
        raise ValueError(
            f"--mhce-shortlist {value}: the shortlist must hold between 1 and V - 2 = {vocab_size - 2} tokens "
            f"(the target dictionary has V = {vocab_size}); leave it at 0 for the plain product"
        )
    return value


def label_smoothed_loss(terms, epsilon: float):
    """fairseq's label-smoothed loss, summed over one or more softmaxes.

    Each softmax over ``C`` classes contributes ``(1 - eps - eps_i) nll +
    eps_i smooth``, ``eps_i = eps / (C - 1)`` (``C - 1`` at least 1): the
    target keeps ``1 - eps`` of the mass and the other ``C - 1`` classes
    share ``eps`` evenly (``smooth`` includes the target, as fairseq's
    ``label_smoothed_nll_loss``).  The terms are added in order, starting
    from 0.

    Args:
        terms: one ``(nll, smooth, num_classes)`` per softmax: nll (N,) the
            target's ``-log p``; smooth (N,) the sum of ``-log p`` over the
            ``C`` classes; num_classes ``C``, an int or (N,) float per row
        epsilon: the label smoothing (``--label-smoothing``)
    Returns:
        (N,) the loss (the int 0 when ``terms`` is empty)
    """
    loss = 0
    for nll, smooth, num_classes in terms:
        if torch.is_tensor(num_classes):
            eps_i = epsilon / (num_classes - 1).clamp(min=1)
        else:
            eps_i = epsilon / max(num_classes - 1, 1)
        loss = loss + (1.0 - epsilon - eps_i) * nll + eps_i * smooth
    return loss


@register_output_layer("mhp", 1)
class MultiHeadProduct(OutputLayer):
    """MHP: ``H`` independent digit classifiers on the same state.

    ``log p(v|x) = sum_h log_softmax(W_h x + b_h)[d_h(v)] - log Z_valid(x)``,
    where ``Z_valid`` is the product distribution's mass on valid codes
    (``< V``), computed from the digits of ``V`` in ``O(sum C_h)``.

    With a shortlist of ``N`` tokens (``--mhce-shortlist``; the hybrid of Oda
    et al. 2017, and the head/tail split of adaptive softmax), the tokens on
    the top codes ``[T, V)``, ``T = V - N``, get their own output vectors in
    an ``(N + 1)``-way softmax ``s`` whose last class is "the tail"; the
    other tokens (codes ``[0, T)``) share the tail's mass through the product:

    * ``log p(u|x) = s[code(u) - T]`` for a shortlist token ``u``
    * ``log p(v|x) = s[N] + sum_h lp_h[d_h(v)] - log Z_T(x)`` for the others

    ``Z_T``, the product's mass on ``[0, T)``, has the same ``O(sum C_h)``
    closed form.  The code table says which tokens are on the shortlist: the
    model's default puts the dictionary's first ``N`` ids there (the most
    frequent), ``mhce-build-codes --shortlist N`` the ``N`` most
    frequent training targets.  Cost per token ``O((N + 1 + sum C_h) d)``.
    """

    def __init__(
        self,
        input_dim: int,
        codec: MixedRadixCodec,
        realloc_updates: Sequence[int] = (),
        realloc_window: int = MHCEConfig.mhce_realloc_window,
        shortlist: int = 0,  # the plain product; the option's default -1 (auto) goes through resolve_shortlist
        tied_embed=None,
    ):
        automatic = shortlist is not None and int(shortlist) < 0
        shortlist = resolve_shortlist(shortlist, codec.vocab_size)
        if tied_embed is not None and not shortlist and automatic:
            V = codec.vocab_size
            raise ValueError(
                f"--share-decoder-input-output-embed / --share-all-embeddings share the decoder's input embedding "
                f"with per-token output vectors; --mhce-method mhp has them only for its shortlist, and the "
                f"automatic shortlist (--mhce-shortlist -1, the default) is empty below {AUTO_SHORTLIST_MIN_VOCAB} "
                f"target types (this dictionary has V = {V}). Pass --mhce-shortlist N (1 <= N <= {V - 2}) to tie "
                f"the vectors of N tokens, use --mhce-method mhe (per-token last head), or drop the flag."
            )
        if tied_embed is not None and not shortlist:
            raise ValueError(tie_error("--mhce-method mhp without a shortlist (--mhce-shortlist 0)"))
        super().__init__(input_dim, codec, tied_embed)
        self.shortlist = shortlist
        if self.shortlist and realloc_updates:
            raise ValueError(
                "--mhce-realloc-updates cannot be combined with --mhce-shortlist (the re-allocation would "
                "move tokens between the shortlist and the tail); drop one of them"
            )
        # the product's valid codes: [0, T), T = V without a shortlist
        self.tail_size = codec.vocab_size - self.shortlist
        self._has_invalid = codec.num_codes > self.tail_size
        # one fused projection for all heads (and the shortlist), split
        # afterwards; tied, the listed tokens' vectors are the shared
        # embedding's rows [T, V) (code order: one contiguous view) and the
        # projection keeps the digit heads and the tail class
        extra = 0
        if self.shortlist:
            extra = 1 if self.tied else self.shortlist + 1
        self.proj = _init_linear(nn.Linear(input_dim, sum(codec.sizes) + extra))
        if self.tied:
            self.short_bias = nn.Parameter(torch.zeros(self.shortlist))
        # LightRNN-style re-allocation of the code table during training
        self.realloc_updates = sorted(int(u) for u in realloc_updates)
        self.realloc_window = int(realloc_window)
        if self.realloc_updates:
            from .code_realloc import REALLOC_MAX_VOCAB

            if codec.vocab_size > REALLOC_MAX_VOCAB:
                raise ValueError(
                    f"--mhce-realloc-updates solves a dense V x V assignment; the target dictionary has "
                    f"{codec.vocab_size} types, above {REALLOC_MAX_VOCAB}. Drop it and use a table from "
                    f"mhce-build-codes (--mhce-code-table) at this vocabulary size."
                )
            if self.realloc_window < 1:
                raise ValueError(f"--mhce-realloc-window must be >= 1, got {realloc_window}")
        self._num_updates = 0
        self._last_realloc = -1
        self._realloc_stats: Optional[List[torch.Tensor]] = None  # (V, C_h) sums of -log p_h; not saved

    @classmethod
    def build(cls, settings, input_dim, codec, embed_tokens=None):
        return cls(
            input_dim,
            codec,
            realloc_updates=parse_update_list(settings.mhce_realloc_updates),
            realloc_window=settings.mhce_realloc_window,
            shortlist=settings.mhce_shortlist,
            tied_embed=embed_tokens,
        )

    # -- re-allocation (LightRNN) ------------------------------------------
    def _collecting(self) -> bool:
        """Training, and within the window before the next re-allocation."""
        nxt = next((u for u in self.realloc_updates if u > self._num_updates), None)
        return self.training and nxt is not None and self._num_updates >= nxt - self.realloc_window

    @torch.no_grad()
    def _collect(self, lps: List[torch.Tensor], target: torch.Tensor):
        """Add each target's ``-log p_h(. | x)`` rows to its token's row."""
        if self._realloc_stats is None:
            self._realloc_stats = [lp.new_zeros(self.vocab_size, lp.size(-1), dtype=torch.float64) for lp in lps]
        for acc, lp in zip(self._realloc_stats, lps):
            acc.index_add_(0, target, -lp.detach().double())

    def set_num_updates(self, num_updates: int):
        """fairseq calls this with the number of finished updates before the
        forward of the next one: re-allocate at the scheduled updates (from
        the targets collected over the window)."""
        self._num_updates = int(num_updates)
        # fairseq's task.train_step calls this before every forward, so once
        # per micro-batch with --update-freq > 1: re-allocate once per update
        if (
            self._num_updates in self.realloc_updates
            and self._realloc_stats is not None
            and self._num_updates != self._last_realloc
        ):
            self._last_realloc = self._num_updates
            self.reallocate()

    @torch.no_grad()
    def reallocate(self):
        """Move every token to the code that minimizes the NLL of its
        collected targets under the current heads (exact assignment,
        :func:`.code_realloc.reallocate_codes`); the heads' weights stay, the
        table changes in place (buffers ``codec.code`` / ``codec.token``,
        saved in the checkpoint).  Workers sum their statistics first, so
        every one computes the same table."""
        import time

        from .code_realloc import reallocate_codes

        stats, self._realloc_stats = self._realloc_stats, None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for acc in stats:
                torch.distributed.all_reduce(acc)
        t0 = time.time()
        old = self.codec.code.cpu().numpy().copy()  # on CPU .numpy() shares the buffer copied into below
        new, before, after = reallocate_codes([a.cpu().numpy() for a in stats], old, self.sizes)
        code = torch.from_numpy(new).to(self.codec.code.device)
        self.codec.code.copy_(code)
        self.codec.token.fill_(-1)
        self.codec.token[code] = torch.arange(self.vocab_size, device=code.device)
        logger.info(
            f"mhce: re-allocated the code table at update {self._num_updates}: {int((new != old).sum())} of "
            f"{self.vocab_size} tokens moved; NLL of the targets collected over the last {self.realloc_window} "
            f"updates under the current heads {before:.1f} -> {after:.1f} nats "
            f"(without log Z_valid; {time.time() - t0:.1f} s)"
        )

    def digit_log_probs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(N, d) -> list of H tensors (N, C_h), float32 log-softmax."""
        return self.parts(x)[0]

    def parts(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
        """(N, d) -> (the H digit log-softmaxes (N, C_h), the shortlist
        log-softmax (N, S + 1) or None), float32, from one projection."""
        logits = self.proj(x).float()
        if not self.shortlist:
            return [F.log_softmax(z, dim=-1) for z in logits.split(self.sizes, dim=-1)], None
        if self.tied:
            *zs, z_tail = logits.split(self.sizes + [1], dim=-1)
            listed = self.tied_weight.narrow(0, self.tail_size, self.shortlist)  # (S, d) view
            zs_short = torch.cat([F.linear(x, listed, self.short_bias).float(), z_tail], -1)
        else:
            *zs, zs_short = logits.split(self.sizes + [self.shortlist + 1], dim=-1)
        return [F.log_softmax(z, dim=-1) for z in zs], F.log_softmax(zs_short, dim=-1)

    def log_z(self, lps: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """(N,) log of the product's mass on its valid codes ``< T`` (``T =
        V``, or the tail size with a shortlist), or None when every code is
        valid.

        Codes below T are: d_1 < t_1 (any suffix), or d_1 = t_1 and d_2 < t_2,
        ... (big-endian comparison with T's digits t_h)."""
        if not self._has_invalid:
            return None
        vd = self.codec.vocab_digits(self.tail_size)
        terms = []
        prefix = lps[0].new_zeros(lps[0].shape[:-1])
        for h, lp in enumerate(lps):
            if vd[h] > 0:
                terms.append(prefix + torch.logsumexp(lp[..., : vd[h]], dim=-1))
            prefix = prefix + lp[..., vd[h]]
        return torch.logsumexp(torch.stack(terms, -1), dim=-1)

    def _joint(self, lps: List[torch.Tensor]) -> torch.Tensor:
        """Kronecker sum of head log-probs: (N, prod C), code order."""
        out = lps[0]
        for lp in lps[1:]:
            out = (out.unsqueeze(-1) + lp.unsqueeze(-2)).flatten(-2)
        return out

    def log_probs(self, x):
        """(N, d) -> (N, V): broadcast sum of the small head log-softmaxes,
        reordered from code to token order; no V x d matmul."""
        lps, short = self.parts(x)
        out = self._joint(lps).index_select(-1, self.codec.code)
        lz = self.log_z(lps)
        out = out if lz is None else out - lz.unsqueeze(-1)
        if short is None:
            return out
        code, T = self.codec.code, self.tail_size
        on_list = short.index_select(-1, (code - T).clamp(min=0))
        return torch.where(code >= T, on_list, out + short[:, self.shortlist :])

    def topk(self, x, k, min_token=0, extra=None):
        """Product-key search (:func:`.factorized_topk.mhp_topk`); with a
        shortlist, merged with the shortlist's own top-k."""
        from .factorized_topk import mhp_shortlist_topk, mhp_topk

        if self.shortlist:
            return mhp_shortlist_topk(self, x, k, min_token, extra)
        return mhp_topk(self, x, k, min_token, extra)

    def token_log_probs(self, x, tokens, lps=None, short=None):
        """(N, d), (N, K) token ids -> (N, K); ``lps`` / ``short``: this
        head's :meth:`parts` of ``x`` when already computed."""
        if lps is None:
            lps, short = self.parts(x)
        digits = self.codec.encode(tokens)  # (N, K, H)
        out = lps[0].gather(-1, digits[..., 0])
        for h in range(1, len(lps)):
            out = out + lps[h].gather(-1, digits[..., h])
        lz = self.log_z(lps)
        out = out if lz is None else out - lz.unsqueeze(-1)
        if not self.shortlist:
            return out
        c = self.codec.code[tokens] - self.tail_size  # >= 0 on the shortlist
        return torch.where(c >= 0, short.gather(-1, c.clamp(min=0)), out + short[:, self.shortlist :])

    def loss(self, x, target, epsilon, smoothing="auto"):
        """The exact NLL (sum of per-head NLLs plus ``log Z_valid``; with a
        shortlist, the shortlist softmax's NLL or ``-s[N]`` plus the tail's),
        smoothed ``uniform`` over the V tokens (fairseq's; closed form from
        per-head sums, the default) or ``per-head`` (each digit classifier
        over its own classes; not with a shortlist).  Shapes: see
        :meth:`OutputLayer.loss`."""
        lps, short = self.parts(x)
        if self.realloc_updates and self._collecting():
            self._collect(lps, target)
        digits = self.codec.encode(target)
        gold = [lp.gather(-1, digits[:, h : h + 1]).squeeze(-1) for h, lp in enumerate(lps)]
        lz = self.log_z(lps)
        nll = -sum(gold)
        if lz is not None:
            nll = nll + lz
        correct = torch.stack([lp.argmax(-1) == digits[:, h] for h, lp in enumerate(lps)], -1)
        if short is not None:
            n = self.shortlist
            c = self.codec.code[target] - self.tail_size
            in_short = c >= 0
            s_cls = torch.where(in_short, c, torch.full_like(c, n))  # the tail class for a tail token
            s_gold = short.gather(-1, s_cls.unsqueeze(-1)).squeeze(-1)
            nll = torch.where(in_short, -s_gold, nll - s_gold)
            s_arg = short.argmax(-1)
            # a shortlist token is right when the shortlist's argmax is; a tail
            # token when the argmax is "the tail" and every digit is right
            correct = torch.where(
                in_short.unsqueeze(-1),
                (s_arg == s_cls).unsqueeze(-1).expand_as(correct),
                correct & (s_arg == n).unsqueeze(-1),
            )
        if epsilon == 0:
            return nll, nll, correct
        counts = self._digit_counts()
        if smoothing in ("auto", "uniform"):
            # sum_v log p(v) = sum_h sum_j n_h[j] lp_h[j] - T log Z (+ the
            # shortlist's sum and T s[N]), with n_h[j] the number of valid
            # codes whose h-th digit is j
            smooth = -sum((lp * n).sum(-1) for lp, n in zip(lps, counts))
            if lz is not None:
                smooth = smooth + self.tail_size * lz
            if short is not None:
                smooth = smooth - short[:, : self.shortlist].sum(-1) - self.tail_size * short[:, self.shortlist]
            loss = label_smoothed_loss([(nll, smooth, self.vocab_size)], epsilon)
        elif smoothing == "per-head":
            if short is not None:
                raise ValueError("--mhce-label-smoothing per-head is not defined with --mhce-shortlist; use uniform")
            # each digit classifier over its used digits
            used = self.codec.used_digits()
            terms = [(-gold[h], -(lp * (counts[h] > 0)).sum(-1), used[h]) for h, lp in enumerate(lps)]
            loss = label_smoothed_loss(terms, epsilon)
            if lz is not None:
                loss = loss + (1.0 - epsilon) * lz
        else:
            raise ValueError(f"unknown label smoothing mode {smoothing!r} (uniform, per-head)")
        return loss, nll, correct

    def _digit_counts(self) -> List[torch.Tensor]:
        """For each head, (C_h,) how many of the product's valid codes ``< T``
        have digit j there; derived from the radix, cached per device."""
        cache = getattr(self, "_counts_cache", None)
        dev = self.codec.code.device
        if cache is None or cache[0].device != dev:
            cache = [c.to(dev) for c in self.codec.digit_counts(self.tail_size)]
            self._counts_cache = cache
        return cache

    def upgrade_state_dict_named(self, state_dict, name):
        super().upgrade_state_dict_named(state_dict, name)
        prefix = name + "." if name else ""
        w = state_dict.get(prefix + "proj.weight")
        sb = state_dict.get(prefix + "short_bias")
        mismatch = w is not None and w.size(0) != self.proj.weight.size(0)
        if self.tied:  # the tail class only in proj; the shortlist size is short_bias's
            theirs = 0 if sb is None else sb.numel()
            mismatch = mismatch or theirs != self.shortlist
        else:
            extra = 0 if w is None else w.size(0) - sum(self.sizes)
            theirs = extra - 1 if extra > 0 else 0
        if mismatch:
            raise RuntimeError(
                f"the checkpoint was trained with --mhce-shortlist {theirs}, this model has --mhce-shortlist "
                f"{self.shortlist}; pass --mhce-shortlist {theirs} (or drop the override so the checkpoint's "
                f"own settings are used)."
            )


class _GroupedLinear(torch.autograd.Function):
    """The per-group products of :func:`grouped_logits` in training.

    Forward writes each group's ``(n_g, d) x (d, r_g)`` product into one
    output; backward writes each group's weight gradient straight into its
    block of one ``(R, d)`` buffer.  Autograd through ``weight.split(c)``
    would instead zero-fill a block for every group absent from the batch
    and concatenate all ``R / c`` blocks, one more ``R x d`` copy per step
    (at V = 224k about as much memory traffic as the products themselves).

    ``blocks``: ``(group, start, count, rows)`` per group present, rows
    ``[start, start + count)`` of ``xs`` (sorted by group); ``rows`` is
    ``c`` except for a partial last block, whose missing columns score
    ``-inf``.
    """

    @staticmethod
    def forward(ctx, xs, weight, bias, blocks, c):
        out = xs.new_empty(xs.size(0), c)
        for g, start, count, rows in blocks:
            lo, hi = g * c, g * c + rows
            torch.addmm(
                bias[lo:hi], xs[start : start + count], weight[lo:hi].t(), out=out[start : start + count, :rows]
            )
            if rows < c:
                out[start : start + count, rows:] = NEG_INF
        ctx.save_for_backward(xs, weight)
        ctx.blocks, ctx.c, ctx.bias_len = blocks, c, bias.size(0)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xs, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(xs) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = grad_out.new_zeros(ctx.bias_len) if need_b else None
        for g, start, count, rows in ctx.blocks:
            lo, hi = g * ctx.c, g * ctx.c + rows
            go = grad_out[start : start + count, :rows]
            if need_x:
                torch.mm(go, weight[lo:hi], out=grad_x[start : start + count])
            if need_w:
                torch.mm(go.t(), xs[start : start + count], out=grad_w[lo:hi])
            if need_b:
                torch.sum(go, 0, out=grad_b[lo:hi])
        return grad_x, grad_w, grad_b, None, None


def grouped_logits(
    x: torch.Tensor, group: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, c: int
) -> torch.Tensor:
    """``out[n, j] = weight[group[n] c + j] @ x[n] + bias[group[n] c + j]``
    without the ``(N, C, d)`` gathered rows.

    Rows are sorted by group and each group present is scored with one
    ``(n_g, d) x (d, C)`` matmul against its ``(C, d)`` block of the flat
    table (a view, no copy; in training :class:`_GroupedLinear`, whose
    backward fills one gradient buffer for the whole table block by block).
    ``weight`` may end in a partial block (a shared embedding has exactly V
    rows): the missing columns score ``-inf``.  Compute ``N C d`` with no
    padding; one host sync for the group counts.

    Args:
        x: (N, d); group: (N,) long in ``[0, ceil(R / c))``
        weight: (R, d); bias: (>= R,); c: the block (group) size
    Returns:
        (N, c)
    """
    n, rows = x.size(0), weight.size(0)
    if n == 0:
        return x.new_zeros(0, c)
    order = group.argsort(stable=True)
    counts = torch.bincount(group, minlength=-(-rows // c))
    present = counts.nonzero().squeeze(-1).tolist()
    sizes = counts[present].tolist()
    xs = x.index_select(0, order)
    if torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
        starts = itertools.accumulate(sizes, initial=0)
        blocks = [(g, s, k, min(c, rows - g * c)) for g, s, k in zip(present, starts, sizes)]
        out_sorted = _GroupedLinear.apply(xs, weight, bias, blocks, c)
    else:  # decoding (a few groups per step), or autocast choosing each product's precision
        if torch.is_grad_enabled():  # split views: one gradient buffer for the table (a narrow's is R x d each)
            ws, bs = weight.split(c), bias.split(c)
            blocks = [(ws[g], bs[g]) for g in present]
        else:  # no view per group of the whole table
            blocks = [(weight.narrow(0, g * c, min(c, rows - g * c)), bias.narrow(0, g * c, c)) for g in present]
        outs = []
        for (w, b), xp in zip(blocks, xs.split(sizes)):
            z = F.linear(xp, w, b[: w.size(0)])
            if w.size(0) < c:  # the partial last block: codes past the table belong to no token
                z = F.pad(z, (0, c - w.size(0)), value=NEG_INF)
            outs.append(z)
        out_sorted = torch.cat(outs, 0)
    return out_sorted.new_empty(n, c).index_copy(0, order, out_sorted)


@register_output_layer("mhe", 2)
class MultiHeadEmbedding(OutputLayer):
    """MHE: heads in series, coarse to fine (the exact chain rule).

    ``p(v|x) = prod_h p_h(d_h | x, d_<h)``; head 1 is ``softmax(W_1 x + b_1)``,
    head ``1 < h < H`` is ``softmax(W_h act(x + E_h[d_<h]) + b_h)`` where
    ``E_h`` embeds the prefix ``d_1 .. d_{h-1}``.  The last head is either

    * ``shared``: like the middle heads, one ``C_H x d`` matrix for every
      prefix (tokens with the same last digit share an output vector, told
      apart only by the prefix embedding); or
    * ``per-token``: the ``C_H`` tokens under prefix ``p`` are scored with
      their own vectors, ``logit(v) = u_v . x + b_v`` for ``v`` in ``p``
      (a code-indexed ``V x d`` table, as the paper's MHC: a coarse head
      over groups, a per-label fine head over the candidate group).  The
      prefix needs no embedding here: with per-token vectors an additive
      prefix term before the linear map would only add a per-token bias.
      Parameters as a softmax's; compute per target token ``O((C_1 + .. +
      C_H) d)`` (:func:`grouped_logits`).

    Digits that lead only to invalid codes are masked, so the distribution
    is normalized over the V tokens exactly; a prefix with no valid digit
    scores ``-inf`` everywhere (never NaN).
    """

    def __init__(
        self,
        input_dim: int,
        codec: MixedRadixCodec,
        activation: str = MHCEConfig.mhce_activation,
        last_head: str = MHCEConfig.mhce_last_head,
        tied_embed=None,
    ):
        if last_head not in LAST_HEAD_CHOICES:
            raise ValueError(f"--mhce-last-head must be one of {LAST_HEAD_CHOICES}, got {last_head!r}")
        if tied_embed is not None and last_head != "per-token":
            raise ValueError(tie_error("--mhce-method mhe with --mhce-last-head shared"))
        super().__init__(input_dim, codec, tied_embed)
        sizes = codec.sizes
        self.last_head = last_head
        self.per_token = last_head == "per-token"
        n_shared = len(sizes) - 1 if self.per_token else len(sizes)
        self.out = nn.ModuleList([_init_linear(nn.Linear(input_dim, c)) for c in sizes[:n_shared]])
        self.prefix_embed = nn.ModuleList([nn.Embedding(math.prod(sizes[:h]), input_dim) for h in range(1, n_shared)])
        for e in self.prefix_embed:
            nn.init.normal_(e.weight, mean=0.0, std=input_dim**-0.5)
        if self.per_token:
            # one row per code of the used last-level prefixes (row = code)
            self.num_last_prefixes = -(-codec.vocab_size // sizes[-1])
            rows = self.num_last_prefixes * sizes[-1]
            if not self.tied:  # tied: the shared embedding's rows (code order)
                self.token_vectors = nn.Parameter(torch.randn(rows, input_dim) * input_dim**-0.5)
            self.token_bias = nn.Parameter(torch.zeros(rows))
        self.activation = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}[activation]

    @classmethod
    def build(cls, settings, input_dim, codec, embed_tokens=None):
        return cls(
            input_dim,
            codec,
            activation=settings.mhce_activation,
            last_head=settings.mhce_last_head,
            tied_embed=embed_tokens,
        )

    def last_vectors(self) -> torch.Tensor:
        """(R, d) the per-token last head's vectors, row = code: its own
        table (R = ceil(V / C_H) C_H) or the shared embedding (R = V)."""
        return self.tied_weight if self.tied else self.token_vectors

    def level_log_probs(self, h: int, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Head h's log-probabilities given prefixes.

        Args:
            x: (N, d)
            prefix: (N, M) prefix indices (``d_1 .. d_{h-1}`` as an integer;
                ignored for h = 0)
        Returns:
            (N, M, C_h) float32 log-softmax; ``-inf`` on digits with no valid
            code (a prefix with none is ``-inf`` throughout, not NaN)
        """
        if h == 0:
            logits = self.out[0](x).unsqueeze(1).expand(-1, prefix.size(1), -1)
        elif self.per_token and h == len(self.sizes) - 1:
            n, m = prefix.shape
            c = self.sizes[-1]
            p = prefix.reshape(-1).clamp(max=self.num_last_prefixes - 1)  # beyond: all invalid, masked
            xs = x.unsqueeze(1).expand(n, m, x.size(-1)).reshape(n * m, -1)
            logits = grouped_logits(xs, p, self.last_vectors(), self.token_bias, c).view(n, m, c)
        else:
            hid = self.activation(x.unsqueeze(1) + self.prefix_embed[h - 1](prefix))
            logits = self.out[h](hid)
        logits = logits.float()
        if not self._has_invalid:
            return F.log_softmax(logits, dim=-1)
        valid = self.codec.valid_digit_mask(h, prefix)
        lp = F.log_softmax(logits.masked_fill(~valid, NEG_INF), dim=-1)
        return lp.masked_fill(~valid, NEG_INF)  # an all-invalid row is NaN after log_softmax

    def log_probs(self, x, max_elements: int = 1 << 25):
        """(N, d) -> (N, V) by expanding every prefix, head by head.  Costs
        ``O(V d)`` (shared: each last-level prefix needs its own hidden state;
        per-token: one ``V x d`` matmul, as a softmax); the factorized search
        avoids it.  Rows are processed in chunks so the ``(N, prefixes, d)``
        hidden states stay bounded."""
        n = x.size(0)
        widest = max([1] + [e.num_embeddings for e in self.prefix_embed])
        step = max(1, max_elements // (widest * self.input_dim))
        out = [self._dense_rows(x[i : i + step]) for i in range(0, n, step)]
        return torch.cat(out, 0) if out else x.new_zeros(0, self.vocab_size, dtype=torch.float)

    def _dense_rows(self, x):
        n = x.size(0)
        H = len(self.sizes)
        prefix = torch.zeros(n, 1, dtype=torch.long, device=x.device)
        scores = x.new_zeros(n, 1, dtype=torch.float)
        for h in range(H):
            if self.per_token and h == H - 1:
                lp = self._last_level_dense(x, scores.size(1))
            else:
                lp = self.level_log_probs(h, x, prefix)  # (n, M, C_h)
            scores = (scores.unsqueeze(-1) + lp).flatten(1)  # (n, M*C_h), code order
            prefix = torch.arange(scores.size(1), device=x.device).unsqueeze(0).expand(n, -1)
        return scores.index_select(-1, self.codec.code)

    def _last_level_dense(self, x, num_prefixes: int):
        """Per-token last head for every prefix at once: (n, num_prefixes, C_H)."""
        c = self.sizes[-1]
        w = self.last_vectors()
        logits = F.linear(x, w, self.token_bias[: w.size(0)]).float()
        if w.size(0) % c:  # a shared embedding ends in a partial group: no token there
            logits = F.pad(logits, (0, c - w.size(0) % c), value=NEG_INF)
        logits = logits.view(x.size(0), -1, c)
        if num_prefixes > self.num_last_prefixes:  # prefixes past V: no valid code
            pad = logits.new_full((x.size(0), num_prefixes - self.num_last_prefixes, c), NEG_INF)
            logits = torch.cat([logits, pad], 1)
        if not self._has_invalid:
            return F.log_softmax(logits, dim=-1)
        prefix = torch.arange(num_prefixes, device=x.device)
        valid = self.codec.valid_digit_mask(len(self.sizes) - 1, prefix)
        lp = F.log_softmax(logits.masked_fill(~valid, NEG_INF), dim=-1)
        return lp.masked_fill(~valid, NEG_INF)

    def topk(self, x, k, min_token=0, extra=None):
        """Best-first prefix expansion; see :func:`.factorized_topk.mhe_topk`."""
        from .factorized_topk import mhe_topk

        return mhe_topk(self, x, k, min_token, extra)

    def token_log_probs(self, x, tokens):
        """(N, d), (N, K) token ids -> (N, K), one head evaluation per digit
        (summed in the dense row's order ``((0 + lp_1) + lp_2) + ..``)."""
        digits = self.codec.encode(tokens)  # (N, K, H)
        prefixes = self.codec.prefixes(tokens)  # (N, K, H)
        out = x.new_zeros(tokens.shape, dtype=torch.float)
        for h in range(len(self.sizes)):
            lp = self.level_log_probs(h, x, prefixes[..., h])
            out = out + lp.gather(-1, digits[..., h : h + 1]).squeeze(-1)
        return out

    def loss(self, x, target, epsilon, smoothing="auto"):
        """Teacher-forced on the gold prefix: one softmax per head.

        Label smoothing is per head (``smoothing`` ``auto`` or ``per-head``):
        uniform smoothing over V would need every prefix, i.e. ``O(V d)``.
        Shapes: see :meth:`OutputLayer.loss`.
        """
        if smoothing not in ("auto", "per-head"):
            raise ValueError(
                "--mhce-label-smoothing uniform needs every prefix of an MHE head (O(V d)); "
                "MHE smooths per head: use --mhce-label-smoothing per-head (or auto)"
            )
        digits = self.codec.encode(target)
        prefixes = self.codec.prefixes(target)
        nll = 0
        terms = []  # per head, over its valid digits under the gold prefix
        correct = []
        for h in range(len(self.sizes)):
            lp = self.level_log_probs(h, x, prefixes[:, h : h + 1]).squeeze(1)  # (N, C_h)
            nll_h = -lp.gather(-1, digits[:, h : h + 1]).squeeze(-1)
            correct.append(lp.argmax(-1) == digits[:, h])
            nll = nll + nll_h
            if epsilon > 0:
                valid = torch.isfinite(lp)
                terms.append((nll_h, -lp.masked_fill(~valid, 0.0).sum(-1), valid.sum(-1).float()))
        loss = nll if epsilon == 0 else label_smoothed_loss(terms, epsilon)
        return loss, nll, torch.stack(correct, -1)

    def upgrade_state_dict_named(self, state_dict, name):
        super().upgrade_state_dict_named(state_dict, name)
        prefix = name + "." if name else ""
        ck_per_token = (prefix + "token_vectors") in state_dict or (prefix + "token_bias") in state_dict
        if ck_per_token != self.per_token:
            ck = "per-token" if ck_per_token else "shared"
            raise RuntimeError(
                f"the checkpoint's MHE last head is --mhce-last-head {ck}, this model's is "
                f"{self.last_head}; pass --mhce-last-head {ck} (or drop the override)."
            )
