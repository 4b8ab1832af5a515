"""Tied output vectors (``--share-decoder-input-output-embed``): per-token MHE
and the MHP shortlist score with the decoder's input embedding rows, checked
against a brute-force reference built from the embedding matrix itself
(token order, every token scored alone); tying is one parameter; the
factorized top-k equals the dense row; forms without per-token vectors are
refused."""

import pytest
import torch
import torch.nn.functional as F

import fairseq_mhce  # noqa: F401
from fairseq_mhce.codes import table as ct
from fairseq_mhce.modules.codec import MixedRadixCodec
from fairseq_mhce.modules.multihead_output import MultiHeadEmbedding, MultiHeadProduct
from fairseq_mhce.modules.tied_embedding import CodeOrderedEmbedding

D = 8
PAD = 1
# (V, head sizes): partial last groups (V not a multiple of C_H) and exact ones
CASES = [(13, [4, 4]), (16, [4, 4]), (29, [2, 3, 5]), (23, [3, 3, 3])]


def _embedding(V, g):
    emb = CodeOrderedEmbedding(V, D, padding_idx=PAD)
    with torch.no_grad():
        emb.weight.normal_(0, 1.0, generator=g)
    return emb, emb.weight.detach().clone()  # token order, before tying


def make_tied(method, V, sizes, seed=0, shortlist=5):
    g = torch.Generator().manual_seed(seed)
    code = torch.randperm(V, generator=g)
    emb, token_order = _embedding(V, g)
    if method == "mhp":
        codec = MixedRadixCodec(V, sizes, ct.shortlist_code(code, shortlist))
        head = MultiHeadProduct(D, codec, shortlist=shortlist, tied_embed=emb)
    else:
        head = MultiHeadEmbedding(D, MixedRadixCodec(V, sizes, code), last_head="per-token", tied_embed=emb)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 1.0, generator=g)
    return head, emb, token_order


