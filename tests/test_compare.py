"""scripts/benchmarks/compare.py's helpers that need no training: per-language scores of
a one-to-many test set and the peak-RSS measurement of a child process.

compare.py is a program in scripts/benchmarks/, loaded from its file by
tests/utils.py's load_script (with its siblings machine_info.py,
compare_logs.py and compare_report.py)."""

import statistics
import subprocess
import sys

import pytest
import sacrebleu

from .utils import load_script

compare = load_script("compare")
compare_logs = load_script("compare_logs")
compare_report = load_script("compare_report")


def _databin(tmp_path, tags, refs, hyps):
    raw = tmp_path / "bin" / "raw"
    raw.mkdir(parents=True)
    (raw / "test.de").write_text("".join(f"{t} quelle {i}\n" for i, t in enumerate(tags)), encoding="utf-8")
    (raw / "test.mul").write_text("\n".join(refs) + "\n", encoding="utf-8")
    save = tmp_path / "run"
    save.mkdir()
    (save / "hyp.test.mul").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    return tmp_path / "bin", save


def test_per_language_scores_split_by_source_tag(tmp_path):
    # languages interleaved, not in blocks: the tag of each source line decides
    tags = ["<2it>", "<2en>", "<2en>", "<2it>", "<2en>"]
    refs = ["il cane dorme qui", "the cat sat on the mat", "a dog ran home", "la casa bianca", "we go now"]
    hyps = ["il cane dorme", "the cat sat on a mat", "a dog ran home", "la casa rossa", "we went now"]
    databin, save = _databin(tmp_path, tags, refs, hyps)
    out = compare_logs.per_language_scores(databin, save, "de", "mul")
    assert set(out) == {"en", "it", "average"}
    for lang, idx in (("en", [1, 2, 4]), ("it", [0, 3])):
        h, r = [hyps[i] for i in idx], [[refs[i] for i in idx]]
        assert out[lang]["lines"] == len(idx)
        assert out[lang]["bleu"] == round(sacrebleu.corpus_bleu(h, r).score, 2)
        assert out[lang]["chrf"] == round(sacrebleu.corpus_chrf(h, r).score, 2)
    assert out["en"]["bleu"] != out["it"]["bleu"]
    assert out["average"]["bleu"] == round(statistics.mean([out["en"]["bleu"], out["it"]["bleu"]]), 2)
    assert out["average"]["lines"] == 5
    md = compare_report.per_language_table([{"method": "mhe", "per_language": out}], "bleu", "BLEU")
    assert any(line.startswith("| method | average | en | it |") for line in md)


def test_per_language_scores_absent_without_tags_or_with_missing_lines(tmp_path):
    databin, save = _databin(tmp_path, ["Der", "Die"], ["a b", "c d"], ["a b", "c d"])
    assert compare_logs.per_language_scores(databin, save, "de", "mul") == {}  # no <2xx> tags: not one-to-many
    (databin / "raw" / "test.de").write_text("<2en> x\n<2it> y\n", encoding="utf-8")
    (save / "hyp.test.mul").write_text("a b\n", encoding="utf-8")
    assert compare_logs.per_language_scores(databin, save, "de", "mul") == {}  # a hypothesis missing


def test_run_reports_peak_rss_of_the_child_and_its_children(tmp_path):
    # a grandchild (as fairseq-train under train.sh) holds ~300 MB; the child itself is small
    grand = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.2)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grand!r}], check=True)"
    _, peak = compare.run([sys.executable, "-c", child], env=None, log_path=tmp_path / "log")
    assert peak > 300 * 2**20
    # a large caller (compare.py after loading checkpoints, or this test process)
    # must not raise the child's figure: Linux starts ru_maxrss at the forking process's RSS
    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    _, small = compare.run([sys.executable, "-c", "pass"], env=None)
    assert small < 200 * 2**20
    del ballast
    with pytest.raises(subprocess.CalledProcessError):
        compare.run([sys.executable, "-c", "raise SystemExit(3)"], env=None, log_path=tmp_path / "log2")
