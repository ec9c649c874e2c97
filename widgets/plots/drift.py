"""Drift: per-layer output error (measured and predicted) and hidden-state cosine per block."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from .common import GROUPED, LAYOUT, WHITENED, by_group, group_title, layout_title


def layer_error_figure(layers: Sequence[dict], *, by: str = "block") -> go.Figure:
    """Measured (held-out) and predicted relative output error, one bar per block or per layer kind
    (the mean over its layers; the hover lists each layer)."""
    x, measured, hover = by_group(layers, [r["measured_error"] for r in layers], by=by)
    _, predicted, _ = by_group(layers, [r["predicted_error"] for r in layers], by=by)
    fig = go.Figure(
        [
            go.Bar(name="measured (held-out)", x=x, y=measured, marker_color=WHITENED, hovertext=hover),
            go.Scatter(
                name="predicted (calibration)",
                x=x,
                y=predicted,
                mode="markers",
                marker=dict(color="black", symbol="line-ew-open", size=14, line=dict(width=2)),
            ),
        ]
    )
    fig.update_layout(
        **LAYOUT,
        title=layout_title(f"Relative output error per {GROUPED[by]}"),
        xaxis=dict(title=group_title(by), type="category"),
        yaxis_title="‖(W − W_E) x‖ / ‖W x‖",
    )
    return fig


def block_cosine_figure(blocks: Sequence[dict]) -> go.Figure:
    """Mean cosine between the original's and the emulator's hidden states after each block."""
    fig = go.Figure(
        go.Scatter(
            name="cosine",
            x=[b["block"] for b in blocks],
            y=[b["cosine"] for b in blocks],
            mode="lines+markers",
            line=dict(color=WHITENED),
        )
    )
    fig.update_layout(
        **LAYOUT,
        title=layout_title("Hidden-state cosine, original vs emulator"),
        xaxis_title="block",
        yaxis_title="mean cosine over real tokens",
        showlegend=False,
    )
    return fig
