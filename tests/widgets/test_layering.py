"""Layering: emloc_nb's modules import one way (no cycle, counting imports inside functions and lazy names);
the core never imports the notebook stack; the pure builders never import ipywidgets; nothing outside
emloc_nb.layout and emloc_nb.run spells out a path inside a run directory."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_STACK = {"ipywidgets", "plotly", "IPython", "anywidget"}
PACKAGES = {
    ROOT / "emloc_nb": "emloc_nb",
    ROOT / "widgets": "emloc_nb.widgets",
    ROOT / "widgets" / "plots": "emloc_nb.widgets.plots",
}  # folder -> the package it installs as
CORE = sorted((ROOT / "emloc_nb").glob("*.py"))
PURE = sorted((ROOT / "widgets" / "plots").glob("*.py")) + [
    ROOT / "widgets" / "focus.py",
    ROOT / "widgets" / "tables.py",
    ROOT / "widgets" / "tokens.py",
]
RUN_LAYOUT = ("emulator/spectra", "results.json", "history.json", "calibrate/", "correct/")


def import_base(node: ast.ImportFrom, package: str) -> str:
    """The module a `from ... import` reads from, a relative one resolved against `package`."""
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        anchor = ".".join(parts[: len(parts) - node.level + 1])
        base = f"{anchor}.{base}" if base else anchor
    return base


def imported_modules(source: str, package: str) -> set[str]:
    """Every module a source imports, absolute or relative (resolved against `package`)."""
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = import_base(node, package)
            if node.level:
                modules |= {f"{base}.{a.name}" for a in node.names}  # `from . import x` may import a submodule
            modules.add(base)
    return modules


def imports_of(path: Path) -> set[str]:
    return imported_modules(path.read_text(), PACKAGES[path.parent])


def notebook_stack(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in NOTEBOOK_STACK or m.startswith("emloc_nb.widgets")}


# ----------------------------------------------------------------------------- one way: no import cycle

LAZY_NAME = re.compile(r"^(emloc_nb(?:\.\w+)+):\w+$")  # "module:attribute", as emloc_nb.lazy names its targets
ARCHITECTURE = ROOT / "docs" / "architecture.md"
TORCH_SIDE = {"torch", "transformers", "peft", "datasets", "safetensors", "accelerate", "pandas"}


class Reference(NamedTuple):
    line: int
    text: str
    lazy: bool  # only by a "module:attribute" name, never by an import statement


def module_of(path: Path) -> str:
    return PACKAGES[path.parent] if path.stem == "__init__" else f"{PACKAGES[path.parent]}.{path.stem}"


def references(source: str, package: str, modules: set[str]) -> dict[str, Reference]:
    """The modules among `modules` that `source` imports (at the top, inside functions, under TYPE_CHECKING) or names
    lazily ("module:attribute" strings), each with the line and text of its first reference."""
    lines = source.splitlines()
    imported: dict[str, Reference] = {}
    named: dict[str, Reference] = {}

    def add(found: dict, module: str, node: ast.AST, lazy: bool) -> None:
        if module in modules:
            found.setdefault(module, Reference(node.lineno, lines[node.lineno - 1].strip(), lazy))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(imported, alias.name, node, False)
        elif isinstance(node, ast.ImportFrom):
            base = import_base(node, package)
            for alias in node.names:  # `from . import x` imports the submodule x, not the package around it
                add(imported, f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, node, False)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (m := LAZY_NAME.match(node.value)):
            add(named, m[1], node, True)
    return {**named, **imported}


def import_graph(sources: dict[str, str], package: str = "emloc_nb") -> dict[str, dict[str, Reference]]:
    """module -> {module it depends on: its first reference}, over one package's modules given as {name: source}."""
    modules = set(sources)
    graph = {}
    for name, source in sources.items():
        inside = name if name == package else name.rsplit(".", 1)[0]
        graph[name] = {m: ref for m, ref in references(source, inside, modules).items() if m != name}
    return graph


