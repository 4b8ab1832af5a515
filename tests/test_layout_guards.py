"""Issue 30, defects 1-3 and 5-10: nothing silently wrong across tie layouts,
reverse directions and odd option values.

* a ``--share-all-embeddings`` MHP / MHE checkpoint decoded or resumed as
  decoder-tied (its rows are stored in code order), a decoder-tied one as
  share-all, and an MHS checkpoint loaded with the other tie setting are
  refused, naming both layouts; each layout still decodes as trained
  (defects 1, 3);
* a data-bin made ``src->tgt`` and trained ``-s tgt -t src``: the automatic
  code table and ``mhce-build-codes --target-lang src`` read
  ``train.src-tgt.src`` as fairseq does (defect 2);
* ``--mhce-code-seed -5`` is refused naming the flag (defect 5);
* a code table holding an integer beyond int64 names the file: as a cache it
  is rebuilt, as ``--mhce-code-table`` refused (defect 6);
* resuming with another ``--mhce-code-order`` / ``--mhce-code-seed`` keeps
  the run's table, says so, and the saved config keeps the values the run
  was started with (defect 7);
* ``mhce-average-checkpoints`` refuses a decoder-tied and a share-all
  checkpoint (defect 8);
* MHP tied below 4096 types: the refusal names the automatic shortlist and
  what to pass (defect 9);
* ``mhce-prepare-data`` refuses a language name that is a path, and
  ``mhce-build-codes`` a ``prepare_data.json`` that is not an object, with
  one line and exit 2 (defect 10).

Tiny runs: 1+1 layers, d 32, two updates on the shared copy data-bin.
"""

import argparse
import json
import shutil
from argparse import Namespace

import numpy as np
import pytest
import torch
from fairseq.data import Dictionary

import fairseq_mhce  # noqa: F401
from fairseq_mhce.cli import average_checkpoints as avg
from fairseq_mhce.cli import build_codes as build_codes_cli
from fairseq_mhce.cli import prepare_data
from fairseq_mhce.codes import table as ct
from fairseq_mhce.config import resolve_settings
from fairseq_mhce.models.transformer_mhce import MHCEConfig, build_output_layer
from fairseq_mhce.training_start import CACHE_NAME, settle_code_table

from .utils import MICRO_ARCH, USER_DIR, cli, read_checkpoint, tree_hashes

LAYOUT_FLAGS = {
    "all": ["--share-all-embeddings"],
    "decoder": ["--share-decoder-input-output-embed"],
    "untied": [],
}
# the per-token vectors a tied output needs: MHP's shortlist (V = 48 < 4096: no automatic one)
METHOD_FLAGS = {"mhp": ["--mhce-shortlist", "8"], "mhe": [], "mhs": ["--mhce-head-sizes", "12,4"]}


def train(data, save, *extra, updates=2, check=True):
    """fairseq-train of the micro transformer_mhce (two updates, no validation)."""
    return cli(
        "fairseq-train", data, "--user-dir", USER_DIR, "--arch", "transformer_mhce", *MICRO_ARCH,
        "--criterion", "mhce_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "500", "--max-update", updates,
        "--disable-validation", "--no-progress-bar", "--no-epoch-checkpoints", "--num-workers", "0",
        "--seed", "1", "--save-dir", save, *extra, check=check,
    )  # fmt: skip


def generate(data, ckpt, *extra):
    return cli(
        "fairseq-generate", data, "--user-dir", USER_DIR, "--path", ckpt, "--gen-subset", "valid",
        "--beam", "2", "--max-len-a", "0", "--max-len-b", "10", "--max-tokens", "4000", "--num-workers", "0",
        *extra, check=False,
    )  # fmt: skip


