"""A finished training run exits 0 (issue 24, item 10).

fairseq's batch prefetcher (``fairseq.data.iterators.BackgroundConsumer``) is a
daemon thread still pulling batches when ``--max-update`` ends the run; if it
is inside a torch call when Python finalizes, the process aborts with
``terminate called without an active exception`` (status 134) after the
checkpoint was written.  The plugin stops those threads at exit
(:mod:`fairseq_mhce.clean_exit`).
"""

import os
import subprocess
import sys

import pytest

from .utils import REPO, make_copy_data, train_micro

pytestmark = pytest.mark.e2e

# fairseq's own prefetch thread over a source that is always inside a torch
# call (a matmul releases the GIL), and an exit after the first batch: the
# race of a real run, made certain
PROBE = """
import sys
import torch
from fairseq.data.iterators import BufferedIterator
if sys.argv[1] == "plugin":
    import fairseq_mhce  # noqa: F401
a = torch.randn(600, 600)
class Slow:
    def __len__(self):
        return 10000
    def __iter__(self):
        for _ in range(10000):
            yield a.mm(a).mm(a)
it = BufferedIterator(20, Slow())
next(it)
print("exiting with the prefetch thread inside torch", flush=True)
sys.exit(0)
"""


def probe(tmp_path, mode):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    # this checkout's plugin, one thread (the matmuls only need to be running)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(script), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="Python 3.14 no longer ends daemon threads at exit")
def test_prefetch_thread_inside_torch_at_exit(tmp_path):
    control = probe(tmp_path, "none")
    # without the plugin: the abort the issue saw (so this probe reproduces it)
    assert control.returncode in (-6, 134) and "terminate called without an active exception" in control.stdout, (
        control.returncode,
        control.stdout[-2000:],
    )
    for _ in range(2):
        p = probe(tmp_path, "plugin")
        assert p.returncode == 0, (p.returncode, p.stdout[-2000:])
        assert "terminate called" not in p.stdout


def test_tiny_training_exits_zero_every_time(tmp_path):
    """The issue's repro shape (an _mhce arch, 1+1 layers, d 32, --max-update
    3, the plugin's criterion), four runs in a row, each must exit 0."""
    data = make_copy_data(tmp_path / "data", n_train=600, n_valid=20, n_test=20, n_words=300)
    statuses = []
    for i in range(4):
        method = "mhp" if i % 2 == 0 else "mhe"
        p = train_micro(data, tmp_path / f"ck{i}", method, "--disable-validation", updates=3, check=False)
        assert "done training" in p.stdout, p.stdout[-3000:]
        statuses.append((p.returncode, "terminate called" in p.stdout))
    assert statuses == [(0, False)] * 4, statuses
