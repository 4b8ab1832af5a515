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
  in rotating order, in one process on the same threads: relative speeds that
  other load on a shared machine hits alike (fairseq's wps, taken during
  each method's own run, cannot promise that);
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
command and the machine.  Example::

    python scripts/benchmarks/compare.py --databin work/bible-de-en/bin --name bible_spm8k \\
        --max-update 600 --warmup 200
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine_info import cpu_name, run_with_peak_rss  # a sibling (this folder is sys.path[0])

HERE = Path(__file__).resolve().parent  # scripts/benchmarks
REPO = HERE.parents[1]
RECIPES = REPO / "scripts" / "recipes"  # train.sh, translate.sh
DEFAULT_METHODS = ["softmax", "adaptive", "mhp", "mhe", "mhs"]
OUTPUT_PREFIXES = ("decoder.output_projection.", "decoder.adaptive_softmax.", "decoder.mhce_head.")
LABELS = {
    "softmax": "softmax (label_smoothed_cross_entropy)",
    "adaptive": "adaptive softmax (adaptive_loss)",
    "mhp": "MHP (mhce, H=2)",
    "mhe": "MHE (mhce, H=2)",
    "mhs": "MHS (mhce, sampled groups)",
    "mhe-shared": "MHE shared last head, identity codes",
    "mhe-shared-ppmi": "MHE shared last head, PPMI codes",
    "mhe-pt": "MHE per-token, identity codes",
    "mhe-pt-ppmi": "MHE per-token, PPMI codes",
    "mhe-pt-ppmi-h3": "MHE per-token, PPMI codes, H=3",
    "mhe-pt-ckpt": "MHE per-token, codes from the softmax's output vectors",
    "mhe-pt-ppmi-seed2": "MHE per-token, PPMI codes (seed 2)",
    "softmax-tied": "softmax, tied embeddings",
    "softmax-tied-seed2": "softmax, tied embeddings (seed 2)",
    "mhe-tied": "MHE per-token, tied, automatic PPMI codes",
    "mhe-tied-seed2": "MHE per-token, tied, automatic PPMI codes (seed 2)",
    "mhp-tied": "MHP + shortlist 2048, tied, automatic PPMI codes",
    "mhp-identity": "MHP, identity codes",
    "mhp-random": "MHP, random codes",
    "mhp-ppmi": "MHP, PPMI codes",
    "mhp-ckpt": "MHP, codes from the softmax's output vectors",
    "mhp-ppmi-realloc": "MHP, PPMI codes re-allocated every 100 updates",
    "mhp-ppmi-realloc1": "MHP, PPMI codes re-allocated once",
    "mhp-short1024": "MHP + shortlist 1024 (dictionary order), identity codes",
    "mhp-ppmi-short1024": "MHP + shortlist 1024, PPMI codes",
    "mhp-ppmi-short2048": "MHP + shortlist 2048, PPMI codes",
    "mhp-ppmi-short1024-seed2": "MHP + shortlist 1024, PPMI codes (seed 2)",
    "mhp-ppmi-short2048-seed2": "MHP + shortlist 2048, PPMI codes (seed 2)",
    "softmax-seed2": "softmax (seed 2)",
    "ceiling": "softmax body only (ceiling)",
}
COLUMNS = [
    ("method", "method"),
    ("bleu", "test BLEU"),
    ("chrf", "test chrF"),
    ("avg_bleu", "avg BLEU over languages"),
    ("best_valid_ppl", "best valid ppl"),
    ("train_seconds", "train wall (s)"),
    ("train_wps", "train tok/s"),
    ("wps_vs_softmax", "tok/s vs softmax"),
    ("step_tok_s", "step tok/s (interleaved)"),
    ("step_vs_softmax", "step vs softmax"),
    ("step_vs_ceiling", "step vs ceiling"),
    ("train_peak_rss_gb", "train peak RSS (GB)"),
    ("decode_sent_per_s", "decode sent/s (beam 5)"),
    ("subset_decode_sent_per_s", "decode sent/s on the dense-row subset"),
    ("decode_dense_sent_per_s", "dense-row decode sent/s"),
    ("output_params", "output-layer params"),
    ("updates", "updates"),
]


# ---------------------------------------------------------------- parsing
TRAIN_SH_START = "===== train.sh start "


def last_start(text: str) -> str:
    """The part of a train.sh log written by its latest start (train.sh appends
    one '===== train.sh start ...' line per start; older logs have none)."""
    i = text.rfind("\n" + TRAIN_SH_START)
    return text[i + 1 :] if i >= 0 else text


def starts(text: str) -> list:
    """The parts of a train.sh log, one per start, oldest first."""
    parts = re.split(r"\n(?=" + re.escape(TRAIN_SH_START) + ")", text)
    return [t for t in parts if t.strip()]


def parse_train_log(text: str, all_starts: bool = False) -> dict:
    """Numbers from a fairseq-train log in ``--log-format simple``: its latest
    start, or (``all_starts``, a run continued to a larger budget) all starts:
    updates and best ppl over all, wps over each start's train_inner lines after
    its first, training seconds summed."""
    parts = starts(text) if all_starts else [last_start(text)]
    inner, epoch_wps, ppl, updates, seconds = [], [], [], [], []
    for text in parts:
        wps_here = [float(m.group(1)) for m in re.finditer(r"\| train_inner \|.*?\bwps=([\d.]+)", text)]
        inner += wps_here[1:] if len(wps_here) > 1 else wps_here  # the first interval includes warm-up
        epoch_wps += [float(m.group(1)) for m in re.finditer(r"\| train \| epoch .*?\| wps ([\d.]+)", text)]
        ppl += [float(m.group(1)) for m in re.finditer(r"\| valid \| .*?\| ppl ([\d.]+)", text)]
        updates += [int(m.group(1)) for m in re.finditer(r"num_updates[ =](\d+)", text)]
        done = re.search(r"done training in ([\d.]+) seconds", text)
        seconds.append(float(done.group(1)) if done else None)
    wps = statistics.mean(inner) if inner else (statistics.mean(epoch_wps) if epoch_wps else None)
    return {
        "train_wps": wps,
        "wps_samples": len(inner),
        "best_valid_ppl": min(ppl) if ppl else None,
        "updates": max(updates) if updates else None,
        "train_seconds": sum(seconds) if seconds and None not in seconds else None,
    }


TS = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)"


