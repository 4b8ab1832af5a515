"""Bad input caught when the model is built or a checkpoint is loaded
(issue "Nothing lost, nothing silently wrong"):

* a dictionary of the same size but other content (fingerprint in the
  checkpoint; an older checkpoint without one loads with a warning);
* more heads than the vocabulary can use (refused) and explicit sizes with a
  whole spare head (warned);
* stock criteria that cannot train a multi-head output (refused before the
  first step, naming the plugin's criterion) or that work through the full
  row (one log line);
* MHS's sampling seed follows fairseq's seed when the model config has none
  (fairseq-hydra-train).

Every failing case leaves the user's checkpoint and data-bin byte-identical.
"""

import logging
import random
import shutil

import pytest
import torch

import fairseq_mhce  # noqa: F401
from fairseq_mhce.models.transformer_mhce import TransformerMHCEModel, build_output_layer

from .utils import USER_DIR, cli, fairseq_train, make_dictionary, model_cfg, read_checkpoint, tree_hashes


# ---------------------------------------------------------------- head counts
def test_too_many_heads_for_the_vocabulary_is_refused():
    d = make_dictionary(208)
    for method in ("mhp", "mhe"):
        with pytest.raises(ValueError, match=r"--mhce-heads 20 .*208.*always predict digit 0.*At most 8 heads"):
            build_output_layer(model_cfg(mhce_method=method, mhce_heads=20), 16, d)
        # 2^8 >= 208 > 2^7: every head used
        head = build_output_layer(model_cfg(mhce_method=method, mhce_heads=8), 16, d)
        assert len(head.codec.sizes) == 8 and min(head.codec.used_digits()) >= 2


def test_spare_head_in_explicit_sizes_is_warned(caplog):
    d = make_dictionary(300)
    caplog.set_level(logging.WARNING, logger="fairseq_mhce")
    head = build_output_layer(model_cfg(mhce_method="mhe", mhce_head_sizes="20,20,20"), 16, d)
    assert head.codec.sizes == [20, 20, 20]
    assert "without head(s) [1, 2, 3], and head(s) [1] always predict digit 0" in caplog.text, caplog.text
    assert "[7, 7, 7] (product 343)" in caplog.text
    caplog.clear()
    build_output_layer(model_cfg(mhce_method="mhe", mhce_head_sizes="20,16"), 16, d)  # both needed: no warning
    assert "without head" not in caplog.text


# ---------------------------------------------------------------- MHS seed
def test_mhs_seed_follows_fairseq_seed_without_a_config_seed():
    from omegaconf import OmegaConf

    def mhs_seed(torch_seed, **extra):
        torch.manual_seed(torch_seed)  # what fairseq does with common.seed before building the model
        args = OmegaConf.create(
            {
                "mhce_method": "mhs",
                "decoder_embed_dim": 16,
                "decoder_layers": 1,
                "decoder_ffn_embed_dim": 32,
                "decoder_attention_heads": 2,
                **extra,
            }
        )
        d = make_dictionary(100)
        emb = torch.nn.Embedding(len(d), 16, padding_idx=d.pad())
        return TransformerMHCEModel.build_decoder(args, d, emb).mhce_head.seed

    assert mhs_seed(3) == mhs_seed(3)
    assert mhs_seed(3) != mhs_seed(4)
    assert mhs_seed(3, seed=11) == mhs_seed(4, seed=11) == 11  # an explicit seed wins (argparse)


# ---------------------------------------------------------------- CLIs
@pytest.fixture(scope="module")
def data(copy_bin):
    return copy_bin


def train(data, save, method, *extra, criterion="mhce_label_smoothed_cross_entropy", check=True):
    return fairseq_train(data, save, "--mhce-method", method, *extra, updates=6, criterion=criterion, check=check)


@pytest.fixture(scope="module")
def mhp_ckpt(trained_mhp):
    return trained_mhp[0] / "checkpoint_best.pt"  # the shared MHP model of tests/conftest.py


@pytest.mark.e2e
def test_same_size_other_dictionary_is_refused(data, mhp_ckpt, tmp_path):
    other = tmp_path / "shuffled"
    shutil.copytree(data, other)
    lines = (other / "dict.tgt.txt").read_text().splitlines()
    random.Random(0).shuffle(lines)
    (other / "dict.tgt.txt").write_text("\n".join(lines) + "\n")
    before = (tree_hashes(mhp_ckpt), tree_hashes(other))
    r = cli("fairseq-generate", other, "--user-dir", USER_DIR, "--path", mhp_ckpt, "--beam", "2", check=False)
    assert r.returncode != 0, r.stdout[-2000:]
    assert "dictionary mismatch: the target dictionary does not match the checkpoint" in r.stdout
    assert "other symbols or another order" in r.stdout and "Use the data-bin" in r.stdout
    assert (tree_hashes(mhp_ckpt), tree_hashes(other)) == before
    # the model's own data-bin decodes
    ok = cli("fairseq-generate", data, "--user-dir", USER_DIR, "--path", mhp_ckpt, "--beam", "2")
    assert "H-0" in ok.stdout or "H-1" in ok.stdout


@pytest.mark.e2e
def test_checkpoint_without_fingerprint_loads_with_a_warning(data, mhp_ckpt, tmp_path):
    state = read_checkpoint(mhp_ckpt)
    assert state["model"]["decoder.mhce_dict_fingerprint"].shape == (2, 2)
    del state["model"]["decoder.mhce_dict_fingerprint"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    r = cli("fairseq-generate", data, "--user-dir", USER_DIR, "--path", old, "--beam", "2")
    assert "holds no dictionary fingerprint" in r.stdout and "H-" in r.stdout


@pytest.mark.e2e
def test_stock_criteria(data, tmp_path):
    save = tmp_path / "adaptive"
    r = train(data, save, "mhe", criterion="adaptive_loss", check=False)
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:])  # a clear error, not an abort (134)
    assert "--criterion adaptive_loss cannot train a multi-head output" in r.stdout
    assert "mhce_label_smoothed_cross_entropy" in r.stdout and "num_updates" not in r.stdout
    assert not list(save.glob("*.pt"))
    r = train(data, tmp_path / "ls", "mhe", "--label-smoothing", "0.1", criterion="label_smoothed_cross_entropy")
    assert "--criterion label_smoothed_cross_entropy builds the full (B, T, V) row" in r.stdout
    assert "num_updates 6" in r.stdout or "num_updates: 6" in r.stdout


@pytest.mark.e2e
def test_too_many_heads_cli(data, tmp_path):
    r = train(data, tmp_path / "h20", "mhe", "--mhce-heads", "20", check=False)
    assert r.returncode != 0 and "would always predict digit 0" in r.stdout, r.stdout[-2000:]
    assert not (tmp_path / "h20").exists() or not list((tmp_path / "h20").glob("*.pt"))
