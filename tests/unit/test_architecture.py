"""The package's shape, pinned: imports (lazy ones included) point down the stages, with no cycle anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "evapipe"
# data flows config -> model+data -> capture -> statistics -> state -> store -> apply; a wing imports only lower ones
STAGE = {"core": 0, "data": 1, "model": 1, "eva": 2, "corda": 2, "states": 3, "run": 4, "adapters": 5, "": 6}
MAX_MODULES_PER_WING = 12


def module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every evapipe module `path` imports, at the top or inside a function, resolved to a module name."""
    mod = module_of(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    modules = {module_of(p) for p in PACKAGE.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("evapipe") and name != mod:
                found.add(name)
    return found


GRAPH = {module_of(p): imports(p) for p in PACKAGE.rglob("*.py")}


def wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else ""


def test_every_wing_is_a_known_stage_of_at_most_twelve_modules():
    wings = {}
    for module in GRAPH:
        wings.setdefault(wing(module), []).append(module)
    assert set(wings) <= set(STAGE), f"a wing with no stage: {sorted(set(wings) - set(STAGE))}"
    for name, modules in wings.items():
        if name:
            assert len(modules) - 1 <= MAX_MODULES_PER_WING, name  # its modules, the __init__ not counted


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down_the_stages(module):
    up = [t for t in GRAPH[module] if wing(t) != wing(module) and STAGE[wing(t)] >= STAGE[wing(module)]
          and t != "evapipe"]  # the package root holds only the version and lazy exports
    assert not up, f"{module} imports from its own or a later stage: {up}"


def test_no_import_cycle():
    graph = {m: {t for t in ts if t != "evapipe"} for m, ts in GRAPH.items() if m != "evapipe"}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_class_over_200_lines_no_function_over_60():
    """A driver readable in one sitting: long bodies hide parts a second driver could reuse."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and size > 200 or \
                    isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and size > 60:
                long.append(f"{module_of(path)}.{node.name}: {size} lines")
    assert not long, long


def test_the_module_map_names_every_module():
    """The contributor page's map is how a newcomer finds where a thing happens: it must not fall behind."""
    text = (PACKAGE.parent / "docs" / "contributing.md").read_text()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent != PACKAGE:
            continue  # a wing's own docstring heads its section
        wing_header = f"**`{path.parent.name}/`" if path.parent != PACKAGE else "**Top level"
        section = text[text.index(wing_header):] if wing_header in text else ""
        assert f"| `{path.name}` |" in section.split("\n\n**")[0], f"docs/contributing.md lacks {path.relative_to(PACKAGE)}"