def valid_curve(text: str, all_starts: bool = False) -> list:
    """[(seconds since training began, updates, valid ppl)] from a fairseq-train
    log (timestamps of its valid lines; t = 0 at 'begin training epoch 1').
    ``all_starts``: a run continued to a larger budget; each later start's clock
    begins where the previous one's last line (its 'done training') left off,
    the training time fairseq restores from the checkpoint."""
    from datetime import datetime

    def ts(line):
        m = re.match(TS, line)
        return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() if m else None

    out, offset = [], 0.0
    for part in starts(text) if all_starts else [last_start(text)]:
        t0, t_last = None, None
        for line in part.splitlines():
            if t0 is None and "begin training epoch" in line:
                t0 = ts(line)
            if t0 is not None and ts(line) is not None:
                t_last = ts(line)
            m = re.search(r"\| valid \| .*?\| ppl ([\d.]+) .*?\| num_updates (\d+)", line)
            if m and t0 is not None and ts(line) is not None:
                out.append((offset + ts(line) - t0, int(m.group(2)), float(m.group(1))))
        if t0 is not None:
            offset += t_last - t0
    return out


def equal_wall_clock(curves: dict) -> tuple:
    """The budget T = the shortest run's training time (its last validation);
    per method the last valid ppl reached by then and the updates done: the
    faster an output layer, the more updates it gets in T."""
    ends = [c[-1][0] for c in curves.values() if c]
    if not ends:
        return None, {}
    budget = min(ends)
    rows = {}
    for m, c in curves.items():
        seen = [p for p in c if p[0] <= budget + 1]
        if seen:
            rows[m] = {"seconds": seen[-1][0], "updates": seen[-1][1], "ppl": min(p[2] for p in seen)}
    return budget, rows


