"""Memory: predicted components and measured peaks per setting (rows of `emloc_nb.memory.budget`)."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from .common import BEFORE, LAYOUT, PLAIN, PLAN, SELECTED, WHITENED, layout_title

MEMORY_PARTS = [
    ("weights_mb", "weights", WHITENED),
    ("trainable_state_mb", "LoRA trainable state", PLAN),
    ("activations_mb", "saved activations", BEFORE),
]
MEMORY_MEASURES = [
    ("total_mb", "predicted total", WHITENED),
    ("measured_peak_mb", "measured peak", SELECTED),
    ("process_baseline_mb", "process baseline", PLAIN),
]


def _memory_bars(rows: Sequence[dict], columns) -> list[go.Bar]:
    settings = [r["setting"] for r in rows]
    return [
        go.Bar(name=label, x=settings, y=[r[key] for r in rows], marker_color=color) for key, label, color in columns
    ]


def memory_components_figure(rows: Sequence[dict]) -> go.Figure:
    """Predicted memory per setting, stacked by component (rows of `emloc_nb.memory.budget`)."""
    fig = go.Figure(_memory_bars(rows, MEMORY_PARTS))
    fig.update_layout(
        **LAYOUT, barmode="stack", title=layout_title("Predicted memory per setting (MB)"), yaxis_title="MB"
    )
    return fig


def memory_measured_figure(rows: Sequence[dict]) -> go.Figure:
    """Predicted total against the measured peak and baseline of the stage's process, per setting."""
    fig = go.Figure(_memory_bars(rows, MEMORY_MEASURES))
    fig.update_layout(
        **LAYOUT, barmode="group", title=layout_title("Predicted total against measured peak (MB)"), yaxis_title="MB"
    )
    return fig
