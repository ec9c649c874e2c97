"""Layering: the core never imports the notebook stack; the pure builders never import ipywidgets;
nothing outside emloc_nb.run spells out a path inside a run directory."""

from __future__ import annotations

import ast
from pathlib import Path

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


def imported_modules(source: str, package: str) -> set[str]:
    """Every module a source imports, absolute or relative (resolved against `package`)."""
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
                modules |= {f"{base}.{a.name}" for a in node.names}  # `from . import x` may import a submodule
            modules.add(base)
    return modules


def imports_of(path: Path) -> set[str]:
    return imported_modules(path.read_text(), PACKAGES[path.parent])


def notebook_stack(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in NOTEBOOK_STACK or m.startswith("emloc_nb.widgets")}


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
