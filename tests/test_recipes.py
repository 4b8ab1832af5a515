"""The recipes on tiny copy data, with the real tools: scripts/recipes/train.sh +
scripts/recipes/translate.sh for every output layer, scripts/benchmarks/compare.py's tables
from those runs, and a configs/ file through the real fairseq-hydra-train."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import sacrebleu

from .utils import BIN, REPO, USER_DIR, arch_sizes, cli, load_script, make_copy_data, recipe, tree_hashes

pytestmark = pytest.mark.e2e

# tiny model (the extra args of train.sh come last and override its sizes)
TINY = [*arch_sizes(1, 64), "--log-interval", "10", "--max-tokens", "2000"]
UPDATES = 40


METHODS = ["softmax", "adaptive", "mhp", "mhe", "mhs"]


def compare(*args, env=None):
    """scripts/benchmarks/compare.py in a process of its own (one thread), its
    stdout and stderr merged."""
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmarks" / "compare.py"), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    dest = make_copy_data(root, n_train=1000, n_valid=50, n_test=53)
    raw = dest / "raw"  # the untokenized references translate.sh scores against
    raw.mkdir()
    shutil.copyfile(root / "text" / "test.tgt", raw / "test.tgt")
    return dest


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Every method trained and translated once, into one compare-style workdir."""
    work = tmp_path_factory.mktemp("compare")
    out = {}
    for m in METHODS:
        train_out = recipe("train.sh", m, data, work / m, "--max-update", UPDATES, *TINY).stdout
        # copy sentences have <= 8 words: cap the length so that a barely
        # trained model does not decode 200 tokens per sentence
        translate = recipe("translate.sh", m, data, work / m, "--max-len-a", "0", "--max-len-b", "20")
        out[m] = (train_out, translate.stdout)
    return work, out


def test_recipes_explain_bad_input(data, tmp_path):
    """Missing tools, data-bins and checkpoints: exit status 2 and what to do."""
    for name in ("train.sh", "translate.sh"):  # too few arguments: the usage from the header
        p = recipe(name, "mhe", check=False)
        assert p.returncode == 2 and f"scripts/recipes/{name} METHOD DATABIN SAVEDIR" in p.stdout, p.stdout
    p = recipe("train.sh", "mhe", tmp_path / "nope", tmp_path / "save", check=False)
    assert p.returncode == 2 and "no data-bin at" in p.stdout
    (tmp_path / "text").mkdir()
    p = recipe("train.sh", "mhe", tmp_path / "text", tmp_path / "save", check=False)
    assert p.returncode == 2 and "is it a fairseq-preprocess data-bin" in p.stdout
    p = recipe("train.sh", "mhx", data, tmp_path / "save", check=False)
    assert p.returncode == 2 and "METHOD must be softmax, adaptive, mhp, mhe or mhs" in p.stdout
    p = recipe("translate.sh", "mhe", data, tmp_path / "save", check=False)
    assert p.returncode == 2 and "no checkpoint" in p.stdout
    # no fairseq in VENV nor on PATH
    p = recipe(
        "train.sh",
        "mhe",
        data,
        tmp_path / "save",
        check=False,
        env={"VENV": str(tmp_path / "novenv"), "PATH": "/usr/bin:/bin"},
    )
    assert p.returncode == 2 and "fairseq-train is neither in" in p.stdout and "make install" in p.stdout
    assert not (tmp_path / "save").exists()  # nothing was created by a failed call


@pytest.mark.parametrize("method", METHODS)
def test_train_and_translate_print_bleu(runs, data, method):
    work, out = runs
    train_out, translate_out = out[method]
    save = work / method
    # fairseq's own progress output is visible, and the run honoured the budget
    assert re.search(r"\| train_inner \|.*num_updates=10\b", train_out), train_out[-2000:]
    assert f"num_updates: {UPDATES} >= max_update: {UPDATES}" in train_out
    assert (save / "checkpoint_best.pt").exists() and (save / "train.log").exists()
    # BLEU and chrF with sacreBLEU signatures
    assert re.search(r"^BLEU: BLEU = [0-9.]+ .*\(nrefs:1\|case:mixed\|eff:no\|tok:13a", translate_out, re.M)
    assert re.search(r"^chrF: chrF2 = [0-9.]+", translate_out, re.M)
    # every test line has its hypothesis, in the original order
    refs = (data / "raw" / "test.tgt").read_text().splitlines()
    hyps = (save / "hyp.test.tgt").read_text().splitlines()
    assert len(hyps) == len(refs) == 53  # 53: not a multiple of fairseq's batch-size multiple 8
    gen = (save / "generate-test.txt").read_text()
    by_id = {int(x.split("\t")[0][2:]): x.split("\t")[2] for x in gen.splitlines() if x.startswith("D-")}
    assert hyps == [by_id[i] for i in range(len(refs))]
    score = json.loads((save / "score.test.json").read_text())
    # the recorded score (2 decimals) is sacreBLEU's on exactly these hypotheses and references
    assert score["bleu"] == round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
    assert score["decoding"]["sentences"] == 53
    if method == "adaptive":
        assert "--adaptive-softmax-cutoff 10,30" in train_out and "adaptive_loss" in train_out


