"""The training monitor: a live loss curve (and learning rate) fed by the core's training callbacks.

monitor = TrainingMonitor()
display(monitor)
result = finetune(model, tokenizer, task, out, callbacks=[monitor])
monitor.catch_up(result.history)  # the saved steps, if finetune found the adapter trained already

A finished run's curve, without training: `TrainingMonitor.of(run)`.
"""

from __future__ import annotations

from pathlib import Path

import ipywidgets as W

from .base import View, figure_widget, refresh
from .plots.common import finite
from .plots.training import loss_figure
from .static import static_views


class TrainingMonitor(View):
    """Call it with each event {"step", "steps", "loss", "lr"}; `history` keeps every event received.

    On a static page (EMLOC_STATIC_VIEWS=1), a monitor displayed before training is redrawn in
    place after each event, so that the page shows the curve as training left it, not the empty
    one it was when displayed.
    """

    def __init__(self, total_steps: int | None = None, *, title: str = "Training loss"):
        self.total_steps = total_steps
        self.history: list[dict] = []
        self.title = title
        self.figure = figure_widget(loss_figure([], total_steps=total_steps, title=title))
        self.status = W.HTML("<p>waiting for the first step…</p>")
        self.widget = W.VBox([self.status, self.figure])
        self._shown = None  # the display handle of the static HTML, redrawn by each event

    @classmethod
    def from_history(
        cls, history: list[dict], *, total_steps: int | None = None, title: str = "Training loss"
    ) -> TrainingMonitor:
        """A monitor showing a saved history (`Run.history()`, or `TrainResult.history`); `total_steps`
        defaults to the steps the events say the run had."""
        total = total_steps or max((h.get("steps") or 0 for h in history), default=0) or None
        monitor = cls(total, title=title)
        monitor.extend(history)
        return monitor

    @classmethod
    def of(cls, run, target: str = "emulator") -> TrainingMonitor:
        """The curve of a Run's own fine-tuning of the LoRA on the "emulator" (or the "original"), once done."""
        return cls.from_history(
            run.history(target), total_steps=run.config.train.steps, title=f"Training loss · LoRA on the {target}"
        )

    @classmethod
    def from_run(cls, run_dir: str | Path, target: str = "emulator") -> TrainingMonitor:
        from emloc_nb.run import Run

        return cls.of(Run(run_dir), target)

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
        if self._shown is not None:
            self._shown.update(self._repr_mimebundle_(), raw=True)

    def catch_up(self, history: list[dict]) -> None:
        """Add the steps of a saved history after the last one received: all of them when `finetune` found
        the adapter trained already (and so called no callback), none after a live run."""
        last = self.history[-1]["step"] if self.history else 0
        self.extend([e for e in history if e["step"] > last])

    def _ipython_display_(self) -> None:
        from IPython.display import DisplayHandle, display

        if not static_views():
            display(self.widget)
            return
        # A static page keeps an output as it was displayed: keep its handle to redraw it.
        self._shown = DisplayHandle()
        self._shown.display(self._repr_mimebundle_(), raw=True)
