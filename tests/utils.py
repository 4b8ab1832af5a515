"""The one home of the test suite's helpers: whatever more than one test
file uses (no test file imports another).

* the real fairseq CLIs and the plugin's console scripts (:func:`cli`, run in
  this process where it can), tiny data and training runs, the recipes;
* the programs in ``scripts/`` loaded as modules (:func:`load_script`);
* in-process models and output layers, and brute-force references.

fairseq's own ``tests/`` helpers are not in its wheel, so the plugin keeps
these.  tests/conftest.py imports this module before any test runs, so the
plugin (whose import changes fairseq) and fairseq are imported inside the
helpers that use them, not here.
"""

import contextlib
import hashlib
import importlib
import importlib.util
import io
import logging
import math
import multiprocessing
import os
import random
import re
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "fairseq_mhce")
BIN = Path(sys.executable).parent
SCRIPTS = REPO / "scripts"

# a command's thread counts: one, steadier on a shared 2-core machine
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PLUGIN_CRITERION = "mhce_label_smoothed_cross_entropy"


def arch_sizes(layers, dim, heads=None, decoder_layers=None):
    """fairseq-train's size flags of a transformer: ``layers`` encoder layers
    (and decoder layers unless ``decoder_layers``), embeddings of ``dim``,
    feed-forward layers of ``2 * dim``, ``heads`` attention heads (None: the
    arch's own)."""
    flags = [
        "--encoder-layers", layers, "--decoder-layers", decoder_layers or layers,
        "--encoder-embed-dim", dim, "--decoder-embed-dim", dim,
        "--encoder-ffn-embed-dim", 2 * dim, "--decoder-ffn-embed-dim", 2 * dim,
    ]  # fmt: skip
    if heads is not None:
        flags += ["--encoder-attention-heads", heads, "--decoder-attention-heads", heads]
    return [str(f) for f in flags]


TINY_ARCH = arch_sizes(2, 64, heads=4)
# 1+1 layers, d 32: the smallest model the issues' repros train (a few updates)
MICRO_ARCH = arch_sizes(1, 32, heads=2)

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


def fairseq_train(
    data,
    save_dir,
    *extra,
    updates,
    arch="transformer_mhce",
    sizes=TINY_ARCH,
    common=TRAIN_COMMON,
    criterion=PLUGIN_CRITERION,
    plugin=True,
    **kw,
):
    """fairseq-train ``updates`` updates of ``arch`` (``sizes``, ``common``
    flags; ``extra`` last, so it overrides them) on ``data`` into
    ``save_dir``, with the plugin (``--user-dir``) unless ``plugin`` is
    false; returns :func:`cli`'s CompletedProcess (``kw``: ``check``, ``env``)."""
    return cli(
        "fairseq-train", data, *(["--user-dir", USER_DIR] if plugin else []), "--arch", arch, *sizes,
        "--criterion", criterion, *common, "--max-update", updates, "--save-dir", save_dir, *extra, **kw,
    )  # fmt: skip


def train_tiny(data, save_dir, method, *extra, updates=300, **kw):
    """fairseq-train of the tiny transformer_mhce (2+2 layers, d 64) with the
    plugin's criterion (label smoothing 0.1); returns the command's output."""
    return fairseq_train(
        data, save_dir, "--mhce-method", method, "--label-smoothing", "0.1", "--report-accuracy", *extra,
        updates=updates, **kw,
    ).stdout  # fmt: skip


def train_micro(data, save_dir, method, *extra, updates=3, lr="1e-3", max_tokens=500, **kw):
    """fairseq-train in the issues' repro shape: an ``_mhce`` arch of
    fairseq's (iwslt) cut to 1+1 layers of d 32, identity codes, adam, the
    plugin's criterion (label smoothing 0.1) and fairseq's defaults otherwise
    (``--num-workers`` among them); returns the CompletedProcess."""
    return fairseq_train(
        data, save_dir, "--mhce-method", method, "--mhce-code-order", "identity", "--optimizer", "adam",
        "--lr", lr, "--max-tokens", max_tokens, "--label-smoothing", "0.1", "--no-progress-bar", *extra,
        updates=updates, arch="transformer_iwslt_de_en_mhce", sizes=MICRO_ARCH, common=(), **kw,
    )  # fmt: skip


