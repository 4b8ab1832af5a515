"""The heads train with a flat memory profile in V (issue 12, item 3).

A softmax's training step materializes ``(N, V)`` logits (and their
log-softmax, and the gradient of both): at ``V = 256k`` and a few thousand
target tokens that is gigabytes.  The multi-head output layers score only the
digits of each target, so no activation of their training step depends on
``N * V``.  This file checks tensor sizes, not timings: one forward and
backward of the plugin's criterion ``mhce_label_smoothed_cross_entropy`` on a
synthetic fairseq ``Dictionary`` of 256k symbols (built in-process, no data
files), ``N = 512`` target tokens, ``d = 64``, under a ``TorchDispatchMode``
that records the output of every aten op (forward and backward); no recorded
tensor may hold ``N * V`` or more elements.  Parameters and their gradients
are ``V x d`` for MHE's per-token last head (a softmax's size, and below
``N * V`` since ``d < N``); the tighter bound on activations leaves tensors of
a parameter's element count out.  The contrast (fairseq's
``label_smoothed_nll_loss`` on an ``(N, V)`` projection under the same
recorder) shows that the recorder does see such a tensor when one is built.
"""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fairseq_mhce  # noqa: F401  (registers the plugin)
from fairseq_mhce.criterions.mhce_label_smoothed_cross_entropy import (
    MHCELabelSmoothedCrossEntropyCriterion,
)
from fairseq_mhce.models.transformer_mhce import build_output_layer
from fairseq_mhce.modules.tied_embedding import CodeOrderedEmbedding

from .utils import make_dictionary, model_cfg

V = 256_000  # fairseq's 4 specials + 255,996 words; 506 x 506 heads, with invalid codes
N = 512  # target tokens (non-padding) in the batch
D = 64
B, T, PAD_TAIL = 8, 72, 8  # 8 sentences of 64 tokens, each padded by 8: N = 512
EPS = 0.1


# one thread (tests/conftest.py): the machine is shared, and sizes do not depend on it
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dictionary():
    d = make_dictionary(V)
    assert len(d) == V
    return d


class Recorder(TorchDispatchMode):
    """(op name, shape) of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), tuple(t.shape), t.numel()))
        return out

    def largest(self, exclude_numel=()):
        kept = [o for o in self.outputs if o[2] not in exclude_numel]
        return max(kept, key=lambda o: o[2])


class _Decoder(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.mhce_head = head


class _StatesModel(nn.Module):
    """Stands in for a transformer_mhce model: returns fixed decoder states
    (the identity output layer of the real decoder), so only the criterion and
    the head run under the recorder."""

    def __init__(self, head, states):
        super().__init__()
        self.decoder = _Decoder(head)
        self.states = states

    def forward(self, **net_input):
        return self.states, {}

    def get_targets(self, sample, net_output):
        return sample["target"]


def make_sample(dictionary):
    g = torch.Generator().manual_seed(1)
    target = torch.randint(dictionary.nspecial, V, (B, T), generator=g)
    target[:, T - PAD_TAIL :] = dictionary.pad()
    states = torch.randn(B, T, D, generator=g).requires_grad_()
    sample = {"net_input": {}, "target": target, "ntokens": int(target.ne(dictionary.pad()).sum())}
    assert sample["ntokens"] == N
    return sample, states


@pytest.mark.parametrize(
    "method,last_head,tied",
    [
        ("mhp", "per-token", False),
        ("mhe", "per-token", False),
        ("mhe", "shared", False),
        ("mhp", "per-token", True),
        ("mhe", "per-token", True),
    ],
    ids=["mhp", "mhe-per-token", "mhe-shared", "mhp-tied", "mhe-per-token-tied"],
)
def test_criterion_step_builds_no_n_by_v_tensor(dictionary, method, last_head, tied):
    torch.manual_seed(0)
    # the model's head; ``tied``: sharing a decoder input embedding (--share-decoder-input-output-embed)
    emb = CodeOrderedEmbedding(len(dictionary), D, padding_idx=dictionary.pad()) if tied else None
    head = build_output_layer(model_cfg(mhce_method=method, mhce_last_head=last_head), D, dictionary, emb)
    assert head.codec.sizes == [506, 506] and head._has_invalid  # 506^2 = 256,036 codes > V
    if method == "mhe":
        assert head.per_token == (last_head == "per-token")
    sample, states = make_sample(dictionary)
    task = Namespace(target_dictionary=dictionary)
    crit = MHCELabelSmoothedCrossEntropyCriterion(task, False, EPS)
    model = _StatesModel(head, states)

    rec = Recorder()
    with rec:
        loss, sample_size, log = crit(model, sample)
        loss.backward()
    assert sample_size == N and torch.isfinite(loss)
    # backward ran under the recorder, and reached the states and every parameter
    assert any("backward" in name for name, _, _ in rec.outputs), "no backward op recorded"
    assert states.grad is not None and torch.isfinite(states.grad).all()
    assert all(p.grad is not None for p in head.parameters())
    if tied:  # the output's gradient reaches the shared embedding
        assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0

    name, shape, numel = rec.largest()
    assert numel < N * V, f"{method}/{last_head}: {name} returned {shape}, {numel:,} >= N*V"
    # activations only: leave out tensors of a parameter's size (their
    # gradients, the unbind/stack of the per-token table in backward)
    params = {p.numel() for p in head.parameters()} | ({emb.weight.numel()} if tied else set())
    name, shape, numel = rec.largest(exclude_numel=params)
    # O(N * (sum C_h + S + 1 + d)), S = MHP's default shortlist (2048 at
    # this V): a few percent of N * V
    bound = N * (sum(head.codec.sizes) + (head.shortlist + 1 if getattr(head, "shortlist", 0) else 0) + D)
    assert numel <= bound, f"{method}/{last_head}: activation {name} {shape} ({numel:,}) > {bound:,}"
    assert bound * 50 < N * V  # under 2% of N * V


def test_softmax_label_smoothed_loss_builds_n_by_v(dictionary):
    """The contrast: the same recorder sees fairseq's (N, V) logits."""
    torch.manual_seed(0)
    proj = nn.Linear(D, V, bias=False)
    sample, states = make_sample(dictionary)
    target = sample["target"]
    keep = target.ne(dictionary.pad())
    rec = Recorder()
    with rec, torch.no_grad():  # the forward alone already holds (N, V)
        lprobs = F.log_softmax(proj(states[keep]), dim=-1)
        loss, _ = label_smoothed_nll_loss(lprobs, target[keep], EPS, ignore_index=dictionary.pad())
    assert torch.isfinite(loss)
    name, shape, numel = rec.largest()
    assert numel >= N * V and shape == (N, V), (name, shape)
