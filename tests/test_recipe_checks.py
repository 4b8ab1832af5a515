"""fairseq_mhce/recipes/recipe_checks.py, the Python steps of scripts/recipes/train.sh
(savedir-guard) and scripts/recipes/translate.sh (score), on hand-made checkpoints
and fairseq-generate output: no training, no fairseq CLI.  The recipes
themselves are run by tests/test_recipes.py and tests/test_recipe_guards.py."""

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import sacrebleu
import torch

from fairseq_mhce.modules.output_layer import output_layer_class
from fairseq_mhce.recipes import recipe_checks as rc
from fairseq_mhce.recipes.word_split import tokenize

from .utils import REPO

SCRIPT = REPO / "fairseq_mhce" / "recipes" / "recipe_checks.py"
V = 40


def test_last_reads_argv_like_argparse():
    argv = ["data", "--arch", "a", "--lr", "1", "--arch=b", "--mhce-heads", "3", "--arch"]
    assert rc.last(argv, "--arch") == "b"  # the last complete one; a trailing flag has no value
    assert rc.last(argv, "--mhce-heads", 2) == "3" and rc.last(argv, "--seed", "1") == "1"
    assert rc.last(["--arch", "x", "--arch", "y"], "--arch") == "y"


def test_small_helpers():
    assert rc.method_of("transformer_iwslt_de_en_mhce", None, None) == "mhe"
    assert rc.method_of("transformer_mhce", "mhs", None) == "mhs"
    assert rc.method_of("transformer", None, "10,30") == "adaptive"
    assert rc.method_of("transformer", None, "None") == "softmax"
    assert rc.cutoff_list("[10, 30]") == rc.cutoff_list((10, 30)) == rc.cutoff_list("10,30") == [10, 30]
    assert rc.cutoff_list("") is None
    assert rc.parse_sizes("8, 5") == [8, 5] and rc.parse_sizes("auto") is None and rc.parse_sizes(None) is None
    assert rc.sizes_str([8, 5]) == "8,5" and rc.sizes_str(None) == "automatic"
    assert rc.same_path(None, "/x") and rc.same_path("/a/../x", "/x") and not rc.same_path("/y", "/x")


def test_auto_sizes_are_the_plugins():
    for method in ("mhp", "mhe", "mhs"):
        assert rc.auto_sizes(method, 2, V) == list(output_layer_class(method).default_head_sizes(V, 2))


def train_args(databin, method, *extra):
    arch = ["--arch", "transformer_iwslt_de_en"] if method in ("softmax", "adaptive") else [
        "--arch", "transformer_iwslt_de_en_mhce", "--mhce-method", method, "--mhce-heads", "2"]  # fmt: skip
    return [str(databin), "--lr", "1e-3", *arch, *extra]


def checkpoint(path, databin, arch="transformer_iwslt_de_en_mhce", hydra=False, sizes=None, **model):
    """A checkpoint with a saved config (a hydra-style dict, or a legacy
    argparse Namespace) and, for a multi-head model, its head sizes buffer."""
    cfg_model = dict(arch=arch, **model)
    state = {"model": {"encoder.version": torch.tensor([3.0])}}
    if sizes is not None:
        state["model"]["decoder.mhce_head.codec.head_sizes"] = torch.tensor(sizes)
    if hydra:
        state["cfg"] = {"model": cfg_model, "task": {"data": str(databin)}}
    else:
        state["args"] = Namespace(data=str(databin), **cfg_model)
    torch.save(state, path)
    return path


def guard(savedir, databin, argv, capsys):
    status = rc.savedir_guard("train.sh", str(savedir), str(databin), V, argv)
    return status, capsys.readouterr().err


def test_guard_accepts_the_same_run(tmp_path, capsys):
    data, save = tmp_path / "bin", tmp_path / "save"
    save.mkdir()
    auto = list(output_layer_class("mhp").default_head_sizes(V, 2))
    checkpoint(save / "checkpoint_last.pt", data, mhce_method="mhp", mhce_heads=2, sizes=auto, hydra=True)
    checkpoint(save / "checkpoint_best.pt", data, mhce_method="mhp", mhce_heads=2)  # legacy args, no buffer
    assert guard(save, data, train_args(data, "mhp"), capsys) == (0, "")
    # the same sizes given explicitly; the data-bin through a symbolic link
    data.mkdir()
    (tmp_path / "alias").symlink_to(data)
    sizes = ",".join(map(str, auto))
    assert guard(save, tmp_path / "alias", train_args(data, "mhp", "--mhce-head-sizes", sizes), capsys) == (0, "")
    assert guard(tmp_path / "empty", data, train_args(data, "softmax"), capsys) == (0, "")  # no checkpoints


