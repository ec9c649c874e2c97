"""What every figure shares: colours, layout, titles, trace lookup, layer names, the grouped axis, labels.

Figures are pure plotly: the core's data objects in, a `go.Figure` out. Both the live
views (which wrap them in FigureWidgets and refresh them with `widgets.base.refresh`)
and the static HTML report draw with them, so a figure looks the same in both.
Traces have stable names; the views and the tests find them by name with `trace`.
Nothing in plots/ imports ipywidgets, and nothing recomputes the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

PLAIN, WHITENED, SELECTED, PLAN = "#9e9e9e", "#1f77b4", "#d62728", "#2ca02c"
BEFORE, AFTER = "#ff7f0e", "#1f77b4"
# The title sits at the top of the canvas and the legend in a row under it, above the plot.
LAYOUT = dict(
    template="plotly_white",
    margin=dict(l=60, r=20, t=95, b=50),
    height=400,
    legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, xanchor="left"),
)
LEGEND_RIGHT = dict(orientation="v", yanchor="top", y=1.0, x=1.02, xanchor="left")  # for stacked subplots


def layout_title(text: str) -> dict:
    """A figure title at the top left of the canvas, above the legend row."""
    return dict(text=text, x=0.01, xanchor="left", y=0.97, yanchor="top", yref="container")


def trace(fig: go.Figure, name: str):
    """The trace called `name` (views update traces by name, never by position)."""
    for t in fig.data:
        if t.name == name:
            return t
    raise KeyError(f"No trace named {name!r}; traces: {[t.name for t in fig.data]}")


def short_names(names: Sequence[str]) -> list[str]:
    """Layer names without their shared prefix ('model.layers.0.self_attn.q_proj' → '0.self_attn.q_proj')."""
    parts = [n.split(".") for n in names]
    if len(parts) < 2:
        return [p[-1] for p in parts]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [".".join(p[common:]) for p in parts]


def group_axis(rows: Sequence[dict], by: str) -> tuple[list[int], list[list[str]]]:
    """Order of `rows` grouped by block or by layer kind, and a two-level (group, layer) category axis."""
    short = short_names([r["name"] for r in rows])
    kinds = list(dict.fromkeys(r["kind"] for r in rows))  # first-seen order: q, k, v, o, gate, up, down
    block = lambda r: -1 if r.get("block") is None else r["block"]
    if by == "block":
        order = sorted(range(len(rows)), key=lambda i: block(rows[i]))  # stable: model order within a block
        groups = [f"block {rows[i]['block']}" for i in order]
        labels = [short[i].split(".", 1)[-1] if rows[i].get("block") is not None else short[i] for i in order]
    elif by == "kind":
        order = sorted(range(len(rows)), key=lambda i: (kinds.index(rows[i]["kind"]), block(rows[i])))
        groups = [rows[i]["kind"] for i in order]
        labels = [str(rows[i]["block"]) for i in order]
    else:
        raise ValueError(f"group by 'block' or 'kind', not {by!r}")
    if len(set(zip(groups, labels))) < len(order):  # e.g. GPT-2 has attn.c_proj and mlp.c_proj in a block
        labels = [short[i] for i in order]
    return order, [groups, labels]


def positive(values: np.ndarray) -> list:
    """Zeros and negatives cannot sit on a log axis: leave gaps instead of plotting at -inf."""
    return [float(v) if v > 0 else None for v in values]


def finite(value):
    """A value plotly can draw: None (a gap) for a missing, NaN or infinite one."""
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def clamp_label(clamp: float, spec: str = "g") -> str:
    """The correction's L as shown everywhere: "∞" for no clamp, else formatted with `spec`."""
    return "∞" if math.isinf(clamp) else format(clamp, spec)
