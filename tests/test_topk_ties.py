"""The factorized top-k when head scores tie exactly (issue 24, "Exactness").

Exact ties are rare in float32 but common when the decoder runs in bf16 / fp16
(8 or 11 mantissa bits over 64-256 first digits).  The two-head MHE search
used to extend its ranking of first digits with a wider ``torch.topk``, whose
order among tied values can differ from the narrower call's: one tied digit
was then ranked twice and its partner never, and true top-k tokens went
missing (values off by up to 0.3 nats).

Ties are made by copying the even output rows of every shared head (weight and
bias) onto the odd rows, so digits ``2i`` and ``2i + 1`` score the same at
every level.  Reference: ``torch.topk`` of the dense ``log_probs`` row.  MHP
must match bit for bit; MHE within its documented float32 rounding (a few
ulps of the largest score or logit: the dense row and the search score
prefixes in matmuls of other shapes), about 1e-5 of the defect's size.
"""

import pytest
import torch

from fairseq_mhce.modules.multihead_output import MultiHeadProduct
from fairseq_mhce.search.topk import mhe_topk, mhp_topk

from .utils import SPECIAL, make_head

D = 16
V = 1025
SIZES = {2: [64, 32], 3: [16, 8, 9], 4: [8, 4, 4, 9]}


def tie_rows(weight: torch.Tensor, bias: torch.Tensor):
    """Copy rows 0, 2, 4, .. of a (C, d) weight and (C,) bias onto rows 1, 3, 5, .."""
    with torch.no_grad():
        odd = weight[1::2].size(0)
        weight[1::2] = weight[0::2][:odd]
        bias[1::2] = bias[0::2][:odd]


def make_tied_head(kind: str, sizes, seed: int) -> torch.nn.Module:
    """A head with random parameters whose digits tie in pairs at every level
    that has a shared output matrix (MHP: the first head)."""
    head = make_head(kind, V, sizes, dim=D, seed=seed, weights="init")
    if kind == "mhp":
        c1 = sizes[0]
        tie_rows(head.proj.weight[:c1], head.proj.bias[:c1])
        return head
    for lin in head.out:
        tie_rows(lin.weight, lin.bias)
    return head


def count_first_ties(head, x: torch.Tensor) -> int:
    """How many first-head scores of x (N, d) repeat another one in their row."""
    if isinstance(head, MultiHeadProduct):
        lp0 = head.digit_log_probs(x)[0]
    else:
        lp0 = head.level_log_probs(0, x, torch.zeros(x.size(0), 1, dtype=torch.long)).squeeze(1)
    return sum(len(r) - len(set(r)) for r in lp0.tolist())


def tolerance(kind: str, head, x: torch.Tensor, ref: torch.Tensor) -> float:
    """Allowed |factorized - dense| of a value: 0 (bit for bit) for MHP; for
    MHE, whose dense row and search score prefixes in matmuls of other shapes
    (the search's batches and row chunks; the per-token head's one V x d
    matmul), four float32 ulps of the largest score (ref) or logit on x (N, d)."""
    if kind == "mhp":
        return 0.0
    with torch.no_grad():
        scale = [1.0, ref[torch.isfinite(ref)].abs().max().item(), head.out[0](x).abs().max().item()]
        if kind == "mhe-pt":
            scale.append(torch.nn.functional.linear(x, head.token_vectors, head.token_bias).abs().max().item())
    return 4 * torch.finfo(torch.float32).eps * max(scale)


def check_topk(kind, head, x, k, min_token=0, extra=None, **kw):
    """top-k of the factorized search == top-k of the dense row, and the
    tokens returned are a valid top-k set (distinct, each scoring its value)."""
    routine = mhp_topk if kind == "mhp" else mhe_topk
    dense = head.log_probs(x)  # (N, V) float32
    ref_row = dense.clone()
    ref_row[:, :min_token] = float("-inf")
    rv = ref_row.topk(k).values  # (N, k)
    v, t, ev = routine(head, x, k, min_token=min_token, extra=extra, **kw)
    where = (kind, head.codec.sizes, k, min_token, kw)
    assert v.dtype == torch.float32 and v.shape == t.shape == (x.size(0), k), where
    tol = tolerance(kind, head, x, rv)
    err = (v - rv).abs()
    assert bool((err <= tol).all()), (where, "top-k values differ from the dense row's by", err.max().item())
    assert ((t >= min_token) & (t < V)).all(), where
    assert all(len(set(row)) == k for row in t.tolist()), ("a token returned twice", where)
    # the tokens score their values on the dense row, so the set is a top-k set
    got = dense.gather(1, t)
    assert bool(((got - v).abs() <= tol).all()), (where, "returned tokens do not score their values")
    if extra is not None:
        assert bool(((ev - dense[:, extra]).abs() <= tol).all()), where


@pytest.mark.parametrize("kind", ["mhe", "mhe-pt", "mhp"])
@pytest.mark.parametrize("heads", [2, 3, 4])
def test_tied_digits_float32(kind, heads):
    """The issue's repro (V = 1025, sizes 64,32, even rows copied onto odd
    rows; 26 of 120 calls were wrong) and the same for H = 3, 4 and MHP."""
    sizes = SIZES[heads]
    for seed in range(5):
        head = make_tied_head(kind, sizes, seed)
        x = torch.randn(8, D)
        assert count_first_ties(head, x) >= 8 * (sizes[0] // 2 - 1), "the test needs tied first digits"
        for k in (10, 20, 50):
            check_topk(kind, head, x, k)
            check_topk(kind, head, x, k, min_token=SPECIAL, extra=torch.arange(SPECIAL))  # the beam search's call
            if kind != "mhp":
                # a narrow first pass: the ranking of first digits is extended several times
                check_topk(kind, head, x, k, first_width=1)
                check_topk(kind, head, x, k, budget=64)


def bf16_supported() -> bool:
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16)
        return bool((a @ a).float().eq(2).all())
    except RuntimeError:
        return False


@pytest.mark.skipif(not bf16_supported(), reason="this CPU build has no bf16 matmul")
@pytest.mark.parametrize("kind", ["mhe", "mhe-pt", "mhp"])
@pytest.mark.parametrize("heads", [2, 3])
@pytest.mark.parametrize("inputs", ["bf16", "float32-autocast"])
def test_tied_digits_bf16(kind, heads, inputs):
    """A bf16 head (fairseq --bf16 converts the model, so the decoder states are
    bf16 too; or float32 states under CPU autocast), rows tied as above; its 8
    mantissa bits also make first digits tie by chance."""
    natural = 0
    for seed in range(4):
        plain = make_head(kind, V, SIZES[heads], dim=D, seed=seed, weights="init").to(torch.bfloat16)
        natural += count_first_ties(plain, torch.randn(8, D).to(torch.bfloat16))
        head = make_tied_head(kind, SIZES[heads], seed).to(torch.bfloat16)
        if inputs == "bf16":
            x = torch.randn(8, D).to(torch.bfloat16)
            ctx = torch.autocast("cpu", enabled=False)
        else:
            x = torch.randn(8, D)
            ctx = torch.autocast("cpu", dtype=torch.bfloat16)
        with ctx:
            assert count_first_ties(head, x) > 0, "the test needs tied first digits"
            for k in (10, 20, 50):
                check_topk(kind, head, x, k)
                check_topk(kind, head, x, k, min_token=SPECIAL, extra=torch.arange(SPECIAL))
    if heads == 2:  # 64 first digits in bf16: chance ties, no copied rows needed
        assert natural > 0
