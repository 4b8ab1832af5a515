"""Heads against brute-force references that materialize every code."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fairseq_mhce.modules.codec import MixedRadixCodec
from fairseq_mhce.modules.multihead_output import MultiHeadEmbedding, MultiHeadProduct

D = 8
CASES = [(16, [4, 4]), (13, [4, 4]), (17, [5, 4]), (29, [2, 3, 5]), (27, [3, 3, 3]), (20, [3, 3, 3])]


def make_head(method, V, sizes, seed=0, order="identity"):
    torch.manual_seed(seed)
    code = torch.randperm(V) if order == "random" else None
    codec = MixedRadixCodec(V, sizes, code)
    head = MultiHeadProduct(D, codec) if method == "mhp" else MultiHeadEmbedding(D, codec)
    with torch.no_grad():  # larger weights than the init, so distributions are far from uniform
        for p in head.parameters():
            p.normal_(0, 1.0)
    return head.double()


def all_digit_tuples(sizes):
    return [list(t) for t in itertools.product(*[range(c) for c in sizes])]


def reference_log_probs(head, x):
    """(N, V) built the slow way: score every code with its own digits, keep
    the valid ones, renormalize."""
    codec = head.codec
    V, sizes = codec.vocab_size, codec.sizes
    rows = []
    for n in range(x.size(0)):
        xi = x[n]
        scores = torch.full((V,), float("-inf"), dtype=torch.float64)
        for digits in all_digit_tuples(sizes):
            c = sum(d * int(s) for d, s in zip(digits, codec.strides.tolist()))
            if c >= V:
                continue
            if isinstance(head, MultiHeadProduct):
                logits = head.proj(xi).split(sizes)
                s = sum(F.log_softmax(z, -1)[d] for z, d in zip(logits, digits))
            else:
                # chain rule; each head renormalized over digits that still lead to valid codes
                s = 0.0
                prefix = 0
                for h, d in enumerate(digits):
                    hid = xi if h == 0 else head.activation(xi + head.prefix_embed[h - 1].weight[prefix])
                    z = head.out[h](hid)
                    allowed = torch.tensor(
                        [((prefix * sizes[h] + j) * int(codec.strides[h])) < V for j in range(sizes[h])]
                    )
                    z = z.masked_fill(~allowed, float("-inf"))
                    s = s + F.log_softmax(z, -1)[d]
                    prefix = prefix * sizes[h] + d
            token = int(codec.token[c])
            scores[token] = s
        if isinstance(head, MultiHeadProduct):
            scores = scores - torch.logsumexp(scores, 0)  # remove the invalid codes' mass
        rows.append(scores)
    return torch.stack(rows)


@pytest.mark.parametrize("method", ["mhp", "mhe"])
@pytest.mark.parametrize("V,sizes", CASES)
@pytest.mark.parametrize("order", ["identity", "random"])
def test_log_probs_match_brute_force(method, V, sizes, order):
    head = make_head(method, V, sizes, order=order)
    x = torch.randn(5, D, dtype=torch.float64)
    with torch.no_grad():
        lp = head.log_probs(x)
        ref = reference_log_probs(head, x)
    assert lp.shape == (5, V)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp.double().exp().sum(-1), torch.ones(5, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    # token_log_probs reads the same numbers without the dense row
    tokens = torch.randint(0, V, (5, 7))
    torch.testing.assert_close(head.token_log_probs(x, tokens).double(), lp.double().gather(1, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["mhp", "mhe"])
@pytest.mark.parametrize("V,sizes", CASES)
def test_loss_nll_and_smoothing_match_materialized(method, V, sizes):
    head = make_head(method, V, sizes, seed=1)
    x = torch.randn(6, D, dtype=torch.float64)
    target = torch.randint(0, V, (6,))
    lp = head.log_probs(x).double()
    eps = 0.1
    loss, nll, correct = head.loss(x, target, eps)
    torch.testing.assert_close(nll.double(), -lp.gather(1, target[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
    if method == "mhp":
        # fairseq's label_smoothed_nll_loss on the materialized distribution
        from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

        ref_loss, ref_nll = label_smoothed_nll_loss(lp, target, eps, ignore_index=None, reduce=False)
        torch.testing.assert_close(loss.double(), ref_loss.squeeze(-1), rtol=1e-5, atol=1e-5)
    else:
        # per-head smoothing: each head's materialized conditional distribution
        codec = head.codec
        digits, prefixes = codec.encode(target), codec.prefixes(target)
        ref = torch.zeros(6, dtype=torch.float64)
        for h in range(len(sizes)):
            lph = head.level_log_probs(h, x, prefixes[:, h : h + 1]).squeeze(1).double()
            for n in range(6):
                valid = torch.isfinite(lph[n])
                k = int(valid.sum())
                eps_h = eps / max(k - 1, 1)
                nll_h = -lph[n, digits[n, h]]
                smooth_h = -lph[n][valid].sum()
                ref[n] += (1 - eps - eps_h) * nll_h + eps_h * smooth_h
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    assert correct.shape == (6, len(sizes))


def test_mhp_per_head_smoothing_reduces_to_nll_at_zero():
    head = make_head("mhp", 17, [5, 4])
    x = torch.randn(4, D, dtype=torch.float64)
    t = torch.randint(0, 17, (4,))
    loss0, nll0, _ = head.loss(x, t, 0.0, smoothing="per-head")
    torch.testing.assert_close(loss0, nll0)
    loss, nll, _ = head.loss(x, t, 0.1, smoothing="per-head")
    assert torch.isfinite(loss).all() and not torch.allclose(loss, nll)


def test_gradients_flow_to_every_mhe_head():
    head = make_head("mhe", 29, [2, 3, 5]).float()
    x = torch.randn(10, D, requires_grad=True)
    loss, _, _ = head.loss(x, torch.randint(0, 29, (10,)), 0.1)
    loss.sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert x.grad.abs().sum() > 0


def test_parameters_far_below_softmax():
    V, d = 32768, 512
    mhp = MultiHeadProduct(d, MixedRadixCodec(V, [256, 128]))
    mhe = MultiHeadEmbedding(d, MixedRadixCodec(V, [256, 128]))
    assert mhp.num_output_parameters() < V * d / 50
    assert mhe.num_output_parameters() < V * d / 25


def test_mhe_uniform_smoothing_is_refused():
    head = make_head("mhe", 16, [4, 4])
    with pytest.raises(ValueError, match="per-head"):
        head.loss(torch.randn(2, D, dtype=torch.float64), torch.tensor([1, 2]), 0.1, smoothing="uniform")


def test_mhp_float32_and_bf16_inputs_give_float32_log_probs():
    head = MultiHeadProduct(D, MixedRadixCodec(13, [4, 4]))
    x = torch.randn(3, D)
    lp = head.log_probs(x)
    assert lp.dtype == torch.float32
    lpb = head.to(torch.bfloat16).log_probs(x.bfloat16())
    assert lpb.dtype == torch.float32
    torch.testing.assert_close(lpb.exp().sum(-1), torch.ones(3), rtol=1e-4, atol=1e-4)
