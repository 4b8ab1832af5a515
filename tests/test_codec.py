import math

import pytest
import torch

from fairseq_mhce.modules.codec import MixedRadixCodec, auto_head_sizes, parse_head_sizes


@pytest.mark.parametrize(
    "V,H,expected",
    [
        (16, 2, [4, 4]),  # V = product exactly
        (17, 2, [5, 4]),  # V = 1 + product of smaller sizes
        (13, 2, [4, 4]),  # prime
        (101, 3, [5, 5, 5]),  # prime, H = 3
        (64, 3, [4, 4, 4]),
        (65, 3, [5, 4, 4]),
        (3, 2, [2, 2]),
        (262144, 2, [512, 512]),
        (32003, 2, [179, 179]),
    ],
)
def test_auto_head_sizes(V, H, expected):
    sizes = auto_head_sizes(V, H)
    assert sizes == expected
    assert math.prod(sizes) >= V
    assert max(sizes) - min(sizes) <= 1
    # smallest balanced product: lowering any head drops below V
    for i in range(H):
        lower = list(sizes)
        lower[i] -= 1
        assert lower[i] < 2 or math.prod(lower) < V or max(lower) - min(lower) > 1


@pytest.mark.parametrize("V,sizes", [(13, [4, 4]), (16, [4, 4]), (17, [5, 4]), (29, [2, 3, 5]), (30, [2, 3, 5])])
@pytest.mark.parametrize("order", ["identity", "random"])
def test_codec_round_trip(V, sizes, order):
    code = torch.randperm(V, generator=torch.Generator().manual_seed(0)) if order == "random" else None
    codec = MixedRadixCodec(V, sizes, code)
    tokens = torch.arange(V)
    digits = codec.encode(tokens)
    assert digits.shape == (V, len(sizes))
    for h, c in enumerate(sizes):
        assert digits[:, h].min() >= 0 and digits[:, h].max() < c
    assert torch.equal(codec.decode(digits), tokens)
    # big-endian: digits spell the code, head 1 most significant
    c = codec.code
    value = torch.zeros_like(c)
    for h, size in enumerate(sizes):
        value = value * size + digits[:, h]
    assert torch.equal(value, c)
    # every code is distinct and < V; invalid codes decode to -1
    assert codec.code.max() < V and len(set(codec.code.tolist())) == V
    assert (codec.token[V:] == -1).all() and (codec.token[:V] >= 0).all()
    # prefix of head h is the integer d_1..d_{h-1}
    pre = codec.prefixes(tokens)
    for h in range(len(sizes)):
        expect = torch.zeros_like(tokens)
        for i in range(h):
            expect = expect * sizes[i] + digits[:, i]
        assert torch.equal(pre[:, h], expect)


def test_digit_counts_and_valid_mask():
    V, sizes = 17, [5, 4]
    codec = MixedRadixCodec(V, sizes)
    counts = codec.digit_counts()
    # digits some valid code uses, as python ints (heads that use only some of their digits too)
    for v, sz, used in ((17, [5, 4], [5, 4]), (7, [3, 3, 3], [1, 3, 3]), (5, [10, 10], [1, 5]), (12, [4, 4], [3, 4])):
        c = MixedRadixCodec(v, sz)
        assert c.used_digits() == used == [int((n > 0).sum()) for n in c.digit_counts()]
    assert counts[0].tolist() == [4, 4, 4, 4, 1]
    assert counts[1].tolist() == [5, 4, 4, 4]
    m = codec.valid_digit_mask(1, torch.tensor([3, 4]))
    assert m.tolist() == [[True] * 4, [True, False, False, False]]
    assert codec.valid_digit_mask(0, torch.tensor([0])).all()


def test_code_table_is_in_state_dict():
    codec = MixedRadixCodec(10, [4, 3], torch.tensor([3, 1, 4, 0, 5, 9, 2, 6, 8, 7]))
    sd = codec.state_dict()
    assert torch.equal(sd["code"], codec.code)
    other = MixedRadixCodec(10, [4, 3])
    other.load_state_dict(sd)
    assert torch.equal(other.encode(torch.arange(10)), codec.encode(torch.arange(10)))


def test_bad_sizes():
    with pytest.raises(ValueError, match="below the vocabulary size 20"):
        MixedRadixCodec(20, [4, 4])
    with pytest.raises(ValueError, match="at least 2 classes"):
        parse_head_sizes("1,40")
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_head_sizes("12x4")
    with pytest.raises(ValueError, match="permutation"):
        MixedRadixCodec(4, [2, 2], torch.tensor([0, 1, 1, 3]))
    assert parse_head_sizes("128,256") == [128, 256]
    assert parse_head_sizes(None) is None
