"""TrainingMonitor: each callback event extends the loss and lr traces; saved histories replay."""

from __future__ import annotations

import math

from emloc_nb.widgets import TrainingMonitor
from emloc_nb.widgets.plots.common import trace


def test_each_event_grows_the_curves():
    monitor = TrainingMonitor()
    events = [{"step": i, "steps": 4, "loss": 3.0 - 0.5 * i, "lr": 1e-3 * i} for i in range(1, 4)]
    for n, event in enumerate(events, 1):
        monitor(event)
        assert list(trace(monitor.figure, "loss").x) == [e["step"] for e in events[:n]]
        assert list(trace(monitor.figure, "loss").y) == [e["loss"] for e in events[:n]]
        assert list(trace(monitor.figure, "lr").y) == [e["lr"] for e in events[:n]]
    assert trace(monitor.figure, "lr").yaxis == "y2"  # the learning rate has its own axis
    assert tuple(monitor.figure.layout.xaxis.range) == (0, 4)
    assert "step 3/4" in monitor.status.value and len(monitor.history) == 3


def test_missing_lr_leaves_a_gap():
    monitor = TrainingMonitor(total_steps=10)
    monitor({"step": 1, "steps": 10, "loss": 1.0, "lr": math.nan})
    assert trace(monitor.figure, "lr").y == (None,)


def test_replays_a_saved_history(tiny_run):
    history = tiny_run.history()
    monitor = TrainingMonitor.from_history(history)
    assert list(trace(monitor.figure, "loss").y) == [h["loss"] for h in history]
    assert monitor.total_steps == history[-1]["steps"]
