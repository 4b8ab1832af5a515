"""The factorized top-k on the configurations that broke it: head sizes well
above the minimum (first digits or whole prefixes that lead to no token), flat
and peaked heads, wide beams (k up to V - 4), NaN decoder states, and the
``extra`` tokens (the four special symbols, the call the beam search makes)
sharing first digits with the top candidates.

Reference: ``torch.topk`` of the dense row with NaN -> -inf (what fairseq's
generator does with the dense row) and the special symbols masked.  Every call
runs under an alarm, so a search that loops fails instead of hanging the suite.
"""

import math
import signal
from contextlib import contextmanager

import pytest
import torch

from fairseq_mhce.search.topk import mhe_topk, mhp_topk

from .utils import SPECIAL, assert_same_hypotheses, build_model, make_head, search, source_sample

D = 16


@contextmanager
def deadline(seconds):
    def fail(*_):
        raise TimeoutError(f"top-k did not return within {seconds} s (the search loops)")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def reference(head, x):
    dense = head.log_probs(x)
    dense = dense.masked_fill(dense != dense, -math.inf)
    ref = dense.clone()
    ref[:, :SPECIAL] = -math.inf
    return dense, ref


# (V, sizes): every product well above V; C_1 > ceil(V / C_2) for H = 2
CONFIGS = [(40, [8, 8]), (13, [4, 4]), (1025, [64, 32]), (300, [20, 20, 20]), (30, [4, 4, 4]), (50, [4, 4, 4, 4])]


@pytest.mark.parametrize("kind", ["mhp", "mhe", "mhe-pt"])
@pytest.mark.parametrize("V,sizes", CONFIGS, ids=[f"{v}-{'x'.join(map(str, s))}" for v, s in CONFIGS])
def test_topk_exact_above_minimum_sizes(kind, V, sizes):
    routine = mhp_topk if kind == "mhp" else mhe_topk
    ks = sorted({1, 2, 4, 8, 16, 50, V // 2, V - SPECIAL} & set(range(1, V - SPECIAL + 1)))
    flat_and_peaky = [(0.05, "identity"), (0.05, "random"), (1.0, "random"), (8.0, "identity"), (8.0, "random")]
    for seed, (scale, code) in enumerate(flat_and_peaky):
        head = make_head(kind, V, sizes, dim=D, seed=seed, code=code, weights="init", scale=scale)
        x = torch.randn(7, D)
        x[2] = float("nan")  # a NaN decoder state (fp16 overflow)
        x[5, 3] = float("nan")
        dense, ref = reference(head, x)
        for k in ks:
            for kw in ({}, {"budget": 64}) + (({"first_width": 1},) if kind != "mhp" else ()):
                with deadline(20):
                    v, t, extra = routine(head, x, k, min_token=SPECIAL, extra=torch.arange(SPECIAL), **kw)
                rv = ref.topk(k).values
                where = (kind, V, sizes, seed, k, kw)
                assert v.shape == t.shape == (x.size(0), k), where
                assert ((t >= SPECIAL) & (t < V)).all(), where
                assert all(len(set(row)) == k for row in t.tolist()), ("duplicate token", where)
                assert not torch.isnan(v).any(), where
                assert torch.allclose(v, rv, atol=1e-5, rtol=0), (where, (v - rv).abs().nan_to_num(1e9).max())
                # ... and they are these tokens' scores (the -inf padding of NaN rows included)
                assert torch.allclose(dense.gather(1, t), v, atol=1e-5, rtol=0), where
                assert torch.allclose(extra, dense[:, :SPECIAL], atol=1e-5, rtol=0), where
                assert torch.isinf(v[2]).all()  # the all-NaN state has no finite candidate


@pytest.mark.parametrize("kind", ["mhe", "mhe-pt"])
def test_extra_tokens_share_first_digits_with_the_best(kind):
    """The extra tokens' first digits are the ones the model likes most: the
    search must not expand those digits a second time for the ranked part."""
    V, sizes = 40, [8, 8]
    head = make_head(kind, V, sizes, dim=D, seed=3, code="random", weights="init", scale=6.0)
    x = torch.randn(11, D)
    dense, ref = reference(head, x)
    best = ref.topk(3).indices  # (n, 3): extra = those tokens (and their digit mates)
    for row in range(x.size(0)):
        extra = best[row]
        for k in (1, 5, 20, V - SPECIAL):
            with deadline(20):
                v, t, ev = mhe_topk(head, x[row : row + 1], k, min_token=SPECIAL, extra=extra)
            assert len(set(t[0].tolist())) == k
            assert torch.allclose(v, ref[row : row + 1].topk(k).values, atol=1e-5, rtol=0)
            assert torch.allclose(ev, dense[row : row + 1, extra], atol=1e-5, rtol=0)


def test_k_above_candidates_is_an_error():
    head = make_head("mhe", 13, [4, 4], dim=D, weights="init")
    with pytest.raises(ValueError, match="smaller beam"):
        mhe_topk(head, torch.randn(2, D), 10, min_token=SPECIAL)
    with pytest.raises(ValueError, match="smaller beam"):
        mhp_topk(make_head("mhp", 13, [4, 4], dim=D, weights="init"), torch.randn(2, D), 10, min_token=SPECIAL)


@pytest.mark.parametrize("last_head", ["shared", "per-token"])
def test_whole_beam_above_minimum_sizes(tmp_path, last_head):
    """The reproduction of the duplicated-candidate defect: V = 40, sizes 8,8,
    a random code table, beam 8: the n-best lists of the factorized search
    equal the dense path's (and hold no duplicate hypothesis)."""
    extra = ["--mhce-head-sizes", "8,8", "--mhce-last-head", last_head]
    task, model = build_model(tmp_path, 40, "mhe", 2, 5, 1.0, "random", extra=extra)
    assert model.decoder.mhce_head.codec.sizes == [8, 8]
    sample = source_sample(4, 6, 5)
    gen = dict(beam=8, max_len_a=0, max_len_b=8, min_len=2)
    with deadline(120):
        _, dense = search(task, model, sample, "dense", **gen)
        _, fact = search(task, model, sample, "factorized", **gen)
    assert_same_hypotheses(dense, fact, exact=False)
    for h in fact:
        assert len({tuple(x["tokens"].tolist()) for x in h}) == len(h) == 8


def test_whole_beam_three_heads_above_minimum(tmp_path):
    """The hang: MHE with sizes 20,20,20 for V = 300 (and beam 2)."""
    task, model = build_model(tmp_path, 300, "mhe", 3, 6, 2.0, "random", extra=["--mhce-head-sizes", "20,20,20"])
    sample = source_sample(3, 5, 6)
    for beam in (2, 6):
        gen = dict(beam=beam, max_len_a=0, max_len_b=8)
        with deadline(120):
            _, dense = search(task, model, sample, "dense", **gen)
            _, fact = search(task, model, sample, "factorized", **gen)
        assert_same_hypotheses(dense, fact, exact=False)