def test_guard_refuses_another_method_naming_both_ways_out(tmp_path, capsys):
    data, save = tmp_path / "bin", tmp_path / "save"
    save.mkdir()
    checkpoint(save / "checkpoint_last.pt", data, mhce_method="mhe", hydra=True)
    checkpoint(save / "checkpoint_best.pt", data, mhce_method="mhe", hydra=True)
    status, err = guard(save, data, train_args(data, "mhp"), capsys)
    assert status == 2
    assert err.splitlines()[0] == (
        f"train.sh: {save} holds checkpoints that are not this run's; refusing to start "
        "(fairseq-train would resume from them or overwrite them):"
    )
    assert (
        "  checkpoint_best.pt, checkpoint_last.pt: trained with METHOD mhe (--arch transformer_iwslt_de_en_mhce); "
        "this run is METHOD mhp.\n"
        f"    Either continue that run with METHOD mhe (scripts/recipes/train.sh mhe {data} {save} ...),\n"
        f"    or train mhp in a new SAVEDIR (a directory without checkpoint*.pt).\n"
    ) in err
    assert err.rstrip().endswith(f"Nothing in {save} was changed.") and "REUSE_SAVEDIR=1" in err


@pytest.mark.parametrize(
    "saved,run,needle",
    [
        (
            dict(arch="transformer_iwslt_de_en", adaptive_softmax_cutoff="10,30"),
            ("adaptive", "--adaptive-softmax-cutoff", "12,30"),
            "trained with --adaptive-softmax-cutoff 10,30; this run has 12,30",
        ),
        (
            dict(arch="transformer"),
            ("softmax",),
            "trained with --arch transformer; this run has --arch transformer_iwslt_de_en",
        ),
        (
            dict(mhce_method="mhp", mhce_heads=3),
            ("mhp",),
            "trained with head sizes automatic (--mhce-heads 3); this run has automatic sizes for --mhce-heads 2",
        ),
        (
            dict(mhce_method="mhp", sizes=[8, 5], mhce_head_sizes="8,5"),
            ("mhp",),
            "trained with head sizes 8,5 (--mhce-head-sizes 8,5); this run has automatic sizes for --mhce-heads 2",
        ),
    ],
)
def test_guard_refuses_other_settings(tmp_path, capsys, saved, run, needle):
    data, save = tmp_path / "bin", tmp_path / "save"
    save.mkdir()
    checkpoint(save / "checkpoint_last.pt", data, **saved)
    status, err = guard(save, data, train_args(data, *run), capsys)
    assert status == 2 and needle in err, err


def test_guard_refuses_another_databin_and_unreadable_files(tmp_path, capsys):
    data, save = tmp_path / "bin", tmp_path / "save"
    save.mkdir()
    checkpoint(save / "checkpoint_last.pt", tmp_path / "other", arch="transformer_iwslt_de_en")
    (save / "checkpoint_best.pt").write_bytes(b"truncated")
    status, err = guard(save, data, train_args(data, "softmax"), capsys)
    assert status == 2
    assert f"checkpoint_last.pt: trained on the data-bin {tmp_path / 'other'}; this run's is {data}." in err
    assert "checkpoint_best.pt: cannot be read (" in err and f"Either move it out of {save}," in err


def test_guard_main_reads_arguments_by_position(tmp_path, capsys):
    data, save = tmp_path / "bin", tmp_path / "save"
    save.mkdir()
    checkpoint(save / "checkpoint_last.pt", data, mhce_method="mhs", hydra=True)
    # fairseq-train options after V are passed on, -h and -- included
    argv = ["savedir-guard", "train.sh", save, data, V, *train_args(data, "mhs"), "-h", "--"]
    assert rc.main(argv) == 0
    assert rc.main(["savedir-guard", "train.sh", save, data, V, *train_args(data, "mhe")]) == 2
    assert "trained with METHOD mhs" in capsys.readouterr().err
    assert rc.main(["savedir-guard", "train.sh", save]) == 2 and "usage:" in capsys.readouterr().err


# --------------------------------------------------------------------- score
REFS = ["the cat sat on the mat.", "a dog, too!", "we go now"]


