"""The correction inspector: per-layer errors before and after correction, ‖D‖ and κ, live in L.

Every number is recomputed from the CorrectionReport alone (`rows_at`, `errors_at`,
`kappa_at` evaluate stored quadratic-form terms), so moving L needs no model. The
toy teaching mode lives in toy.py and is re-exported here.
"""

from __future__ import annotations

from pathlib import Path

import ipywidgets as W

from emloc_nb.correction_report import CorrectionReport

from .base import View, figure_widget, note, redraw, refresh
from .clamp import ClampControl
from .focus import largest_discrepancy_layer
from .plots.common import clamp_label, short_names
from .plots.correction import PAPER_L, correction_error_figure, correction_norms_figure, kappa_figure
from .toy import ToyCorrection

__all__ = ["CorrectionView", "ToyCorrection"]


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


class CorrectionView(View):
    """Controls: `clamp` (a ClampControl; `clamp.set(L)` or the toggle/slider; `L` reads it) and `layer`
    (whose per-direction κ is drawn; by default the one `largest_discrepancy_layer` picks). `rows` is the
    layer table at the current L. At L = 0, the naive transfer, nothing is subtracted: the figures show the
    paper's L = 3 beside it (`paper` holds its rows; None at any other L)."""

    def __init__(self, report: CorrectionReport, *, layer: str | None = None):
        self.report = report
        names = [r["name"] for r in report.layers]  # the layers the adapter trained
        self.has_errors = all("q" in report.stats.get(n, {}) for n in names) and bool(names)
        self.clamp = ClampControl(report.clamp)
        self.layer = W.Dropdown(
            options=list(zip(short_names(names), names)),
            value=layer or largest_discrepancy_layer(report.layers),
            description="layer",
            layout=W.Layout(width="380px"),
        )
        self.summary = W.HTML()
        self._at_L()
        self.errors = figure_widget(self._error_figure()) if self.has_errors else None
        self.norms = figure_widget(self._norms_figure())
        self.kappa = figure_widget(kappa_figure(report, self.layer.value, self.L))
        self.clamp.observe(lambda _: self._update())
        self.layer.observe(lambda _: self._update_kappa(), names="value")
        self._update()
        intro = W.HTML(
            "<h3>LoRA correction</h3><p>The LoRA was trained on the emulator W_E. The corrected adapter subtracts the "
            "discrepancy D = (W − W_E) U_A on the LoRA's input subspace, each column scaled by "
            "κᵢ = min(1, L · mean|B′ᵢ| / mean|Dᵢ|). Errors are against the fine-tuned emulator on held-out inputs. "
            f"The adapter was written with L = {clamp_label(report.clamp)}.</p>"
        )
        body = (
            [self.errors]
            if self.errors is not None
            else [
                note(
                    "This report has no held-out statistics, so no before/after errors: run correct_lora with heldout=."
                )
            ]
        )
        self.widget = W.VBox([intro, self.clamp.widget, self.summary, *body, self.norms, self.layer, self.kappa])

    @classmethod
    def from_run(cls, run_dir: str | Path, **kwargs) -> CorrectionView:
        from emloc_nb.run import Run

        return cls(Run(run_dir).correction(), **kwargs)

    @property
    def L(self) -> float:
        return self.clamp.value

    def _at_L(self) -> None:
        self.rows = self.report.rows_at(self.L)
        self.paper = self.report.rows_at(PAPER_L) if self.L == 0 else None

    def _error_figure(self):
        return correction_error_figure(self.rows, clamp=self.L, paper=self.paper)

    def _norms_figure(self):
        return correction_norms_figure(self.paper or self.rows, clamp=self.L)

    def _update(self) -> None:
        self._at_L()
        if self.errors is not None:
            redraw(self.errors, self._error_figure(), "y", "hovertext")  # at L = 0 "corrected" gives way
        refresh(self.norms, self._norms_figure(), "y", "hovertext")
        self._update_kappa()
        shown = self.paper or self.rows  # the corrected adapter on show: at L, or at the paper's L when L = 0
        clamped = sum(r["clamped"] for r in shown)
        columns = sum(int(self.report.stats[r["name"]]["valid"].sum()) for r in shown)
        if self.paper is None:
            at, corrected = f"At L = {clamp_label(self.L, '.3g')}", "corrected"
        else:
            at = f"L = 0 is the naive transfer: nothing is subtracted. At the paper's L = {PAPER_L:g}"
            corrected = f"corrected at L = {PAPER_L:g}"
        text = f"{at}: {clamped} of {columns} LoRA directions clamped (κ < 1)"
        if self.has_errors:
            text += (
                f" · mean error overall {_mean(r['before_all'] for r in shown):.4f} naive → "
                f"<b>{_mean(r['after_all'] for r in shown):.4f}</b> {corrected} · on the LoRA subspace "
                f"{_mean(r['before_subspace'] for r in shown):.4f} → "
                f"<b>{_mean(r['after_subspace'] for r in shown):.4f}</b>"
            )
        self.summary.value = f"<p>{text}</p>"

    def _update_kappa(self) -> None:
        refresh(self.kappa, kappa_figure(self.report, self.layer.value, self.L), "x", "y", "marker", "hovertext")
