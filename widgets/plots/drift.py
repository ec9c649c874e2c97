"""Drift: per-layer output error (measured and predicted) and hidden-state cosine per block."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from .common import LAYOUT, WHITENED, group_axis, layout_title


def layer_error_figure(layers: Sequence[dict], *, by: str = "block") -> go.Figure:
    """Measured (held-out) and predicted relative output error per layer, grouped by block or by kind."""
    order, axis = group_axis(layers, by)
    fig = go.Figure(
        [
            go.Bar(
                name="measured (held-out)",
                x=axis,
                y=[layers[i]["measured_error"] for i in order],
                marker_color=WHITENED,
                hovertext=[layers[i]["name"] for i in order],
            ),
            go.Scatter(
                name="predicted (calibration)",
                x=axis,
                y=[layers[i]["predicted_error"] for i in order],
                mode="markers",
                marker=dict(color="black", symbol="line-ew-open", size=14, line=dict(width=2)),
            ),
        ]
    )
    fig.update_layout(
        **LAYOUT, title=layout_title(f"Relative output error per layer, by {by}"), yaxis_title="‖(W − W_E) x‖ / ‖W x‖"
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
