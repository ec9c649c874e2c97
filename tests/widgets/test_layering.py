"""The core never imports the notebook stack; the pure figure builders never import ipywidgets."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_STACK = {"ipywidgets", "plotly", "IPython", "anywidget"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted((ROOT / "emloc_nb").glob("*.py")), ids=lambda p: p.name)
def test_core_imports_no_notebook_stack(path):
    assert not imported_roots(path) & NOTEBOOK_STACK


@pytest.mark.parametrize("name", ["figures.py", "tables.py"])
def test_pure_builders_import_no_ipywidgets(name):
    roots = imported_roots(ROOT / "widgets" / name)
    assert "ipywidgets" not in roots and "IPython" not in roots


def test_views_display_as_widgets(spectra):
    from emloc_nb.widgets import SpectrumView
    bundle = SpectrumView(spectra)._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