def cycles(graph: dict[str, dict]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one cycle through all its members'
    first edges: [a, b, ..., a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(graph, component) for component in components]


def _cycle_through(graph: dict[str, dict], component: list[str]) -> list[str]:
    """A shortest cycle from the component's first module back to itself, inside the component (breadth first)."""
    start, members = component[0], set(component)
    previous = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if w in members and w not in previous:
                previous[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {component}")


def describe(graph: dict[str, dict], cycle: list[str]) -> str:
    steps = [f"  {a}  imports  {b}   (line {graph[a][b].line}: {graph[a][b].text})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(m.removeprefix("emloc_nb.") for m in cycle) + "\n" + "\n".join(steps)


def core_sources() -> dict[str, str]:
    return {module_of(p): p.read_text() for p in CORE}


def test_emloc_nb_imports_one_way():
    graph = import_graph(core_sources())
    found = cycles(graph)
    assert not found, f"{len(found)} import cycle(s) in emloc_nb (imports inside functions and lazy names count):\n" + (
        "\n".join(describe(graph, c) for c in found)
    )


def test_the_cycle_check_sees_imports_inside_functions_and_lazy_names():
    sources = {
        "emloc_nb": "from .lazy import lazy\nEXPORTS = {'Run': 'emloc_nb.run:Run'}\n",
        "emloc_nb.lazy": "def lazy(target): ...\n",
        "emloc_nb.low": "def f():\n    from .high import g\n",  # upward, inside a function
        "emloc_nb.high": "from . import low\n",
        "emloc_nb.run": "from .lazy import lazy\ng = lazy('emloc_nb.high:g')\n",
    }
    graph = import_graph(sources)
    assert set(graph["emloc_nb"]) == {"emloc_nb.lazy", "emloc_nb.run"} and graph["emloc_nb"]["emloc_nb.run"].lazy
    assert graph["emloc_nb.run"]["emloc_nb.high"] == Reference(2, "g = lazy('emloc_nb.high:g')", True)
    assert cycles(graph) == [["emloc_nb.high", "emloc_nb.low", "emloc_nb.high"]]
    assert "(line 2: from .high import g)" in describe(graph, cycles(graph)[0])
    sources["emloc_nb.low"] = "def f():\n    return 1\n"
    assert cycles(import_graph(sources)) == []
    sources["emloc_nb.low"] = "from .lazy import lazy\nRun = lazy('emloc_nb.run:Run')\n"  # upward, by a lazy name
    assert cycles(import_graph(sources)) == [["emloc_nb.high", "emloc_nb.low", "emloc_nb.run", "emloc_nb.high"]]


# ----------------------------------------------------------------------------- docs/architecture.md says it


class Row(NamedTuple):
    level: int
    module: str  # as the table names it: "run", or "emloc_nb" for the package
    imports: set[str] | None  # None: the package's row, which names its imports in words
    lazy: set[str]
    starts_without_torch: bool


def architecture_rows() -> list[Row]:
    """The module table of docs/architecture.md, in its order (bottom up)."""
    rows = []
    for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].isdigit():
            continue
        names = re.findall(r"`(\w+)`( \(lazy\))?", cells[3])
        package = cells[1] == "`emloc_nb`"
        rows.append(
            Row(
                int(cells[0]),
                cells[1].strip("`"),
                None if package else {n for n, _ in names},
                {n for n, lazy in names if lazy},
                cells[4] == "yes",
            )
        )
    return rows


def full_name(module: str) -> str:
    return module if module == "emloc_nb" else f"emloc_nb.{module}"


def test_the_architecture_table_lists_every_module_bottom_up_with_what_it_imports():
    graph = import_graph(core_sources())
    rows = architecture_rows()
    listed = [full_name(r.module) for r in rows]
    assert sorted(listed) == sorted(graph), (
        f"docs/architecture.md: modules missing {sorted(set(graph) - set(listed))}, "
        f"listed but gone {sorted(set(listed) - set(graph))}"
    )
    assert [r.level for r in rows] == sorted(r.level for r in rows), "the levels go bottom up"
    above: set[str] = set()
    for row in rows:
        name = full_name(row.module)
        upward = {m: ref for m, ref in graph[name].items() if m not in above}
        assert not upward, f"{name} imports upward (rows below it in docs/architecture.md): " + "; ".join(
            f"{m} (line {ref.line}: {ref.text})" for m, ref in upward.items()
        )
        if row.imports is not None:
            actual = {m.removeprefix("emloc_nb.") for m in graph[name]}
            lazy = {m.removeprefix("emloc_nb.") for m, ref in graph[name].items() if ref.lazy}
            assert (row.imports, row.lazy) == (actual, lazy), (
                f"docs/architecture.md, row {row.module}: say it imports {sorted(actual)}, "
                f"of which {sorted(lazy)} lazily (marked `x` (lazy))"
            )
        above.add(name)


def test_a_module_over_450_lines_says_why_it_stays_whole():
    reasons = ARCHITECTURE.read_text(encoding="utf-8").split("## Modules over 450 lines", 1)[1]
    for path in CORE:
        if len(path.read_text().splitlines()) > 450:
            assert f"`{path.stem}`" in reasons, f"{path.name} is over 450 lines: split it, or say why in {ARCHITECTURE}"


def _function_imports(tree: ast.Module):
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield fn.name, node


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_imports_inside_functions_are_third_party_and_not_at_the_top_already(path):
    from emloc_nb.lazy import THIRD_PARTY

    tree = ast.parse(path.read_text())
    at_top = {a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names}
    at_top |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and not node.level}
    for function, node in _function_imports(tree):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        where = f"{path.name}:{node.lineno} ({function})"
        assert not getattr(node, "level", 0), f"{where}: emloc_nb's own modules are imported at the top, or lazily"
        for module in modules:
            assert module.split(".")[0] in THIRD_PARTY, f"{where} imports {module}: import it at the top"
            assert module not in at_top, f"{where} imports {module} again: the module imports it at the top"


def test_the_shell_starts_without_torch():
    shell = [full_name(r.module) for r in architecture_rows() if r.starts_without_torch]
    assert {"emloc_nb", "emloc_nb.cli", "emloc_nb.run", "emloc_nb.runner", "emloc_nb.config"} <= set(shell)
    code = f"import sys\nfor m in {shell!r}: __import__(m)\nprint(' '.join({{m.split('.')[0] for m in sys.modules}}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split()) & TORCH_SIDE
    assert not loaded, f"a module marked 'starts without torch' in docs/architecture.md loads {sorted(loaded)}"


# ----------------------------------------------------------------------------- the notebook stack


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_imports_no_notebook_stack(path):
    assert not notebook_stack(imports_of(path))


def test_relative_imports_are_checked_too():
    old_cli = "def report():\n    from .widgets.report import write_report\n"
    assert notebook_stack(imported_modules(old_cli, "emloc_nb")) == {
        "emloc_nb.widgets.report",
        "emloc_nb.widgets.report.write_report",
    }
    assert imported_modules("from ..base import View", "emloc_nb.widgets.plots") >= {"emloc_nb.widgets.base"}
    assert imported_modules("from .common import trace", "emloc_nb.widgets.plots") >= {"emloc_nb.widgets.plots.common"}


@pytest.mark.parametrize("path", PURE, ids=lambda p: p.name)
def test_pure_builders_import_no_ipywidgets(path):
    pure = {f"{PACKAGES[p.parent]}.{p.stem}" for p in PURE} | {"emloc_nb.widgets.plots"}
    for module in imports_of(path):
        assert module.split(".")[0] not in ("ipywidgets", "IPython"), module
        if module.startswith("emloc_nb.widgets"):
            assert module in pure or module.rsplit(".", 1)[0] in pure, f"{path.name} imports {module}"


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "widgets").rglob("*.py")) + [ROOT / "emloc_nb" / "cli.py"] + sorted((ROOT / "bench").glob("*.py")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_only_run_spells_out_paths_in_a_run(path):
    text = path.read_text()
    assert not [s for s in RUN_LAYOUT if s in text], "use emloc_nb.run.Run's loaders and Run.path(artifact)"


def test_views_display_as_widgets(spectra):
    from emloc_nb.widgets import SpectrumView

    bundle = SpectrumView(spectra)._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
