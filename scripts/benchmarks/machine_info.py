"""What the machine is and what a command cost on it, for the benchmark and
comparison tables (its siblings ``bench_head.py``, ``bench_decode.py`` and
``compare.py`` in ``scripts/benchmarks/``): the CPU's name and a command's
peak RSS."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs argv[2:] and writes its wait4 ru_maxrss to argv[1].  A small process of
# its own in between, because Linux starts a child's ru_maxrss at the resident
# set of the process it was forked from: forked directly from a caller that
# holds models, the command's peak could not be lower than the caller's.
_RUSAGE_WRAPPER = """
import json, os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(p.pid, 0)
json.dump({"maxrss_kib": ru.ru_maxrss}, open(sys.argv[1], "w"))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def cpu_name() -> str:
    """``model name`` from /proc/cpuinfo, else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_with_peak_rss(cmd, **kwargs) -> tuple:
    """``subprocess.run(cmd, **kwargs)`` that also measures the command's peak
    RSS; returns (CompletedProcess, peak bytes).  The peak is wait4's
    ``ru_maxrss``, which Linux reports as the largest resident set of the
    command and of every descendant it waited for (e.g. the fairseq process
    under a recipe script), not a sum; 0 if the wrapper could not report it."""
    with tempfile.TemporaryDirectory() as tmp:
        usage = Path(tmp) / "rusage.json"
        proc = subprocess.run([sys.executable, "-c", _RUSAGE_WRAPPER, str(usage), *map(str, cmd)], **kwargs)
        peak = json.loads(usage.read_text())["maxrss_kib"] * 1024 if usage.exists() else 0  # Linux: KiB
    return proc, peak
