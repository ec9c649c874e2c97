"""Static pages of the tutorials (`make docs`): views as figures, LaTeX as MathML, nothing from the network."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import nbformat
import pytest

from emloc_nb.widgets import CorrectionView, Dashboard
from emloc_nb.widgets.static import view_html

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def docs_build():
    spec = importlib.util.spec_from_file_location("docs_build", REPO / "docs" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_view_renders_statically_with_every_figure_and_control(run_dir, correction_report, monkeypatch):
    monkeypatch.setenv("EMLOC_STATIC_VIEWS", "1")
    view = CorrectionView(correction_report)
    view.clamp.set(3.0)  # the paper's L (the default adapter is written at 0, the naive transfer)
    bundle = view._repr_mimebundle_()
    assert set(bundle) == {"text/html", "text/plain"}
    page = bundle["text/html"]
    assert page.count('class="plotly-graph-div"') == sum(1 for _ in _figures(view.widget))
    # The clamp control as its label and value, one L only.
    assert "correction: <b>clamped at L</b>" in page and "L: <b>3</b>" in page and "3.16" not in page
    dash = Dashboard(run_dir)
    page = view_html(dash.static_widget())
    for title in dash.titles:  # every tab, built for the page
        assert f"<h3>{title}</h3>" in page
    assert "failed:" not in page and "Nothing to show yet" not in page
    assert f"EMLoC run · {Path(run_dir).name}</h2>" in page and str(run_dir) not in page  # no machine path
    monkeypatch.delenv("EMLOC_STATIC_VIEWS")
    assert "application/vnd.jupyter.widget-view+json" in view._repr_mimebundle_()  # live again


def _figures(widget):
    import plotly.graph_objects as go

    if isinstance(widget, go.FigureWidget):
        yield widget
    for child in getattr(widget, "children", ()):
        yield from _figures(child)


def test_latex_becomes_mathml_and_code_spans_stay(docs_build):
    text = docs_build.latex_to_mathml("Energy $E\\|W x\\|^2$ and `$HOME` cost $$r(d_{in} + d_{out})$$, 5 $ each")
    assert text.count("<math") == 2 and 'display="block"' in text and "`$HOME`" in text
    assert text.endswith("5 $ each")


def test_a_notebook_page_has_its_outputs_and_loads_nothing_remote(docs_build, run_dir, tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Title\n\nThe emulator keeps $W_E = U_r \\Sigma_r V_r^\\top S^{-1}$."),
        nbformat.v4.new_code_cell(
            "from emloc_nb.run import Run\nfrom emloc_nb.widgets import SpectrumView\n"
            f"import emloc_nb\nrun = Run({str(run_dir)!r})\nprint(emloc_nb.__file__)"
        ),
        nbformat.v4.new_code_cell("SpectrumView(run.spectra())"),
        nbformat.v4.new_code_cell("run.spectra().to_frame().head(3)"),
        nbformat.v4.new_code_cell(
            "from emloc_nb.widgets.plots.spectra import kept_energy_figure\nkept_energy_figure(run.spectra())"
        ),
        # A monitor shown before training: the page shows the curve as training left it.
        nbformat.v4.new_code_cell(
            "from emloc_nb.widgets import TrainingMonitor\nmonitor = TrainingMonitor(total_steps=2)\nmonitor"
        ),
        nbformat.v4.new_code_cell("for i in (1, 2):\n    monitor({'step': i, 'steps': 2, 'loss': 1 / i, 'lr': 0.1})"),
        nbformat.v4.new_code_cell(
            "import os, sys, warnings\nwarnings.warn('old API', FutureWarning)\n"
            "print('Map:   0%|          | 0/16', file=sys.stderr)\n"
            "print(os.environ['HF_DATASETS_DISABLE_PROGRESS_BARS'], os.environ['HF_HUB_DISABLE_PROGRESS_BARS'])"
        ),
    ]
    notebook = tmp_path / "tiny.ipynb"
    nbformat.write(nb, notebook)
    out = tmp_path / "site"
    out.mkdir()
    docs_build.write_plotly_js(out)
    page = docs_build.build(notebook, out).read_text(encoding="utf-8")
    assert not set(docs_build.KERNEL_ENV) & set(os.environ)  # only the kernel rendered statically, quietly
    assert (out / "plotly.min.js").stat().st_size > 1_000_000
    assert "widget-state+json" not in page  # the views are static: no kernel state copied into the page
    assert '<script src="plotly.min.js"></script>' in page
    assert not re.search(r"<script[^>]+src=[\"']https?://", page), "the page loads a script from the network"
    assert "<math" in page and "$W_E" not in page
    assert page.count('class="plotly-graph-div"') >= 5  # the view's three figures, the heatmap, the monitor
    assert "step 2/2 · loss <b>0.5000</b>" in page and "waiting for the first step" not in page
    assert "<pre>1 1\n</pre>" in page  # the kernel's progress bars are off
    assert 'data-mime-type="application/vnd.jupyter.stderr"' not in page  # the warning and the bar are gone
    assert "<table" in page and "energy_kept" in page  # the to_frame() table
    assert str(REPO) not in page and "emloc_nb/__init__.py" in page  # the checkout's paths, not this machine's


def test_static_outputs_drop_progress_bars_and_warnings(docs_build):
    stderr = lambda text: nbformat.v4.new_output("stream", name="stderr", text=text)
    cell = nbformat.v4.new_code_cell("load()")
    cell.outputs = [
        stderr("Loading weights:   0%|          | 0/272 [00:00<?, ?it/s]\rLoading weights: 100%|█| 272/272\n"),
        stderr(
            ".venv/lib/python3.11/site-packages/transformers/modeling_utils.py:3312: FutureWarning: "
            "`is_gradient_checkpointing` is deprecated\n  warnings.warn(\n"
        ),
        stderr("Map:   0%|          | 0/8543 [00:00<?, ? examples/s]\nthe adapter is in scratch/\n"),
        nbformat.v4.new_output("stream", name="stdout", text="50%|half of it, printed on purpose\n"),
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = [cell]
    docs_build.static_outputs(nb)
    assert [(o.name, o.text) for o in cell.outputs] == [
        ("stderr", "the adapter is in scratch/\n"),  # what is not a bar or a warning stays
        ("stdout", "50%|half of it, printed on purpose\n"),  # stdout is the notebook's own output
    ]
    assert docs_build.quiet("UserWarning: x\n  warn(x)\nWarning: y\nkept\n") == "kept\n"


def test_index_says_what_each_page_teaches_and_pages_link_their_neighbours(docs_build, tmp_path):
    stems = [p.stem for p in sorted((REPO / "notebooks").glob("*.ipynb"))]
    assert list(docs_build.DESCRIPTIONS) == stems  # every tutorial has its line
    for stem in stems:
        (tmp_path / f"{stem}.html").write_text("<html></html>")
    docs_build.write_index(tmp_path)
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    for stem, line in docs_build.DESCRIPTIONS.items():
        assert f"<a href='{stem}.html'>{stem}</a>: {line}</li>" in index.replace("&#x27;", "'")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Activations")]
    page = docs_build.page(nb, stems[1], docs_build.nav(stems[1], stems))  # no kernel: nothing is executed
    bar = re.search(r"<body[^>]*>\s*(<nav.*?</nav>)", page, re.S)
    assert bar, "the nav bar is not at the top of the body"
    links = re.findall(r"href='([^']+)'", bar.group(1))
    assert links == [f"{stems[0]}.html", "index.html", f"{stems[2]}.html"]
    assert re.findall(r"href='([^']+)'", docs_build.nav(stems[0], stems)) == ["index.html", f"{stems[1]}.html"]
    assert re.findall(r"href='([^']+)'", docs_build.nav(stems[-1], stems)) == [f"{stems[-2]}.html", "index.html"]


def test_committed_pages_carry_no_warnings_or_progress_bars():
    """The static tutorials as committed (`make docs`): no stderr output (warnings, progress bars) survives."""
    pages = sorted((REPO / "docs" / "notebooks").glob("0*.html"))
    assert len(pages) == 6
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert 'data-mime-type="application/vnd.jupyter.stderr"' not in text, page.name
        assert "0%|" not in text and "Warning:" not in text, page.name
