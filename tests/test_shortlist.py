"""MHP with a shortlist (``--mhce-shortlist N``): the listed tokens' own
softmax beside the product, against a brute-force reference that scores
every code; the exact top-k against the dense row; the code-table layout
(model default and ``mhce-build-codes --shortlist``); the refusals; and
real fairseq-train / fairseq-generate runs."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

import fairseq_mhce  # noqa: F401
from fairseq_mhce.cli import build_codes
from fairseq_mhce.codes import table as ct
from fairseq_mhce.models.transformer_mhce import build_output_layer
from fairseq_mhce.modules.codec import auto_head_sizes

from .utils import (
    check_balanced,
    hypotheses,
    in_both_search_modes,
    make_copy_data,
    make_dictionary,
    make_head,
    model_cfg,
    read_checkpoint,
    train_tiny,
)

D = 8
# (V, head sizes, shortlist size)
CASES = [(16, [4, 4], 5), (13, [4, 4], 3), (29, [2, 3, 5], 7), (20, [3, 3, 3], 1), (17, [5, 4], 15)]


def shortlist_head(V, sizes, n, seed=0, listed="first"):
    """An MHP head of width D with a shortlist of ``n`` tokens on a random code
    table: the first ``n`` tokens listed, or ``n`` random ones."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randperm(V, generator=g)
    ids = None if listed == "first" else torch.randperm(V, generator=g)[:n]
    return make_head("mhp", V, sizes, dim=D, seed=seed, code=ct.shortlist_code(base, n, ids), shortlist=n)


def reference_log_probs(head, x):
    """(N, V): the shortlist softmax for its tokens; for every other token
    the tail's mass times the product of the heads' probabilities of its
    digits, renormalized over the tail's codes, every code scored alone."""
    codec, V, n = head.codec, head.vocab_size, head.shortlist
    T = V - n
    W, b = head.proj.weight.double(), head.proj.bias.double()
    sizes, strides = codec.sizes, codec.stride_list
    bounds = list(itertools.accumulate([0] + sizes + [n + 1]))
    out = torch.full((x.size(0), V), float("nan"), dtype=torch.float64)
    for r in range(x.size(0)):
        logits = W @ x[r].double() + b
        heads = [F.log_softmax(logits[bounds[h] : bounds[h + 1]], -1) for h in range(len(sizes))]
        short = F.log_softmax(logits[bounds[-2] :], -1)
        tail = {}
        for digits in itertools.product(*[range(c) for c in sizes]):
            c = sum(d * s for d, s in zip(digits, strides))
            if c < T:
                tail[c] = sum(heads[h][d] for h, d in enumerate(digits))
        log_z = torch.logsumexp(torch.stack(list(tail.values())), 0)
        for v in range(V):
            c = int(codec.code[v])
            out[r, v] = short[c - T] if c >= T else short[n] + tail[c] - log_z
    return out


@pytest.mark.parametrize("V,sizes,n", CASES)
@pytest.mark.parametrize("listed", ["first", "random"])
def test_log_probs_match_brute_force(V, sizes, n, listed):
    head = shortlist_head(V, sizes, n, listed=listed)
    x = torch.randn(6, D)
    ref = reference_log_probs(head, x)
    dense = head.log_probs(x)
    assert torch.allclose(dense.double(), ref, atol=1e-5)
    assert torch.allclose(dense.logsumexp(-1), torch.zeros(6), atol=1e-5)  # normalized over V
    toks = torch.randint(0, V, (6, 9))
    assert torch.equal(head.token_log_probs(x, toks), dense.gather(-1, toks))


