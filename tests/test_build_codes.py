"""Learned code tables: fairseq_mhce/codes/{table,grouping,ppmi,
checkpoint_vectors}.py and mhce-build-codes
(fairseq_mhce/cli/build_codes.py).

Fast (one tiny fairseq-preprocess run, one run of the console script); the
grouping runs on synthetic vectors of a few dozen tokens.
"""

import json

import numpy as np
import pytest
import torch

from fairseq_mhce.cli import build_codes
from fairseq_mhce.codes import table as ct
from fairseq_mhce.codes.checkpoint_vectors import checkpoint_vectors
from fairseq_mhce.codes.grouping import balanced_codes, digit_coherence
from fairseq_mhce.codes.ppmi import ppmi_svd_vectors
from fairseq_mhce.modules.codec import MixedRadixCodec, auto_head_sizes

from .utils import check_balanced, cli, make_copy_data


def symbols_of(V):
    return list(ct.SPECIALS) + [f"w{i}" for i in range(V - 4)]


# ---------------------------------------------------------------- grouping


@pytest.mark.parametrize(
    "V,sizes",
    [(50, [8, 8]), (50, [4, 4, 4]), (64, [8, 8]), (101, [11, 10]), (30, [2, 2, 2, 2, 2]), (50, [50]), (200, [3, 9, 8])],
)
def test_balanced_and_a_permutation(V, sizes):
    x = np.random.default_rng(V).standard_normal((V, 6))
    code = balanced_codes(x, sizes, seed=1)
    check_balanced(code, V, sizes)
    # the codec accepts it and every token round-trips
    codec = MixedRadixCodec(V, sizes, torch.from_numpy(code))
    ids = torch.arange(V)
    assert torch.equal(codec.decode(codec.encode(ids)), ids)


def test_last_tokens_get_the_highest_codes():
    V, sizes = 50, [4, 4, 4]
    x = np.random.default_rng(0).standard_normal((V, 5))
    last = [7, 20, 33, 49]
    code = balanced_codes(x, sizes, seed=3, last=last)
    check_balanced(code, V, sizes)
    assert code[last].tolist() == [46, 47, 48, 49]
    with pytest.raises(ValueError):
        balanced_codes(x, sizes, last=[2])  # a special


