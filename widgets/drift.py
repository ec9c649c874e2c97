"""Drift: how far the emulator strays from its original, per layer, per block, per token and end to end."""

from __future__ import annotations

from pathlib import Path

import ipywidgets as W

from emloc_nb.emulator_drift import DriftReport

from . import tables as T
from .base import View, figure_widget, note, refresh
from .plots.drift import block_cosine_figure, layer_error_figure
from .tokens import token_kl_html


class DriftView(View):
    """Per-layer error (measured on held-out inputs, and predicted), block cosines, token KL, summaries.

    Controls: `group` ("block" or "kind": how the layer bars are grouped) and
    `example` (which held-out example's tokens to colour by KL). `results` are the
    rows of the results table (`Run.results()`); when given, the accuracy table is shown too.
    """

    def __init__(self, drift: DriftReport, results: list[dict] | None = None):
        self.drift, self.results = drift, results
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
        self.example.observe(lambda _: self._show_example(), names="value")
        self._show_example()
        parts = [
            W.HTML("<h3>Drift: emulator vs original</h3>" + T.drift_summary_table(drift.summary)),
            self.group,
            self.layers,
            self.cosine,
            W.HTML("<h4>Next-token KL per token</h4>"),
            self.example,
            self.tokens,
        ]
        if results:
            parts.append(W.HTML("<h4>Task accuracy</h4>" + T.results_table(results)))
        self.widget = W.VBox(parts)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> DriftView:
        from emloc_nb.run import Run

        run = Run(run_dir)
        return cls(run.drift(), run.results() if run.has("results") else None)

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
