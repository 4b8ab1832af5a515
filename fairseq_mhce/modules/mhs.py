"""MHS (Multi-Head Sampling): a full-vocabulary softmax trained on sampled
head-1 groups.

The layer keeps an ordinary ``V x d`` projection (``proj``, tieable to the
decoder's input embedding; decoded with the full softmax) plus a codec that
only defines the groups: head-1 group ``g`` holds the tokens whose code has
first digit ``g``, i.e. codes ``g*P_1 .. (g+1)*P_1 - 1`` (``P_1 = C_2 ..
C_H``; codes ``>= V`` belong to no token and are skipped).

A training step scores only a sample of those groups:

* every group that holds a target of the batch (so every target is inside the
  softmax it is trained against), plus
* random other groups up to the budget (``--mhce-sample-groups``: a count
  ``> 1`` or a fraction ``<= 1`` of the non-empty groups; when the target
  groups alone reach the budget, no negatives are added and the budget is
  exceeded rather than dropping a target).

The rows of the projection for the sampled tokens are gathered with
``index_select`` and scored with one ``(N, d) x (d, S)`` matmul; the loss is
fairseq's label-smoothed NLL with the softmax and the uniform smoothing taken
over the ``S`` sampled tokens (``eps_i = eps / (S - 1)``).  With a budget
that covers every group this *is* fairseq's full-softmax loss (same value,
same gradients).  Rows of unsampled tokens get an exact zero gradient; the
weight is still used by the graph, so DistributedDataParallel (c10d, without
``--find-unused-parameters``) sees every parameter and all-reduces a dense
gradient as usual.

Random negatives come from a private ``torch.Generator`` seeded from
fairseq's ``--seed`` and the update number (fairseq calls
:meth:`MultiHeadSampling.set_num_updates` before every step), never from the
global RNG.  The draw is therefore reproducible (also across a resume),
independent of dropout, identical for every micro-batch of an update
(``--update-freq``) and identical on every data-parallel rank: only the
target groups differ between ranks.  A run on ``k`` ranks thus samples
exactly what a single process with ``--update-freq k`` samples for the same
global batch.

In eval mode (validation, ``--score-reference`` through the criterion) the
loss is the exact full softmax with fairseq's uniform smoothing over ``V``,
so validation loss and perplexity compare with a softmax baseline.
"""

import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from ..config import MHCEConfig
from .codec import MixedRadixCodec
from .output_layer import OutputLayer, register_output_layer

MHS_GROUP_SIZE = 16


