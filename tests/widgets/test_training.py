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


def test_a_finished_run_shows_its_history_on_a_static_page(tiny_run, monkeypatch):
    from emloc_nb.widgets.static import view_html

    history = tiny_run.history("emulator")
    monitor = TrainingMonitor.of(tiny_run)
    assert monitor.history == history and monitor.total_steps == tiny_run.config.train.steps
    assert "LoRA on the emulator" in monitor.figure.layout.title.text
    page = view_html(monitor.static_widget())
    assert 'class="plotly-graph-div"' in page and "waiting for the first step" not in page
    assert f"step {history[-1]['step']}/{tiny_run.config.train.steps}" in page
    assert f"{history[-1]['loss']:.4f}" in page
    monkeypatch.setenv("EMLOC_STATIC_VIEWS", "1")
    assert f"{history[-1]['loss']:.4f}" in monitor._repr_mimebundle_()["text/html"]
    # The HF Trainer's history says nothing of the total: it can be given.
    trainer = [{"step": h["step"], "loss": h["loss"], "lr": h["lr"]} for h in history]
    assert TrainingMonitor.from_history(trainer, total_steps=10).total_steps == 10
    assert tuple(TrainingMonitor.from_history(trainer, total_steps=10).figure.layout.xaxis.range) == (0, 10)


def test_catch_up_adds_only_the_steps_not_received():
    saved = [{"step": i, "steps": 3, "loss": 1.0 / i, "lr": 0.1} for i in range(1, 4)]
    live = TrainingMonitor()
    for event in saved:  # a live run: every step came through the callback already
        live(event)
    live.catch_up(saved)
    assert [h["step"] for h in live.history] == [1, 2, 3]
    skipped = TrainingMonitor(total_steps=3)  # finetune found the adapter trained: no callback was called
    skipped.catch_up(saved)
    assert list(trace(skipped.figure, "loss").y) == [h["loss"] for h in saved]
    assert "step 3/3" in skipped.status.value
