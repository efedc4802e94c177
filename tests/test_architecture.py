"""The import contract of src/retinafm: dependencies point one way, imports inside functions included.

Layers, highest first; a module may import its own layer (only the pairs in SAME_LAYER when they sit in
different packages) or any lower one:

    cli, __main__
    workflows
    engine, objectives
    models, tasks, stats, plots, overlays, data
    runtime, files, settings

Only the CLI imports workflows (the web app, serve, runs commands through the CLI or uses the engine);
nothing imports the CLI but __main__; the package root (the notebook API)
imports neither. The graph is read with `ast`, so a lazy `import` inside a function counts like one at the
top of a file.
"""
from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "retinafm"

LAYERS: list[set[str]] = [
    {"cli", "__main__", "serve"},  # the front ends: the command line and the local web app
    {"workflows"},
    {"engine", "objectives"},
    {"models", "tasks", "stats", "plots", "overlays", "data"},
    {"runtime", "files", "settings"},
]

# Imports between different packages of one layer, (importer, imported). Modules of one package
# (engine.loop -> engine.optim) and workflows among themselves may always import each other; the
# cycle test keeps those one-way.
SAME_LAYER = {
    ("__main__", "cli"),
    ("cli", "serve"),  # `retinafm serve` starts the web app; the app never imports the CLI
    ("tasks", "data"),  # a task reads its targets from the manifest
    ("tasks", "stats"),  # a task's metrics
    ("tasks", "plots"),  # a task's figures
    ("plots", "stats"),  # calibration bins, metric values drawn on the figures
    ("runtime", "settings"),  # precision / device choices are validated as settings
    ("runtime", "files"),
    ("settings", "files"),
}

# Layering breaks in the tree as it stands, each with the reason it is tolerated for now. The contract
# test ignores these and fails once one disappears, so that its entry is removed here.
KNOWN_BREAKS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str  # module name, e.g. retinafm.engine.loop
    imported: str  # the deepest module of src the statement names, e.g. retinafm.models.registry
    line: int

    def __str__(self) -> str:
        return f"{self.importer} imports {self.imported} ({_path(self.importer)}:{self.line})"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _path(module: str) -> str:
    return str(MODULES[module].relative_to(SRC.parent))


