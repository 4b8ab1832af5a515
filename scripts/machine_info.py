"""The CPU's name, for the machine line of the benchmark and comparison
tables (``scripts/bench_head.py``, ``scripts/compare.py``)."""
from __future__ import annotations

import platform


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
