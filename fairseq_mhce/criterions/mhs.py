"""MHS (Multi-Head Sampling): a full-vocabulary softmax trained on sampled
head-1 groups.

The model keeps fairseq's ordinary ``V x d`` ``output_projection`` (tieable,
decoded with the full softmax), plus a codec (``decoder.mhs_codec``) that
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
fairseq's ``--seed`` and the update number (the decoder records it through
``set_num_updates``), never from the global RNG.  The draw is therefore
reproducible (also across a resume), independent of dropout, identical for
every micro-batch of an update (``--update-freq``) and identical on every
data-parallel rank: only the target groups differ between ranks.  A run on
``k`` ranks thus samples exactly what a single process with ``--update-freq
k`` samples for the same global batch.

In eval mode (validation, ``--score-reference`` through the criterion) the
loss is the exact full softmax with fairseq's uniform smoothing over ``V``,
so validation loss and perplexity compare with a softmax baseline.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss


MHS_GROUP_SIZE = 16


def mhs_default_head_sizes(vocab_size: int):
    """``[ceil(V / 16), 16]``: groups of 16 tokens.  Balanced ``sqrt(V)``-sized
    groups are so few that a batch's targets hit nearly all of them and the
    sample saves nothing; small groups let it skip most of the vocabulary."""
    return [-(-vocab_size // MHS_GROUP_SIZE), MHS_GROUP_SIZE]


def _codec_and_projection(decoder):
    codec = getattr(decoder, "mhs_codec", None)
    proj = getattr(decoder, "output_projection", None)
    if codec is None or proj is None:
        raise ValueError(
            "MHS needs a decoder with an ordinary V x d output_projection and a codec "
            "(decoder.mhs_codec); build the model with --mhce-method mhs"
        )
    return codec, proj


def num_groups(codec) -> int:
    """Head-1 groups that hold at least one token: ``ceil(V / P_1)`` (<= C_1)."""
    p1 = codec.stride_list[0]
    return -(-codec.vocab_size // p1)


def group_budget(sample_groups, codec) -> int:
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


def _seed_of(decoder) -> int:
    """fairseq's --seed and the update number, mixed into one 62-bit seed
    (not ``seed + update``, which would replay the stream that fairseq seeds
    the global RNG, hence dropout, with)."""
    cfg = getattr(decoder, "cfg", None)
    base = getattr(cfg, "seed", None)
    base = 1 if base is None else int(base)
    upd = int(getattr(decoder, "mhs_num_updates", 0) or 0)
    return (base * 0x9E3779B97F4A7C15 + upd * 0xBF58476D1CE4E5B9 + 0x4D4853) % (1 << 62)


def mhs_generator(decoder) -> torch.Generator:
    """The CPU generator that draws this update's negative groups."""
    return torch.Generator(device="cpu").manual_seed(_seed_of(decoder))


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


def _digits_correct(codec, pred_tokens, target):
    """(N, H) bool: digit h of the predicted token equals the target's."""
    return codec.encode(pred_tokens) == codec.encode(target)


def full_softmax_loss(decoder, x, target, epsilon):
    """Exact full softmax through ``decoder.output_projection``, fairseq's
    label smoothing uniform over ``V``; per token."""
    codec, proj = _codec_and_projection(decoder)
    lprobs = _log_softmax(proj(x))
    loss, nll = _label_smoothed(lprobs, target, epsilon)
    correct = _digits_correct(codec, lprobs.detach().argmax(-1), target)
    return loss, nll, correct


