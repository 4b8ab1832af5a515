"""What a compare.py work folder holds, read back (``compare.py``'s sibling).

Each method's folder ``WORKDIR/METHOD`` is what ``scripts/recipes/train.sh``
and ``scripts/recipes/translate.sh`` leave there: fairseq-train's log
``train.log`` (``--log-format simple``, one ``===== train.sh start`` line per
start), ``score.SUBSET[.dense].json``, the hypotheses, ``peak_rss.json`` and
the checkpoints.  This module parses them into one table row per method
(:func:`collect`), the valid-perplexity curves (:func:`valid_curve`), the
per-language scores of a one-to-many test set (:func:`per_language_scores`)
and the step timing ``WORKDIR/speed.json``.  Nothing here writes a file.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

OUTPUT_PREFIXES = ("decoder.output_projection.", "decoder.adaptive_softmax.", "decoder.mhce_head.")
TRAIN_SH_START = "===== train.sh start "
TS = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)"
EXTENDED = "extended_from.json"  # marks a run continued from another workdir's (--extend-from)
# the target-language token that starts each one-to-many source line (scripts/bible/prepare_bible_multi.py):
# fairseq's __xx__, or <2xx> as earlier builds wrote it
TAG = re.compile(r"__(?P<lang>[\w-]+?)__|<2(?P<lang2>[\w-]+)>")


# ------------------------------------------------------------ train.log
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


def read_curves(workdir: Path, methods: list) -> dict:
    """{method: valid_curve} for every method folder with a train.log."""
    return {
        m: valid_curve((workdir / m / "train.log").read_text(errors="replace"), is_extended(workdir / m))
        for m in methods
        if (workdir / m / "train.log").exists()
    }


# ------------------------------------------------------ a method's folder
def is_extended(savedir: Path) -> bool:
    return (savedir / EXTENDED).exists()


def extended_sources(workdir: Path, methods: list) -> dict:
    """{method: the OLD_WORKDIR/METHOD it was continued from} for the continued runs."""
    return {m: json.loads((workdir / m / EXTENDED).read_text())["from"] for m in methods if is_extended(workdir / m)}


def output_layer_params(ckpt: Path) -> int:
    import torch

    # the plugin's one checkpoint loader (runs no code in the file), memory-mapped: the optimizer state is not read
    from fairseq_mhce.safe_load import load_checkpoint_mapped

    state = load_checkpoint_mapped(str(ckpt))["model"]
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


# ------------------------------------------------------------ the work folder
def data_info(databin: Path) -> dict:
    """The data-bin's ``prepare_data.json`` (mhce-prepare-data's record), or {}."""
    path = databin / "prepare_data.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_rows(methods: list, workdir: Path, databin: Path, dense_subset: str) -> list:
    """One row per method folder present (:func:`collect`); on one-to-many data
    (the data-bin's languages known) also BLEU / chrF per target language."""
    rows = [collect(m, workdir / m, dense_subset) for m in methods if (workdir / m).exists()]
    info = data_info(databin)
    for r in rows:  # one-to-many data: BLEU / chrF per target language too
        if info.get("source_lang") and info.get("target_lang"):
            r["per_language"] = per_language_scores(
                databin, workdir / r["method"], info["source_lang"], info["target_lang"]
            )
            if r["per_language"]:
                r["avg_bleu"] = r["per_language"]["average"]["bleu"]
    return rows


def read_speed(workdir: Path):
    """The interleaved step timing ``WORKDIR/speed.json`` (step_speed.py's output), or None."""
    path = workdir / "speed.json"
    return json.loads(path.read_text()) if path.exists() else None


def per_language_scores(databin: Path, savedir: Path, src: str, tgt: str) -> dict:
    """BLEU / chrF per target language of a one-to-many test set
    (``prepare_bible_multi.py``: every source line starts with its target tag
    ``__xx__``, or ``<2xx>`` as earlier builds wrote it), from the hypotheses translate.sh wrote in test-line order;
    {} when the data has no tags.  'average' is the unweighted mean over
    languages (every language has the same number of test verses)."""
    import sacrebleu

    hyp_path, src_path = savedir / f"hyp.test.{tgt}", databin / "raw" / f"test.{src}"
    if not (hyp_path.exists() and src_path.exists()):
        return {}
    tags = [line.split(" ", 1)[0] for line in src_path.read_text(encoding="utf-8").splitlines()]
    if not tags or not all(TAG.fullmatch(t) for t in tags):
        return {}
    refs = (databin / "raw" / f"test.{tgt}").read_text(encoding="utf-8").splitlines()
    hyps = hyp_path.read_text(encoding="utf-8").splitlines()
    if not (len(tags) == len(refs) == len(hyps)):
        return {}
    out = {}
    for tag in sorted(set(tags)):
        idx = [i for i, t in enumerate(tags) if t == tag]
        h, r = [hyps[i] for i in idx], [[refs[i] for i in idx]]
        m = TAG.fullmatch(tag)
        out[m.group("lang") or m.group("lang2")] = {
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