def generate(data, ckpt, *extra, **kw):
    """fairseq-generate with the plugin: the checkpoint ``ckpt`` on
    ``data``'s test set; returns the CompletedProcess."""
    return cli("fairseq-generate", data, "--user-dir", USER_DIR, "--path", ckpt, *extra, **kw)


def in_both_search_modes(command, data, ckpt, *extra, **kw):
    """``command`` (fairseq-generate or fairseq-interactive) with ``--task
    translation_mhce``, once per ``--mhce-search`` mode: {mode: (its H- and P-
    lines, its whole output)}."""
    out = {}
    for mode in ("dense", "factorized"):
        text = cli(
            command, data, "--user-dir", USER_DIR, "--task", "translation_mhce", "--mhce-search", mode,
            "--path", ckpt, *extra, **kw,
        ).stdout  # fmt: skip
        out[mode] = ([ln for ln in text.splitlines() if ln[:2] in ("H-", "P-")], text)
    return out


def recipe(name, *args, env=None, check=True):
    """``scripts/recipes/NAME`` in a process of its own, with short-run
    settings (one thread, warm-up 10, lr 3e-3, the adaptive softmax's cutoffs
    for tiny data) and without a REUSE_SAVEDIR of the caller's; ``check``:
    fail unless it exits 0.  Returns the CompletedProcess (stdout and stderr
    merged)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", WARMUP="10", LR="3e-3", ADAPTIVE_CUTOFF="10,30")
    e.pop("REUSE_SAVEDIR", None)
    e.update(env or {})
    p = subprocess.run(
        [str(SCRIPTS / "recipes" / name), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=e,
    )
    if check:
        assert p.returncode == 0, f"{name} failed ({p.returncode}):\n{p.stdout[-4000:]}"
    return p


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


def read_checkpoint(path) -> dict:
    """A checkpoint file as saved, read with ``torch.load(weights_only=False)``
    on CPU: independent of the plugin's own loader (:mod:`fairseq_mhce.safe_load`),
    so a test of what was written does not rest on the code that reads it."""
    return torch.load(str(path), map_location="cpu", weights_only=False)


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


SPLITS = ("train", "valid", "test")


def read_lines(path):
    """The lines of a UTF-8 text file, without their newlines."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def last_line(text):
    """The last line of a command's output that is not blank."""
    return [line for line in text.strip().splitlines() if line.strip()][-1]


def words_argv(prefix, dest, *extra):
    """mhce-prepare-data's arguments for the word-level tokenizer (no
    sentencepiece training, every type kept): training text ``prefix``.{de,en}."""
    args = [
        "-s", "de", "-t", "en", "--trainpref", prefix, "--destdir", dest,
        "--tokenizer", "moses-word", "--vocab-size", "0", "--workers", "1", "--quiet", *extra,
    ]  # fmt: skip
    return [str(a) for a in args]


def bible_slice(limit, valid, test, seed):
    """The options of scripts/bible/prepare_bible.py and
    prepare_bible_multi.py that choose the verses: ``limit`` of them,
    ``valid`` and ``test`` held out, drawn with ``seed``."""
    return ["--limit", str(limit), "--valid-size", str(valid), "--test-size", str(test), "--seed", str(seed)]


# --------------------------------------------------------------------------
# the programs in scripts/ROLE/ that tests call into, loaded as modules
# --------------------------------------------------------------------------
# ``scripts/`` is no package: its programs import a sibling in their folder by
# its bare name (``import prepare_bible``, ``from machine_info import ...``),
# which works when one runs as a program (its directory is then
# ``sys.path[0]``).  Here each is loaded once from its file by importlib and
# entered in ``sys.modules`` under that bare name, its siblings first, so those
# imports find them; nothing is added to ``sys.path``.  The package's own tools
# are imported from :mod:`fairseq_mhce.cli` instead.

# the folder of each program under scripts/
SCRIPT_FOLDERS = {
    "compare": "benchmarks",
    "compare_logs": "benchmarks",
    "compare_report": "benchmarks",
    "machine_info": "benchmarks",
    "prepare_bible": "bible",
    "prepare_bible_multi": "bible",
}
# the siblings each program imports by name
SCRIPT_SIBLINGS = {
    "compare": ("machine_info", "compare_logs", "compare_report"),
    "compare_report": ("machine_info",),
    "prepare_bible_multi": ("prepare_bible",),
}


