"""The memory figures of 05_memory_budget: each component and measure of `emloc_nb.budget.budget`'s rows, per
setting, and the peak of each phase of each stage."""

from __future__ import annotations

from emloc_nb.widgets.plots.common import trace
from emloc_nb.widgets.plots.memory import (
    memory_components_figure,
    memory_measured_figure,
    memory_phases_figure,
    phase_names,
)

# Rows as emloc_nb.budget.budget returns them (computing real ones needs the models); a stage not run measures None.
ROWS = [
    {
        "setting": "inference, original",
        "weights_mb": 520.0,
        "trainable_state_mb": 0.0,
        "activations_mb": 0.0,
        "total_mb": 520.0,
        "predicted_peak_mb": 950.0,
        "measured_peak_mb": 1400.0,
        "process_baseline_mb": 430.0,
    },
    {
        "setting": "LoRA fine-tuning, emulator",
        "weights_mb": 430.0,
        "trainable_state_mb": 19.0,
        "activations_mb": 800.0,
        "total_mb": 1249.0,
        "predicted_peak_mb": None,
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


def test_predicted_peak_beside_the_measured_steady_state_peak():
    fig = memory_measured_figure(ROWS)
    assert fig.layout.barmode == "group"
    assert list(trace(fig, "predicted peak").y) == [950.0, None]
    assert list(trace(fig, "measured peak (steady state)").y) == [1400.0, None]  # not measured: a gap, not a zero
    assert list(trace(fig, "process baseline").y) == [430.0, None]


RECORDS = {
    "calibrate": {
        "baseline_rss_mb": 400.0,
        "phases": {"load": {"peak_rss_mb": 500.0}, "calibration": {"peak_rss_mb": 900.0}},
    },
    "finetune_emulator": {
        "baseline_rss_mb": 410.0,
        "phases": {
            "load": {"peak_rss_mb": 800.0},
            "train_first_step": {"peak_rss_mb": 1300.0},
            "train_steps": {"peak_rss_mb": 1200.0},
            "custom": {"peak_rss_mb": 10.0},
        },
    },
    "old-record": {"baseline_rss_mb": 400.0},  # written before phases were measured
}


def test_each_phase_is_a_bar_per_stage_with_gaps_where_a_stage_lacks_it():
    assert phase_names(RECORDS) == ["load", "calibration", "train_first_step", "train_steps", "custom"]
    fig = memory_phases_figure(RECORDS)
    assert list(trace(fig, "load").x) == list(RECORDS)
    assert list(trace(fig, "load").y) == [500.0, 800.0, None]
    assert list(trace(fig, "train_steps").y) == [None, 1200.0, None]
    assert list(trace(fig, "process baseline").y) == [400.0, 410.0, 400.0]