@pytest.mark.parametrize("V,sizes,n", CASES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_loss_is_fairseqs_label_smoothed_nll_of_the_dense_row(V, sizes, n, eps):
    head = shortlist_head(V, sizes, n, seed=3, listed="random")
    x = torch.randn(40, D, requires_grad=True)
    target = torch.randint(0, V, (40,))
    loss, nll, correct = head.loss(x, target, eps)
    ref_loss, ref_nll = label_smoothed_nll_loss(head.log_probs(x), target.unsqueeze(-1), eps, reduce=False)
    assert torch.allclose(nll, ref_nll.squeeze(-1), atol=1e-5)
    assert torch.allclose(loss, ref_loss.squeeze(-1), atol=1e-5)
    # a token counts as correct when its own part's argmax picks it: the
    # shortlist's for a listed token, "the tail" and every digit for the rest
    lps, short = head.parts(x)
    digits = head.codec.encode(target)
    c = head.codec.code[target] - head.tail_size
    listed_ok = short.argmax(-1) == c.clamp(min=0)
    tail_ok = (short.argmax(-1) == n) & torch.stack([lp.argmax(-1) == digits[:, h] for h, lp in enumerate(lps)]).all(0)
    assert torch.equal(correct.all(-1), torch.where(c >= 0, listed_ok, tail_ok))
    loss.sum().backward()  # gradients reach the states through both parts
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # and they are the brute-force loss's (every code scored alone)
    ref_loss, _ = label_smoothed_nll_loss(reference_log_probs(head, x), target.unsqueeze(-1), eps, reduce=False)
    want = torch.autograd.grad(ref_loss.sum(), [x, head.proj.weight, head.proj.bias])
    for got, w in zip((x.grad, head.proj.weight.grad, head.proj.bias.grad), want):
        assert torch.allclose(got, w, rtol=1e-4, atol=1e-5), (got - w).abs().max()


@pytest.mark.parametrize("V,sizes,n", CASES)
@pytest.mark.parametrize("listed", ["first", "random"])
def test_factorized_topk_equals_the_dense_row(V, sizes, n, listed):
    head = shortlist_head(V, sizes, n, seed=5, listed=listed)
    x = torch.randn(12, D) * 3
    x[3] = float("nan")  # a NaN state: -inf scores, distinct padding tokens
    dense = head.log_probs(x)
    dense = dense.masked_fill(dense != dense, float("-inf"))
    extra = torch.tensor([0, 2])
    for k, min_token in [(1, 0), (3, 2), (V - 2, 2), (V, 0)]:
        v, t, e = head.topk(x, k, min_token=min_token, extra=extra)
        want = dense[:, min_token:].topk(k, dim=-1).values
        assert torch.equal(v, want), (k, min_token)
        assert torch.equal(dense.gather(-1, t)[[r for r in range(12) if r != 3]], v[[r for r in range(12) if r != 3]])
        for r in range(12):  # distinct candidates, all >= min_token
            assert len(set(t[r].tolist())) == k and int(t[r].min()) >= min_token
        assert torch.equal(e, dense[:, extra])


def test_shortlist_code_layout():
    code = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    out = ct.shortlist_code(code, 6)
    assert torch.equal(out[:6], torch.arange(24, 30)) and torch.equal(out.sort().values, torch.arange(30))
    rest = out[6:]
    assert torch.equal(rest.argsort(), code[6:].argsort())  # the tail keeps its order
    assert torch.equal(ct.shortlist_code(out, 6), out)  # idempotent
    listed = torch.tensor([0, 1, 2, 3, 17, 9])
    out2 = ct.shortlist_code(code, 6, listed)
    assert torch.equal(out2[listed], torch.arange(24, 30))
    with pytest.raises(ValueError, match="6 distinct token ids"):
        ct.shortlist_code(code, 6, torch.tensor([0, 1, 2, 3, 4, 4]))


def test_refusals_and_the_models_default_table():
    d = make_dictionary(40)
    with pytest.raises(ValueError, match="this model is --mhce-method mhe.*Drop --mhce-shortlist"):
        build_output_layer(model_cfg(mhce_method="mhe", mhce_shortlist=8), 16, d)
    for bad in (39, 40):
        with pytest.raises(ValueError, match="between 1 and V - 2 = 38"):
            build_output_layer(model_cfg(mhce_method="mhp", mhce_shortlist=bad), 16, d)
    with pytest.raises(ValueError, match="cannot be combined with --mhce-shortlist"):
        build_output_layer(model_cfg(mhce_method="mhp", mhce_shortlist=8, mhce_realloc_updates="5"), 16, d)
    head = build_output_layer(model_cfg(mhce_method="mhp", mhce_shortlist=8), 16, d)
    assert torch.equal(head.codec.code[:8], torch.arange(32, 40))  # the first ids: the most frequent
    assert torch.equal(head.codec.code[8:], torch.arange(32))  # identity on the tail
    assert head.proj.out_features == sum(head.sizes) + 9
    with pytest.raises(ValueError, match="per-head is not defined with --mhce-shortlist"):
        head.loss(torch.randn(3, 16), torch.tensor([1, 9, 20]), 0.1, smoothing="per-head")
    rnd = build_output_layer(model_cfg(mhce_method="mhp", mhce_shortlist=8, mhce_code_order="random"), 16, d)
    assert torch.equal(rnd.codec.code[:8], torch.arange(32, 40)) and not torch.equal(
        rnd.codec.code[8:], torch.arange(32)
    )
    # a checkpoint of another shortlist size is named, not a size mismatch
    state = {f"decoder.mhce_head.{k}": v for k, v in head.state_dict().items()}
    other = build_output_layer(model_cfg(mhce_method="mhp", mhce_shortlist=4), 16, d)
    with pytest.raises(RuntimeError, match="trained with --mhce-shortlist 8, this model has --mhce-shortlist 4"):
        other.upgrade_state_dict_named(state, "decoder.mhce_head")
    plain = build_output_layer(model_cfg(mhce_method="mhp"), 16, d)  # the default, -1: no shortlist below 4096 types
    assert plain.shortlist == 0 and plain.proj.out_features == sum(plain.sizes)
    with pytest.raises(RuntimeError, match="trained with --mhce-shortlist 8, this model has --mhce-shortlist 0"):
        plain.upgrade_state_dict_named(state, "decoder.mhce_head")


def test_default_shortlist_follows_the_vocabulary_and_old_configs_keep_none():
    from fairseq_mhce.config import MHCEConfig, fill_legacy_defaults, resolve_settings, resolve_shortlist
    from fairseq_mhce.modules.codec import MixedRadixCodec
    from fairseq_mhce.modules.multihead_output import MultiHeadProduct

    assert resolve_shortlist(-1, 4095) == 0 and resolve_shortlist(-1, 4096) == 2048
    assert resolve_shortlist(None, 10**6) == 0 and resolve_shortlist(7, 50) == 7
    big = build_output_layer(model_cfg(mhce_method="mhp"), 16, make_dictionary(5000))
    assert big.shortlist == 2048 and torch.equal(big.codec.code[:2048], torch.arange(5000 - 2048, 5000))
    mhe = build_output_layer(model_cfg(mhce_method="mhe"), 16, make_dictionary(5000))
    assert mhe.codec.num_codes >= 5000  # mhe: no shortlist
    old = model_cfg(mhce_method="mhp")
    del old.mhce_shortlist  # a config saved before the option existed: the plain product it was trained with
    fill_legacy_defaults(old)
    assert old.mhce_shortlist == 0
    fresh = model_cfg(mhce_method="mhp")
    del fresh.mhce_shortlist  # a new (hydra) config without the key: today's default
    assert resolve_settings(fresh).mhce_shortlist == -1  # unresolved without the dictionary
    assert resolve_settings(fresh, 5000).mhce_shortlist == 2048 and resolve_settings(fresh, 4095).mhce_shortlist == 0
    assert resolve_settings(MHCEConfig(mhce_method="mhe"), 5000).mhce_shortlist == 0  # -1: none outside mhp
    with pytest.raises(ValueError, match="resolve it for the dictionary first"):
        MultiHeadProduct(16, MixedRadixCodec(40, [7, 6]), shortlist=-1)  # the layer takes resolved values only


def test_the_model_build_resolves_the_shortlist_once_and_the_saved_config_names_it():
    """``--mhce-shortlist -1`` is resolved when the model is built, and the
    model's config (the one fairseq saves in the checkpoint) gets the size;
    a config that still says -1 (a checkpoint saved before) builds the same
    model, whose state dict it loads."""
    from argparse import Namespace

    from fairseq import options

    from fairseq_mhce.models.transformer_mhce import TransformerMHCEModel

    d = make_dictionary(5000)
    task = Namespace(source_dictionary=d, target_dictionary=d)
    small = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16"]
    small += ["--encoder-attention-heads", "2", "--decoder-attention-heads", "2"]
    argv = ["/nonexistent", "--task", "translation", "--arch", "transformer_mhce", "--mhce-method", "mhp"]
    args = options.parse_args_and_arch(options.get_training_parser(), argv + ["--mhce-code-order", "identity", *small])
    assert args.mhce_shortlist == -1
    model = TransformerMHCEModel.build_model(args, task)
    assert args.mhce_shortlist == 2048 == model.decoder.mhce_head.shortlist
    assert model.decoder._mhce_settings.mhce_shortlist == 2048
    args.mhce_shortlist = -1
    again = TransformerMHCEModel.build_model(args, task)
    assert args.mhce_shortlist == 2048 == again.decoder.mhce_head.shortlist
    again.load_state_dict(model.state_dict())


@pytest.fixture(scope="module")
def databin(tmp_path_factory):
    return make_copy_data(tmp_path_factory.mktemp("short"), n_train=300, n_valid=20, n_test=20, n_words=60)


@pytest.mark.e2e
def test_build_codes_shortlist_lists_the_most_frequent_targets(databin, tmp_path, capsys, caplog):
    import numpy as np
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(str(databin / "dict.tgt.txt"))
    V, S = len(d), 12
    out = tmp_path / "short.json"
    argv = ["--databin", str(databin), "--heads", "2", "--dim", "8", "--shortlist", str(S)]
    assert build_codes.main(argv + ["--out", str(out)]) == 0
    assert f"shortlist {S} (codes {V - S}..{V - 1}" in capsys.readouterr().out
    again = tmp_path / "short2.json"
    assert build_codes.main(argv + ["--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()  # deterministic
    sizes = auto_head_sizes(V, 2)
    code = ct.load_code_table(out, V, sizes, list(d.symbols)).numpy()
    assert sorted(code) == list(range(V)) and json.loads(out.read_text())["meta"]["shortlist"] == S
    ds = data_utils.load_indexed_dataset(str(databin / "train.src-tgt.tgt"), d)
    counts = np.bincount(np.concatenate([ds[i].numpy() for i in range(len(ds))]), minlength=V)
    listed = np.flatnonzero(code >= V - S)
    assert set(range(4)) <= set(listed)  # the specials
    assert counts[listed[listed >= 4]].min() >= counts[np.setdiff1d(np.arange(4, V), listed)].max()
    # the tail is grouped balanced on [0, V - S): every group full but the last
    rest = np.setdiff1d(np.arange(V), listed)
    check_balanced(code[rest], V - S, sizes, nfix=0)
    # the model uses the table as it is (no re-layout, no warning)
    caplog.clear()
    head = build_output_layer(model_cfg(mhce_method="mhp", mhce_shortlist=S, mhce_code_table=str(out)), 16, d)
    assert np.array_equal(head.codec.code.numpy(), code) and "not built for --mhce-shortlist" not in caplog.text
    # a table built without --shortlist is laid out for it, with a warning
    plain = tmp_path / "plain.json"
    assert build_codes.main(["--databin", str(databin), "--heads", "2", "--dim", "8", "--out", str(plain)]) == 0
    head = build_output_layer(model_cfg(mhce_method="mhp", mhce_shortlist=S, mhce_code_table=str(plain)), 16, d)
    assert "not built for --mhce-shortlist 12" in caplog.text
    assert torch.equal(head.codec.code[:S], torch.arange(V - S, V))
    rc = build_codes.main(argv[:-1] + [str(V - 1), "--out", str(tmp_path / "bad.json")])
    assert rc == 2 and "must lie between 1 and V - 2" in capsys.readouterr().err


@pytest.mark.e2e
def test_fairseq_train_and_generate_with_a_shortlist(tmp_path):
    data = make_copy_data(tmp_path / "copy", n_train=400, n_valid=40, n_test=20)
    save = tmp_path / "ckpt"
    train_tiny(data, save, "mhp", "--mhce-shortlist", "12", updates=30)
    state = read_checkpoint(save / "checkpoint_last.pt")
    assert state["cfg"]["model"].mhce_shortlist == 12
    V = state["model"]["decoder.mhce_head.codec.code"].numel()
    assert torch.equal(state["model"]["decoder.mhce_head.codec.code"][:12], torch.arange(V - 12, V))
    runs = in_both_search_modes(
        "fairseq-generate", data, save / "checkpoint_last.pt", "--beam", "4", "--nbest", "2", "--batch-size", "20",
        "--required-batch-size-multiple", "1",
    )  # fmt: skip
    lines = {mode: hp for mode, (hp, _) in runs.items()}
    assert len(hypotheses("\n".join(lines["dense"]))) == 20
    assert lines["dense"] == lines["factorized"]
    # (a checkpoint of another shortlist size: test_refusals_and_the_models_default_table)
