"""Shared set-up of the test suite.

* One thread per process: ``make test`` runs two pytest-xdist workers on the
  two cores, and every fairseq command they start uses one thread too (two
  workers with two threads each would oversubscribe the machine).
* Session fixtures shared across test files: the tiny copy-task data-bin and
  one model trained on it per method (MHP, MHE, MHS).  Under pytest-xdist
  each is built once for the whole run, by whichever worker asks first (a
  file lock in the run's shared temporary folder), and read by the others.
* Before each test: whether it is marked ``e2e`` (:mod:`tests.utils` refuses
  to run a command-line tool for a test that is not).
* The order of the files: the slowest first (:data:`SLOW_FILES`).
* ``one_thread``: torch on one thread in this process for a module's tests.

The helpers that test files share are in :mod:`tests.utils`.
"""

import os
import shutil
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402

pytest.register_assert_rewrite("tests.utils")  # its helpers' asserts explain themselves like a test's

import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

from . import utils  # noqa: E402
from .utils import SHARED_MODELS, make_copy_data, train_tiny  # noqa: E402


def pytest_runtest_setup(item):
    """Before the test's fixtures: whether it may run command-line tools."""
    utils.CURRENT_TEST_IS_E2E = item.get_closest_marker("e2e") is not None


# The slowest test files, slowest first (CPU seconds in `make test`).  Under
# --dist loadfile a worker takes one whole file at a time; handed out first,
# the long files overlap the short ones, which fill in at the end, instead of
# one long file running alone after the rest (longest-processing-time first).
# pytest-xdist 3 hands out the files with the most tests first.
SLOW_FILES = [
    "test_recipes.py", "test_recipe_guards.py", "test_end_to_end.py", "test_entry_points.py", "test_mhs.py",
    "test_runtime_guards.py", "test_distributed.py", "test_factorized_search.py", "test_prepare_multi.py",
    "test_fairseq_patches.py", "test_data_scripts.py",
]  # fmt: skip


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: no error where xdist is absent
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` handing out the files of :data:`SLOW_FILES` first,
    in that order, then the others in pytest-xdist's order."""
    from xdist.scheduler import LoadFileScheduling  # here: the hook runs only under pytest-xdist

    if config.getvalue("dist") != "loadfile" or not hasattr(LoadFileScheduling, "_assign_work_unit"):
        return None  # pytest-xdist's own scheduler

    rank = {name: i for i, name in enumerate(SLOW_FILES)}

    class SlowFilesFirst(LoadFileScheduling):
        def _assign_work_unit(self, node):
            # the queue of files not yet handed out ({file: its tests}), reordered (a stable sort)
            queue = sorted(self.workqueue.items(), key=lambda kv: rank.get(Path(kv[0]).name, len(rank)))
            self.workqueue.clear()
            self.workqueue.update(queue)
            super()._assign_work_unit(node)

    return SlowFilesFirst(config, log)


@pytest.fixture(scope="module")
def one_thread():
    """In-process work of a module on one thread (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): on a shared 2-core machine,
    two OpenMP threads next to another busy process run several times slower;
    the count is restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory) -> Path:
    """A folder every xdist worker of this run sees (the parent of the
    workers' own temporary folders), or this process's temporary folder."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


def built_once(root: Path, name: str, build):
    """``root/name`` built by ``build(path)`` once per run across workers;
    a build that failed is redone (and fails again) for the next asker."""
    path = root / name
    with FileLock(str(path) + ".lock"):
        done = path / ".built"
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def copy_bin(shared_root) -> Path:
    """The copy task (target = source, 2000/100/100 lines of 3-8 words over
    40 word types; V = 48 with fairseq's padding) preprocessed: the data-bin."""
    return built_once(shared_root, "copy", make_copy_data) / "bin"


def _trained(shared_root, copy_bin, method):
    def build(path):
        updates, flags = SHARED_MODELS[method]
        log = train_tiny(copy_bin, path / "save", method, *flags, updates=updates)
        (path / "train.out").write_text(log)

    path = built_once(shared_root, f"trained_{method}", build)
    return path / "save", (path / "train.out").read_text()


@pytest.fixture(scope="session")
def trained_mhp(shared_root, copy_bin):
    """(save dir, fairseq-train output) of the shared MHP model."""
    return _trained(shared_root, copy_bin, "mhp")


@pytest.fixture(scope="session")
def trained_mhe(shared_root, copy_bin):
    """(save dir, fairseq-train output) of the shared MHE model (H = 3)."""
    return _trained(shared_root, copy_bin, "mhe")


@pytest.fixture(scope="session")
def trained_mhs(shared_root, copy_bin):
    """(save dir, fairseq-train output) of the shared MHS model."""
    return _trained(shared_root, copy_bin, "mhs")
