"""Runtime guards of the decoding side (issue 11, items 6-8).

* ``fairseq-interactive --task translation_mhce`` (dense and factorized, one
  line per buffer and mixed batches) and the hub API: an empty line and a line
  longer than the model's source positions get a warning and an empty
  hypothesis (score -inf); every input line keeps its S-/H- id and the other
  lines are translated as they are without the bad ones;
* ``import fairseq_mhce`` leaves ``torch.load``'s ``weights_only`` default
  alone (no environment variable): a malicious pickle is refused after the
  import, and after full ``fairseq-generate`` / ``fairseq-train`` resume runs in
  the same process, while plugin checkpoints still load through fairseq's
  ``checkpoint_utils``, the CLIs and the hub API;
* ``--sampling-topk`` / ``--sampling-topp`` without ``--sampling`` are refused
  as stock fairseq refuses them, in both search modes and under ``python -O``;
  the factorized search's argument checks are errors, not asserts.
"""

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import pytest

import fairseq_mhce  # noqa: F401
from fairseq_mhce.search.beam import FactorizedEnsembleModel, FactorizedSequenceGenerator

from .utils import (
    ONE_THREAD,
    REPO,
    TINY_ARCH,
    TRAIN_COMMON,
    USER_DIR,
    build_model,
    cli,
    fairseq_train,
    generate,
    make_copy_data,
)

LANGS = ["--source-lang", "src", "--target-lang", "tgt"]
UPDATES = 150
LONG = " ".join(["w3"] * 1100)  # the model's source positions: 1024


def clean_env(**extra):
    """This process's environment without torch's weights_only overrides."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    }
    env.update(ONE_THREAD, **extra)
    return env


def python(code, *args, flags=(), cwd=None):
    """``code`` in a fresh interpreter of this venv (clean environment)."""
    return subprocess.run(
        [sys.executable, *flags, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(PYTHONPATH=str(REPO)),
        cwd=cwd or REPO,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MHE model (H = 2) on a copy task, UPDATES updates, trained with
    --task translation_mhce (so the hub API decodes with it)."""
    root = tmp_path_factory.mktemp("guards")
    data = make_copy_data(root / "copy", n_train=300, n_valid=20, n_test=20, n_words=30)
    save = root / "mhe"
    fairseq_train(data, save, "--task", "translation_mhce", "--mhce-method", "mhe", updates=UPDATES, env=ONE_THREAD)
    return data, save


def groups(out):
    """{id: (source, [(score, hypothesis)])} from fairseq-interactive's output."""
    res = {}
    for line in out.splitlines():
        tag, _, rest = line.partition("\t")
        if tag.startswith("S-"):
            assert int(tag[2:]) not in res, line  # one S- per input line
            res[int(tag[2:])] = (rest, [])
        elif tag.startswith("H-"):
            score, text = rest.split("\t")
            res[int(tag[2:])][1].append((float(score), text))
    return res


def interactive(data, ckpt, lines, *extra):
    return cli(
        "fairseq-interactive",
        data,
        "--user-dir",
        USER_DIR,
        "--task",
        "translation_mhce",
        "--path",
        ckpt,
        "--beam",
        "4",
        "--nbest",
        "2",
        *LANGS,
        *extra,
        stdin="".join(ln + "\n" for ln in lines),
        env=ONE_THREAD,
    ).stdout


