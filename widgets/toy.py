"""Teaching mode: the LoRA correction on a 2-D or 3-D toy layer, drawn as geometry.

A linear layer maps the unit circle (sphere) to an ellipse (ellipsoid); comparing
those images shows what each weight matrix does. The correction itself is the core's
`correct_layer`; this file only builds a toy layer, calls it, and draws the result:

- W: the original; W_E = W + error · ‖W‖_F · E (a fixed random unit direction E);
- ΔW = s B A: a LoRA "trained on the emulator", acting on the input subspace span(Aᵀ);
- target W_E + ΔW (the fine-tuned emulator), naive W + ΔW, corrected W + ΔW_c.

With no clamp, the corrected layer matches the target on the LoRA's subspace and
equals W off it; at L = 0 it is the naive transfer.
"""

from __future__ import annotations

import html
import math

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import torch

from emloc_nb.layer_correction import correct_layer

from .base import View, figure_widget, refresh
from .clamp import ClampControl
from .plots.common import clamp_label

MAPS = [  # (trace name, colour, dash)
    ("W (original)", "#7f7f7f", "solid"),
    ("W_E (emulator)", "#bcbd22", "dot"),
    ("W_E + ΔW (target: fine-tuned emulator)", "#2ca02c", "solid"),
    ("W + ΔW (naive transfer)", "#ff7f0e", "dash"),
    ("W + ΔW_c (corrected)", "#1f77b4", "solid"),
]
DOT_COLOR = {"target": MAPS[2][1], "naive": MAPS[3][1], "corrected": MAPS[4][1]}


def _orthonormal(d: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]


def _unit_curves(dim: int, n: int = 121) -> np.ndarray:
    """Points on the unit circle, or on three great circles of the sphere (NaN columns break the lines)."""
    t = np.linspace(0, 2 * np.pi, n)
    c, s, z = np.cos(t), np.sin(t), np.zeros_like(t)
    if dim == 2:
        return np.stack([c, s])
    gap = np.full((3, 1), np.nan)
    return np.concatenate([np.stack([c, s, z]), gap, np.stack([z, c, s]), gap, np.stack([s, z, c])], axis=1)


def _xyz(points: np.ndarray) -> dict:
    axes = ("x", "y", "z")[: points.shape[0]]
    return {a: [None if np.isnan(v) else float(v) for v in points[i]] for i, a in enumerate(axes)}


