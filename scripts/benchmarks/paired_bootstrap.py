#!/usr/bin/env python
"""sacreBLEU's paired bootstrap resampling per target language of a one-to-many test set.

Every system's hypotheses ``WORKDIR/SYSTEM/hyp.test.TGT`` (in test-line order,
as ``scripts/recipes/translate.sh`` writes them) are split by the target-language
token that starts each source line of ``DATABIN/raw/test.SRC`` (``__en__``, see
``compare_logs.TAG``), and each language is tested on its own against the
``--baseline`` system with ``sacrebleu.significance.PairedTest`` (the test of
``sacrebleu --paired-bs``, BLEU and chrF, 1000 samples, sacreBLEU's fixed
seed), then the whole test set.  Writes a markdown table: per language and
system, BLEU / chrF, the mean and 95 % interval of the resampled BLEU, and the
p-value of the difference to the baseline.  Example::

    python scripts/benchmarks/paired_bootstrap.py --databin work/bible-multi-spm128k \\
        --workdir work/compare/large_vocab_spm128k --baseline adaptive --systems mhe,softmax \\
        --out scripts/bible/results/large_vocab_spm128k_paired_bs.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compare_logs import TAG  # sibling in this folder (sys.path[0])
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest


def language_of(line: str) -> str:
    m = TAG.fullmatch(line.split(" ", 1)[0])
    if m is None:
        raise SystemExit(f"paired_bootstrap.py: error: a test source line has no target-language token: {line[:60]!r}")
    return m.group("lang") or m.group("lang2")


def read(path: Path) -> list:
    if not path.exists():
        raise SystemExit(f"paired_bootstrap.py: error: {path} does not exist")
    return path.read_text(encoding="utf-8").splitlines()


def test(named: list, refs: list, n: int) -> dict:
    """{metric: [baseline Result, then one per system]} of sacreBLEU's paired bootstrap."""
    metrics = {"BLEU": BLEU(references=[refs]), "chrF2": CHRF(references=[refs])}
    _, scores = PairedTest(named, metrics, references=None, test_type="bs", n_samples=n)()
    return scores


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--databin", required=True)
    p.add_argument("--workdir", required=True, help="compare.py's work folder: SYSTEM/hyp.test.TGT")
    p.add_argument("--baseline", required=True)
    p.add_argument("--systems", required=True, help="comma-separated; the baseline may be among them")
    p.add_argument("--out", required=True, help="the markdown table")
    p.add_argument("--samples", type=int, default=1000)
    args = p.parse_args(argv)
    databin, workdir = Path(args.databin), Path(args.workdir)
    pair = next(databin.glob("train.*-*.*.idx")).name.split(".")[1]
    src, tgt = pair.split("-")
    langs = [language_of(line) for line in read(databin / "raw" / f"test.{src}")]
    refs = read(databin / "raw" / f"test.{tgt}")
    systems = [args.baseline] + [s for s in args.systems.split(",") if s and s != args.baseline]
    hyps = {s: read(workdir / s / f"hyp.test.{tgt}") for s in systems}
    for s, h in hyps.items():
        if len(h) != len(refs):
            raise SystemExit(f"paired_bootstrap.py: error: {s} has {len(h)} hypotheses for {len(refs)} references")
    if len(systems) < 2:
        raise SystemExit("paired_bootstrap.py: error: give at least one system besides the baseline")
    lines = [
        f"# Paired bootstrap against {args.baseline}, per target language",
        "",
        "`python scripts/benchmarks/paired_bootstrap.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
        "",
        f"sacreBLEU's paired bootstrap resampling ({args.samples} samples, BLEU and chrF, its default seed) of each "
        f"system against {args.baseline}, on each language's test lines. p: the probability of the observed "
        "difference or a larger one under the null hypothesis; * p < 0.05.",
        "",
        "| language | lines | system | BLEU | BLEU mean (95% CI) | p (BLEU) | chrF | p (chrF) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    better = []
    for lang in sorted(set(langs)) + ["all"]:
        idx = [i for i, x in enumerate(langs) if lang in ("all", x)]
        named = [(s, [hyps[s][i] for i in idx]) for s in systems]
        scores = test(named, [refs[i] for i in idx], args.samples)
        for k, s in enumerate(systems):
            b, c = scores["BLEU"][k], scores["chrF2"][k]
            star = lambda r: "" if r.p_value is None else f"{r.p_value:.4f}{' *' if r.p_value < 0.05 else ''}"
            ci = f"{b.mean:.2f} (± {b.ci:.2f})" if b.mean is not None else "-"
            lines.append(f"| {lang} | {len(idx)} | {s} | {b.score:.2f} | {ci} | {star(b) or '-'} | {c.score:.2f} | "
                         f"{star(c) or '-'} |")  # fmt: skip
            if (
                lang != "all"
                and k > 0
                and b.p_value is not None
                and b.p_value < 0.05
                and b.score > scores["BLEU"][0].score
            ):
                better.append((s, lang))
    n_lang = len(set(langs))
    lines += [""] + [
        f"{s}: BLEU above {args.baseline} with p < 0.05 on {sum(1 for x, _ in better if x == s)} of {n_lang} languages."
        for s in systems[1:]
    ]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
