"""The shortlist of an MHP output layer (``--mhce-shortlist N``).

The hybrid of Oda et al. 2017, and the head/tail split of fairseq's adaptive
softmax: the ``N`` tokens on the top codes ``[T, V)``, ``T = V - N``, get
their own output vectors in an ``(N + 1)``-way softmax ``s`` whose last
class is "the tail"; the other tokens (codes ``[0, T)``) share the tail's
mass through the product of heads
(:class:`~.multihead_output.MultiHeadProduct`):

* ``log p(u|x) = s[code(u) - T]`` for a shortlist token ``u``
* ``log p(v|x) = s[N] + sum_h lp_h[d_h(v)] - log Z_T(x)`` for the others

The code table says which tokens are listed (:func:`fairseq_mhce.codes.table.shortlist_code`).
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class Shortlist(nn.Module):
    """The shortlist's softmax and how it combines with the product's tail.

    Holds no parameters: its logits are the last ``N + 1`` outputs of the
    head's fused projection, or, tied to the decoder's input embedding, the
    embedding's rows ``[T, V)`` (code order) with the head's ``short_bias``
    beside the projection's last output (the tail class).  The head owns
    them, so that its state-dict keys, and the parameter order a resumed
    optimizer state follows, are those of every earlier checkpoint.
    """

    def __init__(self, size: int, vocab_size: int, tied: bool = False):
        super().__init__()
        self.size = int(size)
        self.tail_size = vocab_size - self.size
        # outputs the shortlist adds to the head's projection: its own
        # classes and the tail, or (tied) the tail only
        self.num_logits = 1 if tied else self.size + 1

    def log_softmax(
        self, x: torch.Tensor, z: torch.Tensor, embedding: Optional[torch.Tensor] = None, bias=None
    ) -> torch.Tensor:
        """The shortlist's log-softmax, the tail class last.

        Args:
            x: (N, d) decoder states
            z: (N, num_logits) float32, the projection's shortlist outputs
            embedding: (V, d) the shared embedding (rows in code order) and
                bias (S,), when tied
        Returns:
            (N, S + 1) float32
        """
        if embedding is not None:
            listed = embedding.narrow(0, self.tail_size, self.size)  # (S, d) view
            z = torch.cat([F.linear(x, listed, bias).float(), z], -1)
        return F.log_softmax(z, dim=-1)

    def log_probs(self, short: torch.Tensor, code: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
        """Token log-probabilities from the shortlist's and the product's.

        Args:
            short: (N, S + 1) :meth:`log_softmax`
            code: the tokens' codes, (V,) every token (the dense row) or
                (N, K) per row
            product: (N, V) or (N, K) the product's log-probabilities of
                the same tokens, normalized over the tail's codes ``[0, T)``
        Returns:
            (N, V) or (N, K)
        """
        c = code - self.tail_size  # >= 0 on the shortlist
        if c.dim() == 1:
            on_list = short.index_select(-1, c.clamp(min=0))
        else:
            on_list = short.gather(-1, c.clamp(min=0))
        return torch.where(c >= 0, on_list, product + short[:, self.size :])

    def nll_and_correct(
        self, short: torch.Tensor, code: torch.Tensor, nll: torch.Tensor, correct: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The targets' NLL and digit accuracy with the shortlist.

        Args:
            short: (N, S + 1) :meth:`log_softmax`; code: (N,) the targets' codes
            nll: (N,) the product's NLL (normalized over the tail)
            correct: (N, H) bool, each head's argmax is the target's digit
        Returns:
            nll (N,): ``-s[c]`` for a shortlist target, ``nll - s[N]`` for a
            tail one; correct (N, H): a shortlist target is right (on every
            head) when the shortlist's argmax is; a tail target when the
            argmax is "the tail" and the digit is right
        """
        c = code - self.tail_size
        in_short = c >= 0
        s_cls = torch.where(in_short, c, torch.full_like(c, self.size))  # the tail class for a tail token
        s_gold = short.gather(-1, s_cls.unsqueeze(-1)).squeeze(-1)
        nll = torch.where(in_short, -s_gold, nll - s_gold)
        s_arg = short.argmax(-1)
        correct = torch.where(
            in_short.unsqueeze(-1),
            (s_arg == s_cls).unsqueeze(-1).expand_as(correct),
            correct & (s_arg == self.size).unsqueeze(-1),
        )
        return nll, correct

    def smooth(self, short: torch.Tensor, tail_smooth: torch.Tensor) -> torch.Tensor:
        """(N,) ``-sum_v log p(v|x)`` over the V tokens, from the tail's
        ``-sum`` of the product's log-probabilities over ``[0, T)``: the
        shortlist's own classes, and ``T`` times ``-s[N]``."""
        return tail_smooth - short[:, : self.size].sum(-1) - self.tail_size * short[:, self.size]

    @staticmethod
    def of_checkpoint(state_dict, prefix: str, head_outputs: int, tied: bool) -> int:
        """The shortlist size of the MHP head at ``prefix`` in a checkpoint's
        state dict: tied, the size of its ``short_bias``; untied, its
        projection's rows beyond the heads' ``head_outputs``, less the tail
        class (0: none)."""
        if tied:
            sb = state_dict.get(prefix + "short_bias")
            return 0 if sb is None else sb.numel()
        w = state_dict.get(prefix + "proj.weight")
        extra = 0 if w is None else w.size(0) - head_outputs
        return extra - 1 if extra > 0 else 0

    def extra_repr(self) -> str:
        return f"size={self.size}, tail_size={self.tail_size}, logits={self.num_logits}"
