#!/usr/bin/env python
"""Train, decode and score every output layer at one budget; write a table.

For each METHOD (softmax, adaptive, mhp, mhe, mhs)
this runs the recipe ``scripts/recipes/train.sh METHOD DATABIN WORKDIR/METHOD
--max-update N`` (identical model, optimizer and data for all; only the output
layer and its criterion differ) and then ``scripts/recipes/translate.sh`` (beam 5 on
the test split, sacreBLEU against ``DATABIN/raw/test.TGT``), and collects:

* test BLEU and chrF (sacreBLEU, signatures in the notes);
* best valid perplexity: min over fairseq's valid lines of ``ppl`` =
  2^nll_loss (base-2 NLL per target token; for adaptive_loss, whose loss has
  no label smoothing, fairseq logs ppl from the same base-2 NLL);
* training wall time: fairseq's "done training in X seconds" (includes its
  validation and checkpoint saving);
* training tokens/s: mean of fairseq's ``wps`` (target tokens per second) over
  the train_inner lines after the first (warm-up) one;
* step tok/s (interleaved): after all training, one full training step
  (forward, the method's criterion, backward, Adam step) of every method's
  last checkpoint is timed on the same real training batches, batch by batch
  in rotating order, in one process on the same threads (``step_speed.py``,
  run as a subprocess): relative speeds that other load on a shared machine
  hits alike (fairseq's wps, taken during each method's own run, cannot
  promise that);
* the ceiling: the softmax model's tokens/s if its output layer and loss cost
  nothing: its body-only step (``features_only=True`` decoder states, a
  negligible N x d proxy loss, backward, Adam step; the V x d projection gets
  no gradient and no update), timed in the same interleaved measurement; and
  fairseq's softmax wps with that cost per token (1/step_softmax -
  1/step_body) removed;
* decoding sentences/s at beam 5: fairseq-generate's "Translated ..." line;
  MHP and MHE decode with the factorized search (``translate.sh``'s
  default), and are decoded a second time on fairseq's dense row
  (``SEARCH=dense``) for the column beside it, whose BLEU must be the same;
* output-layer parameters: float tensors of the checkpoint under
  ``decoder.output_projection`` / ``decoder.adaptive_softmax`` /
  ``decoder.mhce_head``.

The budget is the same number of updates for every method (``--max-update``;
the fairer default: every model sees the same batches, and wall time is then
a result).  ``--stop-time-hours`` can be passed through ``--train-args``
instead, for a same-wall-clock comparison.

Nothing in ``--workdir`` is deleted: an existing non-empty ``WORKDIR/METHOD``
is refused (exit 2, before anything runs) unless ``--reuse`` covers it
(finished methods are kept; an unfinished one is renamed to
``METHOD.unfinished-DATE`` and trained again) or it is a run this command
continued from the same ``--extend-from`` before (fairseq resumes it).
``--extend-from`` must exist and differ from ``--workdir``.  A failing
``train.sh`` / ``translate.sh`` ends compare.py with its exit status and the
last lines of its log (``WORKDIR/METHOD.train.out``, ``.translate.out``).

Writes ``OUT/compare_NAME.md`` and ``.csv`` (and ``.json``), with the exact
command and the machine (``--out``, default ``scripts/benchmarks/results``).
This file is the command line and the orchestration (plan, train, translate,
reuse / extend); its siblings read the work folder back
(``compare_logs.py``), write the tables, plots and notes
(``compare_report.py``) and time the training steps (``step_speed.py``).
Example::

    python scripts/benchmarks/compare.py --databin work/bible-de-en/bin --name bible_spm8k \\
        --max-update 600 --warmup 200
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# siblings in this folder (sys.path[0] when this runs as a program)
from compare_logs import (
    EXTENDED,
    data_info,
    extended_sources,
    is_extended,
    last_start,
    read_curves,
    read_rows,
    read_speed,
)
from compare_report import Report, write_report
from machine_info import run_with_peak_rss

HERE = Path(__file__).resolve().parent  # scripts/benchmarks
REPO = HERE.parents[1]
RECIPES = REPO / "scripts" / "recipes"  # train.sh, translate.sh
DEFAULT_METHODS = ["softmax", "adaptive", "mhp", "mhe", "mhs"]


# ------------------------------------------------------------ the command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_run_args(p)
    add_folder_args(p)
    return p


def add_run_args(p):
    """What is trained and decoded, and with which budget."""
    p.add_argument("--databin", required=True, help="fairseq data-bin with raw/test.TGT")
    p.add_argument("--name", required=True, help="table name: OUT/compare_NAME.{md,csv}")
    p.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(DEFAULT_METHODS))
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=METHOD[:ARGS]",
        help="a named configuration of a method with extra fairseq-train args, e.g. "
        "'mhe-pt=mhe:--mhce-last-head per-token'; NAME can then be used in --methods "
        "(repeatable)",
    )
    p.add_argument("--max-update", type=int, default=600, help="the budget: updates per method")
    p.add_argument("--warmup", type=int, default=None, help="warm-up updates (default: max-update / 3)")
    p.add_argument("--train-args", default="", help="extra fairseq-train args for every method (quoted)")
    p.add_argument("--generate-args", default="", help="extra fairseq-generate args (quoted)")


def add_folder_args(p):
    """Where runs and tables go, what is kept or continued, the timing, notes."""
    p.add_argument("--workdir", default=None, help="checkpoints and logs; default work/compare/NAME")
    p.add_argument("--out", default=str(HERE / "results"), help="where the tables go")
    p.add_argument(
        "--speed-batches",
        type=int,
        default=12,
        help="real batches for the interleaved in-process step timing of all methods and of the "
        "softmax body alone (the ceiling); 0: skip",
    )
    p.add_argument(
        "--dense-subset",
        default="test",
        help="the split MHP / MHE are decoded on a second time on fairseq's dense row (a smaller "
        "one, e.g. test_en, where the dense row is slow at large V); when not 'test', every "
        "method is also decoded on it with its own path, for a same-sentences speed column",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep methods already finished in WORKDIR (train.log done + score.test.json); an "
        "unfinished METHOD folder is renamed to METHOD.unfinished-DATE (nothing is deleted) "
        "and that method trained again. Without --reuse / --extend-from an existing non-empty "
        "WORKDIR/METHOD is refused",
    )
    p.add_argument(
        "--extend-from",
        default=None,
        metavar="OLD_WORKDIR",
        help="continue each method from OLD_WORKDIR/METHOD's checkpoint_last.pt (copied into a new "
        "--workdir; OLD_WORKDIR is not changed and must exist and differ from --workdir) instead "
        "of from scratch: with --stop-time-hours, fairseq restores the training time already "
        "spent, so the budget counts the total; methods absent there train from scratch (said "
        "in the log)",
    )
    p.add_argument("--tables-only", action="store_true", help="only re-render the tables from WORKDIR")
    p.add_argument("--note", action="append", default=[], help="extra note line for the table")


@dataclass
class Comparison:
    """The command line settled: what to train, where, in which environment."""

    args: argparse.Namespace
    methods: list
    variants: dict  # NAME -> (METHOD, extra fairseq-train args)
    workdir: Path
    databin: Path
    warmup: int
    train_extra: list
    max_tokens: str  # of the recipe, or --max-tokens in --train-args
    env: dict  # for train.sh / translate.sh / step_speed.py
    command: str  # as the table shows it (without the --note lines)


def parse_variants(p, specs: list) -> dict:
    variants = {}
    for v in specs:
        name, _, spec = v.partition("=")
        method, _, extra = spec.partition(":")
        if not name or method not in DEFAULT_METHODS:
            p.error(f"--variant {v!r}: expected NAME=METHOD[:ARGS] with METHOD in {','.join(DEFAULT_METHODS)}")
        variants[name] = (method, shlex.split(extra))
    return variants


def max_tokens_of(train_extra: list) -> str:
    max_tokens = "4096"
    for i, a in enumerate(train_extra[:-1]):
        if a == "--max-tokens":
            max_tokens = train_extra[i + 1]
    return max_tokens


def recipe_env(warmup: int) -> dict:
    """The recipes' environment: WARMUP, and OMP_NUM_THREADS (all cores unless
    set), which this process takes too."""
    env = dict(os.environ, WARMUP=str(warmup))
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    os.environ["OMP_NUM_THREADS"] = env["OMP_NUM_THREADS"]
    return env


def shown_command(argv) -> str:
    """The command line for the table's header; notes are printed as notes."""
    argv_shown, skip = [], False
    for a in argv if argv is not None else sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            argv_shown.append(a)
    return "python scripts/benchmarks/compare.py " + " ".join(shlex.quote(a) for a in argv_shown)