# --------------------------------------------------------------------------
# item 6: empty / over-long lines in fairseq-interactive and the hub API
# --------------------------------------------------------------------------
@pytest.mark.e2e
def test_interactive_bad_lines_get_empty_hypotheses(trained):
    data, save = trained
    ckpt = save / "checkpoint_last.pt"
    lines = ["w1 w2 w3", "", "w4 w5 w6 w7", LONG, "w8 w9", "   ", "w10 w11 w12"]
    bad = {1: "is empty", 3: "has 1101 tokens (with eos), more than the model's 1024 source positions", 5: "is empty"}
    good = [i for i in range(len(lines)) if i not in bad]
    ref = groups(interactive(data, ckpt, [lines[i] for i in good]))
    assert sorted(ref) == list(range(len(good)))
    for extra in (
        ["--mhce-search", "dense", "--buffer-size", "1"],  # every line its own buffer and batch
        ["--mhce-search", "factorized", "--buffer-size", "3", "--batch-size", "3"],  # mixed batches
    ):
        p = interactive(data, ckpt, lines, *extra)
        out = groups(p)
        assert sorted(out) == list(range(len(lines))), p[-3000:]  # one S-/H- group per input line, in order
        for i, why in bad.items():
            assert f"input line {i + 1} (S-{i}/H-{i}) {why}: not translated, its hypothesis is empty" in p, p[-3000:]
            assert out[i] == ("", [(-math.inf, "")]), out[i]
        for j, i in enumerate(good):  # the others: translated exactly as without the bad lines
            src, hyps = out[i]
            assert src == lines[i] and len(hyps) == 2 and all(math.isfinite(s) for s, _ in hyps), out[i]
            assert [t for _, t in hyps] == [t for _, t in ref[j][1]], (i, hyps, ref[j])
        assert p.count("not translated") == len(bad)
        assert "Traceback" not in p


@pytest.mark.e2e
def test_hub_bad_inputs_get_empty_strings(trained, caplog, one_thread):
    from fairseq.models.transformer import TransformerModel

    data, save = trained
    hub = TransformerModel.from_pretrained(
        str(save), checkpoint_file="checkpoint_last.pt", data_name_or_path=str(data), user_dir=USER_DIR
    )
    alone = hub.translate(["w1 w2 w3", "w4 w5"], beam=4)
    with caplog.at_level(logging.WARNING, logger="fairseq_mhce"):
        got = hub.translate(["w1 w2 w3", "  ", LONG, "w4 w5"], beam=4)
        fact = hub.translate(["", "w1 w2 w3"], beam=4, mhce_search="factorized")
    assert got == [alone[0], "", "", alone[1]]
    assert fact == ["", alone[0]]
    assert "input sentence 2 of 4 (hub API) is empty: not translated" in caplog.text
    assert "input sentence 3 of 4 (hub API) has 1101 tokens" in caplog.text
    assert "input sentence 1 of 2 (hub API) is empty" in caplog.text
    h = hub.generate([hub.encode("")], beam=4)[0]
    assert len(h) == 1 and h[0]["tokens"].tolist() == [hub.tgt_dict.eos()] and h[0]["score"] == -math.inf


# --------------------------------------------------------------------------
# item 7: weights_only stays on outside fairseq's checkpoint loader
# --------------------------------------------------------------------------
MALICIOUS = r"""
import os, pickle, sys, torch

class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + MARKER,))

def refused(path):
    try:
        torch.load(path)
    except pickle.UnpicklingError:
        return not os.path.exists(MARKER)
    return False

def evil_files(tmp):
    zipped, legacy = os.path.join(tmp, "evil.pt"), os.path.join(tmp, "evil_legacy.pt")
    torch.save({"x": Evil()}, zipped)
    torch.save({"x": Evil()}, legacy, _use_new_zipfile_serialization=False)
    return zipped, legacy
"""


