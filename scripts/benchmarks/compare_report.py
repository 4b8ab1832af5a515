"""The tables, plots and prose of a comparison (``compare.py``'s sibling).

From the rows :mod:`compare_logs` reads back (one per method folder), the
step timing and the valid-perplexity curves: ``OUT/compare_NAME.md`` (the
header with data, budget, command and machine; the table; the notes that say
how each column was measured; per-language tables on one-to-many data; the
equal-wall-clock table), the same rows as ``.csv`` and ``.json``, the curves
as ``_curves.json`` and their plot ``_valid_ppl.png``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from machine_info import cpu_name  # a sibling (this folder is sys.path[0])

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
    "mhp-tied-seed2": "MHP + shortlist 2048, tied, automatic PPMI codes (seed 2)",
    "softmax-tied-seed3": "softmax, tied embeddings (seed 3)",
    "mhe-tied-seed3": "MHE per-token, tied, automatic PPMI codes (seed 3)",
    "mhe-tied-ls05": "MHE per-token, tied, automatic PPMI codes, label smoothing 0.0513 per head",
    "mhe-tied-ls05-seed2": "MHE per-token, tied, automatic PPMI codes, label smoothing 0.0513 per head (seed 2)",
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

    ``speed``: the interleaved in-process measurement (``step_speed.py``'s output);
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


# ----------------------------------------------------------------- curves
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


# ----------------------------------------------------------------- report
@dataclass
class Report:
    """What the report says about the run besides its rows: the table name and
    folder, the data-bin, the budget, the command and (for a run that trained,
    not ``--tables-only``) the load averages and start time."""

    name: str
    out: Path
    databin: Path
    max_update: int
    warmup: int
    max_tokens: str
    train_args: str = ""
    dense_subset: str = "test"
    command: str = ""
    notes: list = field(default_factory=list)  # --note lines
    extended: dict = field(default_factory=dict)  # {method: OLD_WORKDIR/METHOD} of continued runs
    load_start: tuple = None  # os.getloadavg() at the start; None: --tables-only
    load_end: tuple = None
    t_start: float = None


# how every column is measured (the same for every table)
METHOD_NOTES = [
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


def budget_text(train_args: str, max_update: int) -> str:
    hours = re.search(r"--stop-time-hours[ =]([\d.]+)", train_args)
    if hours:
        return (
            f"{float(hours.group(1)) * 60:g} minutes of training per method (--stop-time-hours "
            f"{hours.group(1)}; at most {max_update} updates)"
        )
    return f"{max_update} updates per method"


def header_lines(rep: Report, info: dict) -> list:
    """The lines above the table: data, budget, command, machine, load."""
    tgt_v = (info.get("dict_sizes") or {}).get(info.get("target_lang", ""), None)
    header = [
        f"## Comparison `{rep.name}`",
        "",
        f"- data: `{rep.databin}` ({info.get('tokenizer', '?')}, vocab {info.get('vocab_size', '?')}"
        f"{' joint' if info.get('joint') else ''}; target dictionary {tgt_v} entries; "
        f"lines {info.get('lines', '?')})",
        f"- budget: {budget_text(rep.train_args, rep.max_update)}, warm-up {rep.warmup}, everything else from "
        f"`scripts/recipes/train.sh` (transformer_iwslt_de_en family, 3+3 layers, d 256, ffn 1024, 4 heads, "
        f"no embedding sharing, adam lr 1e-3 inverse_sqrt, max-tokens {rep.max_tokens}, dropout 0.1)"
        + (f"; extra train args `{rep.train_args}`" if rep.train_args else ""),
        f"- command: `{rep.command}`",
        f"- machine: {machine_description()}",
    ]
    if rep.load_start is not None:
        header.append(
            f"- load average (1 min) at start {rep.load_start[0]:.2f}, at end {rep.load_end[0]:.2f}; "
            f"wall time of this run {time.time() - rep.t_start:,.0f} s"
        )
    return header


def notes_lines(rep: Report, rows: list, speed: dict = None) -> list:
    """The notes under the table: how each column was measured, then what
    holds for this run (signatures, the dense-row subset and whether BLEU
    agrees on both paths, continued runs, --note lines, the step timing)."""
    notes = list(METHOD_NOTES)
    sigs = {r.get("bleu_signature") for r in rows if r.get("bleu_signature")}
    sigs |= {r.get("chrf_signature") for r in rows if r.get("chrf_signature")}
    if sigs:
        notes.append("sacreBLEU signatures: " + "; ".join(f"`{s}`" for s in sorted(sigs)))
    notes += dense_row_notes(rep, rows)
    if rep.extended:
        notes.append(
            f"continued runs ({', '.join(rep.extended)}): each started as a copy of its finished run in "
            f"`{', '.join(sorted({str(Path(v).parent) for v in rep.extended.values()}))}` (checkpoints and train.log; --extend-from) and "
            "trained on from its checkpoint_last.pt; fairseq restores the training time already spent, so "
            "the budget counts both starts. Updates, best valid ppl, train wall, peak RSS and the valid curve "
            "cover both starts (the curve's second start begins where the first one's log ended); train tok/s "
            "averages the train_inner lines of both after each start's first"
        )
    notes += rep.notes
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
    return notes


def dense_row_notes(rep: Report, rows: list) -> list:
    """The dense-row subset, and whether BLEU agrees between MHP / MHE's
    factorized search and the dense row (on the same sentences)."""
    notes = []
    own = "bleu" if rep.dense_subset == "test" else "subset_bleu"  # same sentences as the dense decode
    both = [r for r in rows if r.get("dense_bleu") is not None and r.get(own) is not None]
    if rep.dense_subset != "test":
        notes.append(
            f"dense-row subset: `{rep.dense_subset}` (`{rep.databin}/raw/{rep.dense_subset}.*`); "
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
    return notes


def per_language_section(rows: list) -> list:
    """The per-language BLEU and chrF tables (one-to-many data), or []."""
    lang_md = per_language_table(rows, "bleu", "BLEU") + per_language_table(rows, "chrf", "chrF")
    if not lang_md:
        return []
    return lang_md + [
        "",
        "average = unweighted mean over the target languages "
        "(each has the same number of test verses); the main table's "
        "test BLEU / chrF are over all test lines at once",
    ]


def wall_clock_section(curves: dict, png: Path) -> list:
    """The equal-wall-clock table: every method at the shortest run's length."""
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
    return lines


def write_report(rep: Report, rows: list, info: dict, speed: dict, curves: dict) -> tuple:
    """OUT/compare_NAME.{md,csv,json}; with curves of more than one point also
    the valid-ppl plot, the equal-wall-clock table and ``_curves.json``.
    Prints the markdown; returns (md path, csv path)."""
    header = header_lines(rep, info)
    notes = notes_lines(rep, rows, speed)
    md, csv_path = write_tables(rows, Path(rep.out) / f"compare_{rep.name}", header, notes, speed)
    lang_md = per_language_section(rows)
    if lang_md:
        with open(md, "a") as f:
            f.write("\n".join(lang_md) + "\n")
    if any(len(c) > 1 for c in curves.values()):
        png = Path(rep.out) / f"compare_{rep.name}_valid_ppl.png"
        plot_curves(curves, png, f"{rep.name}: valid ppl against training time")
        with open(md, "a") as f:
            f.write("\n".join(wall_clock_section(curves, png)) + "\n")
        Path(str(md.with_suffix("")) + "_curves.json").write_text(json.dumps(curves, indent=1) + "\n")
    print("\n" + md.read_text())
    print(f"tables: {md} {csv_path}")
    return md, csv_path