def load_script(name: str):
    """``scripts/FOLDER/NAME.py`` as the module ``NAME`` (loaded once per process)."""
    path = SCRIPTS / SCRIPT_FOLDERS[name] / f"{name}.py"
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__file__", None) == str(path):
        return module
    for sibling in SCRIPT_SIBLINGS.get(name, ()):
        load_script(sibling)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# --------------------------------------------------------------------------
# in-process models, output layers and brute-force references
# --------------------------------------------------------------------------
SPECIAL = 4  # fairseq's special symbols: ids 0..3


def make_dictionary(n):
    """A fairseq Dictionary of ``n`` symbols: the specials and w0, w1, ..."""
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(n - len(d)):
        d.add_symbol(f"w{i}")
    return d


def model_cfg(**kw):
    """A model config with the plugin's defaults, identity codes unless asked
    (the automatic PPMI table needs training data; tests/test_auto_codes.py)."""
    from argparse import Namespace

    from fairseq_mhce.models.transformer_mhce import MHCEConfig

    c = Namespace(**{k: f.default for k, f in MHCEConfig.__dataclass_fields__.items()})
    c.mhce_code_order = "identity"
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def make_head(method, V, sizes, *, dim=8, seed=0, code="identity", weights="normal", scale=1.0, double=False, **layer):
    """An output layer on its own (no model around it): ``method`` mhp, mhe
    (shared last head), mhe-pt (per-token last head) or mhs, over ``V``
    tokens with head sizes ``sizes`` and inputs of width ``dim``.

    ``code``: "identity", "random" (a permutation drawn after
    ``torch.manual_seed(seed)``) or the code table itself.  ``weights``:
    "normal", every parameter drawn from N(0, 1) (distributions far from
    uniform); "init", the layer's own initialization times ``scale`` (< 1:
    nearly uniform, > 1: peaky).  ``double``: float64 parameters (drawn so).
    ``layer``: passed on to the layer (``shortlist=``, ``sample_groups=``)."""
    from fairseq_mhce.modules.codec import MixedRadixCodec
    from fairseq_mhce.modules.mhs import MultiHeadSampling
    from fairseq_mhce.modules.multihead_output import MultiHeadEmbedding, MultiHeadProduct

    torch.manual_seed(seed)
    if isinstance(code, str):
        code = torch.randperm(V) if code == "random" else None
    codec = MixedRadixCodec(V, sizes, code)
    if method == "mhp":
        head = MultiHeadProduct(dim, codec, **layer)
    elif method == "mhs":
        head = MultiHeadSampling(dim, codec, seed=1, **layer)
    else:
        head = MultiHeadEmbedding(dim, codec, last_head="per-token" if method == "mhe-pt" else "shared", **layer)
    if double:
        head = head.double()
    with torch.no_grad():
        for p in head.parameters():
            if weights == "normal":
                p.normal_(0, 1.0)
            else:
                p.mul_(scale)
    return head


def build_model(root, V, method, heads, seed, scale=1.0, code="identity", d=32, arch="transformer_mhce", extra=()):
    """A random ``arch`` model (1+2 layers, d ``d``) of ``--task
    translation_mhce`` built in-process: dictionaries of 40 source and ``V``
    target symbols written to ``root``; the multi-head output's weights
    times ``scale``.  Returns (task, model in eval mode)."""
    from fairseq import options, tasks

    import fairseq_mhce  # noqa: F401  (registers the task and models)

    root.mkdir(parents=True, exist_ok=True)
    for lang, n in (("src", 40), ("tgt", V - SPECIAL)):
        (root / f"dict.{lang}.txt").write_text("".join(f"w{i} {10**7 - i}\n" for i in range(n)))
    mhce = ["--mhce-method", method, "--mhce-heads", str(heads), "--mhce-code-order", code] if method else []
    args = options.parse_args_and_arch(
        options.get_training_parser(),
        [
            str(root), "--task", "translation_mhce", "--arch", arch, "--source-lang", "src", "--target-lang", "tgt",
            *mhce, *arch_sizes(1, d, heads=2, decoder_layers=2), "--dropout", "0", *extra,
        ],
    )  # fmt: skip
    torch.manual_seed(seed)
    task = tasks.setup_task(args)
    model = task.build_model(args)
    head = getattr(model.decoder, "mhce_head", None)
    if head is not None:
        with torch.no_grad():
            for p in head.parameters():
                p.mul_(scale)
    return task, model.eval()


