"""The run dashboard: every view of one run directory, in tabs, from saved files alone.

Tabs are built the first time they are opened, so a large run (SmolLM2's calibration
statistics are hundreds of MB) only loads what is looked at. A tab whose artifacts
do not exist yet says which stage writes them instead of failing; a tab that fails
to build for any other reason says "<title> failed: <error>" in its place.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

import ipywidgets as W

from emloc_nb.run import Run

from . import tables as T
from .activations import ActivationsView
from .base import View, figure_widget, note
from .correction import CorrectionView
from .drift import DriftView
from .planner import RankPlanner
from .plots.memory import memory_phases_figure
from .spectra import SpectrumView
from .tables import MISSING, config_summary
from .training import TrainingMonitor
from .transfer import AblationView, TransferView


class Dashboard(View):
    """Tabs: results, spectra, rank plan, activations, drift, correction, transfer, training, ablation.

    `view(title)` builds (once) and returns the view of a tab, or None when its
    artifacts are missing or it failed to build; `tabs` is the ipywidgets.Tab.
    `ablation`: the directory of an `emloc ablate` run; the Ablation tab is shown only when it is given.
    """

    def __init__(self, run_dir: str | Path, *, ablation: str | Path | None = None):
        self.run = Run(run_dir)
        self.ablation = ablation
        self._builders: dict[str, Callable[[], View | W.Widget]] = {
            "Results": self._results,
            "Spectra": lambda: SpectrumView(self.run.spectra()),
            "Rank plan": lambda: RankPlanner(self.run.spectra()),
            "Activations": lambda: ActivationsView(self.run.calibration()),
            "Drift": lambda: DriftView(self.run.drift(), self._results_rows()),
            "Correction": lambda: CorrectionView(self.run.correction()),
            "Transfer": lambda: TransferView.of(self.run),
            "Training": self._training,
            "Ablation": self._ablation,
        }
        if ablation is None:  # a tab only where there is something to show
            del self._builders["Ablation"]

        def stage(name: str) -> str:
            return f"Run the {name} stage (`emloc run`, or Run.run_stage({name!r})) and reopen the dashboard."

        self._missing_hint = {  # what to do when a tab has nothing to show yet
            "Results": stage("evaluate"),
            "Spectra": stage("emulator"),
            "Rank plan": stage("emulator"),
            "Activations": stage("calibrate"),
            "Drift": stage("drift"),
            "Correction": stage("correct"),
            "Transfer": stage("evaluate"),
            "Training": stage("finetune_emulator"),
            "Ablation": "Run `emloc ablate CONFIG --dir DIR` to fill the ablation directory.",
        }
        self.titles = list(self._builders)
        self._views: dict[str, View | W.Widget | None] = {}
        self.tabs = W.Tab(children=[W.VBox() for _ in self.titles], titles=self.titles)
        self.tabs.observe(lambda change: self._open(change["new"]), names="selected_index")
        self._open(0)
        # The folder's name only: a machine path means nothing to a reader of a screenshot or a shared page.
        header = W.HTML(f"<h2>EMLoC run · {html.escape(self.run.dir.resolve().name)}</h2>")
        self.widget = W.VBox([header, self.tabs])

    def view(self, title: str):
        """The view in tab `title` (built now if need be); None if its artifacts are missing or it failed."""
        self._open(self.titles.index(title))
        return self._views[title]

    def static_widget(self) -> W.Widget:
        for index in range(len(self.titles)):  # a page without a kernel shows every tab
            self._open(index)
        return self.widget

    def _open(self, index: int | None) -> None:
        if index is None:
            return
        title = self.titles[index]
        if title in self._views:
            return
        try:
            view = self._builders[title]()
            shown = view.widget if isinstance(view, View) else view
        except MISSING as e:
            view = None
            shown = note(f"Nothing to show yet in {self.run.dir.name} ({e}). {self._missing_hint[title]}")
        except Exception as e:  # one broken tab must not take the dashboard down, nor go unnoticed
            view = None
            shown = note(f"{title} failed: {type(e).__name__}: {e}")
        self._views[title] = view
        self.tabs.children[index].children = (shown,)

    # -- tab contents that are not a single view
    def _results_rows(self) -> list[dict] | None:
        return self.run.results() if self.run.has("results") else None

    def _results(self) -> W.Widget:
        parts = [W.HTML(config_summary(self.run))]
        rows = self._results_rows()
        parts.append(
            W.HTML("<h4>Results per setting</h4>" + T.results_table(rows))
            if rows
            else note("No results yet: run the evaluate stage to fill this table.")
        )
        records = self.run.stage_records()
        if records:
            parts.append(W.HTML("<h4>Stages</h4>" + T.stages_table(records)))
            parts.append(figure_widget(memory_phases_figure(records)))
            parts.append(W.HTML("<h4>Memory by phase</h4>" + T.phases_table(records)))
        return W.VBox(parts)

    def _ablation(self) -> AblationView:
        return AblationView.from_dir(self.ablation)

    def _training(self) -> W.Widget:
        monitors = [
            TrainingMonitor.from_history(self.run.history("emulator"), title="Training loss · LoRA on the emulator")
        ]
        if self.run.has("history:original"):
            monitors.append(
                TrainingMonitor.from_history(
                    self.run.history("original"), title="Training loss · LoRA on the original (baseline)"
                )
            )
        self.monitors = monitors
        return W.VBox([m.widget for m in monitors])
