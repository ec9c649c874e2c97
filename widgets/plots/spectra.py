"""Spectra and rank choices: singular values, kept energy by rank, per layer and under a plan."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .common import LAYOUT, PLAIN, PLAN, SELECTED, WHITENED, group_axis, layout_title, positive


def _vline(name: str, x: float | None, y0: float, y1: float, color: str, dash: str) -> go.Scatter:
    xs, ys = ([x, x], [y0, y1]) if x is not None else ([], [])
    return go.Scatter(name=name, x=xs, y=ys, mode="lines", line=dict(color=color, dash=dash, width=2))


def spectrum_figure(spectra, name: str, rank: int | None = None) -> go.Figure:
    """Plain σ(W) and whitened σ(W S) of one layer, each relative to its largest (log y); ranks marked.

    The whitened spectrum is what the emulator truncates: the faster it falls, the
    less a low rank loses. "plan rank" is the rank in the table; "selected rank" is `rank`.
    """
    plain = spectra.spectrum(name, "plain").double().numpy()
    white = spectra.spectrum(name, "whitened").double().numpy()
    rel = lambda s: s / s[0] if len(s) and s[0] > 0 else s
    p, w = rel(plain), rel(white)
    lo = min([v for v in np.concatenate([p, w]) if v > 0], default=1e-6)
    row = spectra.layer(name)
    fig = go.Figure(
        [
            go.Scatter(
                name="plain σ(W)", x=np.arange(1, len(p) + 1), y=positive(p), mode="lines", line=dict(color=PLAIN)
            ),
            go.Scatter(
                name="whitened σ(W S)",
                x=np.arange(1, len(w) + 1),
                y=positive(w),
                mode="lines",
                line=dict(color=WHITENED),
            ),
            _vline("plan rank", row["rank"], lo, 1.0, PLAN, "dash"),
            _vline("selected rank", rank, lo, 1.0, SELECTED, "dot"),
        ]
    )
    fig.update_layout(
        **LAYOUT,
        title=layout_title(f"Singular values · {name}"),
        xaxis_title="index i",
        yaxis_title="σᵢ / σ₁",
        yaxis_type="log",
    )
    return fig


def energy_figure(spectra, name: str, rank: int | None = None) -> go.Figure:
    """Kept energy against rank: whitened (the emulator's metric, E‖W x‖²) and plain (‖W‖²)."""
    white = spectra.cumulative_energy(name, "whitened").numpy()
    plain = spectra.cumulative_energy(name, "plain").numpy()
    r = rank if rank is not None else len(white) - 1
    fig = go.Figure(
        [
            go.Scatter(
                name="whitened energy", x=np.arange(len(white)), y=white, mode="lines", line=dict(color=WHITENED)
            ),
            go.Scatter(name="plain energy", x=np.arange(len(plain)), y=plain, mode="lines", line=dict(color=PLAIN)),
            go.Scatter(
                name="selected",
                x=[r],
                y=[spectra.energy_at(name, r)],
                mode="markers",
                marker=dict(color=SELECTED, size=11),
            ),
        ]
    )
    fig.update_layout(
        **LAYOUT,
        title=layout_title(f"Energy kept by rank · {name}"),
        xaxis_title="rank r",
        yaxis_title="share of energy kept",
        yaxis_range=[0, 1.02],
    )
    return fig


def kept_energy_markers(spectra, ratio: float) -> list[float]:
    """Every layer's kept energy at a uniform ρ, in the order of kept_energy_figure's axis (grouped by block)."""
    order, _ = group_axis(spectra.rows, "block")
    energy = spectra.energy_at_ratio(ratio)
    return [energy[i] for i in order]


def kept_energy_title(ratio: float | None = None) -> str:
    return "Whitened energy kept per layer" + (
        f" (markers: every layer at ρ = {ratio:.2f})" if ratio is not None else ""
    )


def kept_energy_figure(spectra, *, ratio: float | None = None) -> go.Figure:
    """Kept whitened energy per layer under the built plan (bars) and, optionally, a uniform ρ (markers)."""
    rows = spectra.rows
    order, axis = group_axis(rows, "block")
    hover = [f"{rows[i]['name']}<br>rank {rows[i]['rank'] or 'dense'}<br>{rows[i]['reason']}" for i in order]
    data = [
        go.Bar(name="built plan", x=axis, y=[rows[i]["energy_kept"] for i in order], hovertext=hover, marker_color=PLAN)
    ]
    if ratio is not None:
        data.append(
            go.Scatter(
                name="uniform ρ",
                x=axis,
                y=kept_energy_markers(spectra, ratio),
                mode="markers",
                marker=dict(color=SELECTED, size=8, symbol="diamond"),
            )
        )
    fig = go.Figure(data)
    fig.update_layout(
        **LAYOUT,
        title=layout_title(kept_energy_title(ratio)),
        yaxis_title="share of E‖W x‖² kept",
        yaxis_range=[0, 1.02],
    )
    return fig


def ranks_figure(spectra, choices: dict) -> go.Figure:
    """Planned rank per layer (bars; dense layers in grey at full rank) and the energy each keeps."""
    rows = spectra.rows
    order, axis = group_axis(rows, "block")
    full = [min(rows[i]["d_out"], rows[i]["d_in"]) for i in order]
    rank = [choices[rows[i]["name"]].rank for i in order]
    energy = [spectra.energy_at(rows[i]["name"], r) for i, r in zip(order, rank)]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Bar(
            name="rank",
            x=axis,
            y=[r if r is not None else 0 for r in rank],
            marker_color=WHITENED,
            hovertext=[choices[rows[i]["name"]].reason for i in order],
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Bar(name="kept dense", x=axis, y=[f if r is None else 0 for f, r in zip(full, rank)], marker_color=PLAIN),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            name="full rank", x=axis, y=full, mode="markers", marker=dict(symbol="line-ew-open", size=14, color="black")
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(name="energy kept", x=axis, y=energy, mode="markers", marker=dict(color=SELECTED, size=6)),
        secondary_y=True,
    )
    fig.update_layout(**LAYOUT, title=layout_title("Planned rank per layer"), barmode="overlay")
    fig.update_yaxes(title_text="rank", secondary_y=False)
    fig.update_yaxes(title_text="whitened energy kept", range=[0, 1.02], secondary_y=True)
    return fig