def num_groups(codec: MixedRadixCodec) -> int:
    """Head-1 groups that hold at least one token: ``ceil(V / P_1)`` (<= C_1)."""
    return -(-codec.vocab_size // codec.stride_list[0])


def group_budget(sample_groups, codec: MixedRadixCodec) -> int:
    """``--mhce-sample-groups`` -> a number of groups in ``[1, G]``: a count
    when ``> 1``, a fraction of the ``G`` non-empty groups when ``<= 1``."""
    g = num_groups(codec)
    s = float(sample_groups)
    if not s > 0 or math.isinf(s):
        raise ValueError(
            f"--mhce-sample-groups must be a positive count (> 1) or a fraction in (0, 1], got {sample_groups!r}"
        )
    n = math.ceil(s * g - 1e-9) if s <= 1 else math.ceil(s)
    return max(1, min(g, n))


def mix_seed(seed: int, num_updates: int) -> int:
    """fairseq's --seed and the update number, mixed into one 62-bit seed
    (not ``seed + update``, which would replay the stream that fairseq seeds
    the global RNG, hence dropout, with)."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(num_updates) * 0xBF58476D1CE4E5B9 + 0x4D4853) % (1 << 62)


def draw_groups(codec, target: torch.Tensor, budget: int, generator: Optional[torch.Generator] = None):
    """Sorted (K,) long head-1 groups: the groups of ``target`` plus random
    others (drawn with ``generator``) up to ``budget``."""
    p1 = codec.stride_list[0]
    g = num_groups(codec)
    tgt_groups = torch.unique(codec.code[target] // p1)  # sorted
    need = budget - tgt_groups.numel()
    if need <= 0:
        return tgt_groups
    # a permutation of all groups (on CPU: G <= C_1 is small); keep the first
    # `need` that are not target groups. It depends only on the generator's
    # seed, so all ranks / micro-batches share the same order of negatives.
    perm = torch.randperm(g, generator=generator).to(target.device)
    is_tgt = torch.zeros(g, dtype=torch.bool, device=target.device)
    is_tgt[tgt_groups] = True
    negatives = perm[~is_tgt[perm]][:need]
    return torch.cat([tgt_groups, negatives]).sort().values


def group_tokens(codec, groups: torch.Tensor) -> torch.Tensor:
    """(K,) sorted groups -> (S,) token ids of their valid codes, in code
    order (group by group)."""
    p1 = codec.stride_list[0]
    codes = (groups.unsqueeze(1) * p1 + torch.arange(p1, device=groups.device)).flatten()
    codes = codes[codes < codec.vocab_size]  # only the last group can hold invalid codes
    return codec.token[codes]


def _log_softmax(logits):
    # float32 at least (as fairseq's utils.log_softmax), double stays double
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.log_softmax(logits, dim=-1)


def _label_smoothed(lprobs, target, epsilon):
    """(N, K) log-probs, (N,) column of each target -> loss (N,), nll (N,):
    fairseq's ``label_smoothed_nll_loss``; plain NLL without smoothing or
    with a single class (whose smoothing would divide by zero)."""
    if epsilon == 0 or lprobs.size(-1) < 2:
        nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return nll, nll
    return label_smoothed_nll_loss(lprobs, target, epsilon, reduce=False)


@register_output_layer("mhs", 3)
class MultiHeadSampling(OutputLayer):
    """A full softmax (``proj``: ``V x d``) trained on sampled head-1 groups.

    Args:
        input_dim: d
        codec: the grouping (default sizes ``[ceil(V / 16), 16]``)
        sample_groups: ``--mhce-sample-groups``
        seed: fairseq's ``--seed`` (with the update number, seeds the negatives)
        tied_weight: a ``(V, d)`` parameter to share (the decoder's input
            embedding, ``--share-decoder-input-output-embed``)
    """

    def __init__(
        self,
        input_dim: int,
        codec: MixedRadixCodec,
        sample_groups: float = MHCEConfig.mhce_sample_groups,
        seed: int = 1,
        tied_weight: Optional[nn.Parameter] = None,
    ):
        super().__init__(input_dim, codec)
        group_budget(sample_groups, codec)  # validate now, not at the first step
        self.proj = nn.Linear(input_dim, codec.vocab_size, bias=False)
        if tied_weight is not None:
            if tuple(tied_weight.shape) != (codec.vocab_size, input_dim):
                raise ValueError(
                    f"cannot tie the MHS projection ({codec.vocab_size} x {input_dim}) to an embedding of "
                    f"shape {tuple(tied_weight.shape)}; --decoder-embed-dim must equal --decoder-output-dim"
                )
            self.proj.weight = tied_weight
        else:
            nn.init.normal_(self.proj.weight, mean=0.0, std=input_dim**-0.5)  # as fairseq
        self.sample_groups = float(sample_groups)
        self.seed = 1 if seed is None else int(seed)
        self.num_updates = 0

    @classmethod
    def default_head_sizes(cls, vocab_size: int, num_heads: int) -> List[int]:
        """``[ceil(V / 16), 16]``: groups of 16 tokens.  Balanced ``sqrt(V)``-sized
        groups are so few that a batch's targets hit nearly all of them and the
        sample saves nothing; small groups let it skip most of the vocabulary."""
        return [-(-vocab_size // MHS_GROUP_SIZE), MHS_GROUP_SIZE]

    @classmethod
    def build(cls, settings, input_dim, codec, embed_tokens=None):
        # tied: the embedding stays in token order (MHS's projection is a plain V x d softmax)
        return cls(
            input_dim,
            codec,
            sample_groups=settings.mhce_sample_groups,
            seed=settings.seed,
            tied_weight=None if embed_tokens is None else embed_tokens.weight,
        )

    def set_num_updates(self, num_updates):
        self.num_updates = int(num_updates)

    def generator(self) -> torch.Generator:
        """The CPU generator that draws this update's negative groups."""
        return torch.Generator(device="cpu").manual_seed(mix_seed(self.seed, self.num_updates))

    def log_probs(self, x):
        """(N, d) -> (N, V): the full softmax used for decoding."""
        return _log_softmax(self.proj(x))

    def token_log_probs(self, x, tokens):
        return self.log_probs(x).gather(-1, tokens)

    def topk(self, x, k, min_token=0, extra=None):
        """The full row's top-k (MHS decodes with the full softmax)."""
        lp = self.log_probs(x)
        values, tokens = lp[:, min_token:].topk(k, dim=-1)
        extra_values = lp.index_select(1, extra) if extra is not None and extra.numel() else None
        return values, tokens + min_token, extra_values

    def _digits_correct(self, pred_tokens, target):
        """(N, H) bool: digit h of the predicted token equals the target's."""
        return self.codec.encode(pred_tokens) == self.codec.encode(target)

    def full_softmax_loss(self, x, target, epsilon):
        """Exact full softmax, fairseq's label smoothing uniform over ``V``."""
        lprobs = self.log_probs(x)
        loss, nll = _label_smoothed(lprobs, target, epsilon)
        return loss, nll, self._digits_correct(lprobs.detach().argmax(-1), target)

    def sampled_softmax_loss(self, x, target, epsilon, budget: int, generator=None):
        """Softmax over the tokens of the sampled groups only.  Returns loss
        (N,), nll (N,), digit_correct (N, H), sampled token ids (S,)."""
        codec = self.codec
        groups = draw_groups(codec, target, budget, generator)
        tokens = group_tokens(codec, groups)  # (S,)
        w = self.proj.weight.index_select(0, tokens)  # (S, d): dense grad, zero rows elsewhere
        lprobs = _log_softmax(F.linear(x, w))  # (N, S)
        # position of each target among the sampled tokens: tokens are laid out
        # group by group (sorted), P_1 codes per group, and only the last group
        # may be cut short, so the offset is rank(group) * P_1 + (code mod P_1)
        p1 = codec.stride_list[0]
        c = codec.code[target]
        pos = torch.searchsorted(groups, c // p1) * p1 + c % p1
        loss, nll = _label_smoothed(lprobs, pos, epsilon)  # smoothing over the sampled tokens
        correct = self._digits_correct(tokens[lprobs.detach().argmax(-1)], target)
        return loss, nll, correct, tokens

    def loss(self, x, target, epsilon, smoothing="auto", generator: Optional[torch.Generator] = None):
        """Sampled softmax in training mode, the exact full softmax in eval
        mode; ``smoothing`` ``auto``/``uniform`` (uniform over the softmax's
        support: the sampled tokens in training, ``V`` in eval); ``generator``
        overrides the seeded draw.  Shapes: see :meth:`OutputLayer.loss`
        (``digit_correct`` over the sampled tokens in training)."""
        if str(smoothing) not in ("auto", "uniform"):
            raise ValueError(
                f"--mhce-label-smoothing {smoothing} has no meaning for --mhce-method mhs, whose "
                "output is one softmax; use auto or uniform (uniform over the softmax's tokens)"
            )
        if not self.training:
            return self.full_softmax_loss(x, target, epsilon)
        budget = group_budget(self.sample_groups, self.codec)
        if budget >= num_groups(self.codec):  # every group: the sample is the full softmax
            return self.full_softmax_loss(x, target, epsilon)
        gen = self.generator() if generator is None else generator
        return self.sampled_softmax_loss(x, target, epsilon, budget, gen)[:3]
