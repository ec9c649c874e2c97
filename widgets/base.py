"""What every view shares: it holds `.widget`, shows itself, and turns missing artifacts into a note.

Views are plain classes (not widget subclasses), so their state and query methods
stay ordinary Python and the ipywidgets container is only how they are drawn.
"""

from __future__ import annotations

import html

import ipywidgets as W
import plotly.graph_objects as go

from .plots.common import trace


class View:
    """A plain object that displays as its `.widget` in Jupyter, or as static HTML for pages read without a kernel."""

    widget: W.Widget

    def static_widget(self) -> W.Widget:
        """What the static HTML shows (a view with parts built on demand builds them all here)."""
        return self.widget

    def _repr_mimebundle_(self, **kwargs):
        from .static import static_views, view_html

        if static_views():
            return {"text/html": view_html(self.static_widget()), "text/plain": f"<{type(self).__name__}>"}
        return self.widget._repr_mimebundle_(**kwargs)


def figure_widget(fig: go.Figure) -> go.FigureWidget:
    """A live copy of a pure figure; controls update it inside `batch_update()`."""
    return go.FigureWidget(fig)


def refresh(live: go.FigureWidget, fresh: go.Figure, *keys: str, title: bool = True) -> None:
    """Show a freshly built pure figure in a live one, in one update: for each of `fresh`'s traces,
    the live trace of the same name takes its `keys` ("x", "y", "hovertext", ...); then the title."""
    with live.batch_update():
        for t in fresh.data:
            trace(live, t.name).update({k: t[k] for k in keys})
        if title:
            live.layout.title = fresh.layout.title


def redraw(live: go.FigureWidget, fresh: go.Figure, *keys: str) -> None:
    """`refresh`, or, where `fresh` has other traces than `live` (a series that comes and goes with a
    control), `fresh`'s traces in place of `live`'s, and its title."""
    if [t.name for t in live.data] == [t.name for t in fresh.data]:
        refresh(live, fresh, *keys)
        return
    live.data = ()
    live.add_traces(list(fresh.data))
    live.layout.title = fresh.layout.title


def note(text: str) -> W.HTML:
    """A short, escaped message shown where a view or figure cannot be built."""
    return W.HTML(f"<p style='color:#555; font-style:italic'>{html.escape(text)}</p>")


def heading(text: str) -> W.HTML:
    return W.HTML(f"<h4 style='margin:6px 0'>{html.escape(text)}</h4>")
