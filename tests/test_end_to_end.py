"""The real fairseq CLIs on a tiny copy task: preprocess -> train (MHP, MHE)
-> generate / interactive / score-reference / hub API, resume, bad configs."""

import math
import re
import shutil

import pytest

from .utils import (
    SHARED_MODELS,
    USER_DIR,
    bleu_of,
    cli,
    fairseq_train,
    generate,
    hypotheses,
    make_copy_data,
    train_tiny,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def data(copy_bin):
    return copy_bin


@pytest.fixture(scope="module")
def trained(trained_mhp, trained_mhe):
    """The shared MHP (H = 2) and MHE (H = 3, --eval-bleu on) models of
    tests/conftest.py, 200 updates each: {method: (save dir, train output)}."""
    return {"mhp": trained_mhp, "mhe": trained_mhe}


def beam5(data, ckpt, *extra):
    """fairseq-generate's output: beam 5, batches of 64 sentences."""
    return generate(data, ckpt, "--batch-size", "64", "--beam", "5", *extra).stdout


@pytest.mark.parametrize("method", ["mhp", "mhe"])
def test_copy_task_learned_and_logged_like_fairseq(trained, data, method):
    save_dir, log = trained[method]
    # fairseq's own progress lines carry the criterion's metrics
    valid = [ln for ln in log.splitlines() if "| valid |" in ln]
    assert valid and re.search(r"nll_loss [0-9.]+ .*ppl [0-9.]+", valid[-1]), valid[-1:]
    assert "acc_h1" in valid[-1] and "accuracy" in valid[-1]
    first_loss = float(re.search(r"loss=([0-9.]+)", [ln for ln in log.splitlines() if "train_inner" in ln][0]).group(1))
    last_loss = float(re.search(r"\| loss ([0-9.]+)", valid[-1]).group(1))
    assert last_loss < first_loss / 2
    if method == "mhe":
        assert re.search(r"\| bleu [0-9.]+", valid[-1]), valid[-1]  # --eval-bleu ran
    out = beam5(data, save_dir / "checkpoint_best.pt", "--scoring", "sacrebleu")
    assert bleu_of(out) > 90, out[-500:]


@pytest.mark.parametrize("method", ["mhp", "mhe"])
def test_reload_reproduces_hypotheses_and_interactive_agrees(trained, data, method):
    ckpt = trained[method][0] / "checkpoint_best.pt"
    # the reloaded checkpoint through two independent decoders: fairseq's dense
    # row and the factorized search must give the same n-best lists
    a = hypotheses(beam5(data, ckpt, "--nbest", "2"))
    b = hypotheses(beam5(data, ckpt, "--nbest", "2", "--task", "translation_mhce", "--mhce-search", "factorized"))
    assert len(a) > 50 and all(len(v) == 2 for v in a.values())
    assert a.keys() == b.keys()
    for sid in a:
        assert [t for t, _ in a[sid]] == [t for t, _ in b[sid]], sid
        assert all(abs(x - y) < 1e-3 for (_, x), (_, y) in zip(a[sid], b[sid])), sid
    src = "w1 w2 w3 w4 w5"
    out = cli(
        "fairseq-interactive",
        data,
        "--user-dir",
        USER_DIR,
        "--path",
        ckpt,
        "--beam",
        "5",
        "--source-lang",
        "src",
        "--target-lang",
        "tgt",
        stdin=src + "\n",
    ).stdout
    h = [ln for ln in out.splitlines() if ln.startswith("H-0")]
    assert h and h[0].split("\t")[2] == src


@pytest.mark.parametrize("method", ["mhp", "mhe"])
def test_generation_features(trained, data, method):
    ckpt = trained[method][0] / "checkpoint_best.pt"
    # prefix tokens: every hypothesis starts with the reference's first token
    out = beam5(data, ckpt, "--prefix-size", "1")
    refs = {int(ln.split("\t")[0][2:]): ln.split("\t")[1] for ln in out.splitlines() if ln.startswith("T-")}
    for sid, hyps in hypotheses(out).items():
        assert hyps[0][0].split()[0] == refs[sid].split()[0]
    # sampling, n-gram blocking, length and unk penalties all run through the heads
    for flags in (
        ["--sampling", "--sampling-topk", "5", "--beam", "1", "--seed", "3"],
        ["--no-repeat-ngram-size", "2", "--lenpen", "0.5", "--unkpen", "1.0"],
        ["--max-len-b", "3", "--max-len-a", "0", "--min-len", "2"],
    ):
        out = beam5(data, ckpt, *flags)
        hyps = hypotheses(out)
        assert len(hyps) > 50, flags
        if "--sampling" in flags:  # it samples: another seed draws other hypotheses somewhere
            other = hypotheses(beam5(data, ckpt, *flags[:-1], "4"))
            assert any(other[i][0][0] != hyps[i][0][0] for i in hyps if i in other)
        words = [h[0][0].split() for h in hyps.values()]
        if "--min-len" in flags:  # between --min-len and --max-len-b tokens (eos not counted)
            assert all(2 <= len(w) <= 3 for w in words), [len(w) for w in words][:20]
    out = beam5(data, ckpt, "--max-len-b", "3", "--max-len-a", "0")
    assert all(len(h[0][0].split()) <= 3 for h in hypotheses(out).values())
    # --score-reference: scores the references through get_normalized_probs
    out = beam5(data, ckpt, "--score-reference")
    scores = [s for hyps in hypotheses(out).values() for _, s in hyps]
    # finite log-probabilities of the references; a learned copy task scores them well on average
    # (single references of the H = 3 MHE with its automatic code table can fall below -1 at 200 updates)
    assert scores and all(math.isfinite(s) and s <= 0 for s in scores)
    assert sum(scores) / len(scores) > -1.0, sum(scores) / len(scores)


def test_hub_api_translates(trained, data):
    from fairseq.models.transformer import TransformerModel

    save_dir = trained["mhp"][0]
    model = TransformerModel.from_pretrained(
        str(save_dir), checkpoint_file="checkpoint_best.pt", data_name_or_path=str(data), user_dir=USER_DIR
    )
    assert model.translate("w3 w1 w4 w1 w5", beam=5) == "w3 w1 w4 w1 w5"


def test_resume_from_checkpoint_last(trained, data, tmp_path):
    # a copy of the shared MHP run (checkpoint_last.pt at 200 updates, its code table) trained on to 220
    save_dir = tmp_path / "resume"
    shutil.copytree(trained["mhp"][0], save_dir)
    updates, flags = SHARED_MODELS["mhp"]
    second = train_tiny(data, save_dir, "mhp", *flags, updates=updates + 20)
    assert re.search(rf"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ {updates} updates\)", second), second[
        -3000:
    ]
    assert f"num_updates={updates + 20}" in second or f"num_updates {updates + 20}" in second


@pytest.mark.parametrize(
    "arch,flags,needles",
    [
        ("transformer_mhce", ["--mhce-method", "mhp", "--mhce-head-sizes", "3,3"], ["below the vocabulary size"]),
        # unknown method: argparse names the choices
        ("transformer_mhce", ["--mhce-method", "mhx"], ["invalid choice", "mhe"]),
        # the criterion with a softmax model
        ("transformer", [], ["needs a model with a multi-head output layer"]),
        # the shared-last-head MHE has no per-token vectors to tie to
        (
            "transformer_mhce",
            ["--mhce-method", "mhe", "--mhce-last-head", "shared", "--share-decoder-input-output-embed"],
            ["last-head shared has none"],
        ),
    ],
    ids=["sizes-below-V", "unknown-method", "softmax-model", "tied-shared-last-head"],
)
def test_bad_configurations_fail_clearly(data, tmp_path, arch, flags, needles):
    r = fairseq_train(data, tmp_path / "save", *flags, arch=arch, updates=1, check=False)
    assert r.returncode != 0 and all(n in r.stdout for n in needles), r.stdout[-2000:]


@pytest.mark.parametrize(
    "override,message",
    [
        ("{'mhce_head_sizes': '8,8'}", "trained with --mhce-head-sizes"),
        ("{'mhce_method': 'mhe'}", "trained with --mhce-method mhp"),
    ],
)
def test_checkpoint_into_another_head_fails_clearly(trained, data, override, message):
    """A checkpoint loaded into a model with other head sizes / another method."""
    ckpt = trained["mhp"][0] / "checkpoint_best.pt"
    before = ckpt.read_bytes()
    r = generate(data, ckpt, "--model-overrides", override, check=False)
    assert r.returncode != 0 and message in r.stdout, r.stdout[-2000:]
    assert ckpt.read_bytes() == before  # a failed load never touches the checkpoint


def test_dictionary_mismatch_is_explained(trained, tmp_path):
    other = make_copy_data(tmp_path, n_train=200, n_valid=20, n_test=20, n_words=80, seed=5)
    r = generate(other, trained["mhe"][0] / "checkpoint_best.pt", check=False)
    assert r.returncode != 0 and "dictionary mismatch" in r.stdout, r.stdout[-2000:]