def settle(p, args, argv) -> Comparison:
    variants = parse_variants(p, args.variant)
    warmup = args.warmup if args.warmup is not None else max(1, args.max_update // 3)
    train_extra = shlex.split(args.train_args)
    return Comparison(
        args=args,
        methods=args.methods.split(",") if args.methods else list(DEFAULT_METHODS) + list(variants),
        variants=variants,
        workdir=Path(args.workdir or REPO / "work" / "compare" / args.name).absolute(),
        databin=Path(args.databin).absolute(),
        warmup=warmup,
        train_extra=train_extra,
        max_tokens=max_tokens_of(train_extra),
        env=recipe_env(warmup),
        command=shown_command(argv),
    )


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    c = settle(p, args, argv)
    load_start = os.getloadavg()
    t_start = time.time()
    if not args.tables_only:
        return_code = train_and_decode_reporting_errors(c)
        if return_code:
            return return_code
    return report(c, load_start, t_start)


# ---------------------------------------------------- errors and steps
class CompareError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


class StepFailed(subprocess.CalledProcessError):
    """A recipe step (train.sh, translate.sh) exited non-zero; ``log_path``
    holds its output, whose tail says why."""

    def __init__(self, returncode, cmd, log_path=None, what=None):
        super().__init__(returncode, cmd)
        self.log_path, self.what = log_path, what

    def report(self, lines: int = 25) -> str:
        step = self.what or Path(str(self.cmd[0])).name
        status = f"exit status {self.returncode}" if self.returncode > 0 else f"signal {-self.returncode}"
        msg = f"{step} failed ({status})"
        if self.log_path is not None and Path(self.log_path).exists():
            tail = Path(self.log_path).read_text(errors="replace").rstrip().splitlines()[-lines:]
            msg += f"; the last lines of its log {self.log_path}:\n" + "\n".join("    " + t for t in tail)
        return msg + "\ncommand: " + " ".join(shlex.quote(str(c)) for c in self.cmd)


def run(cmd, env, log_path=None):
    """Run ``cmd``; returns (wall seconds, peak RSS in bytes of it and its
    descendants, ``machine_info.run_with_peak_rss``).  A non-zero exit raises
    :class:`StepFailed` (a ``CalledProcessError``) naming ``log_path``."""
    print("+ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    t = time.time()
    f = open(log_path, "w") if log_path is not None else None
    try:
        proc, peak = run_with_peak_rss(cmd, env=env, stdout=f, stderr=subprocess.STDOUT if f else None)
    finally:
        if f:
            f.close()
    if proc.returncode:
        raise StepFailed(proc.returncode, [str(c) for c in cmd], log_path)
    return time.time() - t, peak


# ------------------------------------------------------------- the plan
def check_dirs(args, methods: list, variants: dict, workdir: Path) -> Path:
    """Refusals that need no training (exit 2, nothing written): unknown
    methods, a --workdir that is a file, a missing --extend-from or one equal
    to --workdir.  Returns --extend-from as an absolute path (or None)."""
    unknown = [m for m in methods if m not in DEFAULT_METHODS and m not in variants]
    if unknown:
        raise CompareError(
            f"--methods {','.join(unknown)}: unknown; choose from {','.join(DEFAULT_METHODS)} "
            "or a NAME given with --variant NAME=METHOD[:ARGS]"
        )
    if workdir.exists() and not workdir.is_dir():
        raise CompareError(f"--workdir {workdir} exists and is not a directory")
    if args.extend_from is None:
        return None
    old = Path(args.extend_from).absolute()
    if not old.is_dir():
        raise CompareError(
            f"--extend-from {old}: no such directory; give the --workdir of the earlier compare.py run "
            "whose METHOD/checkpoint_last.pt should be continued (without --extend-from every method "
            "trains from scratch)"
        )
    if old.resolve() == workdir.resolve():
        raise CompareError(
            f"--extend-from {old} is --workdir itself; the runs there are kept as they are: give a new "
            f"--workdir (e.g. {workdir}_more) and --extend-from {old} to continue them to a larger budget "
            "(OLD_WORKDIR is copied, not changed)"
        )
    found = [m for m in methods if (old / m / "checkpoint_last.pt").exists()]
    if not found:
        raise CompareError(
            f"--extend-from {old} holds no METHOD/checkpoint_last.pt for any of {','.join(methods)}; "
            "is it the --workdir of an earlier compare.py run?"
        )
    return old


def plan_methods(methods: list, workdir: Path, extend_old, reuse: bool) -> dict:
    """What to do with each method's folder WORKDIR/METHOD, decided before
    anything runs: {method: (action, detail)} with action one of

    * ``reuse``: finished (train.log done + score.test.json) and ``--reuse``;
    * ``resume``: a run this command continued from ``--extend-from`` before
      (its ``extended_from.json`` names the same OLD_WORKDIR): fairseq resumes
      it from its own checkpoint_last.pt;
    * ``extend``: absent; starts as a copy of OLD_WORKDIR/METHOD;
    * ``fresh``: absent (or an empty folder); trained from scratch;
    * ``set_aside``: with ``--reuse``, an unfinished run: its folder (and its
      WORKDIR/METHOD.*.out logs) is renamed to ``detail`` and the method is
      trained from scratch.

    No folder is ever deleted: an existing non-empty WORKDIR/METHOD that none
    of these covers is a :class:`CompareError` naming ``--reuse`` /
    ``--extend-from``."""
    plan, refused = {}, []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for method in methods:
        savedir = workdir / method
        if savedir.exists() and not savedir.is_dir():
            refused.append(f"{savedir} exists and is not a directory")
            continue
        used = savedir.is_dir() and any(savedir.iterdir())
        log = savedir / "train.log"
        done = (
            (savedir / "score.test.json").exists()
            and log.exists()
            and "done training" in last_start(log.read_text(errors="replace"))
        )
        if used and reuse and done:
            plan[method] = ("reuse", None)
        elif used and extend_old is not None and is_extended(savedir):
            src = json.loads((savedir / EXTENDED).read_text()).get("from")
            if Path(src).resolve() != (extend_old / method).resolve():
                refused.append(f"{savedir} was continued from {src}, not from {extend_old / method}")
            else:
                plan[method] = ("resume", None)
        elif used and reuse:
            aside, n = workdir / f"{method}.unfinished-{stamp}", 1
            while aside.exists():
                n += 1
                aside = workdir / f"{method}.unfinished-{stamp}-{n}"
            plan[method] = ("set_aside", aside)
        elif used:
            what = sorted(p.name for p in savedir.iterdir())
            shown = ", ".join(what[:6]) + (", ..." if len(what) > 6 else "")
            refused.append(f"{savedir} exists and is not empty ({shown})")
        elif extend_old is not None and (extend_old / method / "checkpoint_last.pt").exists():
            plan[method] = ("extend", extend_old / method)
        else:
            plan[method] = ("fresh", None)
    if refused:
        raise CompareError(
            "; ".join(refused) + ". compare.py never deletes a method's folder (checkpoints, logs, your files). "
            "Pass --reuse to keep the finished methods there (an unfinished one is renamed to "
            "METHOD.unfinished-DATE and trained again), --extend-from OLD_WORKDIR with a new --workdir to "
            "continue OLD_WORKDIR's runs, or choose another --workdir (or move the folder away yourself)"
        )
    return plan


def extend_from(old: Path, savedir: Path) -> bool:
    """Start ``savedir`` as a copy of the finished run ``old`` (its checkpoints,
    train.log and peak RSS; copies, not links: fairseq rewrites
    checkpoint_best.pt in place) so that training continues from it; ``old``
    is left as it was.  False when ``old`` has no checkpoint_last.pt."""
    if not (old / "checkpoint_last.pt").exists():
        return False
    savedir.mkdir(parents=True, exist_ok=True)  # absent or empty (plan_methods)
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "train.log", "peak_rss.json"):
        if (old / name).exists():
            shutil.copy2(old / name, savedir / name)
    (savedir / EXTENDED).write_text(json.dumps({"from": str(old)}) + "\n")
    return True


# ------------------------------------------------------------- the runs
def train_and_decode_reporting_errors(c: Comparison) -> int:
    """:func:`train_and_decode`; a refusal or a failed step is printed without
    a traceback: exit status 2, or the step's own."""
    try:
        return train_and_decode(c)
    except CompareError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    except StepFailed as e:
        print(f"compare.py: error: {e.report()}", file=sys.stderr)
        return e.returncode if 0 < e.returncode < 256 else 1


def train_and_decode(c: Comparison) -> int:
    """Every method trained (or reused / continued) and decoded, then the
    second decodes on the dense-row subset, then the step timing."""
    extend_old = check_dirs(c.args, c.methods, c.variants, c.workdir)
    plan = plan_methods(c.methods, c.workdir, extend_old, c.args.reuse)  # before anything is written
    c.workdir.mkdir(parents=True, exist_ok=True)
    for method in c.methods:
        resume = prepare_savedir(c, method, *plan[method], extend_old)
        if resume is None:  # reused as it is
            continue
        train_method(c, method, resume)
        translate_method(c, method)
    decode_subset(c)
    time_steps(c)
    return 0


def prepare_savedir(c: Comparison, method: str, action: str, detail, extend_old):
    """Carry out the plan for WORKDIR/METHOD before training: None when the
    finished run is reused, else whether training continues an earlier run
    (then the earlier budget's decodes are removed)."""
    savedir = c.workdir / method
    if action == "reuse":
        print(f"compare: reusing {savedir}", flush=True)
        return None
    if action == "set_aside":
        savedir.rename(detail)
        for out in c.workdir.glob(f"{method}.*.out"):
            out.rename(detail / out.name)
        print(
            f"compare: {savedir} is an unfinished run (no 'done training' or no score.test.json); "
            f"moved to {detail}, {method} is trained from scratch",
            flush=True,
        )
    # a continued run killed part-way resumes from its own checkpoint_last.pt (fairseq's resume)
    resume = action == "resume"
    if action == "extend":
        resume = extend_from(detail, savedir)
    elif extend_old is not None and action != "resume":
        print(
            f"compare: {extend_old / method} has no checkpoint_last.pt: {method} is trained from "
            f"scratch (the other methods continue from {extend_old})",
            flush=True,
        )
    for stale in savedir.glob("*") if resume else []:  # decoded by the earlier budget's checkpoint
        if stale.name.startswith(("score.", "hyp.", "generate-")):
            stale.unlink()
    return resume


def train_method(c: Comparison, method: str, resume: bool):
    """train.sh into WORKDIR/METHOD; its peak RSS (of all starts) into peak_rss.json."""
    savedir = c.workdir / method
    print(
        f"\n=== {method}: train ({c.args.max_update} updates"
        f"{', continued from ' + c.args.extend_from if resume else ''}) ===",
        flush=True,
    )
    base, v_extra = c.variants.get(method, (method, []))
    _, peak = run(
        [RECIPES / "train.sh", base, c.databin, savedir, "--max-update", c.args.max_update, *c.train_extra, *v_extra],
        c.env,
        log_path=c.workdir / f"{method}.train.out",
    )
    if resume and (savedir / "peak_rss.json").exists():  # the peak of all starts
        peak = max(peak, json.loads((savedir / "peak_rss.json").read_text())["train_peak_rss_bytes"])
    (savedir / "peak_rss.json").write_text(json.dumps({"train_peak_rss_bytes": peak}) + "\n")


def translate_method(c: Comparison, method: str):
    """translate.sh on the test split (score.test.json); prints its BLEU line."""
    print(f"=== {method}: translate + score ===", flush=True)
    base = c.variants.get(method, (method, []))[0]
    run(
        [RECIPES / "translate.sh", base, c.databin, c.workdir / method, *shlex.split(c.args.generate_args)],
        c.env,
        log_path=c.workdir / f"{method}.translate.out",
    )
    print((c.workdir / f"{method}.translate.out").read_text().strip().splitlines()[-5], flush=True)


def decode_subset(c: Comparison):
    """MHP / MHE decoded a second time on fairseq's dense row (speed beside the
    factorized search) on --dense-subset; when that is not 'test', every
    method also on it with its own path.  Decodes already there are kept."""
    sub = c.args.dense_subset
    for method in c.methods:
        base = c.variants.get(method, (method, []))[0]
        savedir = c.workdir / method
        if not (savedir / "score.test.json").exists():
            continue
        todo = [("", {})] if sub != "test" else []  # every method's own path on the subset
        if base in ("mhp", "mhe"):
            todo.append((".dense", {"SEARCH": "dense"}))
        for tag, extra_env in todo:
            if not (savedir / f"score.{sub}{tag}.json").exists():
                print(f"=== {method}: translate {sub}{' on the dense row' if tag else ''} ===", flush=True)
                run(
                    [RECIPES / "translate.sh", base, c.databin, savedir, *shlex.split(c.args.generate_args)],
                    dict(c.env, SUBSET=sub, TAG=tag, **extra_env),
                    log_path=c.workdir / f"{method}.translate.{sub}{tag}.out",
                )


def time_steps(c: Comparison):
    """The interleaved step timing of every method's checkpoint_last.pt
    (step_speed.py, a subprocess) into WORKDIR/speed.json; one made for other
    methods or another batch count is redone, a matching one kept."""
    ckpts = {
        m: str(c.workdir / m / "checkpoint_last.pt")
        for m in c.methods
        if (c.workdir / m / "checkpoint_last.pt").exists()
    }
    n = c.args.speed_batches
    speed_path = c.workdir / "speed.json"
    if n > 0 and speed_path.exists():  # timing of other methods or batch count: redo
        old = json.loads(speed_path.read_text())
        if set(old["tok_per_s"]) - {"softmax_body"} != set(ckpts) or old["batches"] != n:
            speed_path.unlink()
    if n <= 0 or not ckpts or speed_path.exists():
        return
    print(
        f"=== step timing: {', '.join(ckpts)}{' + softmax body' if 'softmax' in ckpts else ''}, "
        f"{n} batches interleaved ===",
        flush=True,
    )
    cmd = [sys.executable, str(HERE / "step_speed.py"), json.dumps(ckpts), str(c.databin), c.max_tokens,
           "--batches", str(n)]  # fmt: skip
    proc = subprocess.run(cmd, env=c.env, stdout=subprocess.PIPE, text=True)  # its stderr: shown above
    if proc.returncode:
        raise StepFailed(proc.returncode, cmd, what="the interleaved step timing (step_speed.py)")
    speed_path.write_text(proc.stdout.strip().splitlines()[-1] + "\n")


# ------------------------------------------------------------- the report
def report(c: Comparison, load_start, t_start) -> int:
    """The tables of what WORKDIR holds (compare_report.py), also after --tables-only."""
    args = c.args
    rows = read_rows(c.methods, c.workdir, c.databin, args.dense_subset)
    speed = read_speed(c.workdir)
    trained = not args.tables_only
    rep = Report(
        name=args.name,
        out=Path(args.out),
        databin=c.databin,
        max_update=args.max_update,
        warmup=c.warmup,
        max_tokens=c.max_tokens,
        train_args=args.train_args,
        dense_subset=args.dense_subset,
        command=c.command,
        notes=args.note,
        extended=extended_sources(c.workdir, [r["method"] for r in rows]),
        load_start=load_start if trained else None,
        load_end=os.getloadavg() if trained else None,
        t_start=t_start,
    )
    write_report(rep, rows, data_info(c.databin), speed, read_curves(c.workdir, c.methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
