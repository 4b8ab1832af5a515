#!/usr/bin/env python
"""Decoding speed and memory of the output layers, with the real
``fairseq-generate --beam 5``.

For each target vocabulary size V, four models of the same architecture
(``transformer_iwslt_de_en`` by default: 6+6 layers, d = 512) are built and
saved as fairseq checkpoints (random initialisation: decoding speed does not
depend on training, except for the factorized MHE search, see ``--head-scale``):

* ``softmax``         fairseq's Transformer, full ``V x d`` projection
* ``mhp-dense``       MHP head (H = ``--heads``), dense ``(hyps x V)`` row
* ``mhp-factorized``  same checkpoint, ``--mhce-search factorized``
* ``mhe-dense`` / ``mhe-factorized``  the same for an MHE head
* ``ceiling``         the softmax model with a 64-type target dictionary:
  identical encoder, decoder layers, source sentences and beam bookkeeping,
  but the output projection, the log-softmax and the beam top-k over
  ``beam x V`` shrink to nothing.  Its throughput is the most any output
  layer can reach with this decoder (the rest of the step is all that is
  left); it is measured next to every V, in the same run, so each variant is
  reported as a fraction of it.  (A tiny dictionary rather than a hook that
  removes the projection: it is a real checkpoint through the real CLI, and
  it removes every V-sized cost of the step, not only the matmul.)

Every run decodes the same synthetic source sentences (``--src-len`` tokens
from a fixed source dictionary) with ``--beam 5 --max-len-a 0 --max-len-b L
--min-len L``, so all variants take exactly L + 1 decoder steps.  Throughput
is fairseq-generate's own "Translated N sentences ... (X sentences/s" line
(generation time only, no start-up); peak memory is the child's peak RSS
(``wait4``), which includes the model's parameters.

``--head-scale s`` multiplies each head's output weights by s (a softmax
temperature of 1/s) before saving.  A randomly initialised head is nearly
uniform, which is the worst case of the factorized MHE search (no prefix can be
pruned, it degrades to the dense cost); a trained NMT model is confident, and
s = 4 gives random models a comparable confidence: the table reports the
measured mean top-1 probability and entropy of each multi-head model so the
choice can be judged.  Dense paths and MHP's search do not depend on it.

Usage::

    python scripts/benchmarks/bench_decode.py --quick    # V in {8k, 32k}, < 3 min
    python scripts/benchmarks/bench_decode.py            # V in {8k, 32k, 128k, 256k}

Writes ``results.md``, ``results.json`` and ``decode_speed.png`` to ``--out``
(default ``scripts/benchmarks/results/decode``).
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import run_with_peak_rss  # a sibling (this folder is sys.path[0])

HERE = Path(__file__).resolve().parent  # scripts/benchmarks
REPO = HERE.parents[1]
USER_DIR = str(REPO / "fairseq_mhce")
BIN = Path(sys.executable).parent
SRC_VOCAB = 8000
CEILING_VOCAB = 64
VARIANTS = [  # name, method (None: softmax), search
    ("softmax", None, "dense"),
    ("mhp-dense", "mhp", "dense"),
    ("mhp-factorized", "mhp", "factorized"),
    ("mhe-dense", "mhe", "dense"),
    ("mhe-factorized", "mhe", "factorized"),
]


def log(msg):
    print(f"[bench_decode {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_dict(path, prefix, n):
    # fairseq adds <s> <pad> </s> <unk> itself: n types here -> n + 4 ids
    path.write_text("".join(f"{prefix}{i} {10**8 - i}\n" for i in range(n)))


def make_databin(root: Path, tgt_vocab: int, n_sent: int, src_len: int, tgt_len: int, threads: int) -> Path:
    """Synthetic test set binarized with fairseq-preprocess; the target
    dictionary has exactly ``tgt_vocab`` ids (specials included)."""
    rng = random.Random(1234)  # same source sentences for every V
    text = root / "text"
    text.mkdir(parents=True, exist_ok=True)
    write_dict(text / "dict.src.txt", "s", SRC_VOCAB - 4)
    write_dict(text / "dict.tgt.txt", "t", tgt_vocab - 4)
    src = [" ".join(f"s{rng.randrange(SRC_VOCAB - 4)}" for _ in range(src_len)) for _ in range(n_sent)]
    tgt = [" ".join(f"t{rng.randrange(tgt_vocab - 4)}" for _ in range(tgt_len)) for _ in range(n_sent)]
    (text / "test.src").write_text("\n".join(src) + "\n")
    (text / "test.tgt").write_text("\n".join(tgt) + "\n")
    dest = root / "bin"
    run_cli(
        [
            "fairseq-preprocess",
            "--source-lang",
            "src",
            "--target-lang",
            "tgt",
            "--testpref",
            text / "test",
            "--srcdict",
            text / "dict.src.txt",
            "--tgtdict",
            text / "dict.tgt.txt",
            "--destdir",
            dest,
            "--workers",
            "1",
        ],
        threads,
    )
    return dest


OMP_WAIT_POLICY = "PASSIVE"


def run_cli(argv, threads, check=True):
    """Run a fairseq console script; returns (merged output, peak RSS MiB)."""
    # PASSIVE: idle OpenMP threads sleep instead of spinning.  On a machine
    # shared with other jobs, spinning threads that lose their core make a
    # 2-thread decode 10-30x slower (measured here); it costs little alone.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY=OMP_WAIT_POLICY)
    # the peak through a small wrapper: this script holds big models while it builds them
    p, peak = run_with_peak_rss(
        [BIN / argv[0], *argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    if check and p.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({p.returncode}):\n{p.stdout[-3000:]}")
    return p.stdout, peak / 2**20


def build_checkpoint(databin: Path, path: Path, arch: str, method, heads: int, head_scale: float, seed: int = 1):
    """An untrained model of ``arch`` saved the way fairseq-train saves one;
    returns (number of parameters, head statistics or None)."""
    import torch
    from fairseq import checkpoint_utils, options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    import fairseq_mhce  # noqa: F401

    argv = [str(databin), "--task", "translation_mhce", "--source-lang", "src", "--target-lang", "tgt",
            "--user-dir", USER_DIR, "--arch", arch + ("_mhce" if method else ""), "--dropout", "0.1"]  # fmt: skip
    if method:
        argv += ["--mhce-method", method, "--mhce-heads", str(heads)]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    torch.manual_seed(seed)
    task = tasks.setup_task(args)
    model = task.build_model(args)
    head = getattr(model.decoder, "mhce_head", None)
    stats = None
    if head is not None:
        with torch.no_grad():
            linears = [head.proj] if method == "mhp" else list(head.out)
            for lin in linears:
                lin.weight.mul_(head_scale)
            stats = head_stats(model, task, len(task.target_dictionary))
    cfg = convert_namespace_to_omegaconf(args)
    state = {
        "args": None,
        "cfg": cfg,
        "model": model.state_dict(),
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "CrossEntropyCriterion",
                "optimizer_name": "Adam",
                "lr_scheduler_state": {"best": None},
                "num_updates": 0,
            }
        ],
        "task_state": {},
        "extra_state": {"metrics": {}, "previous_training_time": 0},
        "last_optimizer_state": None,
    }
    checkpoint_utils.torch_persistent_save(state, str(path))
    n_params = sum(p.numel() for p in model.parameters())
    del model, state
    return n_params, stats


def head_stats(model, task, V):
    """Mean top-1 probability and entropy (nats) of the head's full
    distribution on 64 decoder states (random source, random prefix)."""
    import torch

    model.eval()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, len(task.source_dictionary), (4, 20), generator=g)
    prev = torch.randint(4, V, (4, 16), generator=g)
    prev[:, 0] = 2
    with torch.no_grad():
        feats, _ = model(src, torch.full((4,), 20), prev)
        lp = model.decoder.mhce_head.log_probs(feats.reshape(-1, feats.size(-1)))
        p = lp.exp()
        ent = -(p * lp.clamp(min=-1e30)).sum(-1)
    return {"top1": float(p.max(-1).values.mean()), "entropy": float(ent.mean())}


def generate(databin, ckpt, search, args):
    argv = ["fairseq-generate", databin, "--user-dir", USER_DIR, "--task", "translation_mhce",
            "--mhce-search", search, "--path", ckpt, "--beam", "5", "--batch-size", args.batch_size,
            "--max-len-a", "0", "--max-len-b", args.tgt_len, "--min-len", args.tgt_len,
            "--required-batch-size-multiple", "1", "--num-workers", "0", "--quiet",
            "--gen-subset", "test"]  # fmt: skip
    text, rss = run_cli(argv, args.threads)
    m = re.search(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s \(([\d.]+) sentences/s", text)
    if not m:
        raise RuntimeError(f"no 'Translated' line in fairseq-generate's output:\n{text[-3000:]}")
    n, tokens = int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))
    secs, sps = float(m.group(3)), float(m.group(4))
    if n != args.sentences or tokens != n * (args.tgt_len + 1):
        raise RuntimeError(f"expected {args.sentences} sentences of {args.tgt_len + 1} tokens, got {n} / {tokens}")
    if search == "factorized" and "per-step row of" not in text:
        raise RuntimeError(f"--mhce-search factorized did not take the factorized path:\n{text[-3000:]}")
    return {"sent_per_s": sps, "gen_seconds": secs, "peak_rss_mib": rss}


def fmt_v(v):
    return f"{v // 1024}k" if v % 1024 == 0 else str(v)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="V in {8k, 32k}, 20 sentences: a smoke test (< 3 min)")
    ap.add_argument("--vocab-sizes", default=None, help="comma-separated V (default 8192,32768,131072,262144)")
    ap.add_argument("--arch", default="transformer_iwslt_de_en")
    ap.add_argument("--heads", type=int, default=2, help="H of the MHP / MHE heads (balanced sizes)")
    ap.add_argument("--head-scale", type=float, default=4.0, help="multiply the heads' output weights (see above)")
    ap.add_argument("--sentences", type=int, default=None, help="test sentences (default 40, --quick 20)")
    ap.add_argument("--batch-size", type=int, default=None, help="sentences per batch (default 20)")
    ap.add_argument("--src-len", type=int, default=20)
    ap.add_argument("--tgt-len", type=int, default=20, help="every hypothesis has exactly this many tokens")
    ap.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of each fairseq-generate")
    ap.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        choices=["PASSIVE", "ACTIVE"],
        help="OMP_WAIT_POLICY of each fairseq-generate (see run_cli)",
    )
    ap.add_argument("--repeat", type=int, default=None, help="runs of each variant, best kept (default 3, --quick 1)")
    ap.add_argument(
        "--repeat-under",
        type=float,
        default=20.0,
        help="only variants whose generation took less than this (s) are repeated",
    )
    ap.add_argument("--variants", default=None, help="comma-separated subset of " + ",".join(v[0] for v in VARIANTS))
    ap.add_argument("--out", default=str(HERE / "results" / "decode"))
    ap.add_argument("--workdir", default=None, help="where data-bins and checkpoints go (default: a temp dir)")
    args = ap.parse_args()
    if args.vocab_sizes:
        vocab_sizes = [int(v) for v in args.vocab_sizes.split(",")]
    else:
        vocab_sizes = [8192, 32768] if args.quick else [8192, 32768, 131072, 262144]
    args.sentences = args.sentences or (20 if args.quick else 40)
    args.batch_size = args.batch_size or 20
    args.repeat = args.repeat or (1 if args.quick else 3)
    global OMP_WAIT_POLICY
    OMP_WAIT_POLICY = args.omp_wait_policy
    variants = [v for v in VARIANTS if not args.variants or v[0] in args.variants.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_decode_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    results = {"config": {k: v for k, v in vars(args).items()}, "vocab_sizes": vocab_sizes, "rows": []}
    try:
        cdir = work / "ceiling"
        cbin = make_databin(cdir, CEILING_VOCAB, args.sentences, args.src_len, args.tgt_len, args.threads)
        cckpt = cdir / "model.pt"
        build_checkpoint(cbin, cckpt, args.arch, None, args.heads, args.head_scale)
        for V in vocab_sizes:
            vdir = work / f"v{V}"
            databin = make_databin(vdir, V, args.sentences, args.src_len, args.tgt_len, args.threads)
            ckpts, stats, params = {}, {}, {}
            for method in sorted({m for _, m, _ in variants}, key=str):
                ckpts[method] = vdir / f"{method or 'softmax'}.pt"
                params[method], stats[method] = build_checkpoint(
                    databin, ckpts[method], args.arch, method, args.heads, args.head_scale
                )
            # round-robin repeats; the fastest run of each is kept (the machine
            # may be shared: interference only ever slows a run down).  Runs
            # longer than --repeat-under seconds average the noise out anyway
            # and are not repeated.
            # the cheap runs the fractions compare (ceiling, factorized) go next
            # to each other, so that they see the same load
            order = [("ceiling", "ceiling", "dense")] + sorted(variants, key=lambda v: v[2] != "factorized")
            runs = {}
            for rep in range(args.repeat):
                for name, method, search in order:
                    if rep and runs[name][-1]["gen_seconds"] > args.repeat_under:
                        continue
                    if name == "ceiling":
                        r = generate(cbin, cckpt, "dense", args)
                    else:
                        r = generate(databin, ckpts[method], search, args)
                    log(f"V={V} {name} (run {rep + 1}): {r['sent_per_s']:.2f} sent/s, {r['peak_rss_mib']:.0f} MiB")
                    runs.setdefault(name, []).append(r)
            for name, method, _ in [("ceiling", "ceiling", "dense")] + variants:
                best = max(runs[name], key=lambda r: r["sent_per_s"])
                r = dict(
                    best,
                    V=V,
                    variant=name,
                    all_sent_per_s=[x["sent_per_s"] for x in runs[name]],
                    peak_rss_mib=max(x["peak_rss_mib"] for x in runs[name]),
                )
                if name != "ceiling":
                    r.update(params=params[method], head=stats[method])
                results["rows"].append(r)
            shutil.rmtree(vdir, ignore_errors=True)  # checkpoints of V = 256k are ~1 GB each
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    results["total_seconds"] = time.time() - t_start
    report(results, out, args)


def report(results, out: Path, args):
    rows = results["rows"]
    by = {(r["V"], r["variant"]): r for r in rows}
    lines = [
        f"fairseq-generate --beam 5, {args.sentences} sentences of {args.src_len} source tokens, batch "
        f"{args.batch_size}, exactly {args.tgt_len} target tokens + eos each; {args.arch}, H = {args.heads}, "
        f"head scale {args.head_scale}; {args.threads} threads (OMP_WAIT_POLICY={args.omp_wait_policy}); "
        f"best of {args.repeat} run(s) each (runs over {args.repeat_under:.0f} s: one); total "
        f"{results['total_seconds'] / 60:.1f} min.",
        "",
        "| V | variant | sent/s | vs softmax | fraction of ceiling | peak RSS MiB | head top-1 p / entropy |",
        "|---|---|---|---|---|---|---|",
    ]
    for V in results["vocab_sizes"]:
        soft = by.get((V, "softmax"))
        ceil = by[(V, "ceiling")]
        lines.append(
            f"| {fmt_v(V)} | ceiling (softmax, {CEILING_VOCAB}-type target dict) | {ceil['sent_per_s']:.2f} | "
            + (f"{ceil['sent_per_s'] / soft['sent_per_s']:.2f}x" if soft else "-")
            + f" | 100% | {ceil['peak_rss_mib']:.0f} | - |"
        )
        for name, _, _ in VARIANTS:
            r = by.get((V, name))
            if r is None:
                continue
            ratio = f"{r['sent_per_s'] / soft['sent_per_s']:.2f}x" if soft else "-"
            head = f"{r['head']['top1']:.2f} / {r['head']['entropy']:.2f}" if r.get("head") else "-"
            lines.append(
                f"| {fmt_v(V)} | {name} | {r['sent_per_s']:.2f} | {ratio} | "
                f"{100 * r['sent_per_s'] / ceil['sent_per_s']:.0f}% | {r['peak_rss_mib']:.0f} | {head} |"
            )
    lines += [
        "",
        "fraction of ceiling = sent/s / ceiling sent/s = (speedup over softmax) / (the ceiling's speedup over "
        "softmax). peak RSS includes the model (the softmax model holds two V x d matrices, the others one).",
    ]
    checks = []
    for V in results["vocab_sizes"]:
        ceil = by[(V, "ceiling")]["sent_per_s"]
        for m in ("mhp", "mhe"):
            f, d = by.get((V, f"{m}-factorized")), by.get((V, f"{m}-dense"))
            if f:
                frac = f["sent_per_s"] / ceil
                checks.append(
                    f"{fmt_v(V)} {m}: factorized at {100 * frac:.0f}% of the ceiling"
                    + (" (>= 80%)" if frac >= 0.8 else " (BELOW the 80% target)")
                    + (f", {f['sent_per_s'] / d['sent_per_s']:.2f}x the dense path" if d else "")
                )
    if checks:
        lines += ["", "Target checks:", ""] + [f"- {c}" for c in checks]
    table = "\n".join(lines)
    print("\n" + table + "\n")
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        log("matplotlib not installed: no plot")
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    Vs = results["vocab_sizes"]
    for name in ["ceiling"] + [v[0] for v in VARIANTS]:
        pts = [(V, by[(V, name)]) for V in Vs if (V, name) in by]
        if not pts:
            continue
        style = "k--" if name == "ceiling" else "o-"
        a1.plot([p[0] for p in pts], [p[1]["sent_per_s"] for p in pts], style, label=name)
        a2.plot([p[0] for p in pts], [p[1]["peak_rss_mib"] for p in pts], style, label=name)
    for a, ylabel in ((a1, "sentences / s"), (a2, "peak RSS (MiB)")):
        a.set_xscale("log", base=2)
        a.set_xticks(Vs, [fmt_v(V) for V in Vs])
        a.set_xlabel("target vocabulary V")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3)
    a1.set_yscale("log")
    a1.legend(fontsize=8)
    a1.set_title(f"fairseq-generate --beam 5 ({args.arch}, {args.threads} threads)")
    fig.tight_layout()
    fig.savefig(out / "decode_speed.png", dpi=120)
    log(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'decode_speed.png'}")


if __name__ == "__main__":
    main()
