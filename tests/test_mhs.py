"""MHS (full softmax trained on sampled head-1 groups): the loss against
fairseq's label-smoothed full softmax, the sampling rules, and the real CLIs
(copy task, export to a plain Transformer; two-process DDP: tests/test_distributed.py)."""

import argparse
import re

import pytest
import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from fairseq_mhce.modules.codec import MixedRadixCodec
from fairseq_mhce.modules.mhs import MultiHeadSampling, draw_groups, group_budget, num_groups

from .utils import ONE_THREAD, USER_DIR, bleu_of, cli, hypotheses, make_head, read_checkpoint

D = 8
# (V, head sizes, code order): exact products, invalid codes (a short last
# group), H = 3, a permuted code table
CASES = [(16, [4, 4], "identity"), (29, [6, 5], "random"), (29, [10, 3], "identity"), (29, [2, 3, 5], "random")]


def mhs_head(V, sizes, code="identity", sample_groups=1.0):
    """A float64 MHS layer of width D, its projection drawn from N(0, 1)."""
    return make_head("mhs", V, sizes, dim=D, code=code, sample_groups=sample_groups, double=True)


def reference(head, x, target, eps, tokens=None):
    """fairseq's label_smoothed_nll_loss on the softmax over ``tokens`` (all
    of V by default), per token."""
    logits = x @ head.proj.weight.t()
    t = target
    if tokens is not None:
        logits = logits[:, tokens]
        t = (tokens.unsqueeze(0) == target.unsqueeze(1)).float().argmax(-1)
        assert bool((tokens[t] == target).all())
    return label_smoothed_nll_loss(F.log_softmax(logits, -1), t, eps, reduce=False)


def grads(loss, head, x):
    return torch.autograd.grad(loss.sum(), [x, head.proj.weight])


def batch(V, n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, dtype=torch.double, generator=g).requires_grad_(), torch.randint(V, (n,), generator=g)


