"""Helpers for end-to-end tests: tiny data and the real fairseq CLIs.

fairseq's own ``tests/`` helpers are not in its wheel, so the plugin keeps
these.
"""

import contextlib
import hashlib
import importlib
import io
import logging
import multiprocessing
import os
import random
import re
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "fairseq_mhce")
BIN = Path(sys.executable).parent

TINY_ARCH = [
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
    "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
]  # fmt: skip

# 1+1 layers, d 32: the smallest model the issues' repros train (a few updates)
MICRO_ARCH = [
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]  # fmt: skip

TRAIN_COMMON = [
    "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt",
    "--warmup-updates", "100", "--max-tokens", "2000", "--dropout", "0.0",
    "--seed", "1", "--no-progress-bar", "--log-interval", "50",
    "--no-epoch-checkpoints", "--num-workers", "0",
]  # fmt: skip


# fairseq's console scripts that the tests run in this process (their entry
# function with the same argv, as fairseq's own tests/test_binaries.py does)
# unless a test needs a separate process: starting an interpreter and
# importing fairseq costs about 5 s of CPU per command.
IN_PROCESS = {
    "fairseq-train",
    "fairseq-generate",
    "fairseq-interactive",
    "fairseq-preprocess",
    "fairseq-validate",
    "mhce-build-codes",
    "mhce-average-checkpoints",
    "mhce-export",
    "mhce-prepare-data",
}
THREAD_VARS = {"OMP_NUM_THREADS", "MKL_NUM_THREADS"}


# set by tests/conftest.py before each test's set-up: whether it is marked
# e2e (None outside pytest); a command run for a test without the mark is an
# error, so that `make test-fast` (-m "not e2e") really runs none
CURRENT_TEST_IS_E2E = None


def require_e2e(what):
    if CURRENT_TEST_IS_E2E is False:
        raise AssertionError(f"{what} runs a command-line tool: mark the test (or its module) with pytest.mark.e2e")


def cli(name, *args, check=True, env=None, cwd=None, stdin=None, process=False):
    """Run a console script of this venv (fairseq's or the plugin's); returns
    a CompletedProcess with stdout+stderr merged in ``.stdout``.

    The commands in :data:`IN_PROCESS` run their entry function in this
    process with the same argv (output captured, ``SystemExit`` and
    exceptions turned into the return code and the traceback a separate
    process would print); ``process=True``, an ``env`` beyond thread counts,
    or a fairseq command without ``--user-dir`` (stock fairseq must not see
    the plugin that this process has imported) start a separate process."""
    require_e2e(name)
    args = [str(a) for a in args]
    own_process = (
        process
        or name not in IN_PROCESS
        or bool(set(env or {}) - THREAD_VARS)
        or (name.startswith("fairseq-") and "--user-dir" not in args)
    )
    if own_process:
        e = dict(os.environ)
        e.setdefault("OMP_NUM_THREADS", "1")
        if env:
            e.update(env)
        p = subprocess.run(
            [str(BIN / name), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=e,
            cwd=cwd,
            input=stdin,
        )
    else:
        p = run_in_process(name, args, threads=(env or {}).get("OMP_NUM_THREADS"), cwd=cwd, stdin=stdin)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} failed ({p.returncode}):\n{p.stdout[-4000:]}")
    return p


def _entry_function(name):
    """The function the installed console script ``BIN/name`` calls (pip
    writes ``from MODULE import FUNCTION`` into it)."""
    m = re.search(r"^from (\S+) import (\w+)$", (BIN / name).read_text(), re.M)
    assert m, f"{BIN / name} is not a console script of this venv"
    return getattr(importlib.import_module(m.group(1)), m.group(2))


def run_in_process(name, args, threads=None, cwd=None, stdin=None):
    """The console script ``name``'s entry function with ``sys.argv = [name,
    *args]`` in this process: its stdout, stderr and log records (in
    fairseq's log format) captured together in ``.stdout``, like a separate
    process's merged output; ``.stderr`` holds what it wrote to stderr."""
    import torch

    from fairseq_mhce.clean_exit import stop_background_consumers

    fn = _entry_function(name)
    _forget_earlier_runs()
    children_before = set(multiprocessing.active_children())
    buf, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s"))
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.argv, sys.stdin, os.getcwd(), torch.get_num_threads())
    root.handlers, sys.argv = [handler], [name, *args]
    root.setLevel(logging.INFO)
    sys.stdin = io.StringIO(stdin or "")
    if cwd is not None:
        os.chdir(cwd)
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(_Tee(buf, err)):
            try:
                code = fn()
                code = 0 if code is None else code
            except SystemExit as e:
                code = e.code
                if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, status 1
                    print(code, file=sys.stderr)
                    code = 1
                code = code or 0
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        stop_background_consumers()  # the data thread a separate process would end at exit
        _end_new_daemons(children_before)
        root.handlers, sys.argv, sys.stdin = saved[0], saved[2], saved[3]
        root.setLevel(saved[1])
        os.chdir(saved[4])
        torch.set_num_threads(saved[5])
    return subprocess.CompletedProcess([name, *args], code, buf.getvalue(), err.getvalue())