def reference(head, E, x):
    """(N, V) float64 log-probabilities from the token-order matrix ``E``."""
    codec, V = head.codec, head.vocab_size
    code = codec.code
    out = torch.full((x.size(0), V), float("nan"), dtype=torch.float64)
    xd = x.double()
    if isinstance(head, MultiHeadProduct):
        S, T = head.shortlist, head.tail_size
        W, b = head.proj.weight.double(), head.proj.bias.double()
        listed = codec.token[T:V]  # class order
        for r in range(x.size(0)):
            z = W @ xd[r] + b
            parts = z[: sum(codec.sizes)].split(codec.sizes)
            lps = [F.log_softmax(p, -1) for p in parts]
            short = F.log_softmax(torch.cat([E[listed].double() @ xd[r] + head.short_bias.double(), z[-1:]]), -1)
            tail = {}
            for v in range(V):
                if code[v] < T:
                    c, s = int(code[v]), 0.0
                    for h, st in enumerate(codec.stride_list):
                        s = s + lps[h][(c // st) % codec.sizes[h]]
                    tail[v] = s
            lz = torch.logsumexp(torch.stack(list(tail.values())), 0)
            for v in range(V):
                c = int(code[v])
                out[r, v] = short[c - T] if c >= T else short[S] + tail[v] - lz
        return out
    C = codec.sizes[-1]
    for r in range(x.size(0)):
        # chain rule with the model's own first heads, the last head from E
        for v in range(V):
            c = int(code[v])
            prefix = c // C
            members = [u for u in range(V) if int(code[u]) // C == prefix]
            logit = {u: E[u].double() @ xd[r] + head.token_bias[int(code[u])].double() for u in members}
            last = logit[v] - torch.logsumexp(torch.stack(list(logit.values())), 0)
            digits = codec.encode(torch.tensor([v]))[0]
            prefixes = codec.prefixes(torch.tensor([v]))[0]
            first = 0.0
            for h in range(len(codec.sizes) - 1):
                lp = head.level_log_probs(h, x[r : r + 1], prefixes[h].view(1, 1)).double()[0, 0]
                first = first + lp[digits[h]]
            out[r, v] = first + last
    return out


@pytest.mark.parametrize("method", ["mhe", "mhp"])
@pytest.mark.parametrize("V,sizes", CASES)
def test_tied_log_probs_and_loss_match_the_embedding_matrix(method, V, sizes):
    head, emb, E = make_tied(method, V, sizes, shortlist=min(5, V - 2))
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(1))
    ref = reference(head, E, x)
    lp = head.log_probs(x).double()
    assert torch.allclose(lp, ref, atol=1e-5), (lp - ref).abs().max()
    assert torch.allclose(lp.exp().sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-5)
    target = torch.randint(0, V, (6,), generator=torch.Generator().manual_seed(2))
    _, nll, _ = head.loss(x, target, 0.0)
    assert torch.allclose(nll.double(), -ref.gather(-1, target[:, None]).squeeze(-1), atol=1e-5)
    tok = head.token_log_probs(x, torch.arange(V).expand(6, V))
    assert torch.allclose(tok.double(), ref, atol=1e-5)


@pytest.mark.parametrize("method", ["mhe", "mhp"])
def test_tying_is_one_parameter(method):
    head, emb, E = make_tied(method, 29, [2, 3, 5])
    # the input lookup sees the same vectors, through the code table
    assert torch.equal(emb(torch.arange(29)), E)
    assert all(p is not emb.weight for p in head.parameters())  # the head does not own a copy
    keys = set(head.state_dict())
    assert "tied_output" in keys and not any(k.startswith("token_vectors") for k in keys)
    # a gradient step on the output alone moves the input embedding
    x = torch.randn(5, D)
    target = torch.tensor([0, 7, 11, 28, 3])
    loss, _, _ = head.loss(x, target, 0.1)
    loss.sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0
    before = emb(torch.arange(29)).detach().clone()
    with torch.no_grad():
        emb.weight -= 0.1 * emb.weight.grad
    assert not torch.allclose(emb(torch.arange(29)), before)


@pytest.mark.parametrize("method", ["mhe", "mhp"])
@pytest.mark.parametrize("V,sizes", CASES)
def test_tied_topk_equals_dense(method, V, sizes):
    head, _, _ = make_tied(method, V, sizes, seed=3, shortlist=min(5, V - 2))
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(4)) * 2
    dense = head.log_probs(x)
    for k in (1, 3, min(8, V - 4)):
        vals, toks, extra = head.topk(x, k, min_token=4, extra=torch.tensor([2, 3]))
        want = dense[:, 4:].topk(k, -1).values
        assert torch.allclose(vals, want, atol=1e-6)
        assert torch.allclose(dense.gather(-1, toks), vals, atol=1e-6)
        assert torch.allclose(extra, dense[:, [2, 3]], atol=1e-6)


def test_forms_without_per_token_vectors_refuse_tying():
    V, sizes = 16, [4, 4]
    emb = CodeOrderedEmbedding(V, D, padding_idx=PAD)
    with pytest.raises(ValueError, match="mhp without a shortlist.*Forms that can share"):
        MultiHeadProduct(D, MixedRadixCodec(V, sizes), shortlist=0, tied_embed=emb)
    with pytest.raises(ValueError, match="last-head shared.*Forms that can share"):
        MultiHeadEmbedding(D, MixedRadixCodec(V, sizes), last_head="shared", tied_embed=emb)


def test_untied_checkpoint_into_tied_model_is_a_clear_error():
    tied, _, _ = make_tied("mhe", 16, [4, 4])
    untied = MultiHeadEmbedding(D, MixedRadixCodec(16, [4, 4]), last_head="per-token")
    with pytest.raises(RuntimeError, match="does not share.*drop --share-decoder-input-output-embed"):
        tied.upgrade_state_dict_named(dict(untied.state_dict()), "")
    with pytest.raises(
        RuntimeError, match="shares the decoder's input embedding.*pass --share-decoder-input-output-embed"
    ):
        untied.upgrade_state_dict_named(dict(tied.state_dict()), "")


def test_code_ordered_embedding_lookup_and_export_order():
    """Before tying it is nn.Embedding; tied, row code[v] holds token v's
    vector, lookups go through the code table (padding row included), the
    token-order view undoes the permutation, and it ties to one codec only."""
    V = 13
    g = torch.Generator().manual_seed(3)
    emb, token_order = _embedding(V, g)
    tokens = torch.tensor([[0, PAD, 5, 12]])
    assert emb.codec is None and torch.equal(emb(tokens), F.embedding(tokens, token_order, PAD))
    assert emb.token_order_weight() is emb.weight
    codec = MixedRadixCodec(V, [4, 4], torch.randperm(V, generator=g))
    emb.tie(codec)
    emb.tie(codec)  # the same codec again: nothing changes
    assert emb.codec is codec
    assert torch.equal(emb.weight[codec.code], token_order)
    assert torch.equal(emb(tokens), F.embedding(tokens, token_order))
    assert torch.equal(emb.token_order_weight(), token_order)
    emb(tokens).sum().backward()  # the padding token's row (at its code) gets no gradient
    assert emb.weight.grad[codec.code[PAD]].abs().sum() == 0 and emb.weight.grad[codec.code[5]].abs().sum() > 0
    with pytest.raises(RuntimeError, match="already shared with another output layer"):
        emb.tie(MixedRadixCodec(V, [4, 4]))
    unpadded = CodeOrderedEmbedding(V, D)
    unpadded.tie(codec)
    assert unpadded._code_padding_idx() is None
    with pytest.raises(
        ValueError, match="has 12 rows but the output layer covers 13 target types.*--joined-dictionary"
    ):
        CodeOrderedEmbedding(12, D).tie(codec)
