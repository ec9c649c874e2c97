"""What every figure shares: colours, layout, titles, trace lookup, layer names, per-block bars, labels.

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


def layout_title(text: str, subtitle: str | None = None) -> dict:
    """A figure title at the top left of the canvas, above the legend row. What does not fit a short title goes
    in `subtitle`, a second and smaller line (plotly cuts a long title off at the figure's edge)."""
    if subtitle:
        text += f"<br><span style='font-size:12px;color:#555'>{subtitle}</span>"
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


GROUPED = {"block": "block", "kind": "layer kind"}


def kinds(rows: Sequence[dict]) -> list[str]:
    """Each row's layer kind (q_proj, ..., down_proj), or its name within its block where a kind repeats in one
    (GPT-2's attn.c_proj and mlp.c_proj)."""
    keyed = [(r.get("block"), r["kind"]) for r in rows]
    if len(set(keyed)) == len(keyed):
        return [r["kind"] for r in rows]
    return [r["name"].split(f".{r['block']}.", 1)[-1] if r.get("block") is not None else r["name"] for r in rows]


def by_group(
    rows: Sequence[dict], values: Sequence, *, by: str = "block", how: str = "mean", texts: Sequence[str] | None = None
) -> tuple[list[str], list, list[str]]:
    """Per-layer `values` (one per row) as one bar per block, or per layer kind (by="kind"): the bar labels,
    each group's mean or sum (`how`) over its layers (missing values left out), and a hover text that
    lists every layer with its value (or its entry of `texts`); plotly shows the bar's own value beside it.

    One bar per block linear is unreadable on a real model (210 labels on SmolLM2); one per block is not,
    and the hover keeps every layer's number. Layers outside the blocks get a bar each, first.
    """
    if by not in GROUPED:
        raise ValueError(f"group by 'block' or 'kind', not {by!r}")
    short = short_names([r["name"] for r in rows])
    texts = texts if texts is not None else [_number(v) for v in values]
    kind = kinds(rows)
    groups: dict = {}  # group key -> indices of its rows, in model order
    for i, r in enumerate(rows):
        key = kind[i] if by == "kind" else r["block"] if r.get("block") is not None else short[i]
        groups.setdefault(key, []).append(i)
    keys = list(groups)
    if by == "block":  # layers outside the blocks first, then the blocks in order
        keys.sort(key=lambda k: (isinstance(k, int), k if isinstance(k, int) else 0))
    aggregate = {"mean": lambda v: sum(v) / len(v), "sum": sum}[how]
    labels, bars, hover = [], [], []
    for key in keys:
        present = [float(values[i]) for i in groups[key] if finite(values[i]) is not None]
        labels.append(str(key))
        bars.append(aggregate(present) if present else None)
        hover.append("<br>".join([f"<b>{GROUPED[by]} {key}</b>"] + [f"{short[i]}: {texts[i]}" for i in groups[key]]))
    return labels, bars, hover


def group_title(by: str, how: str = "mean") -> str:
    """The axis title of a `by_group` axis, saying what a bar is."""
    over = "its layers" if by == "block" else "the blocks"
    return f"{GROUPED[by]} ({how} over {over}; hover for each layer)"


def _number(value) -> str:
    return "—" if finite(value) is None else format(value, ".4g")


def positive(values: np.ndarray) -> list:
    """Zeros and negatives cannot sit on a log axis: leave gaps instead of plotting at -inf."""
    return [float(v) if v > 0 else None for v in values]


def finite(value):
    """A value plotly can draw: None (a gap) for a missing, NaN or infinite one."""
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def clamp_label(clamp: float, spec: str = "g") -> str:
    """The correction's L as shown everywhere: "∞" for no clamp, else formatted with `spec`."""
    return "∞" if math.isinf(clamp) else format(clamp, spec)
