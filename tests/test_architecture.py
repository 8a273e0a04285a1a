"""The package's layering (docs/architecture.md), checked on its import graph: layers
only point down, no module imports itself back, no module is long, and the risk API
does not know the coordinator."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import cardiofed

ROOT = Path(cardiofed.__file__).parent

# Bottom to top; a unit is a top-level module or package of cardiofed. A unit may import
# units of its own layer or below (without cycles), never above.
LAYERS: list[set[str]] = [
    {"cardiofed", "exceptions", "names", "_pydantic", "_console", "defaults", "schema",
     "wire"},
    {"data"},
    {"evaluation"},
    {"models"},
    {"training"},
    {"aggregation"},
    {"algorithms"},
    {"privacy"},
    {"secure"},
    {"survival"},
    {"causal"},
    {"simulation"},
    {"experiments"},
    {"protocol", "web", "store"},
    {"serving"},
    {"node", "coordinator"},
    {"cli"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
# The imports allowed to point upwards: (importing file, imported module) -> why.
UPWARD: dict[tuple[str, str], str] = {}
MAX_LINES = 600


def _module(path: Path) -> str:
    parts = ("cardiofed", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> list[tuple[str, str, str]]:
    """(importing file, importer module, imported cardiofed module) for every import,
    including those inside functions."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        module = _module(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                names = [f"{target}.{a.name}" for a in node.names]
                # `from cardiofed.x import y` imports module x.y when y is a module
                targets = [n for n in names if _is_module(n)] or [target]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            rel = str(path.relative_to(ROOT.parent))
            out += [(rel, module, t) for t in targets if t.split(".")[0] == "cardiofed"]
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cardiofed"


def test_every_unit_has_a_layer():
    units = {_unit(_module(p)) for p in ROOT.rglob("*.py")}
    assert units - set(RANK) == set(), "add the new unit to LAYERS and docs/architecture.md"


def test_layers_only_point_down():
    upward = [(f, t) for f, m, t in _imports() if RANK[_unit(t)] > RANK[_unit(m)]]
    unexplained = [u for u in upward if u not in UPWARD]
    assert unexplained == []
    assert len(upward) <= 2


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for _, importer, target in _imports():
        while not _is_module(target):  # a name imported from a module: the module
            target = target.rpartition(".")[0]
        if target != importer:
            graph.setdefault(importer, set()).add(target)
    # A package's __init__ re-exporting its own modules is not a cycle of theirs.
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1]
    assert cycles == []


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            out.append(component)

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_serving_does_not_import_the_coordinator():
    assert [(f, t) for f, m, t in _imports()
            if _unit(m) == "serving" and _unit(t) == "coordinator"] == []


def test_no_long_modules():
    long = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


MODEL_LIBRARIES = {"torch", "opacus", "sklearn", "scipy", "pandas", "matplotlib"}


@pytest.mark.parametrize(("module", "heavy"), [
    # `cardiofed --help` must be instant: the heavy libraries, the services' too, load only
    # when a command needs them (bench/cli.py times it).
    ("cardiofed.cli", MODEL_LIBRARIES | {"sqlalchemy", "httpx", "fastapi", "numpy"}),
    # The coordinator trains nothing: its app starts without the model libraries
    # (PyTorch loads once a study needs initial weights).
    ("cardiofed.coordinator.app", MODEL_LIBRARIES),
])
def test_a_light_entry_point_loads_no_heavy_library(module: str, heavy: set[str]) -> None:
    code = f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout
    assert heavy & set(ast.literal_eval(loaded)) == set()
