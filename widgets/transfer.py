"""Transfer diagnostics, and the ablation: how the emulator's LoRA behaves on the original, and why.

`TransferView` shows, per evaluated setting, the distribution of the margins and of the
predicted answers beside the bias-free scores (AUC, balanced accuracy): a constant push
toward one answer moves the margins and the accuracy but not the AUC. It also shows the
prior correction on its tokens and, per layer, where the LoRA's input subspace came from
and how much of the corrected adapter the correction is. `AblationView` draws an
`emloc ablate` table: accuracy against the budget and against the clamp L, with error bars.
"""

from __future__ import annotations

from pathlib import Path

import ipywidgets as W

from emloc_nb.ablation_report import AblationReport, goal_text, load_ablation, std_goal_text
from emloc_nb.correction_report import CorrectionReport
from emloc_nb.evaluation import EvalResult

from . import tables as T
from .base import View, figure_widget, note, refresh
from .plots.transfer import (
    ablation_budget_figure,
    ablation_clamp_figure,
    margin_figure,
    predictions_figure,
    prior_figure,
    subspace_figure,
)


class TransferView(View):
    """`results`: EvalResult per setting (e.g. "original", "original+naive", "original+corrected");
    `correction`: the run's CorrectionReport, for the prior correction and the per-layer subspaces."""

    def __init__(self, results: dict[str, EvalResult], correction: CorrectionReport | None = None):
        if not results:
            raise ValueError("TransferView needs at least one evaluated setting.")
        self.results, self.correction = results, correction
        rows = [{"setting": s, **r.summary()} for s, r in results.items()]
        parts = [
            W.HTML(
                "<h3>How the LoRA transfers</h3><p>Accuracy counts the argmax answer; AUC ranks the examples by "
                "their scores whatever constant offset those carry, and balanced accuracy weighs both answers "
                "alike. A transfer with a good AUC but a poor accuracy has kept the task signal and shifted "
                "the prior: that is what the prior correction removes.</p>"
            ),
            W.HTML(T.html_table(rows, T.SCORE_COLUMNS)),
        ]
        first = next(iter(results.values()))
        self.margins = None
        if first.scores and len(first.choices) == 2:
            self.margins = figure_widget(margin_figure(results))
            parts.append(self.margins)
        self.predictions = figure_widget(predictions_figure(results))
        parts.append(self.predictions)
        self.prior = None
        if correction is not None and correction.prior:
            self.prior = figure_widget(prior_figure(correction.prior))
            parts.append(self.prior)
        elif correction is not None:
            parts.append(note("The corrected adapter carries no prior correction (correction.prior: false)."))
        self.subspaces = figure_widget(subspace_figure(correction.rows)) if correction is not None else None
        if self.subspaces is not None:
            parts.append(self.subspaces)
        self.widget = W.VBox(parts)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> TransferView:
        from emloc_nb.run import Run

        return cls.of(Run(run_dir))

    @classmethod
    def of(cls, run) -> TransferView:
        """The view of a Run: every setting evaluated so far, and its correction report if written."""
        from emloc_nb.eval_settings import settings

        results = {s: run.eval_result(s) for s in settings(run.config) if run.has(f"evaluation:{s}")}
        return cls(results, run.correction() if run.has("correction") else None)


class AblationView(View):
    """Controls: `budget` (the ρ whose accuracy-against-L curve is drawn)."""

    def __init__(self, report: AblationReport):
        self.report = report
        self.summary = report.summary()
        budgets = report.spec["budgets"]
        every = sorted({r["method"] for r in self.summary if r["budget"] is not None and r["budget"] != budgets[0]})
        self.by_budget = figure_widget(ablation_budget_figure(self.summary, every))
        self.budget = W.Dropdown(options=budgets, value=budgets[0], description="ρ")
        self.by_clamp = figure_widget(ablation_clamp_figure(self.summary, budgets[0]))
        self.budget.observe(lambda _: self._update(), names="value")
        table = W.HTML(T.html_table(self.summary, T.ABLATION_COLUMNS))
        goals = report.goals()
        text = (
            f"<p>Goals at ρ = {goals['budget']:g} for <code>{goals['method']}</code>: beats zero-shot "
            f"<b>{goal_text(goals['beats_zero_shot'])}</b>; beats the naive transfer by more than one std "
            f"<b>{std_goal_text(goals)}</b>; recovered share "
            f"<b>{T.fmt(goals['recovered'], '.2f')}</b>.</p>"
            if goals
            else ""
        )
        self.widget = W.VBox(
            [
                W.HTML(f"<h3>Ablation ({report.spec['seeds']} seeds, {report.spec['split']} split)</h3>{text}"),
                self.by_budget,
                self.budget,
                self.by_clamp,
                table,
            ]
        )

    @classmethod
    def from_dir(cls, directory: str | Path, split: str | None = None) -> AblationView:
        return cls(load_ablation(directory, split))

    def _update(self) -> None:
        refresh(self.by_clamp, ablation_clamp_figure(self.summary, self.budget.value), "x", "y", "error_y")
