"""The multi-head output layers MHP and MHE (MHS lives in :mod:`.mhs`).

Both work on flat decoder states ``x: (N, d)`` and implement
:class:`~.output_layer.OutputLayer`.  All log-probabilities are computed in
float32 whatever the input dtype: the head outputs are small, and fp16/bf16
log-sum-exp over a product of heads loses the precision that beam scores need.
"""

import itertools
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..codes.realloc import ReallocationCollector
from ..config import LAST_HEAD_CHOICES, MHCEConfig, check_shortlist, parse_update_list
from ..search.topk import mhe_topk, mhp_shortlist_topk, mhp_topk
from .codec import MixedRadixCodec
from .output_layer import NEG_INF, OutputLayer, _init_linear, register_output_layer, tie_error
from .shortlist import Shortlist


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

    Two parts it composes:

    * a :class:`~.shortlist.Shortlist` of ``N`` tokens (``--mhce-shortlist``)
      on the top codes ``[T, V)``, ``T = V - N``, with their own output
      vectors; the product then covers the tail ``[0, T)`` only (``Z_valid``
      becomes ``Z_T``, the same closed form).  Cost per token ``O((N + 1 +
      sum C_h) d)``.
    * a :class:`~fairseq_mhce.codes.realloc.ReallocationCollector`
      (``--mhce-realloc-updates``, LightRNN): the code table re-allocated
      during training.

    Parameters: one fused projection ``proj`` for the heads and the
    shortlist's outputs, and ``short_bias`` (S,) when the shortlist is tied
    to the decoder's input embedding.
    """

    def __init__(
        self,
        input_dim: int,
        codec: MixedRadixCodec,
        realloc_updates: Sequence[int] = (),
        realloc_window: int = MHCEConfig.mhce_realloc_window,
        shortlist: int = 0,  # resolved: the option's -1 (automatic) goes through config.resolve_settings
        tied_embed=None,
    ):
        shortlist = int(shortlist)
        if shortlist < 0:
            raise ValueError(
                f"MultiHeadProduct: shortlist {shortlist} is --mhce-shortlist's automatic value; resolve it for the "
                f"dictionary first (fairseq_mhce.config.resolve_shortlist)"
            )
        check_shortlist(shortlist, codec.vocab_size)
        if tied_embed is not None and not shortlist:
            raise ValueError(tie_error("--mhce-method mhp without a shortlist (--mhce-shortlist 0)"))
        if shortlist and realloc_updates:
            raise ValueError(
                "--mhce-realloc-updates cannot be combined with --mhce-shortlist (the re-allocation would "
                "move tokens between the shortlist and the tail); drop one of them"
            )
        super().__init__(input_dim, codec, tied_embed)
        self.shortlist = shortlist
        # the product's valid codes: [0, T), T = V without a shortlist
        self.tail_size = codec.vocab_size - shortlist
        self._has_invalid = codec.num_codes > self.tail_size
        # the shortlist's parameters are the head's (proj, short_bias): its
        # state-dict keys and parameter order stay those of earlier checkpoints
        self.short = Shortlist(shortlist, codec.vocab_size, self.tied) if shortlist else None
        # one fused projection for all heads and the shortlist, split afterwards
        self.proj = _init_linear(nn.Linear(input_dim, sum(codec.sizes) + (self.short.num_logits if shortlist else 0)))
        if self.tied:
            self.short_bias = nn.Parameter(torch.zeros(shortlist))
        self.realloc = (
            ReallocationCollector(realloc_updates, realloc_window, codec.vocab_size) if realloc_updates else None
        )

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

    def set_num_updates(self, num_updates: int):
        """fairseq calls this with the number of finished updates before the
        forward of the next one: the re-allocation's schedule."""
        if self.realloc is not None:
            self.realloc.set_num_updates(num_updates, self.codec)

    def digit_log_probs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(N, d) -> list of H tensors (N, C_h), float32 log-softmax."""
        return self.parts(x)[0]

    def parts(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
        """(N, d) -> (the H digit log-softmaxes (N, C_h), the shortlist
        log-softmax (N, S + 1) or None), float32, from one projection."""
        logits = self.proj(x).float()
        if self.short is None:
            return [F.log_softmax(z, dim=-1) for z in logits.split(self.sizes, dim=-1)], None
        *zs, z_short = logits.split(self.sizes + [self.short.num_logits], dim=-1)
        if self.tied:
            short = self.short.log_softmax(x, z_short, self.tied_weight, self.short_bias)
        else:
            short = self.short.log_softmax(x, z_short)
        return [F.log_softmax(z, dim=-1) for z in zs], short

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
        return out if short is None else self.short.log_probs(short, self.codec.code, out)

    def topk(self, x, k, min_token=0, extra=None):
        """Product-key search (:func:`fairseq_mhce.search.topk.mhp_topk`); with a
        shortlist, merged with the shortlist's own top-k."""
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
        return out if short is None else self.short.log_probs(short, self.codec.code[tokens], out)

    def loss(self, x, target, epsilon, smoothing="auto"):
        """The exact NLL (sum of per-head NLLs plus ``log Z_valid``; with a
        shortlist, the shortlist softmax's NLL or ``-s[N]`` plus the tail's),
        smoothed ``uniform`` over the V tokens (fairseq's; closed form from
        per-head sums, the default) or ``per-head`` (each digit classifier
        over its own classes; not with a shortlist).  Shapes: see
        :meth:`OutputLayer.loss`."""
        lps, short = self.parts(x)
        if self.realloc is not None and self.training:
            self.realloc.collect(lps, target)
        digits = self.codec.encode(target)
        gold = [lp.gather(-1, digits[:, h : h + 1]).squeeze(-1) for h, lp in enumerate(lps)]
        lz = self.log_z(lps)
        nll = -sum(gold)
        if lz is not None:
            nll = nll + lz
        correct = torch.stack([lp.argmax(-1) == digits[:, h] for h, lp in enumerate(lps)], -1)
        if short is not None:
            nll, correct = self.short.nll_and_correct(short, self.codec.code[target], nll, correct)
        if epsilon == 0:
            return nll, nll, correct
        counts = self._digit_counts()
        if smoothing in ("auto", "uniform"):
            # sum_v log p(v) = sum_h sum_j n_h[j] lp_h[j] - T log Z (+ the
            # shortlist's part), with n_h[j] the number of valid codes whose
            # h-th digit is j
            smooth = -sum((lp * n).sum(-1) for lp, n in zip(lps, counts))
            if lz is not None:
                smooth = smooth + self.tail_size * lz
            if short is not None:
                smooth = self.short.smooth(short, smooth)
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
        """A checkpoint of another shortlist size is a clear error: its
        projection has other rows (untied: ``N + 1`` beyond the heads), or
        (tied) its ``short_bias`` another size."""
        super().upgrade_state_dict_named(state_dict, name)
        prefix = name + "." if name else ""
        w = state_dict.get(prefix + "proj.weight")
        theirs = Shortlist.of_checkpoint(state_dict, prefix, sum(self.sizes), self.tied)
        if (w is not None and w.size(0) != self.proj.weight.size(0)) or (self.tied and theirs != self.shortlist):
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
        """Best-first prefix expansion; see :func:`fairseq_mhce.search.topk.mhe_topk`."""
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
