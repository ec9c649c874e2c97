"""LoRA correction: error against the fine-tuned emulator, naive vs corrected; ‖D‖, ‖B′‖ and κ."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .common import AFTER, BEFORE, LAYOUT, LEGEND_RIGHT, PLAIN, PLAN, by_group, clamp_label, group_title, layout_title

PAPER_L = 3.0  # the paper's clamp: what the figures show beside L = 0, where the correction subtracts nothing


def shown_clamp(clamp: float) -> float:
    """The L whose κ the figures draw: L itself, or the paper's L at L = 0 (where every κ is 0)."""
    return PAPER_L if clamp == 0 else clamp


def _stacked(top: str, bottom: str) -> go.Figure:
    """Two subplots, one above the other, sharing the block axis."""
    return make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, subplot_titles=(top, bottom))


def correction_error_figure(rows: Sequence[dict], *, clamp: float, paper: Sequence[dict] | None = None) -> go.Figure:
    """Error against the fine-tuned emulator, overall and on the LoRA subspace, per block (mean over its layers):
    naive (L = 0) against corrected at L.

    At L = 0 the corrected adapter is the naive one, so the naive transfer is drawn once, beside the
    corrected adapter at the paper's L when `paper` (the report's rows at PAPER_L) is given.
    """
    series = [("naive", "before", rows, BEFORE)]
    if clamp != 0:
        series.append(("corrected", "after", rows, AFTER))
        title = layout_title(
            "Error vs the fine-tuned emulator", f"naive (L = 0) and corrected at L = {clamp_label(clamp, '.3g')}"
        )
    else:
        if paper is not None:
            series.append((f"paper's L = {PAPER_L:g}", "after", paper, AFTER))
        beside = f"; beside it, corrected at the paper's L = {PAPER_L:g}" if paper is not None else ""
        title = layout_title("Error vs the fine-tuned emulator", f"L = 0 is the naive transfer{beside}")
    fig = _stacked("overall (held-out inputs)", "on the LoRA input subspace")
    for r, part in ((1, "all"), (2, "subspace")):
        suffix = "overall" if part == "all" else "LoRA subspace"
        for label, when, source, color in series:
            x, y, hover = by_group(source, [row.get(f"{when}_{part}") for row in source])
            bar = go.Bar(name=f"{label}, {suffix}", x=x, y=y, hovertext=hover, marker_color=color, legendgroup=label)
            fig.add_trace(bar, row=r, col=1)
    fig.update_layout(**{**LAYOUT, "height": 580, "legend": LEGEND_RIGHT}, barmode="group", title=title)
    fig.update_yaxes(title_text="relative error")
    fig.update_xaxes(type="category")
    fig.update_xaxes(title_text=group_title("block"), row=2, col=1)
    return fig


def correction_norms_figure(rows: Sequence[dict], *, clamp: float | None = None) -> go.Figure:
    """‖D‖ (what the emulator got wrong on the LoRA basis) against ‖B′‖ (the LoRA itself), and the clamp
    factors, per block (mean over its layers). `rows` are the report's rows at `shown_clamp(clamp)`;
    `clamp` is the L on show (None: not said)."""
    fig = _stacked("discrepancy ‖D‖ = ‖(W − W_E) U_A‖ and LoRA ‖B′‖", "clamp factors κ")
    x, d, d_hover = by_group(rows, [r["d_norm"] for r in rows])
    _, b, b_hover = by_group(rows, [r["b_norm"] for r in rows])
    kappa_text = [f"mean κ {r['kappa_mean']:.3f}, {r['clamped']} of {r['lora_rank']} columns clamped" for r in rows]
    _, kappa, kappa_hover = by_group(rows, [r["kappa_mean"] for r in rows], texts=kappa_text)
    fig.add_trace(go.Bar(name="‖D‖", x=x, y=d, hovertext=d_hover, marker_color=BEFORE), row=1, col=1)
    fig.add_trace(go.Bar(name="‖B′‖", x=x, y=b, hovertext=b_hover, marker_color=AFTER), row=1, col=1)
    fig.add_trace(go.Bar(name="mean κ", x=x, y=kappa, hovertext=kappa_hover, marker_color=PLAN), row=2, col=1)
    if clamp is None:
        title = layout_title("What the correction subtracts")
    elif clamp == 0:
        title = layout_title(
            f"What the correction would subtract at the paper's L = {PAPER_L:g}",
            f"κ shown at L = {PAPER_L:g}: at L = 0, the naive transfer, every κ is 0 and nothing is subtracted",
        )
    else:
        title = layout_title("What the correction subtracts", f"κ at L = {clamp_label(clamp, '.3g')}")
    fig.update_layout(**{**LAYOUT, "height": 540, "legend": LEGEND_RIGHT}, barmode="group", title=title)
    fig.update_yaxes(type="log", title_text="Frobenius norm", row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], title_text="κ (1: full correction)", row=2, col=1)
    fig.update_xaxes(type="category")
    fig.update_xaxes(title_text=group_title("block"), row=2, col=1)
    return fig


def kappa_figure(report, name: str, clamp: float) -> go.Figure:
    """κ per LoRA direction of one layer at L (at the paper's L when L = 0): 1 subtracts that column of D fully,
    0 not at all."""
    shown = shown_clamp(clamp)
    kappa = report.kappa_at(name, shown).double().numpy()
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
        title=layout_title(
            f"Clamp factors κᵢ · {name}",
            f"at L = {clamp_label(shown, '.3g')}"
            + (" (the paper's; at L = 0, the naive transfer, every κᵢ is 0)" if clamp == 0 else ""),
        ),
        xaxis_title="LoRA direction i",
        yaxis_title="κᵢ",
        yaxis_range=[0, 1.05],
        showlegend=False,
    )
    return fig
