"""The plugin's import graph, derived from its sources: no cycle, and no
import inside a function without a comment saying why (an optional or heavy
dependency)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fairseq_mhce"
NAME = PACKAGE.name


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict:
    """{module name: (path, ast)} of every source file of the package."""
    return {module_name(p): (p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(mod: str, path: Path, node) -> list:
    """The package's modules an Import / ImportFrom node names."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == NAME]
    base = node.module or ""
    if node.level:
        up = package.split(".")
        up = up[: len(up) - (node.level - 1)]
        base = ".".join(up + ([base] if base else []))
    if base.split(".")[0] != NAME:
        return []
    # "from pkg import sub" imports the submodule sub when there is one
    return [f"{base}.{a.name}" for a in node.names] + [base]


def graph() -> dict:
    mods = modules()
    edges = {m: set() for m in mods}
    for mod, (path, tree) in mods.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[mod] |= {t for t in imported(mod, path, node) if t in mods and t != mod}
    return edges


def find_cycle(edges: dict):
    """One cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    edges = graph()
    assert len(edges) > 10 and any(edges.values())  # the graph was read
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def function_imports() -> list:
    """(file:line, source line) of every import inside a function of the package
    whose line (or the line before) carries no comment."""
    found = []
    for _, (path, tree) in modules().items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    line = lines[node.lineno - 1]
                    before = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
                    if "#" not in line and not before.startswith("#"):
                        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {line.strip()}")
    return found


def test_every_import_inside_a_function_says_why():
    bare = function_imports()
    assert not bare, "imports inside functions without a comment (optional or heavy dependency?):\n" + "\n".join(bare)
