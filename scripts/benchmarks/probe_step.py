#!/usr/bin/env python
"""Training-step speed and peak training memory of output layers at one vocabulary, from short runs.

For each configuration NAME (default: the tied softmax, tied per-token MHE,
tied MHP with its automatic shortlist, fairseq's adaptive softmax) this
trains the recipe ``scripts/recipes/train.sh`` into ``WORK/NAME`` twice:

1. ``--max-update 1`` (builds the model, the automatic code table of MHP /
   MHE, cached in the save dir, and the checkpoint the step timing reads);
   its peak RSS is ``first_start_peak_rss_gb`` (it includes the code
   table's build and a checkpoint save);
2. from scratch in ``WORK/NAME.mem``, ``--max-update STEPS --no-save``, MHP /
   MHE reading that cached table (``--mhce-code-table``): model, data and
   training steps only; its peak RSS is ``train_peak_rss_gb``, the memory
   the training itself needs (no table build, no checkpoint load or save).

Then ``step_speed.py`` times one full training step of every checkpoint on
the same real batches, interleaved, in one process, with the softmax's
body-only step as the ceiling (``softmax_body``; a configuration named
``softmax`` must be among them for the ceiling).  Writes ``OUT.json`` and
``OUT.md``: tok/s, fraction of the ceiling, peak RSS, its ratio to the
softmax's, output-layer parameters.  Finished runs in ``WORK`` are reused.

Peak RSS is wait4's ``ru_maxrss`` of the recipe (its largest process), see
``machine_info.run_with_peak_rss``.  Example (issue 29's probe)::

    python scripts/benchmarks/probe_step.py --databin work/bible-multi-spm128k \\
        --work work/probe/spm128k --out scripts/bible/results/large_vocab_spm128k_probe
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from compare_logs import output_layer_params  # siblings in this folder (sys.path[0])
from machine_info import cpu_name, run_with_peak_rss

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TRAIN_SH = REPO / "scripts" / "recipes" / "train.sh"
# NAME -> (train.sh METHOD, tied by --tie)
CONFIGS = {
    "softmax": ("softmax", True),
    "mhe": ("mhe", True),
    "mhp": ("mhp", True),
    "adaptive": ("adaptive", False),
    "mhe-untied": ("mhe", False),
    "mhp-untied": ("mhp", False),
}


def train(name: str, databin: Path, savedir: Path, updates: int, extra: list, env: dict, log: Path) -> int:
    """train.sh NAME's configuration to ``updates`` (resumes a run there); its peak RSS in bytes.
    ``extra`` holds the shared tie flag (--tie) and the run's own arguments."""
    cmd = [TRAIN_SH, CONFIGS[name][0], databin, savedir, "--max-update", updates, "--disable-validation", *extra]
    print("+ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    with open(log, "a") as f:
        proc, peak = run_with_peak_rss(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"probe_step.py: error: {name} failed (exit {proc.returncode}); the end of {log}:\n{tail}")
    return peak


def target_vocab(databin: Path) -> int:
    """Target types with fairseq's four specials, from the data-bin's training pair."""
    tgt = next(databin.glob("train.*-*.*.idx")).name.split(".")[1].split("-")[1]
    return len((databin / f"dict.{tgt}.txt").read_text(encoding="utf-8").splitlines()) + 4


def table(res: dict) -> str:
    ceiling = res["tok_per_s"].get("softmax_body")
    soft_peak = res["runs"].get("softmax", {}).get("train_peak_rss_gb")
    lines = [
        f"# Step speed and peak training memory, {res['databin']} (target V = {res['vocab']:,})",
        "",
        f"`{res['command']}`",
        "",
        f"{res['cpu']}, {res['threads']} thread(s), {res['tokens']:,} target tokens in {res['batches']} real "
        f"batches of max-tokens {res['max_tokens']}; load average before / after {res['load_before']} / "
        f"{res['load_after']}.",
        "",
        "| configuration | step tok/s | of the ceiling | train peak RSS (GB) | softmax's peak / this | "
        "first start peak RSS (GB) | output-layer params |",
        "|---|---|---|---|---|---|---|",
    ]
    if ceiling:
        lines.append(f"| softmax body only (the ceiling) | {ceiling:,.1f} | 100.0 % | - | - | - | - |")
    for name, run in res["runs"].items():
        tps = res["tok_per_s"].get(name)
        frac = f"{100 * tps / ceiling:.1f} %" if ceiling and tps else "-"
        peak = run["train_peak_rss_gb"]
        ratio = f"{soft_peak / peak:.1f}x" if soft_peak else "-"
        lines.append(
            f"| {name} ({run['flags'] or 'untied'}) | {tps:,.1f} | {frac} | {peak:.2f} | {ratio} | "
            f"{run['first_start_peak_rss_gb']:.2f} | {run['output_params']:,} |"
        )
    lines += [
        "",
        "Step tok/s: one full training step (forward, the method's criterion, backward, Adam step) on the same "
        "batches, methods interleaved in one process (`step_speed.py`). The ceiling: the softmax model's "
        "body-only step (no output layer, no V x d gradient). Train peak RSS: the recipe's largest process "
        f"in a run of {res['steps']} training steps from scratch, no checkpoint saved, MHP / MHE reading the "
        "cached code table; first start: the 1-update run that built the table and saved a checkpoint. Output-layer params: float tensors under decoder.output_projection / "
        "adaptive_softmax / mhce_head (tied rows counted where they are stored).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--databin", required=True)
    p.add_argument("--work", required=True, help="save dirs of the short runs (reused when finished)")
    p.add_argument("--out", required=True, help="OUT.json and OUT.md are written")
    p.add_argument("--configs", default="softmax,mhe,mhp,adaptive", help=f"comma-separated, of {','.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=3, help="training steps of the memory run")
    p.add_argument("--batches", type=int, default=4, help="timed batches of step_speed.py")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--adaptive-cutoff", default="20000,60000", help="adaptive softmax cutoffs")
    p.add_argument(
        "--tie",
        default="--share-decoder-input-output-embed",
        help="the sharing flag of the tied configurations (adaptive softmax gets it too when it is "
        "--share-all-embeddings: its input embeddings are shared, its output is not)",
    )
    args = p.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"--configs {','.join(unknown)}: unknown; choose from {','.join(CONFIGS)}")
    databin, work = Path(args.databin).absolute(), Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ADAPTIVE_CUTOFF=args.adaptive_cutoff, MAX_TOKENS=str(args.max_tokens), WARMUP="100")
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    load_before = os.getloadavg()
    runs = {}
    for name in names:
        savedir, done = work / name, work / f"{name}.rss.json"
        tied = CONFIGS[name][1] or (args.tie == "--share-all-embeddings")
        flags = [args.tie] if tied else []
        if not done.exists():
            log = work / f"{name}.out"
            first = train(name, databin, savedir, 1, flags, env, log)
            cached = savedir / "mhce_code_table.json"
            extra = ["--no-save"] + (["--mhce-code-table", str(cached)] if cached.exists() else [])
            steps = train(name, databin, work / f"{name}.mem", args.steps, flags + extra, env, log)
            done.write_text(json.dumps({"first_start": first, "train": steps}) + "\n")
        rss = json.loads(done.read_text())
        runs[name] = {
            "flags": " ".join(flags),
            "first_start_peak_rss_gb": round(rss["first_start"] / 1e9, 3),
            "train_peak_rss_gb": round(rss["train"] / 1e9, 3),
            "output_params": output_layer_params(savedir / "checkpoint_last.pt"),
        }
    ckpts = {n: str(work / n / "checkpoint_last.pt") for n in names}
    cmd = [sys.executable, str(HERE / "step_speed.py"), json.dumps(ckpts), str(databin), str(args.max_tokens),
           "--batches", str(args.batches)]  # fmt: skip
    speed = json.loads(
        subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout.splitlines()[-1]
    )
    res = {
        "command": "python scripts/benchmarks/probe_step.py "
        + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "databin": str(databin.relative_to(REPO) if databin.is_relative_to(REPO) else databin),
        "vocab": target_vocab(databin),
        "cpu": cpu_name(),
        "threads": speed["threads"],
        "max_tokens": args.max_tokens,
        "batches": speed["batches"],
        "tokens": speed["tokens"],
        "steps": args.steps,
        "tok_per_s": speed["tok_per_s"],
        "runs": runs,
        "load_before": " ".join(f"{x:.2f}" for x in load_before),
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(table(res))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
