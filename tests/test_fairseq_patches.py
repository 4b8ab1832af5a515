"""What the plugin changes in fairseq (fairseq_mhce/fairseq_patches.py): the
list of patched fairseq attributes, applied once (also when the plugin is
imported again under another module name), the adaptive-softmax repair, and a
stock fairseq ``transformer`` that loads, trains on and decodes exactly as
without the plugin."""

import subprocess
import sys

import pytest
import torch

from fairseq_mhce import fairseq_patches
from fairseq_mhce.safe_load import load_checkpoint

from .utils import MICRO_ARCH, TRAIN_COMMON, USER_DIR, cli

# every fairseq object the plugin replaces (fairseq_patches' docstring says why)
PATCHED = {
    "fairseq.checkpoint_utils.torch",
    "fairseq.distributed.utils.torch",
    "fairseq.checkpoint_utils.PathManager",
    "fairseq.checkpoint_utils.load_checkpoint",
    "fairseq.checkpoint_utils.load_checkpoint_to_cpu",
    "fairseq.trainer.Trainer.load_checkpoint",
    "fairseq.models.transformer.transformer_decoder.TransformerDecoderBase.upgrade_state_dict_named",
    "fairseq.data.iterators (atexit: stop_background_consumers)",
}


def adaptive_shared_model(root, share):
    """A stock fairseq ``transformer`` with an adaptive softmax and ``share``
    (a sharing flag) over a joined 60-symbol dictionary, built in-process."""
    from fairseq import options, tasks

    root.mkdir(parents=True, exist_ok=True)
    for lang in ("src", "tgt"):
        (root / f"dict.{lang}.txt").write_text("".join(f"w{i} {1000 - i}\n" for i in range(56)))
    args = options.parse_args_and_arch(
        options.get_training_parser(),
        [
            str(root), "--arch", "transformer", "--source-lang", "src", "--target-lang", "tgt",
            "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
            "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2",
            "--decoder-attention-heads", "2", "--adaptive-softmax-cutoff", "20,40", "--criterion", "adaptive_loss",
            share,
        ],
    )  # fmt: skip
    task = tasks.setup_task(args)
    return args, task.build_model(args)


def test_adaptive_softmax_with_shared_embeddings_loads_its_own_state(tmp_path):
    for share in ("--share-all-embeddings", "--share-decoder-input-output-embed"):
        args, model = adaptive_shared_model(tmp_path / share, share)
        assert model.decoder.adaptive_softmax is not None and model.decoder.output_projection is None
        state = {k: v.clone() for k, v in model.state_dict().items()}
        # fairseq's load path: upgrade (which would add decoder.output_projection.weight), then a strict load
        model.load_state_dict(state, strict=True, model_cfg=None)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_the_patched_fairseq_attributes():
    patched = fairseq_patches.patched()
    assert set(patched) == PATCHED
    assert fairseq_patches.apply() == []  # made already: nothing again
    assert fairseq_patches.patched() == patched
    # one wrapper each: under it, fairseq's own function
    for name, obj in patched.items():
        inner = getattr(obj, "__wrapped__", None)
        assert inner is None or not hasattr(inner, fairseq_patches.FLAG), name
    from fairseq import checkpoint_utils

    assert checkpoint_utils.load_checkpoint_to_cpu.__wrapped__.__module__ == "fairseq.checkpoint_utils"
    assert torch.load.__module__ == "torch.serialization"  # torch itself is not changed


