#!/usr/bin/env python
"""Output layer + loss, forward and backward: time and peak memory.

Compares, at a fixed number of target tokens ``N`` and model dimension ``d``,
for each vocabulary size ``V``:

* ``fairseq label-smoothed``: fairseq's softmax path as
  ``label_smoothed_cross_entropy`` runs it: ``nn.Linear(d, V, bias=False)``
  (the decoder's output projection), ``fairseq.utils.log_softmax`` in float32
  and ``label_smoothed_nll_loss`` (eps 0.1, reduce=True);
* ``full softmax CE``: the same projection with ``F.cross_entropy`` (no
  smoothing): the plain reference;
* ``adaptive softmax``: fairseq's ``AdaptiveSoftmax`` (cutoffs V/4, 3V/4 as in
  ``scripts/recipes/train.sh``, factor 4, no dropout) with the loss lines of
  ``fairseq.criterions.adaptive_loss`` (a summed cross-entropy per cluster);
* ``MHP H2`` / ``MHE H2``: the plugin's real ``MultiHeadProduct`` /
  ``MultiHeadEmbedding`` on a ``MixedRadixCodec`` with balanced head sizes,
  through their ``.loss(x, target, eps=0.1)``, as the plugin's criterion;
* ``MHE H2 per-token``: ``MultiHeadEmbedding(last_head="per-token")`` (a
  ``V x d`` table, each target scored only against its group's vectors);
* ``MHS H2``: ``MultiHeadSampling``'s training loss with the model's default
  16-token groups, 0.25 of the head-1 groups;
* on a GPU, when importable: Cut Cross-Entropy (``cut_cross_entropy``) and
  Liger's fused linear cross-entropy (``liger_kernel``).

Inputs: ``x`` (N, d) with ``requires_grad`` (the decoder states), targets
drawn from a Zipf(1) law over the ids (fairseq dictionaries are sorted by
frequency; the adaptive softmax and MHS depend on it), fixed seed.  Each
(method, V) runs in a fresh subprocess: warm-up, then the median of the
timed forward+backward repeats (parameter gradients are dropped between
repeats, so each repeat allocates them as a training step does).  Peak
memory: on a GPU ``torch.cuda.max_memory_allocated`` above what was allocated
before the first step; on a CPU the process's peak RSS (``ru_maxrss``) above
its RSS before the first step (module, inputs and imports excluded, the
gradient buffers included).  Ratios are against ``fairseq label-smoothed``
measured in the same run.

Writes ``OUT.md`` (table), ``OUT.csv``, ``OUT.json`` and ``OUT.png`` (time
and memory against V, log-log).  ``--quick``: V in {8k, 32k}.

    python scripts/benchmarks/bench_head.py            # CPU: N 2048, d 512, fp32
    python scripts/benchmarks/bench_head.py --quick    # < 2 min on a 2-core CPU
    python scripts/benchmarks/bench_head.py --device cuda --dtype bf16 --tokens 8192 --dim 1024
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine_info import cpu_name  # a sibling (this folder is sys.path[0])

HERE = Path(__file__).resolve().parent  # scripts/benchmarks

METHODS = ["fairseq_ls", "softmax_ce", "adaptive", "mhp", "mhp_sl", "mhe", "mhe_pt", "mhs", "cce", "liger"]
LABELS = {
    "fairseq_ls": "fairseq label-smoothed",
    "softmax_ce": "full softmax CE",
    "adaptive": "adaptive softmax",
    "mhp": "MHP H2",
    "mhp_sl": "MHP H2 + shortlist 2048",
    "mhe": "MHE H2",
    "mhe_pt": "MHE H2 per-token",
    "mhs": "MHS H2",
    "cce": "Cut Cross-Entropy",
    "liger": "Liger fused linear CE",
}
BASELINE = "fairseq_ls"
EPS = 0.1


def available(method: str, device: str) -> str | None:
    """None when the method can run here, else why not."""
    if method in ("cce", "liger"):
        if device != "cuda":
            return "GPU only"
        mod = "cut_cross_entropy" if method == "cce" else "liger_kernel"
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} not importable"
    return None


# ------------------------------------------------------------ one config
def build(method, V, d, device, dtype, heads):
    """-> (modules holding parameters, step(x, target) -> scalar loss)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    if method in ("fairseq_ls", "softmax_ce", "cce", "liger"):
        proj = nn.Linear(d, V, bias=False).to(device, dtype)
        nn.init.normal_(proj.weight, mean=0.0, std=d**-0.5)
        if method == "fairseq_ls":
            from fairseq import utils
            from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

            def step(x, t):
                # decoder.get_normalized_probs: utils.log_softmax(logits, dim=-1) (float32)
                lprobs = utils.log_softmax(proj(x), dim=-1)
                loss, _ = label_smoothed_nll_loss(lprobs, t, EPS, ignore_index=1, reduce=True)
                return loss

        elif method == "softmax_ce":

            def step(x, t):
                return F.cross_entropy(proj(x).float(), t, reduction="sum")

        elif method == "cce":
            from cut_cross_entropy import linear_cross_entropy

            def step(x, t):
                return linear_cross_entropy(x, proj.weight, t, reduction="sum")

        else:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            lce = LigerFusedLinearCrossEntropyLoss(reduction="sum")

            def step(x, t):
                return lce(proj.weight, x, t)

        return [proj], step

    if method == "adaptive":
        from fairseq.modules.adaptive_softmax import AdaptiveSoftmax

        asm = AdaptiveSoftmax(V, d, [V // 4, 3 * V // 4], dropout=0.0).to(device, dtype)

        def step(x, t):
            # fairseq.criterions.adaptive_loss.AdaptiveLoss.forward, minus the model
            logits, target = asm(x.unsqueeze(0), t.view(-1))
            loss = x.new(1).zero_().float()
            for i in range(len(target)):
                if target[i] is not None:
                    loss = loss + F.cross_entropy(logits[i].float(), target[i], ignore_index=1, reduction="sum")
            return loss

        return [asm], step

    from fairseq_mhce.modules import MixedRadixCodec, output_layer_class

    name = {"mhe_pt": "mhe", "mhp_sl": "mhp"}.get(method, method)
    cls = output_layer_class(name)
    # the model's default sizes: balanced for MHP/MHE, 16-token groups for MHS
    code = None
    kw = {"last_head": "per-token"} if method == "mhe_pt" else {}
    if method == "mhp_sl":  # the model's default (2048 for V >= 4096): the first ids on the shortlist
        from fairseq_mhce.codes.table import shortlist_code
        from fairseq_mhce.config import resolve_shortlist

        kw = {"shortlist": resolve_shortlist(-1, V)}
        if not kw["shortlist"]:
            raise ValueError(f"mhp_sl: the automatic shortlist is empty at V = {V} (< 4096)")
        code = shortlist_code(torch.arange(V), kw["shortlist"])
    codec = MixedRadixCodec(V, cls.default_head_sizes(V, heads), code)
    head = cls(d, codec, **kw).to(device)
    head.to(dtype)  # parameters; the codec's buffers stay integer
    head.train()

    def step(x, t):
        head.set_num_updates(head.num_updates + 1 if name == "mhs" else 0)  # MHS: new negatives every step
        loss, _, _ = head.loss(x, t, EPS)
        return loss.sum()

    return [head], step


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(method, V, N, d, device, dtype_name, heads, warmup, repeats, max_seconds, seed=0):
    """Time and memory of one (method, V) in this process; returns a dict."""
    import torch

    import fairseq_mhce  # noqa: F401

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    torch.manual_seed(seed)
    mods, step = build(method, V, d, device, dtype, heads)
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, V + 1, dtype=torch.float64)
    probs = 1.0 / ranks
    probs[:4] = 0  # fairseq's <s> <pad> </s> <unk> are never targets here
    target = torch.multinomial(probs / probs.sum(), N, replacement=True, generator=g).to(device)
    x = (torch.randn(N, d, generator=g) * d**-0.5).to(device, dtype).requires_grad_(True)
    params = [p for m in mods for p in m.parameters()]
    n_params = sum(p.numel() for p in params)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def once():
        for p in params:
            p.grad = None
        x.grad = None
        sync()
        t = time.perf_counter()
        step(x, target).backward()
        sync()
        return time.perf_counter() - t

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    times = []
    for _ in range(warmup):
        once()
    t_start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - t_start < max_seconds):
        times.append(once())
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        "method": method,
        "V": V,
        "ms": 1000 * statistics.median(times),
        "repeats": len(times),
        "ms_min": 1000 * min(times),
        "peak_mib": max(0, peak) / 2**20,
        "params": n_params,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------- driver
