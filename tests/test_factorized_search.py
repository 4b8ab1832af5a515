"""Factorized beam search (``--task translation_mhce --mhce-search
factorized``) against fairseq's dense search on the full row.

* the exact top-k routines against ``torch.topk`` of the dense row;
* ``SequenceGenerator`` outputs on tiny random MHP / MHE models (H = 2, 3):
  identical hypotheses, positional scores and scores;
* fallbacks (options that need the full row) and runtime prefix tokens;
* no tensor of a factorized step grows with V (V = 2^20, every op's output
  recorded with a dispatch mode, the dense row disabled);
* the real CLIs: train with ``--task translation_mhce`` (``--eval-bleu``
  decoding factorized), then ``fairseq-generate`` dense vs factorized, and the
  hub API.
"""

import argparse
import logging
import math

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fairseq_mhce  # noqa: F401  (registers the task and models)
from fairseq_mhce.search.beam import FactorizedSequenceGenerator
from fairseq_mhce.search.topk import mhe_topk, mhp_topk

from .utils import (
    ONE_THREAD,
    SPECIAL,
    USER_DIR,
    assert_same_hypotheses,
    build_model,
    cli,
    fairseq_train,
    hypotheses,
    in_both_search_modes,
    make_copy_data,
    make_head,
    search,
    source_sample,
)

# in-process decoding on one thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------
# top-k routines
# --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mhp", "mhe"])
@pytest.mark.parametrize(
    "V,sizes", [(100, [10, 10]), (93, [10, 10]), (230, [7, 6, 6]), (500, [8, 8, 8]), (281, [3, 4, 5, 5])]
)
def test_topk_matches_dense_topk(method, V, sizes):
    routine = mhp_topk if method == "mhp" else mhe_topk
    for seed, (scale, code) in enumerate([(0.1, "identity"), (1.0, "random"), (6.0, "random")]):
        head = make_head(method, V, sizes, dim=16, seed=seed, code=code, weights="init", scale=scale)
        x = torch.randn(29, 16)
        dense = head.log_probs(x)
        ref = dense.clone()
        ref[:, :SPECIAL] = -math.inf
        for k in (1, 3, 10):
            for kw in ({}, {"budget": 64}, {"budget": 64, "first_width": 1} if method == "mhe" else {}):
                v, t, extra = routine(head, x, k, min_token=SPECIAL, extra=torch.arange(SPECIAL), **kw)
                rv, _ = ref.topk(k)
                assert (t >= SPECIAL).all() and (t < V).all()
                # the k best values (MHP: bit for bit; MHE: up to BLAS blocking)
                same = torch.equal if method == "mhp" else lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=0)
                assert same(v, rv), (seed, k, kw, (v - rv).abs().max())
                assert same(dense.gather(1, t), v)  # ... and they are these tokens' scores
                assert same(extra, dense[:, :SPECIAL])
                assert all(len(set(row)) == k for row in t.tolist())


def test_head_topk_methods_delegate():
    for method in ("mhp", "mhe"):
        head = make_head(method, 50, [8, 8], dim=16, weights="init")
        x = torch.randn(3, 16)
        v, t, _ = head.topk(x, 5)
        assert torch.equal(v, head.log_probs(x).topk(5).values)


# --------------------------------------------------------------------------
# generator equivalence on tiny random models built in-process
# --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mhp", "mhe"])
@pytest.mark.parametrize("heads", [2, 3])
def test_generator_matches_dense(tmp_path, method, heads):
    V = 300 if heads == 2 else 350  # prod of head sizes > V: invalid codes exist
    # random init (flat) / sharpened heads (trained-like), identity / random codes
    for seed, scale, code in ((1, 1.0, "identity"), (2, 4.0, "random"), (3, 2.0, "identity")):
        task, model = build_model(tmp_path / f"{seed}", V, method, heads, seed, scale, code)
        sample = source_sample(5, 6, seed)
        for beam, extra in ((1, {}), (4, {"lenpen": 0.6, "unkpen": 0.7}), (8, {"lenpen": 1.5, "unkpen": -0.5})):
            gen = dict(beam=beam, max_len_a=0, max_len_b=10, min_len=3, **extra)
            _, dense = search(task, model, sample, "dense", **gen)
            g, fact = search(task, model, sample, "factorized", **gen)
            assert isinstance(g, FactorizedSequenceGenerator) and g.vocab_size == SPECIAL + 2 * beam
            assert all(len(h) == beam for h in fact)  # all beam hypotheses compared (n-best lists)
            assert_same_hypotheses(dense, fact, exact=(method == "mhp"))
            for h in fact:  # min / max length held
                assert all(3 <= len(x["tokens"]) - 1 <= 10 for x in h)


