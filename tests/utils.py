"""Helpers for end-to-end tests: tiny data and the real fairseq CLIs.

fairseq's own ``tests/`` helpers are not in its wheel, so the plugin keeps
these.
"""

import hashlib
import os
import random
import re
import subprocess
import sys
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

TRAIN_COMMON = [
    "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt",
    "--warmup-updates", "100", "--max-tokens", "2000", "--dropout", "0.0",
    "--seed", "1", "--no-progress-bar", "--log-interval", "50",
    "--no-epoch-checkpoints", "--num-workers", "0",
]  # fmt: skip


def cli(name, *args, check=True, env=None, cwd=None, stdin=None):
    """Run a fairseq console script from this venv; returns CompletedProcess
    with stdout+stderr merged in ``.stdout``."""
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "2")
    if env:
        e.update(env)
    p = subprocess.run(
        [str(BIN / name), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=e,
        cwd=cwd,
        input=stdin,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"{name} failed ({p.returncode}):\n{p.stdout[-4000:]}")
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
