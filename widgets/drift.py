"""Drift: how far the emulator strays from its original, per layer, per block, per token and end to end."""

from __future__ import annotations

import html
import math
from pathlib import Path

import ipywidgets as W

from emloc_nb.emulator_drift import DriftReport

from . import tables as T
from .base import View, figure_widget, note, refresh
from .focus import worst_drift_layer
from .plots.common import short_names
from .plots.drift import block_cosine_figure, layer_error_figure
from .tokens import token_kl_html


class DriftView(View):
    """Per-layer error (measured on held-out inputs, and predicted), block cosines, token KL, summaries.

    Controls: `group` ("block" or "kind": how the layer bars are grouped), `layer` (whose
    errors are spelt out; by default the one `worst_drift_layer` picks, the largest measured
    error) and `example` (which held-out example's tokens to colour by KL). `results` are the
    rows of the results table (`Run.results()`); when given, the accuracy table is shown too.
    """

    def __init__(self, drift: DriftReport, results: list[dict] | None = None, *, layer: str | None = None):
        self.drift, self.results = drift, results
        names = [r["name"] for r in drift.rows]
        self.layer = W.Dropdown(
            options=list(zip(short_names(names), names)),
            value=layer or worst_drift_layer(drift.rows),
            description="layer",
            layout=W.Layout(width="380px"),
        )
        self.detail = W.HTML()
        self.group = W.ToggleButtons(
            options=[("by block", "block"), ("by layer kind", "kind")], value="block", description="group"
        )
        self.example = W.Dropdown(
            options=[(f"example {i} ({len(t['tokens'])} tokens)", i) for i, t in enumerate(drift.tokens)],
            description="example",
            disabled=not drift.tokens,
        )
        self.layers = figure_widget(layer_error_figure(drift.rows, by=self.group.value))
        self.cosine = figure_widget(block_cosine_figure(drift.blocks))
        self.tokens = W.HTML()
        self.group.observe(lambda _: self._regroup(), names="value")
        self.layer.observe(lambda _: self._show_layer(), names="value")
        self.example.observe(lambda _: self._show_example(), names="value")
        self._show_layer()
        self._show_example()
        parts = [
            W.HTML("<h3>Drift: emulator vs original</h3>" + T.drift_summary_table(drift.summary)),
            self.group,
            self.layers,
            self.layer,
            self.detail,
            self.cosine,
            W.HTML("<h4>Next-token KL per token</h4>"),
            self.example,
            self.tokens,
        ]
        if results:
            parts.append(W.HTML("<h4>Task accuracy</h4>" + T.results_table(results)))
        self.widget = W.VBox(parts)

    @classmethod
    def from_run(cls, run_dir: str | Path, **kwargs) -> DriftView:
        from emloc_nb.run import Run

        run = Run(run_dir)
        return cls(run.drift(), run.results() if run.has("results") else None, **kwargs)

    def _show_layer(self) -> None:
        if self.layer.value is None:  # a report with no layers
            self.detail.value = ""
            return
        row = self.drift.layer(self.layer.value)
        worse = sum(_error(r) > _error(row) for r in self.drift.rows)
        rank = "kept dense" if row.get("rank") is None else f"rank {row['rank']}"
        self.detail.value = (
            f"<p><b>{html.escape(row['name'])}</b> ({rank}): measured error <b>{_number(row['measured_error'])}</b> "
            f"on held-out inputs, predicted {_number(row['predicted_error'])} from the calibration set · "
            f"{worse + 1} of {len(self.drift.rows)} by measured error</p>"
        )

    def _regroup(self) -> None:
        refresh(self.layers, layer_error_figure(self.drift.rows, by=self.group.value), "x", "y", "hovertext")

    def _show_example(self) -> None:
        if not self.drift.tokens:
            self.tokens.value = note(
                "This drift report holds no token examples (drift() was run without a tokenizer)."
            ).value
            return
        # One colour scale for all examples, so they can be compared by eye.
        vmax = max((max(t["kl"], default=0.0) for t in self.drift.tokens), default=0.0)
        self.tokens.value = token_kl_html(self.drift.tokens[self.example.value], vmax=vmax)


def _error(row: dict) -> float:
    value = row.get("measured_error")
    return value if value is not None and math.isfinite(value) else -math.inf


def _number(value) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.4f}"