def plot_curves(curves: dict, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, c in curves.items():
        if c:
            ax.plot([p[0] for p in c], [p[2] for p in c], marker="o", ms=3, label=LABELS.get(m, m))
    ax.set_xlabel("training wall-clock seconds (since the first update)")
    ax.set_ylabel("valid perplexity (exact, base 2)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def output_layer_params(ckpt: Path) -> int:
    import torch

    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    state = torch.load(str(ckpt), map_location="cpu", weights_only=False)["model"]
    return sum(t.numel() for k, t in state.items() if k.startswith(OUTPUT_PREFIXES) and torch.is_floating_point(t))


def collect(method: str, savedir: Path, dense_subset: str = "test") -> dict:
    """One table row from a finished method directory (train.log, score.test.json)."""
    row = {"method": method}
    log = savedir / "train.log"
    if log.exists():
        row.update(parse_train_log(log.read_text(errors="replace"), all_starts=is_extended(savedir)))
    score = savedir / "score.test.json"
    if score.exists():
        s = json.loads(score.read_text())
        row.update(
            bleu=s["bleu"], chrf=s["chrf"], bleu_signature=s["bleu_signature"], chrf_signature=s["chrf_signature"]
        )
        if s.get("decoding"):
            row["decode_sent_per_s"] = s["decoding"]["sentences_per_s"]
    dense = savedir / f"score.{dense_subset}.dense.json"
    sub = savedir / f"score.{dense_subset}.json"
    if dense_subset != "test" and sub.exists():  # this method's own path on the dense row's subset
        s = json.loads(sub.read_text())
        row["subset_bleu"] = s["bleu"]
        if s.get("decoding"):
            row["subset_decode_sent_per_s"] = s["decoding"]["sentences_per_s"]
    if dense.exists():
        s = json.loads(dense.read_text())
        if s.get("decoding"):
            row["decode_dense_sent_per_s"] = s["decoding"]["sentences_per_s"]
        row["dense_bleu"] = s["bleu"]
    peak = savedir / "peak_rss.json"
    if peak.exists():
        row["train_peak_rss_gb"] = json.loads(peak.read_text())["train_peak_rss_bytes"] / 1e9
    ckpt = savedir / "checkpoint_best.pt"
    if ckpt.exists():
        row["output_params"] = output_layer_params(ckpt)
    return row


EXTENDED = "extended_from.json"  # marks a run continued from another workdir's (--extend-from)


def is_extended(savedir: Path) -> bool:
    return (savedir / EXTENDED).exists()


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


def per_language_scores(databin: Path, savedir: Path, src: str, tgt: str) -> dict:
    """BLEU / chrF per target language of a one-to-many test set
    (``prepare_bible_multi.py``: every source line starts with its target tag
    ``<2xx>``), from the hypotheses translate.sh wrote in test-line order;
    {} when the data has no tags.  'average' is the unweighted mean over
    languages (every language has the same number of test verses)."""
    import sacrebleu

    hyp_path, src_path = savedir / f"hyp.test.{tgt}", databin / "raw" / f"test.{src}"
    if not (hyp_path.exists() and src_path.exists()):
        return {}
    tags = [line.split(" ", 1)[0] for line in src_path.read_text(encoding="utf-8").splitlines()]
    if not tags or not all(re.fullmatch(r"<2[\w-]+>", t) for t in tags):
        return {}
    refs = (databin / "raw" / f"test.{tgt}").read_text(encoding="utf-8").splitlines()
    hyps = hyp_path.read_text(encoding="utf-8").splitlines()
    if not (len(tags) == len(refs) == len(hyps)):
        return {}
    out = {}
    for tag in sorted(set(tags)):
        idx = [i for i, t in enumerate(tags) if t == tag]
        h, r = [hyps[i] for i in idx], [[refs[i] for i in idx]]
        out[tag[2:-1]] = {
            "lines": len(idx),
            "bleu": round(sacrebleu.corpus_bleu(h, r).score, 2),
            "chrf": round(sacrebleu.corpus_chrf(h, r).score, 2),
        }
    out["average"] = {
        "lines": len(tags),
        "bleu": round(statistics.mean(v["bleu"] for v in out.values()), 2),
        "chrf": round(statistics.mean(v["chrf"] for v in out.values()), 2),
    }
    return out


def per_language_table(rows: list, key: str, title: str) -> list:
    langs = sorted({k for r in rows for k in r.get("per_language", {})} - {"average"})
    if not langs:
        return []
    md = [
        "",
        f"### {title} per target language (sacreBLEU on each language's test verses)",
        "",
        "| method | average | " + " | ".join(langs) + " |",
        "|" + "---|" * (len(langs) + 2),
    ]
    for r in rows:
        pl = r.get("per_language")
        if pl:
            md.append(
                f"| {LABELS.get(r['method'], r['method'])} | **{pl['average'][key]:.2f}** | "
                + " | ".join(f"{pl[lang][key]:.2f}" if lang in pl else "–" for lang in langs)
                + " |"
            )
    return md


def measure_speed(ckpts: dict, databin: str, n_batches: int, max_tokens: int) -> dict:
    """Training-step throughput of every method's checkpoint on the *same*
    real batches, interleaved (batch by batch, rotating the order of the
    methods), plus the softmax model's body-only step: relative speeds that
    load drift on a shared machine cannot skew.  Runs in a subprocess."""
    sys.path.insert(0, str(REPO))
    import torch
    from fairseq import checkpoint_utils, utils

    import fairseq_mhce  # noqa: F401

    runs = {}
    for m, ckpt in ckpts.items():
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([ckpt], arg_overrides={"data": databin})
        model = models[0]
        model.train()
        runs[m] = (model, task.build_criterion(cfg.criterion), torch.optim.Adam(model.parameters(), lr=1e-9), task)
    first = next(iter(runs.values()))
    task = first[3]
    task.load_dataset("train")
    itr = task.get_batch_iterator(
        dataset=task.dataset("train"),
        max_tokens=max_tokens,
        max_positions=utils.resolve_max_positions(task.max_positions(), first[0].max_positions()),
        ignore_invalid_inputs=True,
        seed=1,
    ).next_epoch_itr(shuffle=True)
    batches = [next(itr) for _ in range(n_batches + 1)]

    def step(name, sample):
        key = "softmax" if name == "softmax_body" else name
        model, criterion, opt, _ = runs[key]
        t = time.perf_counter()
        if name == "softmax_body":
            x, _ = model(**sample["net_input"], features_only=True)
            x.float().pow(2).mean().backward()  # N x d proxy loss: negligible
        else:
            loss, _, _ = criterion(model, sample)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    names = list(runs) + (["softmax_body"] if "softmax" in runs else [])
    for name in names:  # warm-up
        step(name, batches[0])
    secs = {n: 0.0 for n in names}
    tokens = 0
    for i, sample in enumerate(batches[1:]):
        tokens += sample["ntokens"]
        k = i % len(names)
        for name in names[k:] + names[:k]:
            secs[name] += step(name, sample)
    return {
        "batches": n_batches,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "seconds": secs,
        "tok_per_s": {n: tokens / t for n, t in secs.items()},
    }


# ----------------------------------------------------------------- tables
def fmt(key, value):
    if value is None:
        return "–"
    if key == "output_params":
        return f"{value:,}"
    if key in ("bleu", "chrf", "avg_bleu", "best_valid_ppl", "train_peak_rss_gb"):
        return f"{value:.2f}"
    if key in ("wps_vs_softmax", "step_vs_softmax"):
        return f"{value:.2f}x"
    if key == "step_vs_ceiling":
        return f"{100 * value:.0f}%"
    if key in ("train_wps", "train_seconds", "step_tok_s"):
        return f"{value:,.0f}"
    if key in ("decode_sent_per_s", "decode_dense_sent_per_s", "subset_decode_sent_per_s"):
        return f"{value:.1f}"
    return str(value)


def table_rows(rows: list, speed: dict = None) -> list:
    """Rows in display order, with relative speeds and the ceiling row added.

    ``speed``: the interleaved in-process measurement (``measure_speed``);
    without it there are no step columns and no ceiling row."""
    base = next((r for r in rows if r["method"] == "softmax"), None)
    tps = (speed or {}).get("tok_per_s", {})
    out = []
    for r in rows:
        r = dict(r)
        if base and base.get("train_wps") and r.get("train_wps"):
            r["wps_vs_softmax"] = r["train_wps"] / base["train_wps"]
        if r["method"] in tps:
            r["step_tok_s"] = tps[r["method"]]
            if "softmax" in tps:
                r["step_vs_softmax"] = tps[r["method"]] / tps["softmax"]
            if "softmax_body" in tps:
                r["step_vs_ceiling"] = tps[r["method"]] / tps["softmax_body"]
        out.append(r)
    if not base:
        return out
    if "softmax" in tps and "softmax_body" in tps:
        # output layer + loss seconds per target token of the softmax model
        dt = 1.0 / tps["softmax"] - 1.0 / tps["softmax_body"]
        row = {"method": "ceiling"}
        if base.get("train_wps") and 1.0 / base["train_wps"] - dt > 0:
            row["train_wps"] = 1.0 / (1.0 / base["train_wps"] - dt)
            row["wps_vs_softmax"] = row["train_wps"] / base["train_wps"]
        row["step_tok_s"] = tps["softmax_body"]
        row["step_vs_softmax"] = tps["softmax_body"] / tps["softmax"]
        row["step_vs_ceiling"] = 1.0
        out.append(row)
    return out


def write_tables(rows: list, out_base: Path, header: list, notes: list, speed: dict = None) -> tuple:
    rows = table_rows(rows, speed)
    columns = [(k, t) for k, t in COLUMNS if k == "method" or any(r.get(k) is not None for r in rows)]
    out_base.parent.mkdir(parents=True, exist_ok=True)
    md = list(header) + [""]
    md.append("| " + " | ".join(title for _, title in columns) + " |")
    md.append("|" + "---|" * len(columns))
    for r in rows:
        cells = [LABELS.get(r["method"], r["method"]) if k == "method" else fmt(k, r.get(k)) for k, _ in columns]
        md.append("| " + " | ".join(cells) + " |")
    md += [""] + [f"- {n}" for n in notes]
    md_path = out_base.with_suffix(".md")
    md_path.write_text("\n".join(md) + "\n")
    csv_path = out_base.with_suffix(".csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([k for k, _ in columns])
        for r in rows:
            w.writerow(["" if r.get(k) is None else r.get(k) for k, _ in columns])
    out_base.with_suffix(".json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return md_path, csv_path


def machine_description() -> str:
    desc = f"{cpu_name()}, {os.cpu_count()} CPU cores visible"
    try:
        import torch

        desc += f", torch {torch.__version__}"
        if torch.cuda.is_available():
            desc += f", GPU: {torch.cuda.get_device_name(0)}"
        else:
            desc += ", no GPU"
    except ImportError:
        pass
    return desc + f", OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


# -------------------------------------------------------------------- main
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


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
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
    p.add_argument("--measure-speed", nargs=3, metavar=("CKPTS_JSON", "DATABIN", "MAX_TOKENS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.measure_speed:
        ckpts, databin, max_tokens = args.measure_speed
        print(json.dumps(measure_speed(json.loads(ckpts), databin, args.speed_batches, int(max_tokens))))
        return 0

    variants = {}
    for v in args.variant:
        name, _, spec = v.partition("=")
        method, _, extra = spec.partition(":")
        if not name or method not in DEFAULT_METHODS:
            p.error(f"--variant {v!r}: expected NAME=METHOD[:ARGS] with METHOD in {','.join(DEFAULT_METHODS)}")
        variants[name] = (method, shlex.split(extra))
    methods = args.methods.split(",") if args.methods else list(DEFAULT_METHODS) + list(variants)
    workdir = Path(args.workdir or REPO / "work" / "compare" / args.name).absolute()
    databin = Path(args.databin).absolute()
    warmup = args.warmup if args.warmup is not None else max(1, args.max_update // 3)
    train_extra = shlex.split(args.train_args)
    max_tokens = "4096"
    for i, a in enumerate(train_extra[:-1]):
        if a == "--max-tokens":
            max_tokens = train_extra[i + 1]
    env = dict(os.environ, WARMUP=str(warmup))
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    os.environ["OMP_NUM_THREADS"] = env["OMP_NUM_THREADS"]
    argv_shown, skip = [], False
    for a in argv if argv is not None else sys.argv[1:]:  # notes are printed as notes
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            argv_shown.append(a)
    command = "python scripts/benchmarks/compare.py " + " ".join(shlex.quote(a) for a in argv_shown)
    load_start = os.getloadavg()
    t_start = time.time()

    if not args.tables_only:
        try:
            return_code = train_and_decode(args, methods, variants, workdir, databin, env, train_extra, max_tokens)
        except CompareError as e:
            print(f"compare.py: error: {e}", file=sys.stderr)
            return 2
        except StepFailed as e:
            print(f"compare.py: error: {e.report()}", file=sys.stderr)
            return e.returncode if 0 < e.returncode < 256 else 1
        if return_code:
            return return_code
    return write_report(args, methods, workdir, databin, warmup, max_tokens, command, load_start, t_start)


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


def train_and_decode(args, methods, variants, workdir, databin, env, train_extra, max_tokens) -> int:
    extend_old = check_dirs(args, methods, variants, workdir)
    plan = plan_methods(methods, workdir, extend_old, args.reuse)  # before anything is written
    workdir.mkdir(parents=True, exist_ok=True)
    for method in methods:
        savedir = workdir / method
        action, detail = plan[method]
        if action == "reuse":
            print(f"compare: reusing {savedir}", flush=True)
            continue
        if action == "set_aside":
            savedir.rename(detail)
            for out in workdir.glob(f"{method}.*.out"):
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
        print(
            f"\n=== {method}: train ({args.max_update} updates"
            f"{', continued from ' + args.extend_from if resume else ''}) ===",
            flush=True,
        )
        base, v_extra = variants.get(method, (method, []))
        _, peak = run(
            [
                RECIPES / "train.sh",
                base,
                databin,
                savedir,
                "--max-update",
                args.max_update,
                *train_extra,
                *v_extra,
            ],
            env,
            log_path=workdir / f"{method}.train.out",
        )
        if resume and (savedir / "peak_rss.json").exists():  # the peak of all starts
            peak = max(peak, json.loads((savedir / "peak_rss.json").read_text())["train_peak_rss_bytes"])
        (savedir / "peak_rss.json").write_text(json.dumps({"train_peak_rss_bytes": peak}) + "\n")
        print(f"=== {method}: translate + score ===", flush=True)
        run(
            [RECIPES / "translate.sh", base, databin, savedir, *shlex.split(args.generate_args)],
            env,
            log_path=workdir / f"{method}.translate.out",
        )
        print((workdir / f"{method}.translate.out").read_text().strip().splitlines()[-5], flush=True)

    sub = args.dense_subset
    for method in methods:  # MHP / MHE: the dense row too (speed beside the factorized search)
        base = variants.get(method, (method, []))[0]
        savedir = workdir / method
        if not (savedir / "score.test.json").exists():
            continue
        todo = [("", {})] if sub != "test" else []  # every method's own path on the subset
        if base in ("mhp", "mhe"):
            todo.append((".dense", {"SEARCH": "dense"}))
        for tag, extra_env in todo:
            if not (savedir / f"score.{sub}{tag}.json").exists():
                print(f"=== {method}: translate {sub}{' on the dense row' if tag else ''} ===", flush=True)
                run(
                    [RECIPES / "translate.sh", base, databin, savedir, *shlex.split(args.generate_args)],
                    dict(env, SUBSET=sub, TAG=tag, **extra_env),
                    log_path=workdir / f"{method}.translate.{sub}{tag}.out",
                )

    ckpts = {
        m: str(workdir / m / "checkpoint_last.pt") for m in methods if (workdir / m / "checkpoint_last.pt").exists()
    }
    speed_path = workdir / "speed.json"
    if args.speed_batches > 0 and speed_path.exists():  # timing of other methods or batch count: redo
        old = json.loads(speed_path.read_text())
        if set(old["tok_per_s"]) - {"softmax_body"} != set(ckpts) or old["batches"] != args.speed_batches:
            speed_path.unlink()
    if args.speed_batches > 0 and ckpts and not speed_path.exists():
        print(
            f"=== step timing: {', '.join(ckpts)}{' + softmax body' if 'softmax' in ckpts else ''}, "
            f"{args.speed_batches} batches interleaved ===",
            flush=True,
        )
        cmd = [sys.executable, __file__, "--databin", str(databin), "--name", args.name,
               "--speed-batches", str(args.speed_batches),
               "--measure-speed", json.dumps(ckpts), str(databin), max_tokens]  # fmt: skip
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)  # its stderr: shown above
        if proc.returncode:
            raise StepFailed(proc.returncode, cmd, what="the interleaved step timing (--measure-speed)")
        speed_path.write_text(proc.stdout.strip().splitlines()[-1] + "\n")
    return 0


def write_report(args, methods, workdir, databin, warmup, max_tokens, command, load_start, t_start) -> int:
    """The tables (OUT/compare_NAME.{md,csv,json}), the valid-ppl plot and the
    equal-wall-clock table from what WORKDIR holds."""
    rows = [collect(m, workdir / m, args.dense_subset) for m in methods if (workdir / m).exists()]
    info = json.loads((databin / "prepare_data.json").read_text()) if (databin / "prepare_data.json").exists() else {}
    for r in rows:  # one-to-many data: BLEU / chrF per target language too
        if info.get("source_lang") and info.get("target_lang"):
            r["per_language"] = per_language_scores(
                databin, workdir / r["method"], info["source_lang"], info["target_lang"]
            )
            if r["per_language"]:
                r["avg_bleu"] = r["per_language"]["average"]["bleu"]
    speed = json.loads((workdir / "speed.json").read_text()) if (workdir / "speed.json").exists() else None
    load_end = os.getloadavg()
    tgt_v = (info.get("dict_sizes") or {}).get(info.get("target_lang", ""), None)
    hours = re.search(r"--stop-time-hours[ =]([\d.]+)", args.train_args)
    budget_text = (
        f"{float(hours.group(1)) * 60:g} minutes of training per method (--stop-time-hours "
        f"{hours.group(1)}; at most {args.max_update} updates)"
        if hours
        else f"{args.max_update} updates per method"
    )
    header = [
        f"## Comparison `{args.name}`",
        "",
        f"- data: `{databin}` ({info.get('tokenizer', '?')}, vocab {info.get('vocab_size', '?')}"
        f"{' joint' if info.get('joint') else ''}; target dictionary {tgt_v} entries; "
        f"lines {info.get('lines', '?')})",
        f"- budget: {budget_text}, warm-up {warmup}, everything else from "
        f"`scripts/recipes/train.sh` (transformer_iwslt_de_en family, 3+3 layers, d 256, ffn 1024, 4 heads, "
        f"no embedding sharing, adam lr 1e-3 inverse_sqrt, max-tokens {max_tokens}, dropout 0.1)"
        + (f"; extra train args `{args.train_args}`" if args.train_args else ""),
        f"- command: `{command}`",
        f"- machine: {machine_description()}",
    ]
    if not args.tables_only:
        header.append(
            f"- load average (1 min) at start {load_start[0]:.2f}, at end {load_end[0]:.2f}; "
            f"wall time of this run {time.time() - t_start:,.0f} s"
        )
    notes = [
        "test BLEU / chrF: sacreBLEU on detokenized beam-5 output of checkpoint_best.pt (best valid loss) "
        "against the untokenized references",
        "best valid ppl = 2^(base-2 NLL per target token), fairseq's `ppl`; exact for every method "
        "(MHE: chain rule; MHP: product distribution renormalized over valid codes)",
        "train tok/s = mean of fairseq's `wps` (target tokens/s) over train_inner lines after the first; "
        "train wall = fairseq's 'done training in' (includes validation and checkpoint saving)",
        "step tok/s (interleaved): after all training, in the same run and on the same threads, one full "
        "training step (forward, the method's criterion, backward, Adam step) of every method's last "
        "checkpoint on the same real batches, batch by batch in rotating order, so that other load on the "
        "machine hits every method alike; the softmax body only (decoder states, a negligible N x d proxy loss, "
        "no output projection, its weights get no update) is timed the same way",
        "ceiling = the softmax model's tok/s with the output layer + loss cost removed: 'step' column = "
        "the body-only step; 'train' column = fairseq's softmax wps with that cost per token "
        "(1/step_softmax - 1/step_body) subtracted from its time per token",
        "label smoothing 0.1 everywhere except adaptive_loss, which has none; MHP smooths uniformly over V "
        "(closed form), MHE per head (auto)",
        "output-layer params: V x d projection (softmax, MHS), adaptive softmax head + tail clusters, "
        "or the multi-head module (MHP, MHE: head projections + prefix embeddings)",
    ]
    sigs = {r.get("bleu_signature") for r in rows if r.get("bleu_signature")}
    sigs |= {r.get("chrf_signature") for r in rows if r.get("chrf_signature")}
    if sigs:
        notes.append("sacreBLEU signatures: " + "; ".join(f"`{s}`" for s in sorted(sigs)))
    own = "bleu" if args.dense_subset == "test" else "subset_bleu"  # same sentences as the dense decode
    both = [r for r in rows if r.get("dense_bleu") is not None and r.get(own) is not None]
    if args.dense_subset != "test":
        notes.append(
            f"dense-row subset: `{args.dense_subset}` (`{databin}/raw/{args.dense_subset}.*`); "
            "'decode sent/s on the dense-row subset' is each method's own path on it (factorized "
            "search for MHP / MHE), 'dense-row decode sent/s' the MHP / MHE checkpoint on fairseq's "
            "dense row on it, BLEU compared on it"
        )
    if both:
        differ = [f"{r['method']} ({r[own]} vs {r['dense_bleu']})" for r in both if r[own] != r["dense_bleu"]]
        notes.append(
            "decode sent/s: MHP / MHE with the factorized search (`--task translation_mhce --mhce-search "
            "factorized`); dense-row decode sent/s: the same checkpoint on fairseq's dense row; test BLEU "
            + (
                "identical on both paths for " + ", ".join(r["method"] for r in both)
                if not differ
                else "differs between the paths for " + ", ".join(differ)
            )
        )
    extended = {
        r["method"]: json.loads((workdir / r["method"] / EXTENDED).read_text())["from"]
        for r in rows
        if is_extended(workdir / r["method"])
    }
    if extended:
        notes.append(
            f"continued runs ({', '.join(extended)}): each started as a copy of its finished run in "
            f"`{', '.join(sorted({str(Path(v).parent) for v in extended.values()}))}` (checkpoints and train.log; --extend-from) and "
            "trained on from its checkpoint_last.pt; fairseq restores the training time already spent, so "
            "the budget counts both starts. Updates, best valid ppl, train wall, peak RSS and the valid curve "
            "cover both starts (the curve's second start begins where the first one's log ended); train tok/s "
            "averages the train_inner lines of both after each start's first"
        )
    notes += args.note
    if speed:
        tps = speed["tok_per_s"]
        share = (
            f"; output layer + loss = {100 * (1 - tps['softmax'] / tps['softmax_body']):.0f}% of the "
            "softmax model's training step"
            if "softmax_body" in tps
            else ""
        )
        notes.append(
            f"step timing: {speed['batches']} batches, {speed['tokens']} target tokens, "
            f"{speed['threads']} thread(s){share}"
        )
    md, csv_path = write_tables(rows, Path(args.out) / f"compare_{args.name}", header, notes, speed)
    lang_md = per_language_table(rows, "bleu", "BLEU") + per_language_table(rows, "chrf", "chrF")
    if lang_md:
        with open(md, "a") as f:
            f.write(
                "\n".join(
                    lang_md
                    + [
                        "",
                        "average = unweighted mean over the target languages "
                        "(each has the same number of test verses); the main table's "
                        "test BLEU / chrF are over all test lines at once",
                    ]
                )
                + "\n"
            )
    curves = {
        m: valid_curve((workdir / m / "train.log").read_text(errors="replace"), is_extended(workdir / m))
        for m in methods
        if (workdir / m / "train.log").exists()
    }
    if any(len(c) > 1 for c in curves.values()):
        png = Path(args.out) / f"compare_{args.name}_valid_ppl.png"
        plot_curves(curves, png, f"{args.name}: valid ppl against training time")
        budget, eq = equal_wall_clock(curves)
        lines = [
            "",
            f"### Equal wall-clock: the first {budget:.0f} s of training (the shortest run's length)",
            "",
            "| method | updates done | best valid ppl by then |",
            "|---|---|---|",
        ]
        lines += [f"| {LABELS.get(m, m)} | {r['updates']} | {r['ppl']:.2f} |" for m, r in eq.items()]
        lines += [
            f"| {LABELS.get(m, m)} | {c[0][1]} (first validation only at {c[0][0]:.0f} s) | "
            f"none by then ({c[0][2]:.2f} at {c[0][0]:.0f} s) |"
            for m, c in curves.items()
            if c and m not in eq
        ]  # too slow to validate within T
        lines += [
            "",
            f"Valid ppl against wall-clock seconds: `{png.name}` (timestamps of fairseq's valid lines; "
            "runs that shared the machine's cores with other jobs carry that load).",
        ]
        with open(md, "a") as f:
            f.write("\n".join(lines) + "\n")
        Path(str(md.with_suffix("")) + "_curves.json").write_text(json.dumps(curves, indent=1) + "\n")
    print("\n" + md.read_text())
    print(f"tables: {md} {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
