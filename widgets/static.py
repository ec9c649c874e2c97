"""Views as static HTML, for pages read without a kernel (`make docs`: docs/notebooks/*.html), and figures as PNG.

A live view is an ipywidgets tree; a static page cannot run it. With EMLOC_STATIC_VIEWS=1
a view displays as HTML instead: its text as is, each figure as a plotly div (plotly.js
itself is loaded once by the page), each control as its label and current value (a disabled
one not at all), and each tab of a Tab one after the other under its title.
"""

from __future__ import annotations

import html
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import ipywidgets as W
import plotly.graph_objects as go

STYLE = (
    "<style>.emloc-static{border-left:3px solid #ddd;padding-left:10px;margin:8px 0}"
    ".emloc-static .emloc-row{display:flex;flex-wrap:wrap;gap:4px 18px;align-items:flex-start}"
    ".emloc-static .emloc-control{color:#444;font-size:13px;margin:4px 0}</style>"
)


def static_views() -> bool:
    """Whether views display as static HTML (EMLOC_STATIC_VIEWS=1, set by the docs build)."""
    return os.environ.get("EMLOC_STATIC_VIEWS", "") not in ("", "0")


def figure_html(fig: go.Figure, div_id: str | None = None) -> str:
    """A plotly figure as a div; the page loads plotly.js once (no CDN)."""
    height = fig.layout.height or 450
    return fig.to_html(
        full_html=False,
        include_plotlyjs=False,
        div_id=div_id,
        default_height=f"{height}px",
        config={"displaylogo": False},
    )


def _control(widget: W.Widget) -> str:
    if getattr(widget, "disabled", False):
        return ""  # a control that does not act now (the clamp slider beside "naive") would show a stale value
    label = getattr(widget, "description", "") or type(widget).__name__
    value = widget.value
    if isinstance(widget, (W.Dropdown, W.ToggleButtons, W.RadioButtons, W.Select)) and widget.label is not None:
        value = widget.label
    if isinstance(value, float):
        value = format(value, ".3g")
    return f"<p class='emloc-control'>{html.escape(str(label))}: <b>{html.escape(str(value))}</b></p>"


def widget_html(widget: W.Widget) -> str:
    """The HTML of one widget and everything in it."""
    if isinstance(widget, go.FigureWidget):
        return figure_html(go.Figure(widget))
    if isinstance(widget, W.Tab):
        titles = list(widget.titles)
        return "".join(
            f"<h3>{html.escape(titles[i] if i < len(titles) else f'tab {i}')}</h3>{widget_html(child)}"
            for i, child in enumerate(widget.children)
        )
    if isinstance(widget, W.HBox):
        return "<div class='emloc-row'>" + "".join(widget_html(c) for c in widget.children) + "</div>"
    if isinstance(widget, W.Box):
        return "".join(widget_html(c) for c in widget.children)
    if isinstance(widget, (W.HTML, W.HTMLMath)):
        return widget.value
    if isinstance(widget, W.Label):
        return f"<p>{html.escape(widget.value)}</p>"
    if isinstance(widget, W.Output):
        parts = []
        for out in widget.outputs:
            data = out.get("data", {})
            if "text/html" in data:
                parts.append(data["text/html"])
            elif "text/plain" in data or out.get("text"):
                parts.append(f"<pre>{html.escape(data.get('text/plain', out.get('text', '')))}</pre>")
        return "".join(parts)
    if isinstance(widget, W.ValueWidget) and not isinstance(widget, W.Button):
        return _control(widget)
    return ""  # buttons and other controls that only act


def view_html(widget: W.Widget) -> str:
    return STYLE + f"<div class='emloc-static'>{widget_html(widget)}</div>"


def figure_png(fig: go.Figure, png: Path, *, width: int = 1000, height: int = 560) -> bool:
    """Render a figure to a PNG with headless Chromium (the docs' pictures); False where there is no Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "figure.html"
        fig.write_html(page, include_plotlyjs=True, full_html=True, config={"displayModeBar": False})
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={png}",
             f"--window-size={width},{height}", "--virtual-time-budget=5000", page.as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    return Path(png).is_file()