def source_sample(bsz, src_len, seed):
    """A batch of ``bsz`` random source sentences of ``src_len`` tokens (the
    last one eos) over build_model's source dictionary."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(SPECIAL, 40, (bsz, src_len), generator=g)
    src[:, -1] = 2
    lengths = torch.full((bsz,), src_len)
    return {"id": torch.arange(bsz), "net_input": {"src_tokens": src, "src_lengths": lengths}}


def search(task, model, sample, mode, **gen):
    """(generator, its hypotheses) of ``--mhce-search mode`` with the
    generation options ``gen``."""
    from argparse import Namespace

    generator = task.build_generator([model], Namespace(mhce_search=mode, **gen))
    return generator, generator.generate([model], sample)


def assert_same_hypotheses(dense, fact, exact):
    """The same n-best lists: tokens equal; scores equal (``exact``) or to
    float32 rounding."""
    assert len(dense) == len(fact)
    for hd, hf in zip(dense, fact):
        assert len(hd) == len(hf)
        for a, b in zip(hd, hf):
            assert torch.equal(a["tokens"], b["tokens"]), (a["tokens"], b["tokens"])
            if exact:
                assert torch.equal(a["positional_scores"], b["positional_scores"])
                assert torch.equal(a["score"], b["score"])
            else:
                # float32 rounding of a per-group vs a V-wide matmul: relative, not absolute
                assert torch.allclose(a["positional_scores"], b["positional_scores"], atol=1e-5, rtol=1e-5)
                assert torch.allclose(a["score"], b["score"], atol=1e-5, rtol=1e-5)


def digit_conditionals(joint, codec, target):
    """For each head h, the (N, C_h) conditional log-distribution of digit h
    given the target's first h digits, marginalized from the joint ``(N, V)``
    log-probabilities (token order); -inf where no token continues the prefix."""
    digits = codec.encode(torch.arange(codec.vocab_size))  # (V, H)
    tgt = codec.encode(target)
    out = []
    for h, c in enumerate(codec.sizes):
        rows = []
        for n in range(joint.size(0)):
            same = (digits[:, :h] == tgt[n, :h]).all(-1)  # tokens sharing the target's prefix
            mass = torch.full((c,), float("-inf"), dtype=joint.dtype)
            for j in range(c):
                sel = same & (digits[:, h] == j)
                if bool(sel.any()):
                    mass[j] = torch.logsumexp(joint[n, sel], 0)
            rows.append(mass - torch.logsumexp(mass, 0))
        out.append(torch.stack(rows))
    return out


def smoothed_per_head(conds, target_digits, eps):
    """fairseq's label_smoothed_nll_loss applied to each head's own
    conditional distribution (over its valid digits), summed over heads."""
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

    total = 0
    for h, lp in enumerate(conds):
        per = []
        for n in range(lp.size(0)):
            valid = torch.isfinite(lp[n])
            col = int(valid[: target_digits[n, h]].sum())  # the target's column among the valid digits
            if int(valid.sum()) < 2:  # one class: nothing to smooth over
                per.append(-lp[n, target_digits[n, h]])
                continue
            loss, _ = label_smoothed_nll_loss(lp[n][valid][None], torch.tensor([col]), eps, reduce=False)
            per.append(loss.reshape(()))
        total = total + torch.stack(per)
    return total


def strides(sizes):
    """The code's stride of each head: the product of the later heads' sizes."""
    return [math.prod(sizes[h + 1 :]) for h in range(len(sizes))]


def check_balanced(code, V, sizes, nfix=4, last=()):
    """``code`` is a permutation of range(V) that keeps the first ``nfix``
    tokens (the specials) on codes 0.., gives the ids ``last`` the highest
    codes in id order, and at every head's stride fills each group but the
    last."""
    code = np.asarray(code)
    assert code.shape == (V,)
    assert sorted(code.tolist()) == list(range(V)), "used codes must be exactly range(V)"
    assert code[:nfix].tolist() == list(range(nfix)), "specials keep codes 0..3"
    last = np.sort(np.asarray(last, dtype=np.int64))
    assert code[last].tolist() == list(range(V - last.size, V)), "`last` ids get the highest codes, in id order"
    for s in strides(sizes):
        n_groups = -(-V // s)
        fill = np.bincount(code // s, minlength=n_groups)
        assert fill.size == n_groups
        assert (fill[:-1] == s).all(), f"stride {s}: groups {fill.tolist()}"
        assert 1 <= fill[-1] <= s
