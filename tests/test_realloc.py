"""LightRNN-style re-allocation of MHP's code table during training
(``--mhce-realloc-updates``): the assignment against brute force, the head's
collection window and in-place table swap, the refusals, and a real
fairseq-train run whose checkpoint carries the new table."""

import itertools

import numpy as np
import pytest
import torch

import fairseq_mhce  # noqa: F401
from fairseq_mhce.codes.realloc import REALLOC_MAX_VOCAB, reallocate_codes
from fairseq_mhce.config import parse_update_list
from fairseq_mhce.models.transformer_mhce import build_output_layer
from fairseq_mhce.modules.codec import MixedRadixCodec, auto_head_sizes
from fairseq_mhce.modules.multihead_output import MultiHeadProduct

from .utils import (
    generate,
    hypotheses,
    make_copy_data,
    make_dictionary,
    model_cfg,
    read_checkpoint,
    strides,
    train_tiny,
)


def placement_cost(costs, code, sizes):
    s = strides(sizes)
    return sum(costs[h][v, (code[v] // s[h]) % sizes[h]] for h in range(len(sizes)) for v in range(len(code)))


@pytest.mark.parametrize("sizes,V,seed", [([3, 3], 8, 0), ([3, 3], 9, 1), ([2, 2, 2], 8, 2)])
def test_reallocation_is_the_optimal_assignment(sizes, V, seed):
    """Every permutation of the movable tokens over their codes scored by
    brute force: the solver's table has the minimum cost, keeps the
    specials and reports its cost before / after."""
    rng = np.random.default_rng(seed)
    costs = [rng.exponential(size=(V, c)) * rng.integers(1, 5, size=(V, 1)) for c in sizes]
    old = np.concatenate([[0, 1], 2 + rng.permutation(V - 2)])
    new, before, after = reallocate_codes(costs, old, sizes, fixed_first=2)
    assert sorted(new) == list(range(V)) and list(new[:2]) == [0, 1]
    slots = sorted(old[2:])
    best = min(placement_cost(costs, np.concatenate([[0, 1], perm]), sizes) for perm in itertools.permutations(slots))
    specials = placement_cost([c * (np.arange(V)[:, None] < 2) for c in costs], old, sizes)
    assert after == pytest.approx(best - specials)
    assert before == pytest.approx(placement_cost(costs, old, sizes) - specials)
    assert after <= before


def test_tokens_without_targets_stay_put():
    V, sizes = 30, [6, 6]
    rng = np.random.default_rng(3)
    old = np.concatenate([np.arange(4), 4 + rng.permutation(V - 4)])
    zero = [np.zeros((V, c)) for c in sizes]
    new, before, after = reallocate_codes(zero, old, sizes)
    assert np.array_equal(new, old) and before == after == 0
    # two tokens seen: they may move; the unseen ones keep their codes unless displaced
    costs = [np.zeros((V, c)) for c in sizes]
    costs[0][10, :] = 5.0
    costs[0][10, 0] = 0.0  # token 10 wants head-1 digit 0 (codes 4, 5 are free there)
    new, before, after = reallocate_codes(costs, old, sizes)
    assert new[10] // 6 == 0 and after == 0
    assert (new != old).sum() <= 2  # token 10 and the token it swapped with


def test_refusals():
    with pytest.raises(ValueError, match="above 16384"):
        reallocate_codes([np.zeros((REALLOC_MAX_VOCAB + 1, 200))] * 2, np.arange(REALLOC_MAX_VOCAB + 1), [200, 200])
    with pytest.raises(ValueError, match="comma-separated update numbers"):
        parse_update_list("300,x")
    assert parse_update_list("600, 300") == [300, 600] and parse_update_list(None) == []
    d = make_dictionary(40)
    with pytest.raises(ValueError, match="re-allocates the code table of --mhce-method mhp"):
        build_output_layer(model_cfg(mhce_method="mhe", mhce_realloc_updates="10"), 16, d)
    big = MixedRadixCodec(REALLOC_MAX_VOCAB + 8, auto_head_sizes(REALLOC_MAX_VOCAB + 8, 2))
    with pytest.raises(ValueError, match="dense V x V assignment"):
        MultiHeadProduct(16, big, realloc_updates=[5])
    head = build_output_layer(model_cfg(mhce_method="mhp", mhce_realloc_updates="7,3", mhce_realloc_window=2), 16, d)
    assert head.realloc.updates == [3, 7] and head.realloc.window == 2
    assert build_output_layer(model_cfg(mhce_method="mhp"), 16, d).realloc is None  # no schedule, no state


def test_head_collects_its_window_and_swaps_the_table_in_place(caplog):
    """Collection only during training and only in the window before the
    scheduled update; the swap lowers the NLL of exactly the collected
    targets under the unchanged weights by the amount it reports, keeps the
    distribution normalized and the codec's two buffers consistent."""
    torch.manual_seed(0)
    V, d = 45, 8  # sizes 7 x 7: invalid codes, so log Z_valid is exercised
    head = MultiHeadProduct(d, MixedRadixCodec(V, auto_head_sizes(V, 2)), realloc_updates=[3, 5], realloc_window=2)
    batches = [(torch.randn(60, d), torch.randint(4, V, (60,))) for _ in range(3)]
    old_code = head.codec.code.clone()
    head.train()
    for n, (x, y) in enumerate(batches):  # fairseq: set_num_updates(n), then the forward of update n+1
        head.set_num_updates(n)
        head.loss(x, y, 0.0)
        head.eval()
        head.loss(x, y, 0.0)  # validation: never collected
        head.train()
        if n == 0:
            assert head.realloc.stats is None  # update 1 lies outside the window (updates 2, 3)
    head.eval()  # scoring only: not collected
    nll_before = sum(head.loss(x, y, 0.0)[1].sum().item() for x, y in batches[1:])
    head.train()
    with caplog.at_level("INFO"):
        head.set_num_updates(3)
    assert head.realloc.stats is None and not torch.equal(head.codec.code, old_code)
    n_moved = int((head.codec.code != old_code).sum())
    assert f": {n_moved} of {V} tokens moved" in caplog.text  # the log counts the real moves
    moved = head.codec.code.clone()
    head.train()
    head.loss(*batches[0], 0.0)  # update 4 is in the window of update 5: collected;
    head.set_num_updates(3)  # --update-freq 2: its 2nd micro-batch repeats the call: no 2nd re-allocation
    assert torch.equal(head.codec.code, moved) and head.realloc.stats is not None
    head.eval()
    assert torch.equal(head.codec.token[head.codec.code], torch.arange(V))
    assert int((head.codec.token >= 0).sum()) == V
    nll_after = sum(head.loss(x, y, 0.0)[1].sum().item() for x, y in batches[1:])
    assert nll_after < nll_before
    # the reported improvement is the exact one (log Z_valid does not depend on the table)
    stats = [torch.zeros(V, c, dtype=torch.float64) for c in head.sizes]
    for x, y in batches[1:]:
        for s, lp in zip(stats, head.digit_log_probs(x)):
            s.index_add_(0, y, -lp.double().detach())
    _, before, after = reallocate_codes([s.numpy() for s in stats], old_code.numpy(), head.sizes)
    assert nll_before - nll_after == pytest.approx(before - after, rel=1e-4)
    with torch.no_grad():
        lp = head.log_probs(torch.randn(5, d))
    assert torch.allclose(lp.logsumexp(-1), torch.zeros(5), atol=1e-5)
    head.train()
    head.set_num_updates(5)
    assert head.realloc.stats is None
    head.set_num_updates(6)  # past the schedule: nothing more is collected
    head.loss(*batches[0], 0.0)
    assert head.realloc.stats is None


@pytest.mark.e2e
def test_fairseq_train_reallocates_and_the_checkpoint_decodes(tmp_path):
    data = make_copy_data(tmp_path / "copy", n_train=600, n_valid=40, n_test=20)
    save = tmp_path / "ckpt"
    out = train_tiny(data, save, "mhp", "--mhce-realloc-updates", "20", "--mhce-realloc-window", "10", updates=30)
    assert "re-allocated the code table at update 20" in out
    ckpt = read_checkpoint(save / "checkpoint_last.pt")
    assert ckpt["cfg"]["model"].mhce_shortlist == 0  # the default -1, resolved at model build (V < 4096)
    state = ckpt["model"]
    code = state["decoder.mhce_head.codec.code"]
    assert not torch.equal(code, torch.arange(code.numel()))  # identity before, moved after
    assert torch.equal(code[:4], torch.arange(4))
    gen = generate(
        data, save / "checkpoint_last.pt", "--batch-size", "20", "--beam", "3", "--required-batch-size-multiple", "1"
    ).stdout
    assert sorted(hypotheses(gen)) == list(range(20))