def test_every_method_learns(runs):
    """Not a benchmark: only that each recipe trains (40 updates, tiny model):
    the valid NLL ends well below the first training interval's."""
    work, _ = runs
    for m in METHODS:
        log = (work / m / "train.log").read_text()
        first = float(re.search(r"\| train_inner \|.*? loss=([0-9.]+)", log).group(1))
        last = float(re.findall(r"\| valid \|.*?\| loss ([0-9.]+)", log)[-1])
        assert last < 0.8 * first, (m, first, last)


def test_compare_tables_from_real_runs(runs, data, tmp_path):
    """compare.py on the finished runs above (--reuse: no retraining): it adds
    the interleaved step timing (and the ceiling) and writes the markdown and
    CSV tables."""
    work, _ = runs
    out = compare(
        "--databin", data, "--name", "tiny", "--workdir", work, "--out", tmp_path, "--reuse",
        "--max-update", UPDATES, "--speed-batches", "2", "--train-args", " ".join(TINY),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:]
    assert "train (" not in out.stdout  # nothing was retrained
    md = (tmp_path / "compare_tiny.md").read_text()
    rows = list(csv.DictReader(open(tmp_path / "compare_tiny.csv")))
    assert [r["method"] for r in rows] == METHODS + ["ceiling"]
    for r in rows[:-1]:
        m = r["method"]
        score = json.loads((work / m / "score.test.json").read_text())
        assert float(r["bleu"]) == score["bleu"] and float(r["chrf"]) == score["chrf"]
        assert int(r["updates"]) == UPDATES
        # the best of the valid ppl that fairseq logged for this run
        log = (work / m / "train.log").read_text()
        ppls = [float(x) for x in re.findall(r"\| valid \| .*?\| ppl ([\d.]+)", log)]
        assert float(r["train_wps"]) > 0 and ppls and float(r["best_valid_ppl"]) == min(ppls)
        assert float(r["decode_sent_per_s"]) == score["decoding"]["sentences_per_s"]
    params = {r["method"]: int(r["output_params"]) for r in rows[:-1]}
    v, d = 48, 64  # copy data: 40 words + 4 specials + padding to a multiple of 8; d of TINY
    assert params["softmax"] == v * d
    # MHP: digit heads only; MHE's default per-token last head holds a vector per token (V x d) + head 1
    assert params["mhp"] < params["softmax"] < params["mhe"] < params["softmax"] * 1.5
    # the ceiling row exists (at V = 48 the output layer costs ~nothing, so its
    # value is the softmax run's give or take timing noise)
    assert float(rows[-1]["train_wps"]) > 0.5 * float(rows[0]["train_wps"])
    assert float(rows[-1]["step_tok_s"]) > 0
    speed = json.loads((work / "speed.json").read_text())
    assert speed["batches"] == 2 and set(speed["tok_per_s"]) == set(METHODS) | {"softmax_body"}
    for r in rows[:-1]:
        assert float(r["step_tok_s"]) == pytest.approx(speed["tok_per_s"][r["method"]])
    assert "| softmax body only (ceiling) |" in md and "test BLEU" in md and "nrefs:1" in md
    assert "command: `python scripts/benchmarks/compare.py" in md