# a second import of the plugin in a fresh interpreter: (1) the whole package
# under another name, as a --user-dir copy or link would import it (fairseq's
# registries refuse its task and models a second time); (2) the patches module
# itself run again under that name (its own classes and wrappers, the rest of
# the plugin the first import's): neither changes fairseq again
TWICE = """
import importlib, importlib.util, sys
import fairseq_mhce
from fairseq_mhce import fairseq_patches

def snapshot():
    return {name: id(obj) for name, obj in fairseq_patches.patched().items()}

first = snapshot()
pkg = fairseq_mhce.__path__[0]
spec = importlib.util.spec_from_file_location("mhce_again", pkg + "/__init__.py", submodule_search_locations=[pkg])
again = importlib.util.module_from_spec(spec)
sys.modules["mhce_again"] = again
try:
    spec.loader.exec_module(again)
except ValueError as e:
    assert "duplicate" in str(e), e
assert snapshot() == first, "the second package import patched fairseq again"
for name, mod in list(sys.modules.items()):
    if name.startswith("fairseq_mhce.") and name != "fairseq_mhce.fairseq_patches":
        sys.modules["mhce_again" + name[len("fairseq_mhce"):]] = mod
sys.modules.pop("mhce_again.fairseq_patches", None)
second = importlib.import_module("mhce_again.fairseq_patches")
assert second is not fairseq_patches and second._TorchLoad is not fairseq_patches._TorchLoad
assert second.apply() == [], "the patches module under another name patched fairseq again"
assert snapshot() == first and set(first) == set(second.patched())
print("ok", len(first))
"""


def test_importing_the_plugin_twice_patches_once():
    p = subprocess.run([sys.executable, "-c", TWICE], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.split()[-2:] == ["ok", str(len(PATCHED))], p.stdout + p.stderr[-3000:]


# -- a stock fairseq transformer: the same with and without the plugin -------------
STOCK = ["--arch", "transformer", *MICRO_ARCH, "--criterion", "label_smoothed_cross_entropy", *TRAIN_COMMON]
STOCK += ["--data-buffer-size", "0"]  # no prefetch thread: stock fairseq can abort in it at exit (status 134)
NO_PLUGIN = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # how stock fairseq reads a checkpoint on torch >= 2.6


def same(a, b) -> bool:
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def decoded(output: str) -> list:
    return sorted(line for line in output.splitlines() if line[:2] in ("S-", "T-", "H-", "D-", "P-"))


@pytest.mark.e2e
def test_a_stock_transformer_is_unchanged_by_the_plugin(copy_bin, tmp_path):
    base = tmp_path / "base"
    cli("fairseq-train", copy_bin, *STOCK, "--max-update", "2", "--save-dir", base)  # stock fairseq, own process
    ckpt = base / "checkpoint_last.pt"
    # trains on (--restore-file) alike: the same parameters and optimizer state, bit for bit
    resumed = {}
    for who, extra, env in (("stock", [], NO_PLUGIN), ("plugin", ["--user-dir", USER_DIR], None)):
        save = tmp_path / who
        p = cli("fairseq-train", copy_bin, *STOCK, *extra, "--max-update", "3", "--restore-file", ckpt,
                "--save-dir", save, env=env)  # fmt: skip
        assert "Loaded checkpoint" in p.stdout and "@ 2 updates)" in p.stdout, p.stdout[-2000:]
        resumed[who] = load_checkpoint(save / "checkpoint_last.pt")
    a, b = resumed["stock"], resumed["plugin"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    opt_a, opt_b = a["last_optimizer_state"]["state"], b["last_optimizer_state"]["state"]
    assert opt_a.keys() == opt_b.keys() and all(same(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    # decodes alike: the same hypotheses, scores and positional scores (at most source length
    # + 2 tokens: a model of 2 updates rarely stops, and 200 steps a sentence would show nothing more)
    args = ["--path", ckpt, "--beam", "2", "--batch-size", "32", "--max-len-a", "1", "--max-len-b", "2"]
    stock = cli("fairseq-generate", copy_bin, *args, env=NO_PLUGIN).stdout
    plugin = cli("fairseq-generate", copy_bin, *args, "--user-dir", USER_DIR).stdout
    assert sum(line.startswith("H-") for line in decoded(stock)) >= 90  # the test set, decoded
    assert decoded(plugin) == decoded(stock)


def test_the_adaptive_softmax_patch_is_applied_once():
    from fairseq.models.transformer.transformer_decoder import TransformerDecoderBase

    method = TransformerDecoderBase.upgrade_state_dict_named
    assert getattr(method, fairseq_patches.FLAG, None)
    assert not hasattr(method.__wrapped__, fairseq_patches.FLAG)  # one wrapper around fairseq's method