def machine(device) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{cpu_name()}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def fmt_v(v):
    return f"{v // 1024}k" if v % 1024 == 0 else str(v)


def write_outputs(results, args, out: Path, command: str, notes):
    out.parent.mkdir(parents=True, exist_ok=True)
    vs = sorted({r["V"] for r in results})
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    by = {(r["method"], r["V"]): r for r in results}
    lines = [
        f"## Output layer + loss, forward + backward ({args.device}, {args.dtype}, "
        f"{args.tokens} target tokens, d = {args.dim})",
        "",
        f"- command: `{command}`",
        f"- machine: {machine(args.device)}",
        f"- load average (1 min) at start {notes['load_start']:.2f}, at end {notes['load_end']:.2f}",
        "",
        "Median ms / peak extra MiB per forward+backward:",
        "",
        "| V | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for v in vs:
        cells = []
        for m in methods:
            r = by.get((m, v))
            cells.append("–" if r is None else f"{r['ms']:.1f} / {r['peak_mib']:.0f}")
        lines.append(f"| {v:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Speed-up over {LABELS[BASELINE]} (time ratio, same run) and memory ratio:",
        "",
        "| V | " + " | ".join(LABELS[m] for m in methods if m != BASELINE) + " |",
        "|---|" + "---|" * (len(methods) - 1),
    ]
    for v in vs:
        base = by.get((BASELINE, v))
        cells = []
        for m in methods:
            if m == BASELINE:
                continue
            r = by.get((m, v))
            if r is None or base is None:
                cells.append("–")
            else:
                mem = base["peak_mib"] / r["peak_mib"] if r["peak_mib"] > 0 else float("inf")
                cells.append(f"{base['ms'] / r['ms']:.1f}x / {mem:.0f}x less")
        lines.append(f"| {v:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Output-layer parameters:",
        "",
        "| V | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for v in vs:
        lines.append(
            f"| {v:,} | " + " | ".join("–" if (m, v) not in by else f"{by[(m, v)]['params']:,}" for m in methods) + " |"
        )
    lines += [""] + [f"- {n}" for n in notes["lines"]]
    (out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    with open(out.with_suffix(".csv"), "w") as f:
        f.write("method,V,ms,ms_min,repeats,peak_mib,params,threads\n")
        for r in results:
            f.write(
                f"{r['method']},{r['V']},{r['ms']:.3f},{r['ms_min']:.3f},{r['repeats']},"
                f"{r['peak_mib']:.1f},{r['params']},{r['threads']}\n"
            )
    (out.with_suffix(".json")).write_text(json.dumps({"results": results, "command": command}, indent=2) + "\n")

    try:
        import logging

        import matplotlib

        logging.getLogger("matplotlib").setLevel(logging.WARNING)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in methods:
        rs = [by[(m, v)] for v in vs if (m, v) in by]
        if not rs:
            continue
        kw = dict(marker="o", label=LABELS[m], linestyle="--" if m == BASELINE else "-")
        axes[0].plot([r["V"] for r in rs], [r["ms"] for r in rs], **kw)
        axes[1].plot([r["V"] for r in rs], [max(r["peak_mib"], 0.5) for r in rs], **kw)
    for ax, ylabel in zip(axes, ("median ms (forward + backward)", "peak extra MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(vs)
        ax.set_xticklabels([fmt_v(v) for v in vs])
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"output layer + loss, {args.device} {args.dtype}, N = {args.tokens}, d = {args.dim}")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--vocab", default="8192,32768,131072,262144", help="comma-separated V")
    p.add_argument("--quick", action="store_true", help="V in 8192,32768 only")
    p.add_argument("--tokens", type=int, default=None, help="target tokens N (default 2048 CPU, 8192 GPU)")
    p.add_argument("--dim", type=int, default=None, help="model dimension d (default 512 CPU, 1024 GPU)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="default fp32 CPU, bf16 GPU")
    p.add_argument("--heads", type=int, default=2, help="H of MHP / MHE (MHS uses the model's default 16-token groups)")
    p.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, at least 3 (default 5; --quick 3)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="stop repeating after this (>= 3 repeats)")
    p.add_argument("--out", default=str(HERE / "results" / "head" / "bench_head"), help="output path without suffix")
    p.add_argument(
        "--one",
        nargs=2,
        metavar=("METHOD", "V"),
        help="measure one method at one V in this process and print its 'RESULT {json}' line "
        "(the table runs each pair this way, in a fresh process, so peak memory is its own)",
    )
    args = p.parse_args(argv)

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device == "cuda"
    args.tokens = args.tokens or (8192 if gpu else 2048)
    args.dim = args.dim or (1024 if gpu else 512)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")

    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.one:
        r = run_one(
            args.one[0],
            int(args.one[1]),
            args.tokens,
            args.dim,
            args.device,
            args.dtype,
            args.heads,
            args.warmup,
            args.repeats,
            args.max_seconds,
        )
        print("RESULT " + json.dumps(r))
        return 0

    vs = [8192, 32768] if args.quick else [int(v) for v in args.vocab.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    command = "python scripts/benchmarks/bench_head.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load_start = os.getloadavg()[0]
    results, skipped = [], []
    for m in methods:
        why = available(m, args.device)
        if why:
            skipped.append(f"{LABELS[m]}: skipped ({why})")
            print(f"skip {m}: {why}", file=sys.stderr)
            continue
        for v in vs:
            cmd = [sys.executable, __file__, "--one", m, str(v), "--tokens", str(args.tokens), "--dim",
                   str(args.dim), "--device", args.device, "--dtype", args.dtype, "--heads", str(args.heads),
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                   "--max-seconds", str(args.max_seconds)]  # fmt: skip
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                skipped.append(f"{LABELS[m]} at V={v:,}: failed ({err[:200]})")
                print(f"{m} V={v}: FAILED: {err}", file=sys.stderr)
                continue
            r = json.loads(line[0][7:])
            results.append(r)
            print(
                f"{LABELS[m]:>24} V={v:>7,}: {r['ms']:9.1f} ms  {r['peak_mib']:8.0f} MiB  " f"({r['repeats']} repeats)",
                flush=True,
            )
    notes = {
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "lines": [
            "each (method, V) in a fresh process; median over the timed repeats after "
            f"{args.warmup} warm-up step(s); targets Zipf(1) over the ids",
            "memory: "
            + (
                "torch.cuda.max_memory_allocated above the allocation before the first step"
                if gpu
                else "peak RSS (ru_maxrss) above the RSS before the first step "
                "(includes the gradient buffers; module, inputs and imports excluded)"
            ),
            "adaptive softmax: cutoffs V/4, 3V/4 (as scripts/recipes/train.sh), factor 4, adaptive_loss (no "
            "label smoothing); MHP/MHE: balanced H=2 head sizes (auto_head_sizes), eps 0.1; MHS: the model's default groups of 16 tokens ([ceil(V/16), 16]), samples "
            "0.25 of the head-1 groups (plus every group holding a target)",
        ]
        + skipped,
    }
    write_outputs(results, args, Path(args.out), command, notes)
    print("\n" + Path(args.out).with_suffix(".md").read_text())
    print(f"wrote {Path(args.out).with_suffix('.md')}, .csv, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
