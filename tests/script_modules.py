"""The programs in ``scripts/ROLE/`` that tests call into, loaded as modules.

``scripts/`` is no package: its programs import a sibling in their folder by
its bare name (``import prepare_bible``, ``from machine_info import ...``),
which works when one runs as a program (its directory is then
``sys.path[0]``).  Here each is loaded once from its file by importlib and
entered in ``sys.modules`` under that bare name, its siblings first, so those
imports find them; nothing is added to ``sys.path``.  The package's own tools
are imported from :mod:`fairseq_mhce.cli` instead.
"""

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
# the folder of each program under scripts/
FOLDERS = {
    "compare": "benchmarks",
    "compare_logs": "benchmarks",
    "compare_report": "benchmarks",
    "machine_info": "benchmarks",
    "prepare_bible": "bible",
    "prepare_bible_multi": "bible",
}
# the siblings each program imports by name
SIBLINGS = {
    "compare": ("machine_info", "compare_logs", "compare_report"),
    "compare_report": ("machine_info",),
    "prepare_bible_multi": ("prepare_bible",),
}


def load(name: str):
    """``scripts/FOLDER/NAME.py`` as the module ``NAME`` (loaded once per process)."""
    path = SCRIPTS / FOLDERS[name] / f"{name}.py"
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__file__", None) == str(path):
        return module
    for sibling in SIBLINGS.get(name, ()):
        load(sibling)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