def test_compare_extend_from_continues_a_finished_run(runs, data, tmp_path):
    """compare.py --extend-from: adaptive softmax's finished 40-update run
    continues to 60 updates in a new workdir (fairseq resumes from the copied
    checkpoint_last.pt; train.sh accepts the adaptive checkpoint, whose
    cutoff fairseq saved as an int list, where a plugin method's checkpoint
    needs nothing of the kind); the old workdir is byte-identical afterwards,
    and the row counts both starts.  A resume with another cutoff is refused,
    naming the checkpoint's."""
    work, _ = runs
    m = "adaptive"
    before = tree_hashes(work / m)
    new = tmp_path / "ext"
    out = compare(
        "--databin", data, "--name", "tiny_ext", "--workdir", new, "--out", tmp_path, "--methods", m,
        "--max-update", UPDATES + 20, "--speed-batches", "0", "--extend-from", work, "--train-args", " ".join(TINY),
        "--generate-args", "--max-len-a 0 --max-len-b 20",
        env={"WARMUP": "10", "LR": "3e-3", "ADAPTIVE_CUTOFF": "10,30"},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:]
    assert out.stdout.count("continued from") == 1
    (row,) = csv.DictReader(open(tmp_path / "compare_tiny_ext.csv"))
    curves = json.loads((tmp_path / "compare_tiny_ext_curves.json").read_text())
    assert tree_hashes(work / m) == before
    log = (new / m / "train.log").read_text()
    assert log.count("===== train.sh start ") == 2
    assert f"@ {UPDATES} updates)" in log  # fairseq resumed from the copied checkpoint
    assert int(row["updates"]) == UPDATES + 20
    assert float(row["train_seconds"]) > float(compare_row(work, m)["train_seconds"])
    assert (new / m / "score.test.json").exists()
    # the valid curve runs on across the restart: time and updates keep growing
    curve = curves[m]
    assert max(u for _, u, _ in curve) == UPDATES + 20 and min(u for _, u, _ in curve) < UPDATES
    assert all(b[0] >= a[0] and b[1] > a[1] for a, b in zip(curve, curve[1:]))
    assert "continued runs (adaptive)" in (tmp_path / "compare_tiny_ext.md").read_text()
    p = recipe(
        "train.sh",
        m,
        data,
        new / m,
        "--max-update",
        UPDATES + 30,
        *TINY,
        env={"ADAPTIVE_CUTOFF": "12,30"},
        check=False,
    )
    assert p.returncode == 2 and "trained with --adaptive-softmax-cutoff 10,30; this run has 12,30" in p.stdout


def compare_row(work, method):
    compare_logs = load_script("compare_logs")  # scripts/benchmarks/compare_logs.py, loaded from its file
    return compare_logs.collect(method, work / method)


@pytest.mark.parametrize("config", ["mhe_iwslt", "softmax_iwslt"])
def test_hydra_config_accepted_by_fairseq_hydra_train(data, tmp_path, config):
    """A configs/ file through the real fairseq-hydra-train (3 updates, tiny
    sizes), then fairseq-generate on the checkpoint it wrote."""
    save = tmp_path / "ckpt"
    p = subprocess.run(
        [
            str(BIN / "fairseq-hydra-train"),
            "--config-dir",
            str(REPO / "configs"),
            "--config-name",
            config,
            f"task.data={data}",
            "task.source_lang=src",
            "task.target_lang=tgt",
            f"common.user_dir={USER_DIR}",
            f"checkpoint.save_dir={save}",
            "optimization.max_update=3",
            "common.log_interval=1",
            "model.encoder_layers=1",
            "model.decoder_layers=1",
            "model.encoder_embed_dim=32",
            "model.decoder_embed_dim=32",
            "model.encoder_ffn_embed_dim=64",
            "model.decoder_ffn_embed_dim=64",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert p.returncode == 0, p.stdout[-4000:]
    assert "num_updates: 3 >= max_update: 3" in p.stdout and (save / "checkpoint_best.pt").exists()
    assert re.search(r"\| INFO \| train_inner \| epoch", p.stdout)  # fairseq's log format
    if config.startswith("mhe"):
        assert "acc_h1" in p.stdout  # the multi-head criterion ran
    assert not (tmp_path / "hydra_train.log").exists() and not (tmp_path / ".hydra").exists()
    out = cli(
        "fairseq-generate",
        data,
        "--user-dir",
        USER_DIR,
        "--path",
        save / "checkpoint_best.pt",
        "--beam",
        "2",
        "--batch-size",
        "16",
        "--required-batch-size-multiple",
        "1",
        "--max-len-a",  # copy lines have <= 8 words; a model of 3 updates rarely stops by itself
        "0",
        "--max-len-b",
        "12",
    ).stdout
    assert len([x for x in out.splitlines() if x.startswith("H-")]) == 53
