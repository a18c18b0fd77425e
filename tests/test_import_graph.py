"""The house's import rules, checked on every module: `kernels` never imports `fastmath` (nor `bench` / `tests`),
`fastmath` never imports `bench` / `tests`, no stage file imports another stage, and no chain of imports comes back
to where it started (function-level imports count: a cycle through a lazy import is still a cycle). Also: no file of
the project points to notes outside the repository (docs/design.md holds what the code needs)."""

import ast
import importlib
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "fastmath")
STAGES = {"fastmath.sft", "fastmath.grpo_stage", "fastmath.eval"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (top level or inside a function)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from p import m` imports the submodule p.m when there is one, else a name defined in p
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if full in MODULES else node.module)
    return names


def _project_edges() -> dict[str, set[str]]:
    """module -> the project modules it imports (a name `a.b.c` resolves to the longest known module prefix)."""
    edges = {}
    for name, path in MODULES.items():
        targets = set()
        for imported in _imports(path):
            parts = imported.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in MODULES:
                    if candidate != name:
                        targets.add(candidate)
                    break
        edges[name] = targets
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    edges = _project_edges()
    assert "fastmath.train" in edges and "kernels.dispatch" in edges  # the walk found the packages
    cycles = _cycles(edges)
    assert not cycles, f"import cycles: {cycles}"


def test_a_cycle_is_found_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_imports_point_down():
    for name, path in MODULES.items():
        for imported in _imports(path):
            top = imported.split(".")[0]
            assert top not in ("bench", "tests"), f"{name} imports {imported}: nothing imports bench/ or tests/"
            if name.split(".")[0] == "kernels":
                assert top != "fastmath", f"{name} imports {imported}: kernels never imports fastmath"


def test_no_stage_imports_another_stage():
    edges = _project_edges()
    for stage in STAGES:
        assert not edges[stage] & (STAGES - {stage}), f"{stage} imports {edges[stage] & STAGES}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_file_points_outside_the_repository():
    outside = [n + ".md" for n in ("DESIGN", "NOTES", "STYLE")] + ["../" + "shared"]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for rel in tracked:
        path = REPO / rel
        if path.suffix not in (".py", ".md", ".yaml", ".sh", ".toml", ".cfg", ".txt") and path.name != "Makefile":
            continue
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{rel}: {word}" for word in outside if word in text]
    assert not offenders, offenders