def test_generator_temperature_and_unnormalized(tmp_path):
    task, model = build_model(tmp_path, 200, "mhp", 2, 3, 2.0)
    sample = source_sample(4, 5, 3)
    for gen in (dict(beam=4, temperature=0.7), dict(beam=3, unnormalized=True, max_len_b=6, max_len_a=0)):
        assert_same_hypotheses(
            search(task, model, sample, "dense", **gen)[1], search(task, model, sample, "factorized", **gen)[1], True
        )


def test_fallbacks_are_logged(tmp_path, caplog):
    task, model = build_model(tmp_path / "mhp", 100, "mhp", 2, 1)
    caplog.set_level(logging.INFO, logger="fairseq_mhce")
    for gen, why in (
        (dict(sampling=True, sampling_topk=5, beam=1), "--sampling"),
        (dict(prefix_size=1), "--prefix-size"),
        (dict(no_repeat_ngram_size=2), "--no-repeat-ngram-size"),
        (dict(diverse_beam_groups=2, beam=4), "--diverse-beam-groups"),
        (dict(match_source_len=True), "--match-source-len"),
        (dict(diversity_rate=0.5), "--diversity-rate"),
        (dict(beam=60), "too small"),
    ):
        caplog.clear()
        g = task.build_generator([model], argparse.Namespace(mhce_search="factorized", **gen))
        assert type(g) is SequenceGenerator, gen
        assert "falling back to the dense search" in caplog.text and why in caplog.text, caplog.text
    caplog.clear()
    g = task.build_generator([model, model], argparse.Namespace(mhce_search="factorized"))
    assert type(g) is SequenceGenerator and "ensemble" in caplog.text
    # a softmax model: the flag has no effect, and says so
    stask, smodel = build_model(tmp_path / "softmax", 100, None, 0, 1, arch="transformer")
    caplog.clear()
    g = stask.build_generator([smodel], argparse.Namespace(mhce_search="factorized"))
    assert type(g) is SequenceGenerator and "no multi-head output" in caplog.text
    # dense stays the default
    assert type(task.build_generator([model], argparse.Namespace())) is SequenceGenerator


def test_runtime_prefix_tokens_decode_dense(tmp_path, caplog):
    task, model = build_model(tmp_path, 120, "mhe", 2, 4, 3.0)
    sample = source_sample(3, 5, 4)
    prefix = torch.tensor([[5], [6], [7]])
    g = task.build_generator([model], argparse.Namespace(mhce_search="factorized", beam=4))
    d = task.build_generator([model], argparse.Namespace(beam=4))
    with caplog.at_level(logging.WARNING, logger="fairseq_mhce"):
        out = g.generate([model], sample, prefix_tokens=prefix)
    assert "decoded with the dense row" in caplog.text
    assert_same_hypotheses(d.generate([model], sample, prefix_tokens=prefix), out, True)
    assert [h[0]["tokens"][0].item() for h in out] == [5, 6, 7]
    # and the generator is factorized again afterwards: same hypotheses; MHE's
    # scores only to float rounding (per-group vs V-wide matmul), as in test above
    head = model.decoder.mhce_head
    calls, topk = [], head.topk
    head.topk = lambda *a, **k: calls.append(1) or topk(*a, **k)  # the factorized step's entry point
    fact = g.generate([model], sample)
    del head.topk
    assert calls, "the generator stayed on the dense row after a prefix_tokens call"
    assert_same_hypotheses(d.generate([model], sample), fact, False)


