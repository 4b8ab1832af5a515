"""Heads against brute-force references that materialize every code."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fairseq_mhce.modules.codec import MixedRadixCodec
from fairseq_mhce.modules.multihead_output import MultiHeadEmbedding, MultiHeadProduct

from .utils import digit_conditionals, make_dictionary, make_head, model_cfg, smoothed_per_head

D = 8
CASES = [(16, [4, 4]), (13, [4, 4]), (17, [5, 4]), (29, [2, 3, 5]), (27, [3, 3, 3]), (20, [3, 3, 3])]


METHODS = ["mhp", "mhe", "mhe-pt"]  # mhe-pt: MHE with --mhce-last-head per-token


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
                    if head.per_token and h == len(sizes) - 1:
                        # the prefix's own C_H token vectors (rows = codes), applied to x
                        own = slice(prefix * sizes[h], (prefix + 1) * sizes[h])
                        z = head.token_vectors[own] @ xi + head.token_bias[own]
                    else:
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


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("V,sizes", CASES)
@pytest.mark.parametrize("order", ["identity", "random"])
def test_log_probs_match_brute_force(method, V, sizes, order):
    head = make_head(method, V, sizes, dim=D, code=order, double=True)
    x = torch.randn(5, D, dtype=torch.float64)
    with torch.no_grad():
        lp = head.log_probs(x)
        ref = reference_log_probs(head, x)
    assert lp.shape == (5, V)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp.double().exp().sum(-1), torch.ones(5, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    # token_log_probs reads the same numbers without the dense row
    tokens = torch.randint(0, V, (5, 7))
    torch.testing.assert_close(
        head.token_log_probs(x, tokens).double(), lp.double().gather(1, tokens), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("V,sizes", CASES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_loss_nll_and_smoothing_match_materialized(method, V, sizes, eps):
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

    head = make_head(method, V, sizes, dim=D, seed=1, double=True)
    x = torch.randn(6, D, dtype=torch.float64)
    target = torch.randint(0, V, (6,))
    ref = reference_log_probs(head, x)
    loss, nll, correct = head.loss(x, target, eps)
    torch.testing.assert_close(nll.double(), -ref.gather(1, target[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
    if method == "mhp":
        # fairseq's label_smoothed_nll_loss on the brute-force distribution (uniform over V)
        ref_loss, _ = label_smoothed_nll_loss(ref, target, eps, ignore_index=None, reduce=False)
        torch.testing.assert_close(loss.double(), ref_loss.squeeze(-1), rtol=1e-5, atol=1e-5)
        # its gradients (states and projection) are the brute-force loss's
        xg = x.clone().requires_grad_(True)
        ref_loss = label_smoothed_nll_loss(reference_log_probs(head, xg), target, eps, ignore_index=None, reduce=False)
        want = torch.autograd.grad(ref_loss[0].sum(), [xg, head.proj.weight, head.proj.bias])
        got = torch.autograd.grad(head.loss(xg, target, eps)[0].sum(), [xg, head.proj.weight, head.proj.bias])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        # per-head smoothing: fairseq's loss on each head's own log-softmax (plus log Z_valid)
        lps = [F.log_softmax(z, -1) for z in head.proj(x).split(sizes, -1)]
        digits = head.codec.encode(target)
        used = head.codec.used_digits()
        ph = 0
        for h, lp in enumerate(lps):
            lp = lp[:, : used[h]]  # digits some valid code uses
            if used[h] > 1 and eps > 0:
                ph = ph + label_smoothed_nll_loss(lp, digits[:, h], eps, ignore_index=None, reduce=False)[0].squeeze(-1)
            else:
                ph = ph - lp.gather(1, digits[:, h : h + 1]).squeeze(1)
        lz = torch.logsumexp(  # log Z_valid by brute force: the product's mass on codes < V
            torch.stack(
                [
                    sum(lps[h][:, d] for h, d in enumerate(t))
                    for t in all_digit_tuples(sizes)
                    if sum(d * int(s) for d, s in zip(t, head.codec.strides.tolist())) < V
                ],
                -1,
            ),
            -1,
        )
        ph = ph + (1 - eps) * lz
        loss_ph, _, _ = head.loss(x, target, eps, smoothing="per-head")
        torch.testing.assert_close(loss_ph.double(), ph, rtol=1e-5, atol=1e-5)
    else:
        # per-head smoothing on the conditionals of the brute-force joint
        conds = digit_conditionals(reference_log_probs(head, x), head.codec, target)
        ref_loss = smoothed_per_head(conds, head.codec.encode(target), eps)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert correct.shape == (6, len(sizes))


def test_code_table_option_reads_checks_and_defers_to_a_checkpoint(tmp_path):
    """--mhce-code-table: the file's table is the model's; a table for another
    dictionary or other head sizes is refused naming both; a file missing at
    build time is taken from the checkpoint when one is loaded, and is an
    error (naming the file) when training starts without it."""
    from argparse import Namespace

    from fairseq_mhce.codes.table import save_code_table
    from fairseq_mhce.config import resolve_settings
    from fairseq_mhce.criterions.mhce_label_smoothed_cross_entropy import get_mhce_head
    from fairseq_mhce.models.transformer_mhce import build_output_layer
    from fairseq_mhce.training_start import settle_code_table

    d = make_dictionary(16)
    V = len(d)  # 16 with fairseq's 4 specials
    code = torch.randperm(V, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "codes.json"
    save_code_table(path, code.tolist(), [4, 4], list(d.symbols), {})
    cfg = model_cfg(mhce_method="mhe", mhce_head_sizes="4,4", mhce_code_table=str(path))
    head = build_output_layer(cfg, D, d)
    assert torch.equal(head.codec.code, code) and head.codec.pending_table is None
    cfg.mhce_head_sizes = "8,2"
    with pytest.raises(ValueError, match=r"\[4, 4\].*\[8, 2\]"):
        build_output_layer(cfg, D, d)
    cfg.mhce_head_sizes = "5,4"
    with pytest.raises(ValueError, match="16.*17"):
        build_output_layer(cfg, D, make_dictionary(17))
    # missing file: a placeholder table until a checkpoint's state dict arrives
    cfg.mhce_head_sizes = "4,4"
    cfg.mhce_code_table = str(tmp_path / "gone.json")
    head = build_output_layer(cfg, D, d)
    model = Namespace(decoder=Namespace(mhce_head=head, _mhce_settings=resolve_settings(cfg)))
    with pytest.raises(FileNotFoundError, match="gone.json: no such file"):
        settle_code_table(model, None, None)  # training from scratch
    trained = make_head("mhe-pt", 16, [4, 4], dim=D, code="random", double=True)
    state = {f"h.{k}": v for k, v in trained.state_dict().items()}
    head.upgrade_state_dict_named(state, "h")
    assert head.codec.pending_table is None and get_mhce_head(model) is head


def test_last_head_mismatch_is_a_clear_error():
    shared = make_head("mhe", 16, [4, 4], dim=D, double=True)
    per_token = make_head("mhe-pt", 16, [4, 4], dim=D, double=True)
    state = {f"h.{k}": v for k, v in shared.state_dict().items()}
    with pytest.raises(RuntimeError, match="--mhce-last-head shared"):
        per_token.upgrade_state_dict_named(state, "h")


@pytest.mark.parametrize("method", ["mhe", "mhe-pt"])
def test_gradients_flow_to_every_mhe_head(method):
    head = make_head(method, 29, [2, 3, 5], dim=D, double=True).float()
    x = torch.randn(10, D, requires_grad=True)
    loss, _, _ = head.loss(x, torch.randint(0, 29, (10,)), 0.1)
    loss.sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert x.grad.abs().sum() > 0


def test_parameters_far_below_softmax():
    V, d = 32768, 512
    mhp = MultiHeadProduct(d, MixedRadixCodec(V, [256, 128]))
    mhe = MultiHeadEmbedding(d, MixedRadixCodec(V, [256, 128]), last_head="shared")
    assert mhp.num_output_parameters() < V * d / 50
    assert mhe.num_output_parameters() < V * d / 25
    # per-token: a softmax's V x d (+ V biases), plus head 1
    pt = MultiHeadEmbedding(d, MixedRadixCodec(V, [256, 128]), last_head="per-token")
    assert pt.num_output_parameters() == V * (d + 1) + 256 * (d + 1)


def test_mhe_uniform_smoothing_is_refused():
    head = make_head("mhe", 16, [4, 4], dim=D, double=True)
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


def test_last_head_default_and_legacy_configs():
    """A new MHE model is per-token (the ablation's winner); a config saved
    before --mhce-last-head existed (an older checkpoint) keeps its shared
    last head, so the checkpoint still loads."""
    from argparse import Namespace

    from fairseq import options

    import fairseq_mhce  # noqa: F401
    from fairseq_mhce.config import fill_legacy_defaults, resolve_settings

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["/nonexistent", "--arch", "transformer_mhce", "--task", "translation"])
    assert args.mhce_last_head == "per-token"
    old = Namespace(mhce_method="mhe", mhce_heads=2)
    fill_legacy_defaults(old)  # a checkpoint's config that predates the options
    assert old.mhce_last_head == "shared" and old.mhce_code_order == "identity"
    fresh = resolve_settings(Namespace(mhce_method="mhe"))  # a new config lacking the keys
    assert fresh.mhce_last_head == "per-token" and fresh.code_order == "ppmi"


@pytest.mark.parametrize("rows, c, n", [(48, 8, 100), (50, 7, 30), (1000, 33, 60)])
def test_grouped_logits_and_its_gradients_match_gathered_rows(rows, c, n):
    """The per-token last head's products (training path: one weight-gradient
    buffer filled block by block; no-grad path: views per group) equal the
    gathered ``(N, C, d)`` rows, forward and backward, with absent groups and
    a partial last block (rows not a multiple of c: its missing columns -inf)."""
    from fairseq_mhce.modules.multihead_output import grouped_logits

    torch.manual_seed(rows)
    groups = -(-rows // c)
    weight = torch.randn(rows, D, dtype=torch.double, requires_grad=True)
    bias = torch.randn(groups * c, dtype=torch.double, requires_grad=True)
    x = torch.randn(n, D, dtype=torch.double, requires_grad=True)
    group = torch.randint(0, groups, (n,))
    group[group == 1] = 0  # group 1 absent
    padded_w = torch.cat([weight, weight.new_zeros(groups * c - rows, D)])
    idx = group.unsqueeze(1) * c + torch.arange(c)  # (N, C) codes
    ref = torch.einsum("ncd,nd->nc", padded_w[idx], x) + bias[idx]
    ref = ref.masked_fill(idx >= rows, float("-inf"))
    finite = torch.isfinite(ref)
    upstream = torch.randn(n, c, dtype=torch.double)

    def grads(z):
        return torch.autograd.grad((z.masked_fill(~finite, 0) * upstream).sum(), (x, weight, bias))

    got = grouped_logits(x, group, weight, bias, c)
    assert torch.equal(torch.isfinite(got), finite)
    assert torch.allclose(got[finite], ref[finite])
    got_grads = grads(got)
    for a, b in zip(got_grads, grads(ref)):
        assert torch.allclose(a, b)
    assert got_grads[1][c : 2 * c].abs().sum() == 0  # the absent group's rows get no gradient
    with torch.no_grad():
        assert torch.allclose(grouped_logits(x, group, weight, bias, c)[finite], ref[finite])
    # under autocast (bf16 products, each group's own view of the table): the same values and
    # gradients to bf16's precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grouped_logits(x.float(), group, weight.float(), bias.float(), c)
    assert got.dtype == torch.bfloat16 and torch.equal(torch.isfinite(got), finite)
    assert torch.allclose(got[finite].double(), ref[finite], rtol=0.05, atol=0.1)
    for a, b in zip(grads(got.double()), got_grads):
        assert torch.allclose(a, b, rtol=0.05, atol=0.1)
