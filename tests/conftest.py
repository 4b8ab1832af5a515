"""Shared set-up of the test suite.

The suite runs on two cores (``make test``: two pytest-xdist workers), so
every test process, and every fairseq command it starts, uses one thread:
two workers with two threads each would oversubscribe the machine.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_runtest_setup(item):
    """Before the test's fixtures: whether it may run command-line tools."""
    from . import utils

    utils.CURRENT_TEST_IS_E2E = item.get_closest_marker("e2e") is not None