class _Shapes(TorchDispatchMode):
    """Largest dimension and element count of every op output."""

    def __init__(self):
        super().__init__()
        self.max_dim = 0
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views of an input (e.g. the per-token table reshaped into groups) allocate nothing
        inputs = {
            a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.max_dim = max([self.max_dim, *t.shape])
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("method", ["mhp", "mhe"])
def test_step_memory_does_not_grow_with_vocabulary(tmp_path, method):
    V = 1 << 20  # a dense (hypotheses x V) row of this batch: 40 x 2^20 floats
    # MHE's work is set by how peaked the heads are (a uniform head needs every
    # prefix); scale 8 gives a trained-like model, the MHP search does not care
    task, model = build_model(tmp_path, V, method, 2, 1, scale=8.0 if method == "mhe" else 1.0, d=16)
    head = model.decoder.mhce_head

    def no_dense_row(*a, **k):
        raise AssertionError("the factorized search built the dense row")

    head.log_probs = no_dense_row
    gen = argparse.Namespace(mhce_search="factorized", beam=8, max_len_b=5, max_len_a=0)
    g = task.build_generator([model], gen)
    rec = _Shapes()
    with rec:
        out = g.generate([model], source_sample(5, 6, 1))
    assert len(out) == 5 and all(len(h) == 8 for h in out)  # nbest is applied by the CLI
    assert g.vocab_size == SPECIAL + 16
    # the dense path holds V floats per hypothesis (a dimension of size V); here
    # the largest tensors are MHP's fused projection (sum of head sizes, 2048 per
    # hypothesis) and MHE's children of the expanded prefixes (a few x 1024 per
    # hypothesis, sometimes flattened over the batch)
    hyps = 5 * 8
    assert rec.max_dim < V // 4, rec.max_dim
    assert rec.max_numel <= hyps * V // 32, rec.max_numel / hyps


# --------------------------------------------------------------------------
# the real CLIs and the hub API
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A tiny MHP model trained 30 updates with ``--task translation_mhce``,
    ``--eval-bleu`` decoding factorized: (data, checkpoint_last.pt, train output)."""
    root = tmp_path_factory.mktemp("factorized_cli")
    data = make_copy_data(root / "copy", n_train=500, n_valid=20, n_test=40, n_words=60)
    save = root / "mhp"
    log = fairseq_train(
        data, save, "--task", "translation_mhce", "--mhce-method", "mhp", "--no-save-optimizer-state",
        "--eval-bleu", "--eval-bleu-args", '{"beam": 2, "mhce_search": "factorized"}', "--eval-bleu-detok", "space",
        updates=30, env=ONE_THREAD,
    ).stdout  # fmt: skip
    return data, save / "checkpoint_last.pt", log


@pytest.mark.e2e
def test_cli_eval_bleu_decodes_factorized(cli_run):
    _, _, log = cli_run
    assert "fairseq_mhce.search | --mhce-search factorized: MHP head" in log  # --eval-bleu decoded factorized
    assert "| bleu " in log


@pytest.mark.e2e
def test_cli_generate_matches_dense(cli_run):
    data, ckpt, _ = cli_run
    runs = in_both_search_modes(
        "fairseq-generate", data, ckpt, "--beam", "5", "--nbest", "3", "--lenpen", "0.6", "--unkpen", "1",
        "--batch-size", "16", env=ONE_THREAD,
    )  # fmt: skip
    for mode, (_, out) in runs.items():
        assert ("per-step row of 14 columns" in out) == (mode == "factorized")
    lines = {mode: hp for mode, (hp, _) in runs.items()}
    assert len(lines["dense"]) == 2 * 3 * 40 and lines["dense"] == lines["factorized"]
    assert len(hypotheses("\n".join(lines["dense"]))) == 40


@pytest.mark.e2e
def test_cli_interactive_matches_dense(cli_run):
    data, ckpt, _ = cli_run
    runs = in_both_search_modes(
        "fairseq-interactive", data, ckpt, "--beam", "4", "--nbest", "2", "--source-lang", "src",
        "--target-lang", "tgt", stdin="w1 w2 w3 w4\nw5 w5 w6\n", env=ONE_THREAD,
    )  # fmt: skip
    for mode, (_, out) in runs.items():
        assert ("per-step row of 12 columns" in out) == (mode == "factorized")
    lines = {mode: hp for mode, (hp, _) in runs.items()}
    assert len(lines["dense"]) == 2 * 2 * 2 and lines["dense"] == lines["factorized"]


@pytest.mark.e2e
def test_hub_matches_dense(cli_run):
    from fairseq.models.transformer import TransformerModel

    data, ckpt, _ = cli_run
    hub = TransformerModel.from_pretrained(
        str(ckpt.parent),
        checkpoint_file=ckpt.name,
        data_name_or_path=str(data),
        user_dir=USER_DIR,
        mhce_search="factorized",
    )
    assert hub.task.cfg.mhce_search == "factorized"
    src = "w3 w1 w4 w1 w5"
    best = hub.translate(src, beam=5)
    assert best == hub.translate(src, beam=5, mhce_search="dense")
    assert isinstance(hub.task.build_generator(hub.models, hub.cfg.generation), FactorizedSequenceGenerator)
    # a checkpoint of any task: switch it to translation_mhce through the overrides
    hub2 = TransformerModel.from_pretrained(
        str(ckpt.parent),
        checkpoint_file=ckpt.name,
        data_name_or_path=str(data),
        user_dir=USER_DIR,
        task={"_name": "translation_mhce", "mhce_search": "factorized"},
    )
    assert hub2.task.cfg.mhce_search == "factorized" and hub2.translate(src, beam=5) == best
    # an empty input is not translated: a warning naming it and an empty hypothesis, and the
    # session goes on (tests/test_runtime_guards.py covers this in detail)
    assert hub.translate(["  ", src], beam=5) == ["", best]


@pytest.mark.e2e
def test_cli_interactive_empty_line_is_not_translated(cli_run):
    data, ckpt, _ = cli_run
    r = cli(
        "fairseq-interactive", data, "--user-dir", USER_DIR, "--task", "translation_mhce", "--path", ckpt,
        "--source-lang", "src", "--target-lang", "tgt", stdin="w1 w2\n\nw3\n", env=ONE_THREAD,
    )  # fmt: skip
    assert "input line 2 (S-1/H-1) is empty: not translated" in r.stdout, r.stdout[-2000:]
    assert r.stdout.count("\nH-") == 3 and "\nH-1\t-inf\t\n" in r.stdout
