"""The memory figures of 05_memory_budget: each component and measure of `emloc_nb.memory.budget`'s rows, per "
"setting."""

from __future__ import annotations

from emloc_nb.widgets.plots.common import trace
from emloc_nb.widgets.plots.memory import memory_components_figure, memory_measured_figure

# Rows as emloc_nb.memory.budget returns them (computing real ones needs the models); a stage not run measures None.
ROWS = [
    {
        "setting": "inference, original",
        "weights_mb": 520.0,
        "trainable_state_mb": 0.0,
        "activations_mb": 0.0,
        "total_mb": 520.0,
        "measured_peak_mb": 1400.0,
        "process_baseline_mb": 430.0,
    },
    {
        "setting": "LoRA fine-tuning, emulator",
        "weights_mb": 430.0,
        "trainable_state_mb": 19.0,
        "activations_mb": 800.0,
        "total_mb": 1249.0,
        "measured_peak_mb": None,
        "process_baseline_mb": None,
    },
]


def test_components_are_stacked_per_setting():
    fig = memory_components_figure(ROWS)
    assert fig.layout.barmode == "stack"
    for key, name in (
        ("weights_mb", "weights"),
        ("trainable_state_mb", "LoRA trainable state"),
        ("activations_mb", "saved activations"),
    ):
        bars = trace(fig, name)
        assert list(bars.x) == [r["setting"] for r in ROWS]
        assert list(bars.y) == [r[key] for r in ROWS]
    assert [sum(t.y[i] for t in fig.data) for i in range(len(ROWS))] == [r["total_mb"] for r in ROWS]


def test_predicted_total_beside_the_measured_peak():
    fig = memory_measured_figure(ROWS)
    assert fig.layout.barmode == "group"
    assert list(trace(fig, "predicted total").y) == [520.0, 1249.0]
    assert list(trace(fig, "measured peak").y) == [1400.0, None]  # not measured: a gap, not a zero
    assert list(trace(fig, "process baseline").y) == [430.0, None]