class ToyCorrection(View):
    """Controls: `clamp` (ClampControl for L) and `error` (the emulator's relative error ‖W − W_E‖_F / ‖W‖_F).

    `state` holds the matrices on show (W, W_E, ΔW, ΔW_c, U_A, κ) and `numbers` the
    readout (mismatch with the target on the LoRA subspace, change to W off it).
    """

    def __init__(
        self, dim: int = 2, seed: int = 0, *, lora_rank: int | None = None, error: float = 0.3, clamp: float = 3.0
    ):
        if dim not in (2, 3):
            raise ValueError("The toy layer is drawn in 2 or 3 dimensions: use dim=2 or dim=3.")
        self.dim, self.r = dim, lora_rank or dim - 1
        if not 1 <= self.r < dim:
            raise ValueError(
                f"lora_rank must be between 1 and {dim - 1}, so that some inputs lie outside the LoRA's subspace."
            )
        g = torch.Generator().manual_seed(seed)
        self.w = (
            _orthonormal(dim, g)
            @ torch.diag(torch.linspace(1.6, 0.6, dim, dtype=torch.float64))
            @ _orthonormal(dim, g).T
        )
        e = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        self.direction = e / e.norm()
        self.a = torch.randn(self.r, dim, generator=g, dtype=torch.float64)
        b = torch.randn(dim, self.r, generator=g, dtype=torch.float64)
        self.b = b * (0.6 * self.w.norm() / (b @ self.a).norm())  # a LoRA update about 60% of ‖W‖, visible by eye
        self.scaling = 1.0
        self.curves = _unit_curves(dim)
        self.extent = self._extent()

        self.clamp = ClampControl(clamp)
        self.error = W.FloatSlider(
            value=error,
            min=0.0,
            max=1.0,
            step=0.01,
            description="emulator error",
            readout_format=".2f",
            style={"description_width": "initial"},
        )
        self.readout = W.HTML()
        self.figure = figure_widget(self._figure())
        self.clamp.observe(lambda _: self._update())
        self.error.observe(lambda _: self._update(), names="value")
        self._update()
        intro = W.HTML(
            f"<h3>LoRA correction on a {dim}-D toy layer</h3><p>Each curve is the image of the unit "
            f"{'circle' if dim == 2 else 'sphere (three great circles)'} under a weight matrix. The LoRA only reads "
            f"inputs along its {'direction' if self.r == 1 else 'plane'} (drawn in input space). The correction makes "
            "W + ΔW_c agree with the fine-tuned emulator there, and leaves W alone elsewhere; L limits how much of "
            "the discrepancy D is subtracted.</p>"
        )
        self.widget = W.VBox([intro, self.clamp.widget, self.error, self.readout, self.figure])

    @property
    def L(self) -> float:
        return self.clamp.value

    @property
    def state(self) -> dict:
        w_e = self.w + self.error.value * self.w.norm() * self.direction
        lc = correct_layer(self.w, w_e, self.a, self.b, self.scaling, self.L)
        valid = lc.valid
        return {
            "w": self.w,
            "w_e": w_e,
            "delta": self.scaling * self.b @ self.a,
            "delta_c": lc.b @ lc.a,
            "u": lc.a[valid].T,
            "kappa": lc.kappa[valid],
            "d": lc.d[:, valid],
        }

    @property
    def numbers(self) -> dict:
        s = self.state
        u = s["u"]
        target = (s["w_e"] + s["delta"]) @ u
        outside = torch.eye(self.dim, dtype=torch.float64) - u @ u.T
        rel = lambda m: float(m.norm() / target.norm())
        return {
            "d_norm": float(s["d"].norm()),
            "kappa": s["kappa"].tolist(),
            "naive_subspace_error": rel((self.w + s["delta"]) @ u - target),
            "corrected_subspace_error": rel((self.w + s["delta_c"]) @ u - target),
            "corrected_change_off_subspace": float((s["delta_c"] @ outside).norm()),
            "emulator_error_off_subspace": float(((s["w_e"] - self.w) @ outside).norm()),
        }

    # -- drawing
    def _maps(self, s: dict) -> list[torch.Tensor]:
        return [s["w"], s["w_e"], s["w_e"] + s["delta"], s["w"] + s["delta"], s["w"] + s["delta_c"]]

    def _extent(self) -> float:
        """Fixed axes for every slider position.

        Every image point is affine in the emulator error and, through κ ∈ [0, 1], in
        the correction, so its largest coordinate is reached at an end: error 0 or 1,
        L = 0 or ∞.
        """
        delta = self.scaling * self.b @ self.a
        peak = 0.0
        for error in (0.0, 1.0):
            w_e = self.w + error * self.w.norm() * self.direction
            for clamp in (0.0, math.inf):
                lc = correct_layer(self.w, w_e, self.a, self.b, self.scaling, clamp)
                for m in (self.w, w_e, w_e + delta, self.w + lc.b @ lc.a):
                    peak = max(peak, float(np.nanmax(np.abs(m.numpy() @ self.curves))))
        return 1.1 * max(peak, 1.3)

    def _figure(self) -> go.Figure:
        s = self.state
        three = self.dim == 3
        Line = go.Scatter3d if three else go.Scatter
        data = [
            Line(
                name="unit " + ("sphere" if three else "circle"),
                mode="lines",
                **_xyz(self.curves),
                line=dict(color="#cccccc", width=2),
            )
        ]
        for (name, color, dash), m in zip(MAPS, self._maps(s)):
            data.append(
                Line(
                    name=name,
                    mode="lines",
                    **_xyz(m.numpy() @ self.curves),
                    line=dict(color=color, dash=dash, width=3 if "corrected" in name else 2),
                )
            )
        u = s["u"].numpy()
        if self.r == 1 or not three:
            ends = np.concatenate([-1.3 * u[:, :1], 1.3 * u[:, :1]], axis=1)
            data.append(
                Line(
                    name="LoRA input subspace",
                    mode="lines",
                    **_xyz(ends),
                    line=dict(color="black", width=3, dash="longdash"),
                )
            )
        else:
            corners = np.stack(
                [1.3 * (i * u[:, 0] + j * u[:, 1]) for i, j in ((-1, -1), (1, -1), (1, 1), (-1, 1))], axis=1
            )
            data.append(
                go.Mesh3d(
                    name="LoRA input subspace",
                    **_xyz(corners),
                    i=[0, 0],
                    j=[1, 2],
                    k=[2, 3],
                    color="black",
                    opacity=0.15,
                    showlegend=True,
                )
            )
        Dots = go.Scatter3d if three else go.Scatter
        for name, m, symbol in (
            ("target on subspace", s["w_e"] + s["delta"], "circle"),
            ("naive on subspace", s["w"] + s["delta"], "x"),
            ("corrected on subspace", s["w"] + s["delta_c"], "diamond-open"),
        ):
            data.append(
                Dots(
                    name=name,
                    mode="markers",
                    **_xyz(m.numpy() @ u),
                    marker=dict(size=11 if not three else 5, symbol=symbol, color=DOT_COLOR[name.split()[0]]),
                )
            )
        fig = go.Figure(data)
        extent = self.extent
        if three:
            axis = dict(range=[-extent, extent])
            fig.update_layout(scene=dict(xaxis=axis, yaxis=axis, zaxis=axis, aspectmode="cube"))
        else:
            fig.update_xaxes(range=[-extent, extent], zeroline=True)
            fig.update_yaxes(range=[-extent, extent], scaleanchor="x", scaleratio=1, zeroline=True)
        fig.update_layout(
            template="plotly_white",
            height=560,
            margin=dict(l=40, r=20, t=50, b=40),
            title="Images of the unit " + ("sphere" if three else "circle") + " (input and output share the axes)",
        )
        return fig

    def _update(self) -> None:
        refresh(self.figure, self._figure(), "x", "y", *(("z",) if self.dim == 3 else ()), title=False)
        n = self.numbers
        kappa = ", ".join(f"{k:.3g}" for k in n["kappa"])
        L = clamp_label(self.L, ".3g")
        self.readout.value = (
            f"<p>L = {L} · ‖D‖ = {n['d_norm']:.3f} · κ = [{html.escape(kappa)}]<br>"
            f"mismatch with the fine-tuned emulator on the LoRA subspace: naive {n['naive_subspace_error']:.3f}, "
            f"<b>corrected {n['corrected_subspace_error']:.3f}</b><br>"
            "off the subspace the corrected layer keeps the original W (change "
            f"{n['corrected_change_off_subspace']:.1e}) "
            f"instead of copying the emulator's error there ({n['emulator_error_off_subspace']:.3f})</p>"
        )