def generate_files(tmp_path, hyps, search=False):
    """fairseq-generate's output (ids out of order, two hypotheses for one)
    and its log."""
    gen, glog = tmp_path / "generate-test.txt", tmp_path / "generate-test.log"
    lines = []
    for i in (2, 0, 1):
        lines += [f"S-{i}\tsource {i}", f"H-{i}\t-0.5\ttok {i}", f"D-{i}\t-0.5\t{hyps[i]}", f"P-{i}\t-0.5 -0.5"]
        if i == 0:
            lines.append(f"D-{i}\t-0.9\tsecond best")
    gen.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log = ["2024 | INFO | fairseq_cli.generate | " + ("--mhce-search factorized" if search else "beam 5")]
    log.append(
        "2024 | INFO | fairseq_cli.generate | Translated 3 sentences (40 tokens) in 1.5s (2.00 sentences/s, 26.67 tokens/s)"
    )
    glog.write_text("\n".join(log) + "\n", encoding="utf-8")
    ref = tmp_path / "test.en"
    ref.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    return gen, glog, ref


def test_score_writes_hypotheses_in_order_and_sacrebleu(tmp_path, capsys):
    hyps = ["the cat sat on a mat.", "a dog, too!", "we went now"]
    gen, glog, ref = generate_files(tmp_path, hyps, search=True)
    hyp, out = tmp_path / "hyp.test.en", tmp_path / "score.test.json"
    assert rc.score(str(gen), str(glog), str(ref), str(hyp), str(out), "mhe", "ckpt.pt") == 0
    assert hyp.read_text(encoding="utf-8") == "\n".join(hyps) + "\n"  # line order, best of each
    res = json.loads(out.read_text())
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    b, c = bleu.corpus_score(hyps, [REFS]), chrf.corpus_score(hyps, [REFS])
    assert res == {
        "method": "mhe",
        "checkpoint": "ckpt.pt",
        "hypotheses": str(hyp),
        "reference": str(ref),
        "bleu": round(b.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "bleu_detail": str(b),
        "chrf": round(c.score, 2),
        "chrf_signature": str(chrf.get_signature()),
        "decoding": {"sentences": 3, "seconds": 1.5, "sentences_per_s": 2.0, "tokens_per_s": 26.67},
        "search": "factorized",
    }
    assert capsys.readouterr().out.splitlines() == [
        f"BLEU: {b}  ({res['bleu_signature']})",
        f"chrF: {c}  ({res['chrf_signature']})",
        "decoding: 3 sentences in 1.5 s, 2.0 sentences/s (beam 5)",
        f"hypotheses: {hyp}",
        f"score:      {out}",
    ]


def test_score_refuses_a_missing_hypothesis(tmp_path):
    gen, glog, ref = generate_files(tmp_path, ["a", "b", "c"])
    gen.write_text("".join(line + "\n" for line in gen.read_text().splitlines() if not line.startswith("D-1")))
    with pytest.raises(SystemExit) as e:
        rc.score(str(gen), str(glog), str(ref), str(tmp_path / "h"), str(tmp_path / "s.json"), "mhp", "c.pt")
    assert e.value.code == "translate.sh: 2 hypotheses for 3 references (first missing id: [1]); was a line skipped?"
    assert not (tmp_path / "h").exists() and not (tmp_path / "s.json").exists()


@pytest.mark.e2e
def test_score_word_joiner_as_translate_sh_runs_it(tmp_path):
    """As translate.sh runs it: ``python -m fairseq_mhce.recipes.recipe_checks
    score`` with this checkout on PYTHONPATH, from another directory, the word
    split undone."""
    gen, glog, ref = generate_files(tmp_path, [" ".join(tokenize(r)) for r in REFS])
    hyp, out = tmp_path / "hyp.test.en", tmp_path / "score.test.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    step = ["-m", "fairseq_mhce.recipes.recipe_checks", "score", "--word-joiner"]
    args = [*step, gen, glog, ref, hyp, out, "mhe", "c.pt"]
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert hyp.read_text(encoding="utf-8") == "\n".join(REFS) + "\n"
    res = json.loads(out.read_text())
    assert res["bleu"] == 100.0 and res["search"] == "dense" and p.stdout.startswith("BLEU: ")


def test_usage(capsys):
    assert rc.main(["score", "a", "b"]) == 2 and rc.main([]) == 2
    assert capsys.readouterr().err.count("usage: python -m fairseq_mhce.recipes.recipe_checks ") == 2
    assert Path(rc.__file__) == SCRIPT
