"""The training monitor: a live loss curve (and learning rate) fed by the core's training callbacks.

monitor = TrainingMonitor()
display(monitor)
finetune(model, tokenizer, task, out, callbacks=[monitor])
"""

from __future__ import annotations

from pathlib import Path

import ipywidgets as W

from .base import View, figure_widget, refresh
from .plots.common import finite
from .plots.training import loss_figure


class TrainingMonitor(View):
    """Call it with each event {"step", "steps", "loss", "lr"}; `history` keeps every event received."""

    def __init__(self, total_steps: int | None = None, *, title: str = "Training loss"):
        self.total_steps = total_steps
        self.history: list[dict] = []
        self.title = title
        self.figure = figure_widget(loss_figure([], total_steps=total_steps, title=title))
        self.status = W.HTML("<p>waiting for the first step…</p>")
        self.widget = W.VBox([self.status, self.figure])

    @classmethod
    def from_history(cls, history: list[dict], *, title: str = "Training loss") -> TrainingMonitor:
        """Replay a saved history (`Run.history()`, or `TrainResult.history`)."""
        total = max((h.get("steps") or 0 for h in history), default=0) or None
        monitor = cls(total, title=title)
        monitor.extend(history)
        return monitor

    @classmethod
    def from_run(cls, run_dir: str | Path, target: str = "emulator") -> TrainingMonitor:
        from emloc_nb.run import Run

        return cls.from_history(Run(run_dir).history(target), title=f"Training loss · LoRA on the {target}")

    def __call__(self, event: dict) -> None:
        self.extend([event])

    def extend(self, events: list[dict]) -> None:
        """Add several events with one redraw."""
        if not events:
            return
        self.history.extend(dict(e) for e in events)
        last = self.history[-1]
        if last.get("steps") and last["steps"] != self.total_steps:
            self.total_steps = last["steps"]
            self.figure.layout.xaxis.range = [0, self.total_steps]
        refresh(self.figure, loss_figure(self.history, title=self.title), "x", "y", title=False)
        of = f"/{self.total_steps}" if self.total_steps else ""
        lr = finite(last.get("lr"))
        self.status.value = (
            f"<p>step {last['step']}{of} · loss <b>{last['loss']:.4f}</b>"
            + (f" · lr {lr:.3g}" if lr is not None else "")
            + "</p>"
        )