@pytest.mark.parametrize("V,sizes,code", CASES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("budget", ["fraction", "count"])
def test_full_budget_equals_full_softmax_loss_and_gradients(V, sizes, code, eps, budget):
    dec = mhs_head(V, sizes, code)
    dec.sample_groups = 1.0 if budget == "fraction" else float(sizes[0] + 3)
    assert group_budget(dec.sample_groups, dec.codec) == num_groups(dec.codec)
    x, t = batch(V)
    ref_loss, ref_nll = reference(dec, x, t, eps)
    ref_grads = grads(ref_loss, dec, x)
    # the layer's loss (which short-cuts a full budget to the plain softmax) and the
    # gather path itself, scoring every group in code order
    G = num_groups(dec.codec)
    for loss, nll, correct in (  # noqa: B007  (the last one is checked below)
        dec.loss(x, t, eps),
        dec.sampled_softmax_loss(x, t, eps, G, dec.generator())[:3],
    ):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(nll, ref_nll, rtol=1e-12, atol=1e-12)
        for g, r in zip(grads(loss, dec, x), ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    # digit accuracy of the argmax token (all digits right = token accuracy)
    pred = dec.log_probs(x).argmax(-1)
    assert torch.equal(correct.all(-1), pred == t) and correct.shape == (len(t), len(sizes))


@pytest.mark.parametrize("V,sizes,code", CASES + [(1000, [250, 4], "random")])
@pytest.mark.parametrize("sample_groups", [0.01, 0.3, 2.0])
def test_small_budget_always_holds_every_target_group(V, sizes, code, sample_groups):
    dec = mhs_head(V, sizes, code, sample_groups=sample_groups)
    codec, p1 = dec.codec, int(dec.codec.strides[0])
    budget = group_budget(sample_groups, codec)
    for step in range(12):
        dec.set_num_updates(step)
        x, t = batch(V, n=int(torch.randint(1, 12, (1,))), seed=step)
        groups = draw_groups(codec, t, budget, dec.generator())
        tgt_groups = set((codec.code[t] // p1).tolist())
        assert tgt_groups <= set(groups.tolist())  # every target's group is in
        assert len(set(groups.tolist())) == groups.numel() == max(budget, len(tgt_groups))
        assert bool((groups < num_groups(codec)).all())  # never an empty (all-invalid) group
        loss, nll, _, tokens = dec.sampled_softmax_loss(x, t, 0.1, budget, dec.generator())
        assert set(tokens.tolist()) == {v for v in range(V) if int(codec.code[v]) // p1 in set(groups.tolist())}
        assert bool(torch.isfinite(loss).all())
        # = fairseq's label-smoothed softmax restricted to the sampled tokens
        ref_loss, ref_nll = reference(dec, x, t, 0.1, tokens)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(nll, ref_nll, rtol=1e-12, atol=1e-12)
        # the layer's training loss draws the same groups (seeded from --seed and
        # the update number): fairseq's loss over the tokens drawn here
        if budget < num_groups(codec):
            torch.testing.assert_close(dec.loss(x, t, 0.1)[0], ref_loss, rtol=1e-12, atol=1e-12)
        # the weight gets a dense gradient, exactly zero on unsampled rows
        gw = grads(loss, dec, x)[1]
        sampled = torch.zeros(V, dtype=torch.bool)
        sampled[tokens] = True
        assert gw.shape == (V, D) and bool((gw[~sampled] == 0).all())


def test_negatives_reproducible_and_shared_by_ranks():
    dec = mhs_head(1000, [250, 4], sample_groups=0.2)
    codec = dec.codec
    a = torch.tensor([0, 1, 2, 3])  # group 0
    b = torch.tensor([996, 997])  # group 249

    def draw(t, update, seed=1):
        dec.set_num_updates(update)
        dec.seed = seed
        torch.manual_seed(update * 7 + 123)  # the global RNG (dropout) plays no part
        return set(draw_groups(codec, t, 50, dec.generator()).tolist())

    assert draw(a, 5) == draw(a, 5)
    assert draw(a, 5) != draw(a, 6) and draw(a, 5) != draw(a, 5, seed=2)
    # two ranks (or two micro-batches of one update) share the negatives'
    # order: outside their own target groups they pick the same groups
    ga, gb = draw(a, 5), draw(b, 5)
    assert len(ga - {0, 249}) >= 48 and len(ga ^ gb) <= 4


def test_eval_mode_is_the_exact_full_softmax():
    dec = mhs_head(29, [10, 3], "random", sample_groups=0.01)
    x, t = batch(29)
    loss, nll, _ = dec.eval().loss(x, t, 0.1)
    ref_loss, ref_nll = reference(dec, x, t, 0.1)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-12, atol=1e-12)
    # training does sample (2 targets: at most 2 of the 10 groups)
    assert not torch.allclose(dec.train().loss(x[:2], t[:2], 0.1)[0], loss[:2])


def test_budget_parsing_and_errors():
    codec = MixedRadixCodec(29, [10, 3])  # 10 groups of 3 codes (code 29 is invalid)
    assert num_groups(codec) == 10
    assert [group_budget(s, codec) for s in (0.01, 0.25, 0.5, 1.0, 2, 2.5, 500)] == [1, 3, 5, 10, 2, 3, 10]
    assert num_groups(MixedRadixCodec(25, [10, 3])) == 9  # codes 27..29 hold no token
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="--mhce-sample-groups"):
            group_budget(bad, codec)
    dec = mhs_head(16, [4, 4])
    with pytest.raises(ValueError, match="per-head"):
        dec.loss(*batch(16), 0.1, smoothing="per-head")
    with pytest.raises(ValueError, match="--mhce-sample-groups"):
        MultiHeadSampling(D, MixedRadixCodec(16, [4, 4]), sample_groups=0)
    # with every group sampled: fairseq's full label-smoothed loss
    head = mhs_head(1000, [250, 4])
    x, t = batch(1000)
    ref_loss, ref_nll = reference(head, x, t, 0.1)
    loss, nll, _ = head.loss(x, t, 0.1)
    torch.testing.assert_close(loss.sum(), ref_loss.sum())
    torch.testing.assert_close(nll.sum(), ref_nll.sum())
    head.eval()
    torch.testing.assert_close(head.loss(x, t, 0.1)[1], -head.log_probs(x).gather(-1, t[:, None])[:, 0])


# ---------------------------------------------------------------- real CLIs

PLAIN = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # stock fairseq on torch >= 2.6


@pytest.fixture(scope="module")
def copy_data(copy_bin):
    return copy_bin  # V = 48


@pytest.fixture(scope="module")
def mhs_run(trained_mhs):
    """The shared MHS model of tests/conftest.py: 300 updates, tied input /
    output embeddings, 12 groups of 4 tokens, 6 scored per step (targets'
    groups plus negatives): (checkpoint_best.pt, train output)."""
    save, log = trained_mhs
    return save / "checkpoint_best.pt", log


def generate(data, ckpt, *extra, plugin=True):
    """fairseq-generate on the test set; returns its results file (whole: a
    progress bar on the merged stdout/stderr can swallow line starts)."""
    args = ["--user-dir", USER_DIR] if plugin else []
    results = ckpt.parent / f"gen-{ckpt.stem}-{len(list(ckpt.parent.glob('gen-*')))}"
    cli(
        "fairseq-generate",
        data,
        *args,
        "--path",
        ckpt,
        "--batch-size",
        "64",
        "--beam",
        "5",
        "--required-batch-size-multiple",
        "1",  # else fairseq drops the last N mod 8 sentences
        "--results-path",
        results,
        *extra,
        env={**ONE_THREAD, **({} if plugin else PLAIN)},
    )
    return (results / "generate-test.txt").read_text()


def validate(data, ckpt, plugin=True):
    args = ["--user-dir", USER_DIR] if plugin else []
    out = cli(
        "fairseq-validate",
        data,
        *args,
        "--task",
        "translation",
        "--path",
        ckpt,
        "--max-tokens",
        "4000",
        "--valid-subset",
        "valid",
        env={**ONE_THREAD, **({} if plugin else PLAIN)},
    ).stdout
    m = re.search(r"\| loss ([0-9.]+) \| nll_loss ([0-9.]+)", out)
    assert m, out[-2000:]
    return float(m.group(1)), float(m.group(2))


@pytest.mark.e2e
def test_cli_copy_task_bleu_and_plain_transformer_export(mhs_run, copy_data, tmp_path):
    ckpt, log = mhs_run
    valid = [line for line in log.splitlines() if "| valid |" in line]
    assert valid and "acc_h1" in valid[-1] and "ppl" in valid[-1]
    out = generate(copy_data, ckpt, "--scoring", "sacrebleu")
    assert bleu_of(out) > 90, out[-500:]

    # export to a plain fairseq transformer; never overwrites
    plain = tmp_path / "plain.pt"
    cli("mhce-export", ckpt, plain)
    again = cli("mhce-export", ckpt, plain, check=False)
    assert again.returncode != 0 and "refusing to overwrite" in again.stdout
    state = read_checkpoint(plain)
    assert state["cfg"]["model"].arch == state["cfg"]["model"]._name == "transformer"
    assert (
        not any("mhce_head" in k or "mhs_codec" in k for k in state["model"])
        and "decoder.output_projection.weight" in state["model"]
    )
    assert (
        state["cfg"]["common"]["user_dir"] is None
        and state["cfg"]["criterion"]["_name"] == "label_smoothed_cross_entropy"
    )
    same = cli("mhce-export", ckpt, ckpt, check=False)
    assert same.returncode != 0 and ckpt.stat().st_size > 0

    # stock fairseq-generate (no --user-dir) decodes it to the same hypotheses
    # and scores; --score-reference agrees too
    plain_out = generate(copy_data, plain, "--nbest", "2", plugin=False)
    a, b = hypotheses(generate(copy_data, ckpt, "--nbest", "2")), hypotheses(plain_out)
    assert a == b and len(a) == 100
    sa = hypotheses(generate(copy_data, ckpt, "--score-reference"))
    sb = hypotheses(generate(copy_data, plain, "--score-reference", plugin=False))
    assert sa == sb and len(sa) == 100
    # validation loss through the plugin's criterion (eval mode: exact full
    # softmax) = stock label_smoothed_cross_entropy on the exported model
    loss, nll = validate(copy_data, ckpt)
    assert (loss, nll) == validate(copy_data, plain, plugin=False)
    assert loss > nll > 0


@pytest.mark.e2e
def test_export_refuses_multi_head_checkpoints(tmp_path):
    state = {
        "model": {"decoder.mhce_head.proj.weight": torch.zeros(2, 2)},
        "cfg": {"model": argparse.Namespace(arch="transformer_mhce", mhce_method="mhp")},
    }
    src = tmp_path / "mhp.pt"
    torch.save(state, src)
    p = cli("mhce-export", src, tmp_path / "out.pt", check=False)
    assert p.returncode != 0 and "Only --mhce-method mhs" in p.stdout and not (tmp_path / "out.pt").exists()