def sampled_softmax_loss(decoder, x, target, epsilon, budget: int, generator=None, return_tokens=False):
    """Softmax over the tokens of the sampled groups only; per token."""
    codec, proj = _codec_and_projection(decoder)
    groups = draw_groups(codec, target, budget, generator)
    tokens = group_tokens(codec, groups)  # (S,)
    w = proj.weight.index_select(0, tokens)  # (S, d): dense grad, zero rows elsewhere
    b = proj.bias.index_select(0, tokens) if getattr(proj, "bias", None) is not None else None
    lprobs = _log_softmax(F.linear(x, w, b))  # (N, S)
    # position of each target among the sampled tokens: tokens are laid out
    # group by group (sorted), P_1 codes per group, and only the last group
    # may be cut short, so the offset is rank(group) * P_1 + (code mod P_1)
    p1 = codec.stride_list[0]
    c = codec.code[target]
    pos = torch.searchsorted(groups, c // p1) * p1 + c % p1
    loss, nll = _label_smoothed(lprobs, pos, epsilon)  # smoothing over the sampled tokens
    correct = _digits_correct(codec, tokens[lprobs.detach().argmax(-1)], target)
    if return_tokens:
        return loss, nll, correct, tokens
    return loss, nll, correct


def mhs_loss(
    decoder,
    x: torch.Tensor,
    target: torch.Tensor,
    epsilon: float,
    training: bool = True,
    smoothing: str = "auto",
    sample_groups: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Label-smoothed loss of an MHS decoder, per target token.

    Args:
        decoder: has ``output_projection`` (``nn.Linear`` V -> d, or anything
            with ``.weight`` (V, d) and optional ``.bias``) and ``mhs_codec``
            (:class:`MixedRadixCodec`); optionally ``cfg.mhce_sample_groups``,
            ``cfg.seed`` and ``mhs_num_updates`` (a ``transformer_mhce``
            decoder has them). A ``types.SimpleNamespace`` holding these works
            (benchmarks).
        x: (N, d) decoder states of the non-padding targets
        target: (N,) gold token ids
        epsilon: label smoothing
        training: sampled softmax when True, exact full softmax when False
        smoothing: ``auto``/``uniform`` (uniform over the softmax's support:
            the sampled tokens in training, ``V`` in eval)
        sample_groups: overrides ``decoder.cfg.mhce_sample_groups``
        generator: overrides the seeded generator of the negatives
    Returns:
        loss (N,), nll (N,) in nats, digit_correct (N, H) bool (digit h of
        the argmax token -- over the sampled tokens in training -- equals
        the target's; all digits right = token accuracy)
    """
    if str(smoothing) not in ("auto", "uniform"):
        raise ValueError(
            f"--mhce-label-smoothing {smoothing} has no meaning for --mhce-method mhs, whose "
            "output is one softmax; use auto or uniform (uniform over the softmax's tokens)"
        )
    if not training:
        return full_softmax_loss(decoder, x, target, epsilon)
    codec, _ = _codec_and_projection(decoder)
    if sample_groups is None:
        sample_groups = getattr(getattr(decoder, "cfg", None), "mhce_sample_groups", None)
        if sample_groups is None:
            sample_groups = 0.25
    budget = group_budget(sample_groups, codec)
    if budget >= num_groups(codec):  # every group: the sample is the full softmax
        return full_softmax_loss(decoder, x, target, epsilon)
    if generator is None:
        generator = mhs_generator(decoder)
    return sampled_softmax_loss(decoder, x, target, epsilon, budget, generator)


class MHSOutput(torch.nn.Module):
    """A stand-alone MHS output layer with the decoder's interface
    (``output_projection`` + ``mhs_codec`` + ``cfg``), for benchmarks and
    tests: ``MHSOutput(d, V, [C_1, C_2], sample_groups=0.25).loss(x, t, eps)``
    is the training loss (sampled groups) in train mode and the exact
    full-softmax loss in eval mode, exactly as in a ``transformer_mhce``
    model with ``--mhce-method mhs``.
    """

    def __init__(self, input_dim: int, vocab_size: int, head_sizes=None, sample_groups: float = 0.25, seed: int = 1):
        super().__init__()
        from types import SimpleNamespace

        from ..modules.codec import MixedRadixCodec

        self.output_projection = torch.nn.Linear(input_dim, vocab_size, bias=False)
        torch.nn.init.normal_(self.output_projection.weight, mean=0.0, std=input_dim**-0.5)  # as fairseq
        self.mhs_codec = MixedRadixCodec(vocab_size, head_sizes or mhs_default_head_sizes(vocab_size))
        self.cfg = SimpleNamespace(mhce_sample_groups=sample_groups, seed=seed)
        self.mhs_num_updates = 0

    def set_num_updates(self, num_updates):
        self.mhs_num_updates = num_updates

    def loss(self, x, target, epsilon):
        """(N, d), (N,) -> loss (N,), nll (N,), digit_correct (N, H)."""
        return mhs_loss(self, x, target, epsilon, training=self.training)

    def log_probs(self, x):
        """(N, d) -> (N, V): the full softmax used for decoding."""
        return _log_softmax(self.output_projection(x))