@pytest.mark.e2e
def test_import_keeps_weights_only_and_checkpoints_load(trained, tmp_path):
    data, save = trained
    ckpt = save / "checkpoint_last.pt"
    code = (
        MALICIOUS
        + r"""
import json
ckpt, data, tmp, user_dir = sys.argv[1:5]
MARKER = os.path.join(tmp, "marker")
res = {}
import fairseq_mhce
res["env"] = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
zipped, legacy = evil_files(tmp)
res["refused_after_import"] = refused(zipped) and refused(legacy)
from fairseq import checkpoint_utils
models, cfg = checkpoint_utils.load_model_ensemble([ckpt])
res["ensemble"] = type(models[0].decoder.mhce_head).__name__
from fairseq.models.transformer import TransformerModel
hub = TransformerModel.from_pretrained(os.path.dirname(ckpt), checkpoint_file=os.path.basename(ckpt),
                                       data_name_or_path=data, user_dir=user_dir)
res["hub"] = isinstance(hub.translate("w1 w2", beam=2), str)
res["refused_after_loads"] = refused(zipped) and refused(legacy)
try:  # an unrelated torch.load of the checkpoint itself keeps torch's default too
    torch.load(ckpt)
    res["plain_ckpt_load"] = "loaded"
except pickle.UnpicklingError:
    res["plain_ckpt_load"] = "refused"
res["env_end"] = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
# the file is malicious indeed: loaded without weights_only it runs its command
torch.load(zipped, weights_only=False)
res["marker_when_trusted"] = os.path.exists(MARKER)
print("RESULT " + json.dumps(res))
"""
    )
    r = python(code, ckpt, data, tmp_path, USER_DIR)
    assert r.returncode == 0, r.stdout[-3000:]
    res = json.loads(r.stdout.split("RESULT ")[-1])
    assert res == {
        "env": None,
        "refused_after_import": True,
        "ensemble": "MultiHeadEmbedding",
        "hub": True,
        "refused_after_loads": True,
        "plain_ckpt_load": "refused",
        "env_end": None,
        "marker_when_trusted": True,
    }, res


@pytest.mark.e2e
def test_generate_and_train_resume_leave_weights_only_on(trained, tmp_path):
    """The real fairseq-generate / fairseq-train entry points (in one fresh
    process, without TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) load plugin
    checkpoints; afterwards a malicious pickle is still refused there."""
    data, save = trained
    resume = tmp_path / "resume"
    shutil.copytree(save, resume)
    code = (
        MALICIOUS
        + r"""
import io, contextlib, json
data, ckpt, resume, tmp, user_dir, *train_args = sys.argv[1:]
MARKER = os.path.join(tmp, "marker")
from fairseq_cli import generate, train
out = io.StringIO()
sys.argv = ["fairseq-generate", data, "--user-dir", user_dir, "--path", ckpt, "--task", "translation_mhce",
            "--mhce-search", "factorized", "--beam", "2", "--batch-size", "32", "--required-batch-size-multiple", "1"]
with contextlib.redirect_stdout(out):
    generate.cli_main()
hyps = sum(l.startswith("H-") for l in out.getvalue().splitlines())
sys.argv = ["fairseq-train", data, "--user-dir", user_dir, "--save-dir", resume, *train_args]
train.cli_main()
zipped, legacy = evil_files(tmp)
print("RESULT " + json.dumps({"hyps": hyps, "env": os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"),
                              "refused": refused(zipped) and refused(legacy)}))
"""
    )
    train_args = [
        "--task", "translation_mhce", "--arch", "transformer_mhce", "--mhce-method", "mhe", *TINY_ARCH,
        "--criterion", "mhce_label_smoothed_cross_entropy", *TRAIN_COMMON, "--max-update", UPDATES + 5,
    ]  # fmt: skip
    r = python(code, data, save / "checkpoint_last.pt", resume, tmp_path, USER_DIR, *train_args)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "Loaded checkpoint" in r.stdout and f"@ {UPDATES} updates)" in r.stdout, r.stdout[-3000:]
    res = json.loads(r.stdout.split("RESULT ")[-1])
    assert res == {"hyps": 20, "env": None, "refused": True}, res


