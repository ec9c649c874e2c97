"""LoRA correction: error against the fine-tuned emulator, naive vs corrected; ‖D‖, ‖B′‖ and κ."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .common import AFTER, BEFORE, LAYOUT, LEGEND_RIGHT, PLAIN, PLAN, clamp_label, group_axis, layout_title


def _stacked(top: str, bottom: str) -> go.Figure:
    """Two subplots, one above the other, sharing the layer axis."""
    return make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, subplot_titles=(top, bottom))


def correction_error_figure(rows: Sequence[dict], *, clamp: float) -> go.Figure:
    """Error against the fine-tuned emulator, naive (L = 0) vs corrected at L, overall and on the LoRA subspace."""
    order, axis = group_axis(rows, "block")
    fig = _stacked("overall (held-out inputs)", "on the LoRA input subspace")
    for r, part in ((1, "all"), (2, "subspace")):
        suffix = "overall" if part == "all" else "LoRA subspace"
        for label, when, color in (("naive", "before", BEFORE), ("corrected", "after", AFTER)):
            y = [rows[i].get(f"{when}_{part}") for i in order]
            bar = go.Bar(name=f"{label}, {suffix}", x=axis, y=y, marker_color=color, legendgroup=label)
            fig.add_trace(bar, row=r, col=1)
    fig.update_layout(
        **{**LAYOUT, "height": 580, "legend": LEGEND_RIGHT},
        barmode="group",
        title=layout_title(f"Error vs the fine-tuned emulator: naive (L = 0) and corrected (L = {clamp_label(clamp)})"),
    )
    fig.update_yaxes(title_text="relative error")
    return fig


def correction_norms_figure(rows: Sequence[dict]) -> go.Figure:
    """‖D‖ (what the emulator got wrong on the LoRA basis) against ‖B′‖ (the LoRA itself), and the clamp."""
    order, axis = group_axis(rows, "block")
    fig = _stacked("discrepancy ‖D‖ = ‖(W − W_E) U_A‖ and LoRA ‖B′‖", "clamp factors")
    fig.add_trace(go.Bar(name="‖D‖", x=axis, y=[rows[i]["d_norm"] for i in order], marker_color=BEFORE), row=1, col=1)
    fig.add_trace(go.Bar(name="‖B′‖", x=axis, y=[rows[i]["b_norm"] for i in order], marker_color=AFTER), row=1, col=1)
    fig.add_trace(
        go.Bar(
            name="mean κ",
            x=axis,
            y=[rows[i]["kappa_mean"] for i in order],
            marker_color=PLAN,
            hovertext=[f"{rows[i]['clamped']} of {rows[i]['lora_rank']} columns clamped" for i in order],
        ),
        row=2,
        col=1,
    )
    fig.update_layout(
        **{**LAYOUT, "height": 540, "legend": LEGEND_RIGHT},
        barmode="group",
        title=layout_title("What the correction subtracts"),
    )
    fig.update_yaxes(type="log", title_text="Frobenius norm", row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], title_text="κ (1: full correction)", row=2, col=1)
    return fig


def kappa_figure(report, name: str, clamp: float) -> go.Figure:
    """κ per LoRA direction of one layer at L: 1 subtracts that column of D fully, 0 not at all."""
    kappa = report.kappa_at(name, clamp).double().numpy()
    valid = report.stats[name]["valid"].bool().numpy()
    fig = go.Figure(
        go.Bar(
            name="κ",
            x=np.arange(len(kappa)),
            y=kappa,
            marker_color=[PLAN if v else PLAIN for v in valid],
            hovertext=["in the LoRA subspace" if v else "outside (A is zero there)" for v in valid],
        )
    )
    fig.update_layout(
        **LAYOUT,
        title=layout_title(f"Clamp factors · {name}"),
        xaxis_title="LoRA direction i",
        yaxis_title="κᵢ",
        yaxis_range=[0, 1.05],
        showlegend=False,
    )
    return fig
