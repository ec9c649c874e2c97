"""Spectra and rank choices: singular values, kept energy by rank, per layer and under a plan."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .common import LAYOUT, PLAIN, PLAN, SELECTED, WHITENED, by_group, group_title, kinds, layout_title, positive


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
        yaxis_exponentformat="power",  # 10⁻⁶, not the SI "1μ"
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


def block_grid(rows) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """Block × projection cells for per-layer rows: the row labels, the column labels, and each row's cell.

    Columns are the layer kinds (q_proj, ..., down_proj) in model order, or the name within the block
    where a kind repeats in one (GPT-2's attn.c_proj and mlp.c_proj). Layers outside the blocks get a row each.
    """
    columns = kinds(rows)
    blocks = list(dict.fromkeys(r.get("block") if r.get("block") is not None else r["name"] for r in rows))
    cols = list(dict.fromkeys(columns))
    cells = [
        (blocks.index(r.get("block") if r.get("block") is not None else r["name"]), cols.index(c))
        for r, c in zip(rows, columns)
    ]
    labels = [f"block {b}" if isinstance(b, int) else str(b) for b in blocks]
    return labels, cols, cells


def grid_values(rows, values) -> list[list]:
    """`values` (one per row) laid out on `block_grid(rows)`; cells no layer fills stay empty."""
    labels, cols, cells = block_grid(rows)
    z = [[None] * len(cols) for _ in labels]
    for (i, j), v in zip(cells, values):
        z[i][j] = v
    return z


def kept_energy_markers(spectra, ratio: float) -> list[list]:
    """Every layer's kept energy at a uniform ρ, on the kept-energy heatmap's grid."""
    return grid_values(spectra.rows, list(spectra.energy_at_ratio(ratio)))


def energy_floor(spectra, ratio: float | None = None) -> float:
    """The smallest kept energy the heatmap shows (the built plan's, and at a uniform ρ if given): where its
    colour scale starts, so that 0.96 and 1.00 do not get the same colour."""
    values = [r["energy_kept"] for r in spectra.rows]
    if ratio is not None:
        values += list(spectra.energy_at_ratio(ratio))
    return min(min(values, default=0.0), 0.999)  # a scale from 1 to 1 has no colours


def kept_energy_title(ratio: float | None = None, floor: float | None = None) -> dict:
    panels = "the built plan" + (f" (left) and every layer at ρ = {ratio:.2f} (right)" if ratio is not None else "")
    scale = f"; colours from {floor:.3f} (the lowest shown) to 1" if floor is not None else ""
    return layout_title("Whitened energy kept, block × projection", panels + scale)


def kept_energy_figure(spectra, *, ratio: float | None = None) -> go.Figure:
    """Kept whitened energy as a block × projection heatmap: the built plan and, optionally, a uniform ρ beside it.

    One cell per block linear reads far better than a bar per layer (210 on SmolLM2); dense layers say so.
    The colour scale runs from the lowest value shown to 1, where the differences are.
    """
    rows = spectra.rows
    labels, cols, cells = block_grid(rows)
    hover = grid_values(
        rows,
        [
            f"{r['name']}<br>rank {r['rank'] or 'dense'}<br>energy kept {r['energy_kept']:.3f}<br>{r['reason']}"
            for r in rows
        ],
    )
    text = grid_values(rows, ["dense" if r["rank"] is None else f"{r['energy_kept']:.3f}" for r in rows])
    floor = energy_floor(spectra, ratio)
    heat = dict(x=cols, y=labels, zmin=floor, zmax=1, colorscale="Viridis", xgap=1, ygap=1)
    panels = 1 if ratio is None else 2
    fig = make_subplots(rows=1, cols=panels, shared_yaxes=True, horizontal_spacing=0.03)
    fig.add_trace(
        go.Heatmap(
            name="built plan",
            z=grid_values(rows, [r["energy_kept"] for r in rows]),
            text=text,
            texttemplate="%{text}" if len(labels) * len(cols) <= 400 else None,
            textfont=dict(size=9),
            hovertext=hover,
            hovertemplate="%{hovertext}<extra></extra>",
            colorbar=dict(title=dict(text="energy kept", side="right"), tickformat=".3f"),
            **heat,
        ),
        row=1,
        col=1,
    )
    if ratio is not None:
        fig.add_trace(
            go.Heatmap(
                name="uniform ρ",
                z=kept_energy_markers(spectra, ratio),
                showscale=False,
                hovertemplate="%{y} · %{x}<br>energy kept %{z:.3f}<extra>uniform ρ</extra>",
                **heat,
            ),
            row=1,
            col=2,
        )
    fig.update_layout(
        **{**LAYOUT, "height": max(320, 16 * len(labels) + 150)},
        title=kept_energy_title(ratio, floor),
    )
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", tickangle=-30)
    return fig


def ranks_figure(spectra, choices: dict) -> go.Figure:
    """Per block: the share of its parameters the plan keeps (bars) and the mean whitened energy its layers keep
    (dots); the hover lists each layer's rank, or "dense"."""
    rows = spectra.rows
    ranks = [choices[r["name"]].rank for r in rows]
    kept = [spectra.params_at(r["name"], rank) for r, rank in zip(rows, ranks)]
    energy = [spectra.energy_at(r["name"], rank) for r, rank in zip(rows, ranks)]
    texts = [
        f"dense · {choices[r['name']].reason}" if rank is None else f"rank {rank} of {min(r['d_out'], r['d_in'])}"
        for r, rank in zip(rows, ranks)
    ]
    x, kept_sum, hover = by_group(rows, kept, how="sum", texts=texts)
    _, dense_sum, _ = by_group(rows, [r["d_out"] * r["d_in"] for r in rows], how="sum")
    _, mean_energy, energy_hover = by_group(rows, energy)
    fig = go.Figure(
        [
            go.Bar(
                name="parameters kept",
                x=x,
                y=[k / d for k, d in zip(kept_sum, dense_sum)],
                marker_color=WHITENED,
                hovertext=hover,
            ),
            go.Scatter(
                name="energy kept",
                x=x,
                y=mean_energy,
                mode="markers",
                marker=dict(color=SELECTED, size=7),
                hovertext=energy_hover,
            ),
        ]
    )
    fig.update_layout(
        **LAYOUT,
        title=layout_title(
            "Planned ranks per block",
            "bars: share of the block's parameters kept · dots: mean whitened energy its layers keep",
        ),
        xaxis=dict(title=group_title("block"), type="category"),
        yaxis=dict(title="share kept", range=[0, 1.02]),
    )
    return fig