def test_deterministic_from_seed(tmp_path):
    V, sizes = 120, [11, 11]
    x = np.random.default_rng(5).standard_normal((V, 8))
    a = balanced_codes(x, sizes, seed=1)
    b = balanced_codes(x, sizes, seed=1)
    assert np.array_equal(a, b)
    c = balanced_codes(x, sizes, seed=2)
    check_balanced(c, V, sizes)
    assert not np.array_equal(a, c)  # another k-means start
    syms = symbols_of(V)
    ct.save_code_table(tmp_path / "a.json", a, sizes, syms, {"seed": 1})
    ct.save_code_table(tmp_path / "b.json", b, sizes, syms, {"seed": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_planted_groups_are_found():
    # 4 specials + clusters of 4, 8, 8, ..., 8 tokens: group 0 = specials + the
    # 4-cluster, groups 1..7 one cluster each; token ids shuffled
    rng = np.random.default_rng(0)
    C1, C2, k = 8, 8, 16
    labels = np.concatenate([np.zeros(4, int), np.repeat(np.arange(1, C1), C2)])
    rng.shuffle(labels)
    centres = rng.standard_normal((C1, k)) * 3
    x = np.concatenate([rng.standard_normal((4, k)), centres[labels] + 0.5 * rng.standard_normal((labels.size, k))])
    V = x.shape[0]
    assert V == 64
    code = balanced_codes(x, [C1, C2], seed=1)
    check_balanced(code, V, [C1, C2])
    group = code[4:] // C2
    pure = sum(len(set(labels[group == g])) == 1 for g in range(C1))
    assert pure >= 7, pure
    # identity codes on shuffled ids are far from that
    ident = np.arange(4, V) // C2
    assert sum(len(set(labels[ident == g])) == 1 for g in range(C1)) <= 1


def test_last_digit_means_the_same_across_groups():
    # token (g, j): vector = A[g] + B[j] + noise; tokens with the same planted
    # column j should share the last digit across groups
    rng = np.random.default_rng(1)
    C1, C2, k = 6, 6, 24
    cells = [(g, j) for g in range(C1) for j in range(C2)][4:]  # 4 cells left to the specials
    order = rng.permutation(len(cells))
    cells = [cells[i] for i in order]
    A = rng.standard_normal((C1, k)) * 4
    B = rng.standard_normal((C2, k)) * 1.5
    x = np.stack([A[g] + B[j] + 0.1 * rng.standard_normal(k) for g, j in cells])
    x = np.concatenate([rng.standard_normal((4, k)), x])
    code = balanced_codes(x, [C1, C2], seed=1)
    check_balanced(code, x.shape[0], [C1, C2])
    g_planted = np.array([g for g, _ in cells])
    j_planted = np.array([j for _, j in cells])
    g_code, j_code = code[4:] // C2, code[4:] % C2
    # groups recovered
    assert all(len(set(g_planted[g_code == g])) == 1 for g in range(C1))
    # columns: the share of tokens whose last digit is their column's usual one
    agree = sum(np.bincount(j_code[j_planted == j]).max() for j in range(C2))
    assert agree >= 0.85 * len(cells), agree
    learned = digit_coherence(x, code, [C1, C2])
    ident = digit_coherence(x, np.arange(x.shape[0]), [C1, C2])
    assert learned[0] > ident[0] + 0.3 and learned[1] > ident[1] + 0.3


def test_grouping_at_3000_tokens_is_balanced_and_seeded():
    """V = 3000, H = 2 and 3: balanced, the same table for the same seed,
    another for another seed (speed is the benchmarks' business, not a
    test's)."""
    V = 3000
    x = np.random.default_rng(0).standard_normal((V, 32))
    for H in (2, 3):
        sizes = auto_head_sizes(V, H)
        code = balanced_codes(x, sizes, seed=1)
        check_balanced(code, V, sizes)
        assert np.array_equal(code, balanced_codes(x, sizes, seed=1))
        assert not np.array_equal(code, balanced_codes(x, sizes, seed=2))


# ---------------------------------------------------------------- vectors


def test_ppmi_vectors_separate_context_classes():
    # tokens 4..9 always follow token 20, tokens 10..15 always follow token 21
    rng = np.random.default_rng(0)
    V = 30
    seqs = []
    for _ in range(400):
        s = []
        for _ in range(6):
            if rng.random() < 0.5:
                s += [20, int(rng.integers(4, 10))]
            else:
                s += [21, int(rng.integers(10, 16))]
        seqs.append(np.array(s + [2]))
    v = ppmi_svd_vectors(seqs, V, dim=8, window=1, seed=1)
    assert v.shape == (V, 8)
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    sim = u @ u.T
    a, b = list(range(4, 10)), list(range(10, 16))
    within = (sim[np.ix_(a, a)].mean() + sim[np.ix_(b, b)].mean()) / 2
    across = sim[np.ix_(a, b)].mean()
    assert within > across + 0.5
    # unseen tokens (22..29): small vectors; same seed, same vectors
    assert np.linalg.norm(v[25]) < 0.01 * np.linalg.norm(v[5])
    assert np.array_equal(v, ppmi_svd_vectors(seqs, V, dim=8, window=1, seed=1))


def test_checkpoint_vectors(tmp_path):
    V, d = 20, 6
    emb, out = torch.randn(V, d), torch.randn(V, d)
    p = tmp_path / "softmax.pt"
    torch.save({"model": {"decoder.embed_tokens.weight": emb, "decoder.output_projection.weight": out}}, p)
    assert np.allclose(checkpoint_vectors(p, "input"), emb.numpy())
    assert np.allclose(checkpoint_vectors(p, "output", vocab_size=V), out.numpy())
    mhs = tmp_path / "mhs.pt"
    torch.save({"model": {"decoder.embed_tokens.weight": emb, "decoder.mhce_head.proj.weight": out}}, mhs)
    assert np.allclose(checkpoint_vectors(mhs, "output", vocab_size=V), out.numpy())
    mhp = tmp_path / "mhp.pt"  # an MHP head: sum(C_h) rows, not a per-token table
    torch.save({"model": {"decoder.embed_tokens.weight": emb, "decoder.mhce_head.proj.weight": torch.randn(9, d)}}, mhp)
    with pytest.raises(ValueError, match="--vectors input") as e:
        checkpoint_vectors(mhp, "output", vocab_size=V)
    assert "decoder.embed_tokens.weight" in str(e.value)  # lists what is there
    # tied input/output embeddings (fairseq may store only the embedding)
    import argparse

    tied = tmp_path / "tied.pt"
    torch.save(
        {
            "args": argparse.Namespace(share_decoder_input_output_embed=True),
            "model": {"decoder.embed_tokens.weight": emb},
        },
        tied,
    )
    assert np.allclose(checkpoint_vectors(tied, "output", vocab_size=V), emb.numpy())
    with pytest.raises(ValueError, match="rows, the target dictionary has 21"):
        checkpoint_vectors(p, "output", vocab_size=V + 1)
    with pytest.raises(ValueError, match="must be 'output' or 'input'"):
        checkpoint_vectors(p, "both")


# ---------------------------------------------------------------- file


def test_save_load_roundtrip_and_refusals(tmp_path):
    V, sizes = 50, [8, 8]
    code = balanced_codes(np.random.default_rng(0).standard_normal((V, 4)), sizes, seed=1)
    syms = symbols_of(V)
    path = tmp_path / "sub" / "codes.json"
    ct.save_code_table(path, code, sizes, syms, {"source": "test"})
    obj = json.loads(path.read_text())
    assert obj["format"] == "fairseq_mhce.code_table" and obj["version"] == 1
    assert obj["vocab_size"] == V and obj["head_sizes"] == sizes and obj["meta"] == {"source": "test"}
    assert obj["code"] == code.tolist()
    assert [p.name for p in path.parent.iterdir()] == ["codes.json"]  # no temp file left
    loaded = ct.load_code_table(path, V, sizes, syms)
    assert loaded.dtype == torch.long and loaded.tolist() == code.tolist()
    assert ct.load_code_table(str(path), V, sizes).tolist() == code.tolist()

    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        ct.save_code_table(path, np.arange(V), sizes, syms, {})
    assert path.read_bytes() == before

    with pytest.raises(ValueError, match="50 types, this model's has 51; rebuild it with mhce-build-codes"):
        ct.load_code_table(path, 51, sizes)
    with pytest.raises(ValueError, match=r"head sizes \[8, 8\], this model has \[10, 5\]; pass --mhce-head-sizes 8,8"):
        ct.load_code_table(path, V, [10, 5])
    other = list(syms)
    other[10] = "zzz"
    with pytest.raises(ValueError, match="another target dictionary") as e:
        ct.load_code_table(path, V, sizes, other)
    assert obj["dictionary_sha1"] in str(e.value) and ct.dictionary_sha1(other) in str(e.value)
    with pytest.raises(ValueError, match="no code table file"):
        ct.load_code_table(tmp_path / "missing.json", V, sizes)
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="is not a code table"):
        ct.load_code_table(tmp_path / "x.json", V, sizes)
    (tmp_path / "y.json").write_text("not json")
    with pytest.raises(ValueError, match="is not a code table"):
        ct.load_code_table(tmp_path / "y.json", V, sizes)
    bad = dict(obj, code=[0] * V)
    (tmp_path / "z.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"permutation of \[0, 50\)"):
        ct.load_code_table(tmp_path / "z.json", V, sizes)
    with pytest.raises(ValueError, match="permutation"):
        ct.save_code_table(tmp_path / "w.json", [0] * V, sizes, syms, {})
    with pytest.raises(ValueError, match="cannot give"):
        ct.save_code_table(tmp_path / "w.json", np.arange(V), [7, 7], syms, {})


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def databin(tmp_path_factory):
    return make_copy_data(tmp_path_factory.mktemp("codes"), n_train=300, n_valid=20, n_test=20, n_words=60)


@pytest.mark.e2e
def test_dictionary_symbols(databin):
    from fairseq.data import Dictionary

    d = Dictionary.load(str(databin / "dict.tgt.txt"))
    syms = ct.dictionary_symbols(databin / "dict.tgt.txt")
    assert syms[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and syms == list(d.symbols)
    assert ct.dictionary_symbols(d) == syms


@pytest.mark.e2e
def test_cli_ppmi_and_checkpoint(databin, tmp_path, capsys):
    syms = ct.dictionary_symbols(databin / "dict.tgt.txt")
    V = len(syms)
    out = tmp_path / "ppmi.json"
    argv = ["--databin", str(databin), "--heads", "3", "--source", "ppmi", "--dim", "8", "--seed", "1"]
    assert build_codes.main(argv + ["--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "wrote" in line and f"V={V}" in line and "identity codes" in line
    sizes = auto_head_sizes(V, 3)
    code = ct.load_code_table(out, V, sizes, syms)
    check_balanced(code.numpy(), V, sizes)
    meta = json.loads(out.read_text())["meta"]
    assert meta["source"] == "ppmi" and meta["target_lang"] == "tgt"
    # deterministic: same arguments, same bytes
    again = tmp_path / "ppmi2.json"
    assert build_codes.main(argv + ["--out", str(again), "--target-lang", "tgt"]) == 0
    assert again.read_bytes() == out.read_bytes()

    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": {"decoder.embed_tokens.weight": torch.randn(V, 16)}}, ckpt)
    out2 = tmp_path / "ckpt.json"
    assert (
        build_codes.main(
            [
                "--databin",
                str(databin),
                "--head-sizes",
                "9,8",
                "--source",
                "checkpoint",
                "--checkpoint",
                str(ckpt),
                "--vectors",
                "input",
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    check_balanced(ct.load_code_table(out2, V, [9, 8], syms).numpy(), V, [9, 8])
    assert json.loads(out2.read_text())["meta"]["vectors"] == "input"
    capsys.readouterr()
    # no output vectors in that checkpoint: exit 2 with the keys it has
    rc = build_codes.main(
        [
            "--databin",
            str(databin),
            "--source",
            "checkpoint",
            "--checkpoint",
            str(ckpt),
            "--out",
            str(tmp_path / "none.json"),
        ]
    )
    assert rc == 2 and "decoder.embed_tokens.weight" in capsys.readouterr().err
    assert not (tmp_path / "none.json").exists()


@pytest.mark.e2e
def test_cli_refusals(databin, tmp_path, capsys):
    V = len(ct.dictionary_symbols(databin / "dict.tgt.txt"))
    out = tmp_path / "c.json"
    rc = build_codes.main(["--databin", str(databin), "--head-sizes", "5,5", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "[5, 5] is 25, below the target dictionary size" in err and str(V) in err
    assert not out.exists()
    rc = build_codes.main(["--databin", str(databin), "--head-sizes", "9,x", "--out", str(out)])
    assert rc == 2 and "comma-separated" in capsys.readouterr().err
    rc = build_codes.main(["--databin", str(tmp_path / "nope"), "--out", str(out)])
    assert rc == 2 and "no data-bin" in capsys.readouterr().err
    rc = build_codes.main(["--databin", str(databin), "--target-lang", "xx", "--out", str(out)])
    assert rc == 2 and "no target dictionary" in capsys.readouterr().err
    # an existing --out is left alone, also by the console script
    out.write_text("keep")
    p = cli("mhce-build-codes", "--databin", databin, "--out", out, check=False)
    assert p.returncode == 2 and "already exists" in p.stdout, p.stdout
    assert out.read_text() == "keep"
