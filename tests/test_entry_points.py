"""Every entry point builds the same output layer: ``fairseq-train`` with the
documented flags, ``fairseq-hydra-train`` with ``configs/*.yaml`` (and
overrides), ``scripts/recipes/train.sh`` and the hub; bad values are refused on the
hydra path as on the command line."""

import pytest

import fairseq_mhce  # noqa: F401

from .utils import REPO, USER_DIR, cli, fairseq_train, make_copy_data, read_checkpoint, recipe

pytestmark = pytest.mark.e2e

# the yaml's model, one layer each side (only the output layer is compared)
SIZES = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "256", "--decoder-embed-dim", "256"]
HYDRA_SIZES = ["model.encoder_layers=1", "model.decoder_layers=1"]
# per method: (fairseq-train / train.sh flags, hydra overrides) asking for the same head
CASES = {
    "mhe": (["--share-decoder-input-output-embed"], ["model.share_decoder_input_output_embed=true"]),
    "mhp": (["--mhce-shortlist", "8"], ["+model.mhce_shortlist=8"]),
    "mhs": ([], []),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_copy_data(
        tmp_path_factory.mktemp("entry"), n_train=300, n_valid=20, n_test=20, n_words=60, langs=("de", "en")
    )


def signature(state: dict) -> dict:
    """What defines the output layer: its tensors' names and shapes, the
    method, head sizes and code table, and whether it is tied."""
    head = {k[len("decoder.mhce_head.") :]: v for k, v in state.items() if k.startswith("decoder.mhce_head.")}
    return {
        "shapes": {k: tuple(v.shape) for k, v in head.items()},
        "method": int(head["method_id"]),
        "sizes": head["codec.head_sizes"].tolist(),
        "code": head["codec.code"].tolist(),
        "tied": "tied_output" in head,
    }


def ckpt_signature(save_dir):
    return signature(read_checkpoint(save_dir / "checkpoint_last.pt")["model"])


def train_cli(data, save, method, extra):
    method_flag = ["--mhce-method", method] if method != "mhe" else []  # mhe: the default
    fairseq_train(data, save, *method_flag, *extra, updates=1, arch="transformer_iwslt_de_en_mhce", sizes=SIZES)


def train_hydra(data, save, method, overrides, check=True):
    return cli(
        "fairseq-hydra-train",
        "--config-dir",
        REPO / "configs",
        "--config-name",
        f"{method}_iwslt",
        f"task.data={data}",
        f"checkpoint.save_dir={save}",
        "optimization.max_update=1",
        "dataset.max_tokens=2000",
        *HYDRA_SIZES,
        *overrides,
        check=check,
        cwd=REPO,
    )


@pytest.mark.parametrize("method", ["mhe", "mhp", "mhs"])
def test_every_entry_point_builds_the_same_head(data, tmp_path, method):
    flags, overrides = CASES[method]
    train_cli(data, tmp_path / "cli", method, flags)
    want = ckpt_signature(tmp_path / "cli")
    assert want["method"] == {"mhp": 1, "mhe": 2, "mhs": 3}[method]
    train_hydra(data, tmp_path / "hydra", method, overrides)
    assert ckpt_signature(tmp_path / "hydra") == want
    if method == "mhs":
        return
    assert want["tied"] == (method == "mhe") and want["code"] != sorted(want["code"])  # tied; PPMI codes
    if method == "mhe":
        assert "token_vectors" not in want["shapes"] and "token_bias" in want["shapes"]  # per-token, tied
    else:
        assert want["shapes"]["proj.weight"][0] == sum(want["sizes"]) + 8 + 1  # shortlist 8 + the tail
    recipe("train.sh", method, data, tmp_path / "recipe", *flags, *SIZES, "--max-update", "1", "--max-tokens", "2000")
    assert ckpt_signature(tmp_path / "recipe") == want
    from fairseq.models.transformer import TransformerModel

    hub = TransformerModel.from_pretrained(str(tmp_path / "cli"), "checkpoint_last.pt", str(data), user_dir=USER_DIR)
    assert signature(hub.models[0].state_dict()) == want


@pytest.mark.parametrize(
    "method,override,message",
    [
        ("mhp", "+model.mhce_head_sizes='4,4'", "below the vocabulary size"),
        ("mhp", "+model.mhce_heads=abc", "--mhce-heads must be an integer"),
        ("mhe", "+model.mhce_last_head=bogus", "--mhce-last-head 'bogus': choose one of"),
        ("mhe", "+model.mhce_code_table=/nonexistent/codes.json", "no such file"),
        ("mhe", "+model.mhce_shortlist=8", "Drop --mhce-shortlist"),
    ],
)
def test_hydra_refuses_bad_values(data, tmp_path, method, override, message):
    r = train_hydra(data, tmp_path / "bad", method, [override], check=False)
    assert r.returncode != 0 and message in r.stdout, r.stdout[-2000:]
    assert not (tmp_path / "bad" / "checkpoint_last.pt").exists()
