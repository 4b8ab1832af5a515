"""The package's console scripts (setup.py's entry points) are installed and
point at fairseq_mhce/cli/*.main; tests and scripts need no path tricks (no
sys.path inserts in tests/ or scripts/, no Python inside a shell script's
heredoc, none at all in the recipes).  What the tools do is tested with them
(test_build_codes.py, test_driver_guards.py, test_recipe_guards.py,
test_mhs.py, test_data_scripts.py)."""

import importlib
import re

import pytest

from .utils import BIN, REPO

COMMANDS = {
    "mhce-build-codes": "fairseq_mhce.cli.build_codes",
    "mhce-average-checkpoints": "fairseq_mhce.cli.average_checkpoints",
    "mhce-export": "fairseq_mhce.cli.export",
    "mhce-prepare-data": "fairseq_mhce.cli.prepare_data",
}


def test_console_scripts_run_the_cli_mains():
    """The scripts pip wrote into the venv's bin (make install) import each
    module's main (read from the files: a stale fairseq_mhce.egg-info in the
    checkout can shadow the installed metadata for importlib.metadata)."""
    for name, module in COMMANDS.items():
        assert (BIN / name).is_file(), f"{BIN / name} missing: run make install"
        assert f"from {module} import main" in (BIN / name).read_text()
        assert importlib.import_module(module).PROG == name  # the name its messages and --help use
    setup = (REPO / "setup.py").read_text()
    assert all(f'"{name} = {module}:main"' in setup for name, module in COMMANDS.items())


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_names_the_command(name, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(COMMANDS[name]).main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: {name} ")


def test_no_path_tricks():
    insert = "sys.path." + "insert"
    scripts = REPO / "scripts"  # its programs in their role folders (recipes/, bible/, benchmarks/)
    python = [*(REPO / "tests").glob("*.py"), *scripts.rglob("*.py")]
    assert [str(p.relative_to(REPO)) for p in python if insert in p.read_text()] == []
    shell = sorted(scripts.rglob("*.sh"))
    assert scripts / "recipes" / "train.sh" in shell
    for path in shell:
        text = path.read_text()
        assert not re.search(r"python\S*\"? +- .*<<", text) and "<<'PY'" not in text, path
    for name in ("train.sh", "translate.sh", "recipe_common.sh"):
        assert "import " not in (scripts / "recipes" / name).read_text(), name
