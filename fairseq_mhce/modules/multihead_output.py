"""Multi-head output layers that replace the ``V x d`` vocabulary projection.

Both heads work on flat decoder states ``x: (N, d)`` and token ids, and share
one interface (see :class:`MultiHeadOutput`):

* ``log_probs(x)``          -> ``(N, V)`` exact log-probabilities (dense row,
  for fairseq's generator and scorer);
* ``token_log_probs(x, t)`` -> ``(N, K)`` exact log-probabilities of given
  tokens, without the dense row;
* ``loss(x, target, eps)``  -> label-smoothed loss and NLL per token, computed
  in ``O(sum C_h d)`` (never materializes ``V``);

All log-probabilities are computed in float32 whatever the input dtype: the
head outputs are small, and fp16/bf16 log-sum-exp over a product of heads
loses the precision that beam scores need.
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .codec import MixedRadixCodec

NEG_INF = float("-inf")


def _init_linear(linear: nn.Linear) -> nn.Linear:
    # same scale as fairseq's output projection (normal, std d^-0.5)
    nn.init.normal_(linear.weight, mean=0.0, std=linear.in_features ** -0.5)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class MultiHeadOutput(nn.Module):
    """Base class: a codec plus the bookkeeping every head shares."""

    method: str = ""

    def __init__(self, input_dim: int, codec: MixedRadixCodec):
        super().__init__()
        self.input_dim = input_dim
        self.codec = codec

    @property
    def vocab_size(self) -> int:
        return self.codec.vocab_size

    @property
    def sizes(self) -> List[int]:
        return self.codec.sizes

    def num_output_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def upgrade_state_dict_named(self, state_dict, name):
        """Called by fairseq before ``load_state_dict``: turn a checkpoint
        whose head does not match this model into a clear error instead of a
        tensor size mismatch deep inside torch."""
        prefix = name + "." if name else ""
        key = prefix + "codec.head_sizes"
        if key not in state_dict:
            raise RuntimeError(
                f"the checkpoint has no multi-head output at '{prefix}' (no {key}); it was not "
                f"trained with --mhce-method {self.method}. Load it with the architecture it was "
                f"trained with."
            )
        ck_sizes = state_dict[key].tolist()
        ck_vocab = state_dict[prefix + "codec.code"].numel()
        if ck_vocab != self.vocab_size:
            raise RuntimeError(
                f"dictionary mismatch: the checkpoint's output layer covers {ck_vocab} target "
                f"types but the target dictionary given now has {self.vocab_size}. Use the "
                f"data-bin (dict.*.txt) the model was trained with."
            )
        if ck_sizes != self.sizes:
            raise RuntimeError(
                f"the checkpoint was trained with --mhce-head-sizes "
                f"{','.join(map(str, ck_sizes))} but this model has "
                f"{','.join(map(str, self.sizes))}; pass --mhce-head-sizes "
                f"{','.join(map(str, ck_sizes))} (or drop the overrides so the checkpoint's "
                f"own settings are used)."
            )
        mkey = prefix + "method_id"
        if mkey in state_dict and int(state_dict[mkey]) != int(self.method_id):
            ck_method = METHODS_BY_ID.get(int(state_dict[mkey]), "?")
            raise RuntimeError(
                f"the checkpoint was trained with --mhce-method {ck_method}, this model is "
                f"--mhce-method {self.method}; use --mhce-method {ck_method}."
            )

    # -- interface ---------------------------------------------------------
    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def token_log_probs(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, x, target, epsilon, smoothing="auto"):
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_probs(x)


class MultiHeadProduct(MultiHeadOutput):
    """MHP: ``H`` independent digit classifiers on the same state.

    ``log p(v|x) = sum_h log_softmax(W_h x + b_h)[d_h(v)] - log Z_valid(x)``,
    where ``Z_valid`` is the product distribution's mass on valid codes
    (``< V``), computed from the digits of ``V`` in ``O(sum C_h)``.
    """

    method = "mhp"

    def __init__(self, input_dim: int, codec: MixedRadixCodec):
        super().__init__(input_dim, codec)
        # one fused projection for all heads, split afterwards
        self.proj = _init_linear(nn.Linear(input_dim, sum(codec.sizes)))
        self.register_buffer("method_id", torch.tensor(METHOD_IDS[self.method]))
        self._has_invalid = codec.num_codes > codec.vocab_size

    def head_log_probs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(N, d) -> list of H tensors (N, C_h), float32 log-softmax."""
        logits = self.proj(x).float()
        return [F.log_softmax(z, dim=-1) for z in logits.split(self.sizes, dim=-1)]

    def log_z(self, lps: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """(N,) log of the mass on codes < V, or None when every code is valid.

        Codes below V are: d_1 < v_1 (any suffix), or d_1 = v_1 and d_2 < v_2,
        ... (big-endian comparison with V's digits v_h)."""
        if not self._has_invalid:
            return None
        vd = self.codec.vocab_digits()
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
        lps = self.head_log_probs(x)
        out = self._joint(lps).index_select(-1, self.codec.code)
        lz = self.log_z(lps)
        return out if lz is None else out - lz.unsqueeze(-1)

    def topk(self, x, k, min_token=0, extra=None):
        """Exact per-row top-k without the dense row; see :mod:`.factorized_topk`."""
        from .factorized_topk import mhp_topk

        return mhp_topk(self, x, k, min_token, extra)

    def token_log_probs(self, x, tokens):
        """(N, d), (N, K) token ids -> (N, K)."""
        lps = self.head_log_probs(x)
        digits = self.codec.encode(tokens)  # (N, K, H)
        out = lps[0].gather(-1, digits[..., 0])
        for h in range(1, len(lps)):
            out = out + lps[h].gather(-1, digits[..., h])
        lz = self.log_z(lps)
        return out if lz is None else out - lz.unsqueeze(-1)

    def loss(self, x, target, epsilon, smoothing="auto"):
        """Label-smoothed loss and NLL, per token.

        Args:
            x: (N, d) decoder states at non-padding positions
            target: (N,) gold token ids
            epsilon: label smoothing
            smoothing: ``uniform`` (fairseq's: uniform over the V tokens, in
                closed form from per-head sums) or ``per-head`` (each digit
                classifier smoothed over its own classes)
        Returns:
            loss (N,), nll (N,), digit_correct (N, H) bool
        """
        lps = self.head_log_probs(x)
        digits = self.codec.encode(target)
        gold = [lp.gather(-1, digits[:, h : h + 1]).squeeze(-1) for h, lp in enumerate(lps)]
        lz = self.log_z(lps)
        nll = -sum(gold)
        if lz is not None:
            nll = nll + lz
        correct = torch.stack([lp.argmax(-1) == digits[:, h] for h, lp in enumerate(lps)], -1)
        if epsilon == 0:
            return nll, nll, correct
        if smoothing in ("auto", "uniform"):
            # sum_v log p(v) = sum_h sum_j n_h[j] lp_h[j] - V log Z, with n_h[j]
            # the number of valid codes whose h-th digit is j
            counts = self._digit_counts()
            smooth = -sum((lp * n).sum(-1) for lp, n in zip(lps, counts))
            if lz is not None:
                smooth = smooth + self.vocab_size * lz
            eps_i = epsilon / (self.vocab_size - 1)
            loss = (1.0 - epsilon - eps_i) * nll + eps_i * smooth
        elif smoothing == "per-head":
            loss = 0
            used = self.codec.used_digits()
            for h, lp in enumerate(lps):
                n = self._digit_counts()[h] > 0
                eps_h = epsilon / max(used[h] - 1, 1)
                smooth_h = -(lp * n).sum(-1)
                loss = loss + (1.0 - epsilon - eps_h) * (-gold[h]) + eps_h * smooth_h
            if lz is not None:
                loss = loss + (1.0 - epsilon) * lz
        else:
            raise ValueError(f"unknown label smoothing mode {smoothing!r} (uniform, per-head)")
        return loss, nll, correct

    def _digit_counts(self) -> List[torch.Tensor]:
        # derived from the codec; cached per device, never saved
        cache = getattr(self, "_counts_cache", None)
        dev = self.codec.code.device
        if cache is None or cache[0].device != dev:
            cache = [c.to(dev) for c in self.codec.digit_counts()]
            self._counts_cache = cache
        return cache


class MultiHeadEmbedding(MultiHeadOutput):
    """MHE: heads in series, coarse to fine (the exact chain rule).

    ``p(v|x) = prod_h p_h(d_h | x, d_<h)``; head 1 is ``softmax(W_1 x + b_1)``,
    head ``h > 1`` is ``softmax(W_h act(x + E_h[d_<h]) + b_h)`` where
    ``E_h`` embeds the prefix ``d_1 .. d_{h-1}`` (``C_1 * .. * C_{h-1}``
    rows).  Digits that lead only to invalid codes are masked, so the
    distribution is normalized over the V tokens exactly.
    """

    method = "mhe"

    def __init__(self, input_dim: int, codec: MixedRadixCodec, activation: str = "gelu"):
        super().__init__(input_dim, codec)
        sizes = codec.sizes
        self.out = nn.ModuleList([_init_linear(nn.Linear(input_dim, c)) for c in sizes])
        self.prefix_embed = nn.ModuleList(
            [nn.Embedding(math.prod(sizes[:h]), input_dim) for h in range(1, len(sizes))]
        )
        for e in self.prefix_embed:
            nn.init.normal_(e.weight, mean=0.0, std=input_dim ** -0.5)
        self.activation = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}[activation]
        self.register_buffer("method_id", torch.tensor(METHOD_IDS[self.method]))
        self._has_invalid = codec.num_codes > codec.vocab_size

    def head_log_probs(self, h: int, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Head h's log-probabilities given prefixes.

        Args:
            x: (N, d)
            prefix: (N, M) prefix indices (``d_1 .. d_{h-1}`` as an integer;
                ignored for h = 0)
        Returns:
            (N, M, C_h) float32 log-softmax, -inf on digits with no valid code
        """
        if h == 0:
            logits = self.out[0](x).unsqueeze(1).expand(-1, prefix.size(1), -1)
        else:
            hid = self.activation(x.unsqueeze(1) + self.prefix_embed[h - 1](prefix))
            logits = self.out[h](hid)
        logits = logits.float()
        if self._has_invalid:
            logits = logits.masked_fill(~self.codec.valid_digit_mask(h, prefix), NEG_INF)
        return F.log_softmax(logits, dim=-1)

    def log_probs(self, x, max_elements: int = 1 << 25):
        """(N, d) -> (N, V) by expanding every prefix, head by head.  Costs
        ``O(V d)`` (each of the ``V / C_H`` last-level prefixes needs its own
        hidden state); the factorized search avoids it.  Rows are processed in
        chunks so the ``(N, prefixes, d)`` hidden states stay bounded."""
        n = x.size(0)
        widest = max([1] + [e.num_embeddings for e in self.prefix_embed])
        step = max(1, max_elements // (widest * self.input_dim))
        out = [self._dense_rows(x[i : i + step]) for i in range(0, n, step)]
        return torch.cat(out, 0) if out else x.new_zeros(0, self.vocab_size, dtype=torch.float)

    def _dense_rows(self, x):
        n = x.size(0)
        prefix = torch.zeros(n, 1, dtype=torch.long, device=x.device)
        scores = x.new_zeros(n, 1, dtype=torch.float)
        for h, c in enumerate(self.sizes):
            lp = self.head_log_probs(h, x, prefix)  # (n, M, C_h)
            scores = (scores.unsqueeze(-1) + lp).flatten(1)  # (n, M*C_h), code order
            prefix = torch.arange(scores.size(1), device=x.device).unsqueeze(0).expand(n, -1)
        return scores.index_select(-1, self.codec.code)

    def topk(self, x, k, min_token=0, extra=None):
        """Exact per-row top-k without the dense row; see :mod:`.factorized_topk`."""
        from .factorized_topk import mhe_topk

        return mhe_topk(self, x, k, min_token, extra)

    def token_log_probs(self, x, tokens):
        """(N, d), (N, K) token ids -> (N, K), one head evaluation per digit."""
        digits = self.codec.encode(tokens)  # (N, K, H)
        prefixes = self.codec.prefixes(tokens)  # (N, K, H)
        out = 0
        for h in range(len(self.sizes)):
            lp = self.head_log_probs(h, x, prefixes[..., h])
            out = out + lp.gather(-1, digits[..., h : h + 1]).squeeze(-1)
        return out

    def loss(self, x, target, epsilon, smoothing="auto"):
        """Teacher-forced on the gold prefix: one softmax per head.

        Label smoothing is per head (``smoothing`` ``auto`` or ``per-head``):
        uniform smoothing over V would need every prefix, i.e. ``O(V d)``.

        Args / returns: as :meth:`MultiHeadProduct.loss`.
        """
        if smoothing not in ("auto", "per-head"):
            raise ValueError(
                "--mhce-label-smoothing uniform needs every prefix of an MHE head (O(V d)); "
                "MHE smooths per head: use --mhce-label-smoothing per-head (or auto)"
            )
        digits = self.codec.encode(target)
        prefixes = self.codec.prefixes(target)
        nll = 0
        loss = 0
        correct = []
        for h in range(len(self.sizes)):
            lp = self.head_log_probs(h, x, prefixes[:, h : h + 1]).squeeze(1)  # (N, C_h)
            nll_h = -lp.gather(-1, digits[:, h : h + 1]).squeeze(-1)
            correct.append(lp.argmax(-1) == digits[:, h])
            nll = nll + nll_h
            if epsilon > 0:
                valid = torch.isfinite(lp)
                n_valid = valid.sum(-1).float()
                eps_h = epsilon / (n_valid - 1).clamp(min=1)
                smooth_h = -lp.masked_fill(~valid, 0.0).sum(-1)
                loss = loss + (1.0 - epsilon - eps_h) * nll_h + eps_h * smooth_h
        if epsilon == 0:
            loss = nll
        return loss, nll, torch.stack(correct, -1)


METHOD_IDS = {"mhp": 1, "mhe": 2, "mhs": 3}
METHODS_BY_ID = {v: k for k, v in METHOD_IDS.items()}