def _resolve(name: str) -> str | None:
    """The deepest module of src that `name` (a module or module.attribute) falls in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported_names(node: ast.AST, module: str) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the package the module sits in
            base = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        yield source  # its package's __init__ runs too
        yield from (f"{source}.{alias.name}" for alias in node.names)  # `from pkg import submodule`


def _imports() -> list[Import]:
    found = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for name in _imported_names(node, module):
                if name != ROOT and not name.startswith(ROOT + "."):
                    continue
                target = _resolve(name)
                # a module's own package (imported implicitly anyway) is not a dependency
                if target and target != module and not module.startswith(target + "."):
                    found.add(Import(module, target, node.lineno))
    return sorted(found, key=lambda i: (i.importer, i.imported, i.line))


IMPORTS = _imports()


def _package(module: str) -> str:
    """retinafm.engine.loop -> engine; retinafm.cli -> cli; the root package -> ''."""
    return module.split(".")[1] if module != ROOT else ""


def _layer(package: str) -> int:
    for rank, layer in enumerate(LAYERS):
        if package in layer:
            return rank
    raise AssertionError(f"retinafm.{package} is in no layer: add it to LAYERS in {Path(__file__).name}")


def _layering_breaks() -> dict[tuple[str, str], Import]:
    breaks = {}
    for imp in IMPORTS:
        low, high = _package(imp.importer), _package(imp.imported)
        if not low or not high or low == high:  # the root, and a package's own modules, are checked elsewhere
            continue
        if (low, high) in SAME_LAYER or _layer(high) > _layer(low):
            continue
        if low == high == "workflows":
            continue
        breaks.setdefault((imp.importer, imp.imported), imp)
    return breaks


def test_every_module_of_src_is_in_a_layer():
    packages = {_package(m) for m in MODULES} - {""}
    unplaced = sorted(p for p in packages if not any(p in layer for layer in LAYERS))
    assert not unplaced, f"retinafm.{unplaced[0]} is in no layer: add it to LAYERS in {Path(__file__).name}"


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    lines = {}
    for imp in IMPORTS:
        graph[imp.importer].add(imp.imported)
        lines.setdefault((imp.importer, imp.imported), imp)
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1]
    if cycles:
        cycle = _cycle_through(cycles[0], graph)
        steps = "\n  ".join(str(lines[a, b]) for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True))
        pytest.fail(f"{len(cycles)} import cycle(s); the first:\n  {steps}")


def test_imports_point_down_the_layers():
    breaks = _layering_breaks()
    new = [imp for key, imp in breaks.items() if key not in KNOWN_BREAKS]
    assert not new, ("imports against the layers (cli > workflows > engine, objectives > models, tasks, stats, "
                     "plots, data > runtime, files, settings):\n  " + "\n  ".join(map(str, new)))
    gone = sorted(set(KNOWN_BREAKS) - set(breaks))
    assert not gone, f"{gone[0][0]} no longer imports {gone[0][1]}: remove that entry from KNOWN_BREAKS"


def test_only_the_cli_imports_workflows():
    wrong = [imp for imp in IMPORTS if _package(imp.imported) == "workflows"
             and _package(imp.importer) != "workflows" and imp.importer not in (f"{ROOT}.cli", f"{ROOT}.__main__")]
    assert not wrong, "only retinafm.cli imports retinafm.workflows:\n  " + "\n  ".join(map(str, wrong))


def test_nothing_imports_the_cli():
    wrong = [imp for imp in IMPORTS if imp.imported == f"{ROOT}.cli" and imp.importer != f"{ROOT}.__main__"]
    assert not wrong, "only retinafm.__main__ imports retinafm.cli:\n  " + "\n  ".join(map(str, wrong))


def test_the_package_root_imports_no_workflow():
    wrong = [imp for imp in IMPORTS if imp.importer == ROOT and _package(imp.imported) in ("workflows", "cli")]
    assert not wrong, ("`import retinafm` must stay light (a notebook or a verb imports only what it uses):\n  "
                       + "\n  ".join(map(str, wrong)))


@pytest.mark.parametrize("cls", ["DistributedDataParallel", "GradScaler"])
def test_constructed_in_exactly_one_module(cls):
    where = {m: lines for m, path in MODULES.items() if (lines := _constructions(path, cls))}
    listing = "\n  ".join(f"{_path(m)}:{','.join(map(str, lines))}" for m, lines in sorted(where.items()))
    assert len(where) == 1, f"{cls}(...) is constructed in {len(where)} modules, one wanted:\n  {listing}"


def test_tests_take_helpers_from_helpers_py_only():
    """Fixtures come from conftest.py by name, shared functions from tests/helpers.py; importing conftest or
    another test module runs that module a second time under another name."""
    tests = Path(__file__).resolve().parent
    test_modules = {p.stem for p in tests.rglob("test_*.py")} | {"conftest"}
    wrong = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            wrong += [f"{path.relative_to(tests.parent)}:{node.lineno} imports {name}" for name in names
                      if name.split(".")[-1] in test_modules]
    assert not wrong, "import shared helpers from tests/helpers.py instead:\n  " + "\n  ".join(wrong)


def _constructions(path: Path, cls: str) -> list[int]:
    """Lines that call `cls`, by its name, an alias (`import ... as DDP`) or an attribute (torch.amp.GradScaler)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names = {cls} | {alias.asname for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     for alias in node.names if alias.name == cls and alias.asname}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if called in names:
                lines.append(node.lineno)
    return sorted(lines)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (the import graph is deep enough to matter for recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _cycle_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One cycle inside a strongly connected component, as the list of its modules in import order."""
    members = set(component)
    start = component[0]
    parents = {start: None}
    queue = [start]
    for node in queue:  # breadth first, so the cycle shown is a shortest one through `start`
        for child in sorted(graph[node] & members):
            if child == start:
                path = [node]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return path[::-1]
            if child not in parents:
                parents[child] = node
                queue.append(child)
    raise AssertionError("not a cycle")  # unreachable for a strongly connected component


def test_the_contract_catches_what_it_is_meant_to(tmp_path, monkeypatch):
    """The checks above run on a toy package with one of each fault, so a bug here cannot pass silently."""
    package = tmp_path / "src" / ROOT
    files = {
        "__init__.py": "import retinafm.workflows.demo\n",
        "cli.py": "",
        "workflows/__init__.py": "",
        "workflows/demo.py": "",
        "engine/__init__.py": "",
        "engine/loop.py": "def f():\n    from retinafm.data import io\n    from retinafm.cli import main\n",
        "data/__init__.py": "",
        "data/io.py": "from . import volumes\nfrom ..engine import loop\n",
        "data/volumes.py": "from retinafm.data.io import read\nimport torch\nx = torch.amp.GradScaler()\n",
        "files.py": "from torch.amp import GradScaler as S\nS()\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "SRC", tmp_path / "src")
    monkeypatch.setattr(module, "MODULES", _modules())
    monkeypatch.setattr(module, "IMPORTS", _imports())
    monkeypatch.setattr(module, "KNOWN_BREAKS", {})

    with pytest.raises(pytest.fail.Exception, match=r"retinafm.data.io imports retinafm.data.volumes"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match=r"retinafm.data.io imports retinafm.engine.loop \(src/retinafm/data/io"):
        test_imports_point_down_the_layers()
    with pytest.raises(AssertionError, match=r"retinafm.engine.loop imports retinafm.cli"):
        test_nothing_imports_the_cli()
    with pytest.raises(AssertionError, match=r"retinafm imports retinafm.workflows.demo"):
        test_only_the_cli_imports_workflows()
    with pytest.raises(AssertionError, match=r"retinafm imports retinafm.workflows.demo"):
        test_the_package_root_imports_no_workflow()
    with pytest.raises(AssertionError, match=r"in 2 modules, one wanted:\n\s*src/retinafm/data/volumes.py:3\n"
                                             r"\s*src/retinafm/files.py:2\n"):
        test_constructed_in_exactly_one_module("GradScaler")