def _end_new_daemons(before):
    """Terminate the daemonic processes a command started (its DataLoader
    workers, ``--num-workers`` 1 by default in fairseq-generate), as
    multiprocessing does at a process's exit.  Left alive, the DataLoader
    iterator's finalizer later waits 5 s for each (its join timeout) at
    whatever garbage collection comes next."""
    for p in set(multiprocessing.active_children()) - before:
        if p.daemon:
            p.terminate()
            p.join()


def _forget_earlier_runs():
    """fairseq keeps a run's best validation score in function attributes
    (``checkpoint_utils.save_checkpoint.best``, ``should_stop_early.best`` and
    ``.num_runs``); a new process starts without them, so a run in this
    process must too (else its checkpoint_best.pt is only written when it
    beats an earlier run's best)."""
    from fairseq import checkpoint_utils
    from fairseq_cli import train

    for fn, attrs in ((checkpoint_utils.save_checkpoint, ("best",)), (train.should_stop_early, ("best", "num_runs"))):
        for attr in attrs:
            if hasattr(fn, attr):
                delattr(fn, attr)


class _Tee(io.TextIOBase):
    """stderr of an in-process command: into the merged output and on its own."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)


# the models tests/conftest.py trains once per run on its copy data-bin:
# method -> (updates, extra flags of train_tiny).  MHP and
# MHE copy at BLEU > 95 after 200 updates with a shorter warm-up; the MHS model
# (scoring half the groups per step) needs the 300 updates of TRAIN_COMMON's
# warm-up for BLEU > 90.
SHARED_MODELS = {
    # MHP, H = 2, the plugin's defaults
    "mhp": (200, ["--warmup-updates", "60"]),
    # MHE, H = 3, best checkpoint by BLEU (--eval-bleu through the heads, every 4th epoch)
    "mhe": (200, [
        "--warmup-updates", "60", "--validate-interval", "4",
        "--mhce-heads", "3", "--eval-bleu", "--eval-bleu-args", '{"beam": 2}', "--eval-bleu-detok", "space",
        "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
    ]),
    # MHS with tied input/output embeddings: 12 groups of 4 tokens, half of them scored per step
    "mhs": (300, ["--mhce-head-sizes", "12,4", "--mhce-sample-groups", "0.5", "--share-decoder-input-output-embed"]),
}  # fmt: skip


def train_tiny(data, save_dir, method, *extra, updates=300):
    """fairseq-train of the tiny transformer_mhce (2+2 layers, d 64) with the
    plugin's criterion; returns the command's output."""
    return cli(
        "fairseq-train", data, "--user-dir", USER_DIR, "--arch", "transformer_mhce", "--mhce-method", method,
        *TINY_ARCH, "--criterion", "mhce_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--report-accuracy", *TRAIN_COMMON, "--max-update", updates, "--save-dir", save_dir, *extra,
    ).stdout  # fmt: skip


def make_copy_data(root: Path, n_train=2000, n_valid=100, n_test=100, n_words=40, seed=0, langs=("src", "tgt")):
    """A copy task (target = source) over ``n_words`` word types; preprocessed
    into ``root/bin`` with fairseq-preprocess.  Returns the data-bin path."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(n_words)]
    text = root / "text"
    text.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(n)]
        for lang in langs:
            (text / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    dest = root / "bin"
    preprocess(
        "--source-lang",
        langs[0],
        "--target-lang",
        langs[1],
        "--trainpref",
        text / "train",
        "--validpref",
        text / "valid",
        "--testpref",
        text / "test",
        "--destdir",
        dest,
        "--workers",
        "1",
    )
    return dest


def preprocess(*args):
    """fairseq-preprocess's own main, in this process: the same code as the
    command, without a second interpreter importing fairseq (seconds per
    data-bin; the suite builds about twenty)."""
    from fairseq import options
    from fairseq_cli import preprocess as fairseq_preprocess

    require_e2e("fairseq-preprocess")

    parser = options.get_preprocessing_parser()
    fairseq_preprocess.main(parser.parse_args([str(a) for a in args]))


def bleu_of(generate_output: str) -> float:
    m = re.search(r"BLEU = ([0-9.]+)", generate_output)
    assert m, generate_output[-2000:]
    return float(m.group(1))


def hypotheses(generate_output: str):
    """{sentence id: [hypothesis strings]} from fairseq-generate's H- lines."""
    out = {}
    for line in generate_output.splitlines():
        if line.startswith("H-"):
            sid, score, text = line.split("\t")
            out.setdefault(int(sid[2:]), []).append((text, float(score)))
    return out


def tree_hashes(path) -> dict:
    """{relative path: sha256} of every file below ``path`` (a directory), or
    {"": sha256} of ``path`` itself when it is a file: what a failing command
    must leave unchanged."""
    path = Path(path)
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }
