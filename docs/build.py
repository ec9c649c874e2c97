"""`make docs`: run the tutorial notebooks and write static HTML copies, with their outputs, to docs/notebooks/.

    python docs/build.py [NOTEBOOK ...] [--output DIR]

Each notebook runs in a fresh kernel on the run `notebook_run()` picks (runs/demo, what
`make demo` wrote; EMLOC_SMALL=1 for a quick check on a small run). The kernel has
EMLOC_STATIC_VIEWS=1, so every view displays as static HTML: figures as plotly divs,
controls as their values (emloc_nb.widgets.static); progress bars are off, and stderr's
leftover progress bars and Python warnings are dropped. The markdown's LaTeX becomes MathML,
which browsers draw natively. Each page loads plotly.min.js from its own folder and
nothing from the network: no CDN, no MathJax, no require.js. Paths of this machine in
the outputs are shortened to the checkout's relative paths. The notebooks themselves
are not changed (they stay committed without outputs). Each page links to the previous and
the next tutorial and to index.html, which says in one line what each page teaches.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter
from nbconvert.preprocessors import ExecutePreprocessor

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
OUTPUT = REPO / "docs" / "notebooks"
PLOTLY_JS = "plotly.min.js"
CELL_TIMEOUT_S = 1800
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# A code span (left alone), display math $$...$$, or inline math $...$ (no space inside the dollars).
_MATH = re.compile(r"(`+)(.+?)\1|\$\$(.+?)\$\$|\$(?![\s$])([^$\n]+?)(?<!\s)\$", re.S)
_REMOTE_SCRIPT = re.compile(r"<script[^>]*\ssrc=[\"']https?://[^>]*>\s*</script>", re.I)
# What each tutorial teaches, in one line: index.html lists them.
DESCRIPTIONS = {
    "00_quickstart": "the whole pipeline in one run, and the results table",
    "01_calibration_activations": "what the calibration set's activations look like, and why whitening needs them",
    "02_spectra_and_rank_choices": "per-layer spectra, the rank plan, and energy-allocated against uniform ranks",
    "03_finetune_the_emulator": "fine-tuning the emulator with an ordinary peft LoRA, and its memory",
    "04_lora_correction_explained": (
        "when the paper's correction helps, when it hurts, and what the prior offset assumes"
    ),
    "05_memory_budget": "the memory budget: what fine-tuning the emulator costs against inference",
}
# The kernel's environment: views as static HTML, and no progress bars (tqdm text on a page is noise).
KERNEL_ENV = {
    "EMLOC_STATIC_VIEWS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' "Map: 0%|"
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # the hub's downloads, and transformers' "Loading weights" (it follows this)
    "TRANSFORMERS_VERBOSITY": "error",  # transformers' logged warnings
    "TQDM_DISABLE": "1",  # any other tqdm bar (tqdm reads TQDM_* defaults from the environment)
}
_WARNING = re.compile(r"Warning:")  # "FutureWarning: ...", "UserWarning: ...", "Warning: ..."


def latex_to_mathml(markdown: str) -> str:
    from latex2mathml.converter import convert

    def one(m: re.Match) -> str:
        if m.group(1):
            return m.group(0)
        display = m.group(3) is not None
        return convert((m.group(3) if display else m.group(4)).strip(), display="block" if display else "inline")

    return _MATH.sub(one, markdown)


def _plotly_html(spec: dict) -> str:
    import plotly.graph_objects as go

    from emloc_nb.widgets.static import figure_html

    return figure_html(go.Figure(spec))


def _scrub(text: str) -> str:
    """This machine's paths, as the reader's checkout would have them."""
    return text.replace(f"{REPO}/", "").replace(str(REPO), ".").replace(str(Path.home()), "~")


def static_outputs(nb: nbformat.NotebookNode) -> None:
    """Outputs a page can show without a kernel: plotly figures as divs, no widget views, no machine paths,
    no progress bars or warnings on stderr."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = latex_to_mathml(cell.source)
            continue
        for out in cell.get("outputs", []):
            data = out.get("data")
            if data is not None:
                if PLOTLY_MIME in data:
                    out["data"] = {"text/html": _plotly_html(data[PLOTLY_MIME])}
                    continue
                data.pop(WIDGET_MIME, None)  # its state is not saved: the text/plain fallback shows instead
                for mime, value in data.items():
                    if isinstance(value, str) and mime.startswith("text/"):
                        data[mime] = _scrub(value)
            if "text" in out:
                out["text"] = _scrub(out["text"])
            if _stderr(out):
                out["text"] = quiet(out["text"])
        if cell.cell_type == "code":  # stderr that was only progress bars and warnings leaves no empty box behind
            cell.outputs = [out for out in cell.outputs if not (_stderr(out) and not out["text"].strip())]