# --------------------------------------------------------------------------
# item 8: --sampling-topk/-topp without --sampling; errors instead of asserts
# --------------------------------------------------------------------------
@pytest.mark.e2e
def test_sampling_options_without_sampling_refused_like_stock(trained):
    data, save = trained
    ckpt = save / "checkpoint_last.pt"
    # stock fairseq refuses (with an assert)
    r = generate(data, ckpt, "--beam", "2", "--sampling-topk", "5", check=False, env=ONE_THREAD)
    assert r.returncode != 0 and "--sampling-topk requires --sampling" in r.stdout, r.stdout[-2000:]
    # the plugin's task: the same refusal, a ValueError (both search modes: _assert_guards)
    r = generate(
        data, ckpt, "--beam", "2", "--task", "translation_mhce", "--mhce-search", "factorized",
        "--sampling-topk", "5", check=False, env=ONE_THREAD,
    )  # fmt: skip
    assert (
        r.returncode != 0
        and "ValueError: --sampling-topk requires --sampling (got --sampling-topk 5 without it)" in r.stdout
    ), r.stdout[-2000:]
    assert "\nH-" not in r.stdout
    # and under python -O, where asserts are gone (stock fairseq would then beam-search quietly)
    r = python(
        "import sys; sys.argv[0] = 'fairseq-generate'; from fairseq_cli.generate import cli_main; cli_main()",
        data,
        "--user-dir",
        USER_DIR,
        "--path",
        ckpt,
        "--beam",
        "2",
        "--task",
        "translation_mhce",
        "--mhce-search",
        "dense",
        "--sampling-topp",
        "0.9",
        flags=["-O"],
    )
    assert (
        r.returncode != 0 and "ValueError: --sampling-topp requires --sampling (got --sampling-topp 0.9" in r.stdout
    ), r.stdout[-2000:]
    assert "\nH-" not in r.stdout


def _assert_guards(task, model):
    """The factorized search's argument checks (run here and under -O)."""
    tgt = task.target_dictionary
    for gen in (dict(sampling_topk=5), dict(sampling_topp=0.5), dict(sampling_topk=0)):
        for mode in ("dense", "factorized"):
            try:
                task.build_generator([model], argparse.Namespace(mhce_search=mode, **gen))
            except ValueError as e:
                assert "requires --sampling" in str(e), e
            else:
                raise AssertionError(f"{mode} {gen} not refused")
    from fairseq import search

    for kwargs, msg in (
        (dict(search_strategy=search.BeamSearch(tgt)), "search_strategy"),
        (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size"),
        (dict(match_source_len=True), "match_source_len"),
        (dict(lm_model=model), "lm_model"),
    ):
        try:
            FactorizedSequenceGenerator([model], tgt, **kwargs)
        except ValueError as e:
            assert msg in str(e) and "--mhce-search dense" in str(e), e
        else:
            raise AssertionError(f"{msg} not refused")
    try:
        FactorizedEnsembleModel([model, model], 4, 8, None)
    except ValueError as e:
        assert "one model, got an ensemble of 2" in str(e), e
    else:
        raise AssertionError("ensemble not refused")
    # still fine: sampling with top-k, and top-k with --score-reference (fairseq checks neither)
    task.build_generator([model], argparse.Namespace(mhce_search="factorized", sampling=True, sampling_topk=5, beam=1))
    task.build_generator([model], argparse.Namespace(mhce_search="factorized", score_reference=True, sampling_topk=5))


def test_search_guards_are_errors(tmp_path):
    task, model = build_model(tmp_path, 100, "mhp", 2, 1)
    _assert_guards(task, model)


def test_search_guards_survive_python_O(tmp_path):
    code = (
        "import sys, pathlib; from tests.test_runtime_guards import _assert_guards; from tests.utils import build_model\n"
        "_assert_guards(*build_model(pathlib.Path(sys.argv[1]), 100, 'mhe', 2, 1))\n"
        "print('GUARDS OK, optimize =', sys.flags.optimize)\n"
    )
    r = python(code, tmp_path, flags=["-O"])
    assert r.returncode == 0 and "GUARDS OK, optimize = 1" in r.stdout, r.stdout[-2000:]