def last_line(text):
    return [line for line in text.strip().splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def runs(copy_bin, tmp_path_factory):
    """{(method, layout): checkpoint_last.pt} of two-update runs."""
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for method, layout in (("mhp", "all"), ("mhe", "all"), ("mhe", "decoder"), ("mhs", "untied"), ("mhs", "decoder")):
        save = root / f"{method}_{layout}"
        train(copy_bin, save, "--mhce-method", method, *METHOD_FLAGS[method], *LAYOUT_FLAGS[layout])
        out[method, layout] = save / "checkpoint_last.pt"
    return out


OVERRIDES = {
    "all": "{'share_all_embeddings': True, 'share_decoder_input_output_embed': True}",
    "decoder": "{'share_all_embeddings': False, 'share_decoder_input_output_embed': True}",
    "untied": "{'share_all_embeddings': False, 'share_decoder_input_output_embed': False}",
}


# ------------------------------------------------------------ defects 1 and 3
@pytest.mark.e2e
@pytest.mark.parametrize(
    "method,trained,loaded",
    [
        ("mhp", "all", "decoder"),  # defect 1: code-order rows read as token order by the encoder
        ("mhe", "all", "decoder"),
        ("mhe", "decoder", "all"),  # the encoder's own embedding overwritten by the decoder's
        ("mhs", "untied", "decoder"),  # defect 3
        ("mhs", "decoder", "untied"),
    ],
)
def test_tie_layout_mismatch_is_refused_naming_both(copy_bin, runs, method, trained, loaded):
    ckpt = runs[method, trained]
    before = tree_hashes(ckpt)
    ok = generate(copy_bin, ckpt)  # as trained: decodes
    assert ok.returncode == 0 and "H-0\t" in ok.stdout, ok.stdout[-3000:]
    p = generate(copy_bin, ckpt, "--model-overrides", OVERRIDES[loaded])
    assert p.returncode != 0, p.stdout[-3000:]
    names = {"all": "--share-all-embeddings", "decoder": "--share-decoder-input-output-embed", "untied": "untied"}
    line = last_line(p.stdout)
    assert names[trained] in line and names[loaded] in line and "tie layout" in line, line
    assert "H-0\t" not in p.stdout and tree_hashes(ckpt) == before


@pytest.mark.e2e
def test_share_all_checkpoint_resumed_as_decoder_tied_is_refused(copy_bin, runs, tmp_path):
    ckpt = runs["mhe", "all"]
    before = tree_hashes(ckpt)
    save = tmp_path / "save"
    p = train(
        copy_bin, save, "--mhce-method", "mhe", "--share-decoder-input-output-embed",
        "--restore-file", ckpt, "--reset-optimizer", "--reset-dataloader", "--reset-meters",
        updates=4, check=False,
    )  # fmt: skip
    assert p.returncode != 0, p.stdout[-3000:]
    line = last_line(p.stdout)
    assert "--share-all-embeddings" in line and "--share-decoder-input-output-embed" in line, line
    assert not list(save.glob("*.pt")) and tree_hashes(ckpt) == before


# ------------------------------------------------------------ defect 8
def _layout_ckpt(path, layout, seed):
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(6, 4, generator=g)
    enc = dec if layout == "all" else torch.randn(6, 4, generator=g)
    model = {
        "encoder.embed_tokens.weight": enc,
        "decoder.embed_tokens.weight": dec,
        "decoder.mhce_head.tied_output": torch.tensor(1),
        "decoder.mhce_head.codec.head_sizes": torch.tensor([3, 2]),
    }
    cfg = {"model": argparse.Namespace(arch="transformer_mhce", mhce_method="mhe"), "task": {}}
    torch.save({"model": model, "cfg": cfg, "extra_state": {}}, path)
    return str(path)


def test_average_refuses_decoder_tied_with_share_all(tmp_path):
    a = _layout_ckpt(tmp_path / "a.pt", "decoder", 1)
    b = _layout_ckpt(tmp_path / "b.pt", "all", 2)
    with pytest.raises(avg.AverageError, match="--share-decoder-input-output-embed.*--share-all-embeddings"):
        avg.average_checkpoints([a, b])
    with pytest.raises(avg.AverageError, match="--share-all-embeddings.*--share-decoder-input-output-embed"):
        avg.average_checkpoints([b, a])
    # one layout averages
    c = _layout_ckpt(tmp_path / "c.pt", "all", 3)
    out = avg.average_checkpoints([b, c])["model"]
    assert torch.equal(out["encoder.embed_tokens.weight"], out["decoder.embed_tokens.weight"])


# ------------------------------------------------------------ defect 2
@pytest.mark.e2e
def test_reverse_direction_reads_the_data_bin_as_fairseq_does(copy_bin, tmp_path):
    before = tree_hashes(copy_bin)
    assert not list(copy_bin.glob("train.tgt-src.*"))
    table = tmp_path / "codes_src.json"
    p = cli("mhce-build-codes", "--databin", copy_bin, "--target-lang", "src", "--out", table, check=False)
    assert p.returncode == 0, p.stdout[-3000:]
    assert "train.src-tgt.src" in json.loads(table.read_text())["meta"]["train_split"]
    save = tmp_path / "save"
    train(copy_bin, save, "--mhce-method", "mhe", "-s", "tgt", "-t", "src", updates=1)
    cache = ct.read_code_table(save / CACHE_NAME)
    assert "train.src-tgt.src.bin" in cache["meta"]["train_data"]["path"]
    assert cache["code"] == json.loads(table.read_text())["code"]  # the same table, as for the forward direction
    assert tree_hashes(copy_bin) == before


# ------------------------------------------------------------ defect 5
def test_negative_code_seed_is_refused_where_the_option_is_defined():
    from omegaconf import OmegaConf

    for cfg in (Namespace(mhce_code_seed=-5), OmegaConf.create({"mhce_code_seed": -5})):
        with pytest.raises(ValueError, match="--mhce-code-seed must be >= 0, got -5"):
            resolve_settings(cfg)
    with pytest.raises(ValueError, match="--mhce-code-seed must be <= "):
        resolve_settings(Namespace(mhce_code_seed=2**64))
    assert resolve_settings(Namespace(mhce_code_seed=0)).mhce_code_seed == 0


@pytest.mark.e2e
def test_negative_code_seed_on_the_command_line(copy_bin, tmp_path):
    p = train(copy_bin, tmp_path / "save", "--mhce-method", "mhe", "--mhce-code-seed", "-5", updates=1, check=False)
    assert p.returncode == 1 and "--mhce-code-seed must be >= 0, got -5" in last_line(p.stdout), p.stdout[-3000:]
    assert "SeedSequence" not in p.stdout and not list((tmp_path / "save").glob("*.pt"))


# ------------------------------------------------------------ defect 6
def _cfg(**kw):
    c = Namespace(**{k: f.default for k, f in MHCEConfig.__dataclass_fields__.items()})
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _huge_table(path, V, sizes, symbols=None):
    symbols = symbols or [f"w{i}" for i in range(V)]
    ct.save_code_table(path, np.arange(V), sizes, symbols)
    obj = json.loads(path.read_text())
    obj["code"][5] = 2**70
    path.write_text(json.dumps(obj))


def test_code_table_with_an_integer_beyond_int64_names_the_file(tmp_path):
    d = Dictionary()
    for i in range(40):
        d.add_symbol(f"w{i}")
    V = len(d)
    path = tmp_path / "huge.json"
    _huge_table(path, V, [7, 7], d.symbols)
    with pytest.raises(ValueError, match=f"the code table {path}: field 'code' .*entry 5.*damaged"):
        ct.load_code_table(path, V, [7, 7], d.symbols)
    with pytest.raises(ValueError, match=f"the code table {path}: field 'code'"):
        build_output_layer(_cfg(mhce_method="mhe", mhce_code_table=str(path), mhce_head_sizes="7,7"), 16, d)


@pytest.mark.e2e
def test_cache_with_an_integer_beyond_int64_is_rebuilt(copy_bin, tmp_path):
    d = Dictionary.load(str(copy_bin / "dict.tgt.txt"))
    save = tmp_path / "save"

    def settle():
        settings = resolve_settings(_cfg(mhce_method="mhe"))
        head = build_output_layer(settings, 16, d)
        task = Namespace(cfg=Namespace(data=str(copy_bin), source_lang="src", target_lang="tgt"), target_dictionary=d)
        settle_code_table(Namespace(decoder=Namespace(mhce_head=head, _mhce_settings=settings)), task, str(save))
        return head.codec.code.clone()

    good = settle()
    cache = save / CACHE_NAME
    obj = json.loads(cache.read_text())
    obj["code"][5] = 2**70
    cache.write_text(json.dumps(obj))
    assert torch.equal(settle(), good)
    assert ct.read_code_table(cache)["code"] == good.tolist()


# ------------------------------------------------------------ defect 7
@pytest.mark.e2e
def test_resume_with_another_code_order_keeps_table_and_saved_config(copy_bin, tmp_path):
    save = tmp_path / "save"
    train(copy_bin, save, "--mhce-method", "mhe", "--mhce-code-order", "random", "--mhce-code-seed", "3")

    def saved():
        state = read_checkpoint(save / "checkpoint_last.pt")
        model = state["cfg"]["model"]
        return model.mhce_code_order, model.mhce_code_seed, state["model"]["decoder.mhce_head.codec.code"]

    order, seed, code = saved()
    assert (order, seed) == ("random", 3)
    out = train(
        copy_bin, save, "--mhce-method", "mhe", "--mhce-code-order", "ppmi", "--mhce-code-seed", "4", updates=3
    ).stdout
    lines = [line for line in out.splitlines() if "keeps the code table" in line]
    assert len(lines) == 1, out[-3000:]
    assert "--mhce-code-order random --mhce-code-seed 3" in lines[0], lines[0]
    assert "--mhce-code-order ppmi --mhce-code-seed 4" in lines[0], lines[0]
    order2, seed2, code2 = saved()
    assert (order2, seed2) == ("random", 3) and torch.equal(code2, code)
    assert "num_updates" in out and not (save / CACHE_NAME).exists()  # no PPMI table was built


# ------------------------------------------------------------ defect 9
def test_tied_mhp_below_the_automatic_shortlist_size_says_what_to_pass():
    V = 48
    with pytest.raises(ValueError) as e:  # the automatic size is resolved with the options, at model build
        resolve_settings(Namespace(mhce_method="mhp", share_decoder_input_output_embed=True), V)
    msg = str(e.value)
    assert "--mhce-shortlist 0" not in msg, msg
    assert "automatic" in msg and "4096" in msg and f"V = {V}" in msg, msg
    assert "--mhce-shortlist N" in msg and "--mhce-method mhe" in msg, msg


# ------------------------------------------------------------ defect 10
@pytest.mark.e2e
@pytest.mark.parametrize("flag", ["-s", "-t"])
def test_prepare_data_refuses_a_language_name_that_is_a_path(tmp_path, capsys, flag):
    text = tmp_path / "t"
    (text / "train.d").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    lines = "".join(f"hallo welt {i}\n" for i in range(30))
    (tmp_path / "outside" / "x").write_text(lines)
    (text / "train.en").write_text(lines)
    before = tree_hashes(tmp_path)
    bad = "d/../../outside/x"
    langs = ["-s", bad, "-t", "en"] if flag == "-s" else ["-s", "en", "-t", bad]
    argv = [*langs, "--trainpref", str(text / "train"), "--destdir", str(tmp_path / "bin")]
    rc = prepare_data.main([*argv, "--tokenizer", "moses-word", "--vocab-size", "0", "--workers", "1"])
    err = capsys.readouterr().err
    name = "--source-lang" if flag == "-s" else "--target-lang"
    assert rc == 2 and "Traceback" not in err, err
    assert name in last_line(err) and repr(bad) in last_line(err), err
    assert tree_hashes(tmp_path) == before and not (tmp_path / "bin").exists()


@pytest.mark.e2e
def test_build_codes_refuses_a_prepare_data_json_that_is_not_an_object(copy_bin, tmp_path, capsys):
    databin = tmp_path / "bin"
    shutil.copytree(copy_bin, databin)
    (databin / "prepare_data.json").write_text("[1, 2]\n")
    before = tree_hashes(databin)
    rc = build_codes_cli.main(["--databin", str(databin), "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr()
    text = err.out + err.err
    assert rc == 2 and "Traceback" not in text, text
    assert "prepare_data.json" in last_line(text) and "--target-lang" in last_line(text), text
    assert tree_hashes(databin) == before and not (tmp_path / "c.json").exists()