def _stderr(out: nbformat.NotebookNode) -> bool:
    return out.get("output_type") == "stream" and out.get("name") == "stderr"


def quiet(text: str) -> str:
    """Stderr text without tqdm progress bars (any line with "%|") and Python warnings (a line with "Warning:",
    and the indented source line that warnings.warn prints under it)."""
    kept, in_warning = [], False
    for line in text.splitlines(keepends=True):
        if _WARNING.search(line):
            in_warning = True
        elif not (in_warning and line[:1] in (" ", "\t")):
            in_warning = False
            if "%|" not in line:
                kept.append(line)
    return "".join(kept)


def nav(stem: str, stems: list[str]) -> str:
    """The bar at the top of a page: the previous tutorial · index · the next one (by name order)."""
    i = stems.index(stem) if stem in stems else None
    link = lambda s, text: f"<a href='{html.escape(s)}.html'>{html.escape(text)}</a>"
    parts = [
        link(stems[i - 1], f"← {stems[i - 1]}") if i else "",
        "<a href='index.html'>index</a>",
        link(stems[i + 1], f"{stems[i + 1]} →") if i is not None and i + 1 < len(stems) else "",
    ]
    return (
        "<nav class='emloc-nav' style='font:14px sans-serif;padding:8px 16px;border-bottom:1px solid #ddd'>"
        + " · ".join(p for p in parts if p)
        + "</nav>"
    )


def page(nb: nbformat.NotebookNode, title: str, nav_bar: str = "") -> str:
    """The notebook as one HTML page, `nav_bar` at the top of its body."""
    exporter = HTMLExporter(template_name="lab")
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    body = _REMOTE_SCRIPT.sub("", body)
    body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + nav_bar, body, count=1)
    return body.replace("</head>", f'<script src="{PLOTLY_JS}"></script>\n</head>', 1)


def build(notebook: Path, output: Path) -> Path:
    """Execute one notebook and write its static page, linked to its neighbours in its folder; returns its path."""
    from emloc_nb.atomic import atomic_path

    nb = nbformat.read(notebook, as_version=4)
    saved = {k: os.environ.get(k) for k in KERNEL_ENV}
    os.environ.update(KERNEL_ENV)  # for the kernel, which inherits them; this process gets its own back
    try:
        # No widget state: the views are static HTML already, and the state would copy every figure's data.
        ExecutePreprocessor(timeout=CELL_TIMEOUT_S, kernel_name="python3", store_widget_state=False).preprocess(
            nb, {"metadata": {"path": str(notebook.parent)}}
        )
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    static_outputs(nb)
    stems = [n.stem for n in sorted(notebook.parent.glob("*.ipynb"))]
    target = output / f"{notebook.stem}.html"
    with atomic_path(target) as tmp:
        tmp.write_text(page(nb, notebook.stem, nav(notebook.stem, stems)), encoding="utf-8")
    return target


def write_plotly_js(output: Path) -> None:
    from plotly.offline import get_plotlyjs

    from emloc_nb.atomic import atomic_path

    with atomic_path(output / PLOTLY_JS) as tmp:
        tmp.write_text(get_plotlyjs(), encoding="utf-8")


def write_index(output: Path) -> None:
    from emloc_nb.atomic import atomic_path

    pages = sorted(p for p in output.glob("*.html") if p.name != "index.html")
    items = "".join(
        f"<li><a href='{html.escape(p.name)}'>{html.escape(p.stem)}</a>"
        + (f": {html.escape(DESCRIPTIONS[p.stem])}" if p.stem in DESCRIPTIONS else "")
        + "</li>"
        for p in pages
    )
    with atomic_path(output / "index.html") as tmp:
        tmp.write_text(
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>emloc-nb tutorials</title></head>"
            f"<body><h1>emloc-nb tutorials</h1><ul>{items}</ul></body></html>\n",
            encoding="utf-8",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to build (default: notebooks/*.ipynb)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where the pages go (default: docs/notebooks)")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    args.output.mkdir(parents=True, exist_ok=True)
    write_plotly_js(args.output)
    for notebook in notebooks:
        started = time.time()
        print(f"[docs] {notebook.name} ...", flush=True)
        target = build(notebook.resolve(), args.output)
        print(f"[docs] {target} ({time.time() - started:.0f} s)", flush=True)
    write_index(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
