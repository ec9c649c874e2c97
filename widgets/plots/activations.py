"""Calibration activations: per-channel magnitudes, the eigen-spectrum of C, and an overview heatmap."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go

from emloc_nb.structure import block_index

from .common import LAYOUT, WHITENED, layout_title, positive


def input_label(stats, key: str) -> str:
    """'block 0 · q_proj, k_proj, v_proj': which layers read this input."""
    s = stats.inputs[key]
    b = block_index(key)
    kinds = ", ".join(n.rsplit(".", 1)[-1] for n in s.layers)
    return f"block {b} · {kinds}" if b is not None else f"{key} · {kinds}"


def channel_figure(inp, *, factor: float = 6.0, title: str = "") -> go.Figure:
    """Per-channel mean |x| and max |x| of one layer input (log y), outlier channels ringed."""
    mean, peak = inp.mean_abs.double().numpy(), inp.abs_max.double().numpy()
    outliers = inp.outlier_channels(factor).numpy()
    ch = np.arange(inp.dim)
    fig = go.Figure(
        [
            go.Scatter(name="max |x|", x=ch, y=positive(peak), mode="lines", line=dict(color="#d62728", width=1)),
            go.Scatter(name="mean |x|", x=ch, y=positive(mean), mode="lines", line=dict(color=WHITENED, width=1)),
            go.Scatter(
                name="outliers",
                x=outliers,
                y=positive(peak[outliers]),
                mode="markers",
                marker=dict(symbol="circle-open", size=10, color="black", line=dict(width=2)),
            ),
        ]
    )
    fig.update_layout(
        **LAYOUT,
        title=layout_title(f"{title or 'Per-channel magnitude'} (outlier: max > {factor:g}× median)"),
        xaxis_title="channel",
        yaxis_title="|x| over real tokens",
        yaxis_type="log",
        yaxis_exponentformat="power",
    )
    return fig


def eigen_figure(inp, *, title: str = "", eigenvalues=None) -> go.Figure:
    """Eigenvalues of E[x xᵀ], largest first (log y): how many directions the input really uses.

    `eigenvalues`: `inp.eigenvalues()` if the caller already has them (an eigen-decomposition is the slow part).
    """
    eig = (inp.eigenvalues() if eigenvalues is None else eigenvalues).double().numpy()
    fig = go.Figure(
        go.Scatter(
            name="eigenvalues",
            x=np.arange(1, len(eig) + 1),
            y=positive(eig),
            mode="lines+markers",
            marker=dict(size=3),
            line=dict(color=WHITENED),
        )
    )
    fig.update_layout(
        **LAYOUT,
        title=layout_title(title or "Eigen-spectrum of C = E[x xᵀ]"),
        xaxis_title="index (largest first)",
        yaxis_title="eigenvalue",
        yaxis_type="log",
        yaxis_exponentformat="power",
        showlegend=False,
    )
    return fig


def activation_heatmap(stats, *, bins: int = 64) -> go.Figure:
    """Inputs × channels sorted by max |x|, as log10(max |x| / median channel's max |x|).

    Channels are sorted per input (largest first) and grouped into equal quantile
    bins, keeping each bin's largest value, so inputs of different widths line up and
    an outlier channel is never averaged away. Rows read top to bottom in model order.
    """
    keys = list(stats.inputs)
    width = min(bins, min(s.dim for s in stats.inputs.values()))
    z, hover = [], []
    for key in keys:
        s = stats.inputs[key].abs_max.double()
        median = float(s.median()) or 1.0  # torch's (lower) median, as in InputStats.outlier_channels
        peak = np.sort(s.numpy())[::-1]
        chunks = np.array_split(peak, width)
        z.append([math.log10(max(float(c.max()) / median, 1e-12)) for c in chunks])
        hover.append(
            [
                f"{key}<br>channels {sum(map(len, chunks[:j]))}–{sum(map(len, chunks[: j + 1])) - 1} "
                f"of {len(peak)}<br>max |x| = {float(c.max()):.3g} (median {median:.3g})"
                for j, c in enumerate(chunks)
            ]
        )
    labels = [input_label(stats, k) for k in keys]
    fig = go.Figure(
        go.Heatmap(
            name="channel magnitude",
            z=z,
            y=labels,
            x=[f"{(j + 0.5) / width:.0%}" for j in range(width)],
            text=hover,
            hoverinfo="text",
            colorscale="Viridis",
            colorbar=dict(title="log10(max / median)"),
        )
    )
    fig.update_layout(
        **{**LAYOUT, "height": max(300, 22 * len(keys) + 120)},
        title=layout_title("Channel magnitude per input: max |x| relative to the median channel, channels sorted"),
        xaxis_title="channel quantile (sorted by max |x|, largest first)",
        yaxis=dict(autorange="reversed", type="category"),
    )
    return fig
