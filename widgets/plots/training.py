"""Training: the loss per step and the learning rate."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .common import LAYOUT, PLAIN, WHITENED, finite, layout_title


def loss_figure(
    history: Sequence[dict] = (), *, total_steps: int | None = None, title: str = "Training loss"
) -> go.Figure:
    """Loss per step, and the learning rate on a second axis."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Scatter(
            name="loss",
            x=[h["step"] for h in history],
            y=[finite(h["loss"]) for h in history],
            mode="lines+markers",
            marker=dict(size=4),
            line=dict(color=WHITENED),
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            name="lr",
            x=[h["step"] for h in history],
            y=[finite(h.get("lr")) for h in history],
            mode="lines",
            line=dict(color=PLAIN, dash="dot"),
        ),
        secondary_y=True,
    )
    fig.update_layout(**LAYOUT, title=layout_title(title), xaxis_title="step")
    if total_steps:
        fig.update_xaxes(range=[0, total_steps])
    fig.update_yaxes(title_text="loss (answer tokens)", secondary_y=False)
    fig.update_yaxes(title_text="learning rate", secondary_y=True, showgrid=False)
    return fig
