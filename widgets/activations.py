"""Calibration activations: what the emulator's whitening sees at each layer input."""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as W

from emloc_nb.calibration import CalibrationStats
from emloc_nb.structure import block_index

from .base import View, figure_widget, refresh
from .focus import most_peaked_input
from .plots.activations import activation_heatmap, channel_figure, eigen_figure, input_label

ALL = "all blocks"


class ActivationsView(View):
    """Per-input channel magnitudes, outliers and the eigen-spectrum of C, plus an overview heatmap.

    Controls: `block` (filters `input`), `input` (the key of a layer input, e.g. the
    q/k/v input of a block) and `factor` (an outlier is a channel whose max |x|
    exceeds `factor` times the median channel's). `layer` (an input key, or the name of
    a layer that reads it) picks the input shown first; without it, the input whose
    largest channel stands out most (`most_peaked_input`).
    """

    def __init__(self, stats: CalibrationStats, *, layer: str | None = None, title: str = "Calibration activations"):
        self.stats = stats
        self.keys = list(stats.inputs)
        blocks = sorted({block_index(k) for k in self.keys}, key=lambda b: -1 if b is None else b)
        self.block = W.Dropdown(
            options=[(ALL, ALL)] + [(f"block {b}", b) for b in blocks if b is not None], value=ALL, description="block"
        )
        self.input = W.Dropdown(options=self._options(ALL), description="input", layout=W.Layout(width="420px"))
        self.input.value = self._key(layer) if layer else most_peaked_input(stats)
        self.factor = W.FloatSlider(
            value=6.0, min=2.0, max=50.0, step=0.5, description="outlier ×", continuous_update=False
        )
        self.info = W.HTML()
        self._eigenvalues: dict = {}  # input key -> eigenvalues of its C, computed once
        self._eigen_shown: str | None = None  # the input the eigen figure shows
        self.channels = figure_widget(channel_figure(self.current, factor=self.factor.value))
        self.eigen = figure_widget(eigen_figure(self.current, eigenvalues=self._eigenvalues_of(self.input.value)))
        self.heatmap = figure_widget(activation_heatmap(stats))
        self.block.observe(self._on_block, names="value")
        self.input.observe(lambda _: self._update(), names="value")
        self.factor.observe(lambda _: self._update(), names="value")
        self._update()
        header = W.HTML(
            f"<h3>{html.escape(title)}</h3><p>{stats.examples} examples, up to {stats.tokens} real tokens "
            f"per input, {len(self.keys)} distinct inputs read by {len(stats.layers)} layers.</p>"
        )
        self.widget = W.VBox(
            [header, W.HBox([self.block, self.input, self.factor]), self.info, self.channels, self.eigen, self.heatmap]
        )

    @classmethod
    def from_run(cls, run_dir: str | Path, split: str = "train", **kwargs) -> ActivationsView:
        """`split`: "train" (the statistics the emulator was built from) or "heldout"."""
        from emloc_nb.run import Run

        return cls(Run(run_dir).calibration(split), title=f"Activations · {split}", **kwargs)

    def _options(self, block) -> list[tuple[str, str]]:
        keys = [k for k in self.keys if block == ALL or block_index(k) == block]
        return [(input_label(self.stats, k), k) for k in keys]

    def _on_block(self, change) -> None:
        current = self.input.value
        options = self._options(change["new"])
        self.input.options = options  # ipywidgets picks the first option when the old value is gone
        if current in [k for _, k in options]:
            self.input.value = current

    def select(self, key: str) -> None:
        """Show input `key` (any layer name that reads it also works)."""
        self.block.value = ALL
        self.input.value = self._key(key)

    def _key(self, key: str) -> str:
        return key if key in self.stats.inputs else self.stats.key_for(key)

    @property
    def current(self):
        """The InputStats on show."""
        return self.stats.inputs[self.input.value]

    def _eigenvalues_of(self, key: str):
        if key not in self._eigenvalues:
            self._eigenvalues[key] = self.stats.inputs[key].eigenvalues()
        return self._eigenvalues[key]

    def _update(self) -> None:
        key, s = self.input.value, self.current
        label = input_label(self.stats, key)
        fresh = [(self.channels, channel_figure(s, factor=self.factor.value, title=f"Per-channel |x| · {label}"))]
        if key != self._eigen_shown:  # the eigen-spectrum depends on the input alone, not on the outlier factor
            fresh.append(
                (
                    self.eigen,
                    eigen_figure(s, title=f"Eigen-spectrum of C · {label}", eigenvalues=self._eigenvalues_of(key)),
                )
            )
            self._eigen_shown = key
        for live, fig in fresh:
            refresh(live, fig, "x", "y")
        outliers = s.outlier_channels(self.factor.value).tolist()
        shown = ", ".join(map(str, outliers[:20])) + (" …" if len(outliers) > 20 else "")
        self.info.value = (
            f"<b>{html.escape(key)}</b> read by {html.escape(', '.join(s.layers))}<br>"
            f"{s.dim} channels · {s.tokens} tokens seen · {len(outliers)} outlier channel(s)"
            f"{': ' + shown if outliers else ''} · largest max |x| {float(s.abs_max.max()):.3g}"
        )
