"""The memory figures of 05_memory_budget: each component and measure of `emloc_nb.budget.budget`'s rows, per
setting, and the peak of each phase of each stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emloc_nb.widgets.plots.common import trace
from emloc_nb.widgets.plots.memory import (
    emulator_peaks_at_scale,
    memory_components_figure,
    memory_measured_figure,
    memory_phases_figure,
    pareto_figure,
    phase_names,
    recipe_point,
)

SCALE = Path(__file__).parents[2] / "bench" / "results" / "scale_curve.json"

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


def test_the_budget_model_predicts_the_measured_0_8_peaks_from_the_0_5_ones():
    """Block linears' weights scale with ρ: the ρ = 0.5 row alone predicts every size's measured ρ = 0.8 peak."""
    saved = json.loads(SCALE.read_text())
    measured = {(r["size"], r["setting"]): r["peak_mb"] for r in saved["rows"]}
    predicted = emulator_peaks_at_scale(saved, [0.5, 0.8, 1.0], sizes=None)
    checked = 0
    for p in predicted:
        key = (p["model"], f"emulator@{p['budget']:g}")
        if key in measured:
            assert p["peak_mb"] == pytest.approx(measured[key], rel=0.01), key
            checked += 1
        if p["budget"] == 1.0:  # keeping everything is LoRA on the original
            lora = measured.get((p["model"], "lora"))
            assert lora is None or p["peak_mb"] == pytest.approx(lora)
    assert checked >= 8 and {"1.7B", "3B", "8B"} <= {p["model"] for p in predicted}
    default = emulator_peaks_at_scale(saved)  # the plot's sizes and budgets
    assert sorted({p["model"] for p in default}) == sorted(["135M", "1.7B", "3B", "8B"]) and len(default) == 4 * 8


def test_pareto_puts_each_budget_at_its_peak_with_the_references():
    summary = [
        {"method": "zero-shot", "label": "zero-shot", "budget": None, "accuracy": 0.7, "accuracy_std": 0.0},
        {"method": "full", "label": "full LoRA", "budget": None, "accuracy": 0.86, "accuracy_std": 0.01},
        {"method": "naive", "label": "naive", "budget": 0.8, "accuracy": 0.82, "accuracy_std": 0.02},
        {"method": "naive", "label": "naive", "budget": 0.5, "accuracy": 0.6, "accuracy_std": 0.1},
        {"method": "naive", "label": "naive", "budget": 0.6, "accuracy": 0.7, "accuracy_std": 0.0},  # no peak
        {"method": "emulator", "label": "emulator", "budget": 0.8, "accuracy": 0.75, "accuracy_std": 0.0},
    ]
    memory = {"inference": 1000.0, "full": 1100.0, "finetune": {"0.8": 950.0, "0.5": 800.0}}
    scale = [{"model": "3B", "budget": b, "peak_mb": 0.0, "ratio": b} for b in (0.5, 0.8)]
    tight = [{"method": "naive", "budget": 0.5, "accuracy": 0.84, "accuracy_std": 0.01}]
    recipe = recipe_point(tight, {"finetune": {"0.5": 850.0}}, "naive", 0.5, "tight recipe, ρ = 0.5", 1000.0)
    with pytest.raises(ValueError, match="no 'naive' row .* at ρ = 0.8"):
        recipe_point(tight, {"finetune": {"0.5": 850.0}}, "naive", 0.8, "absent", 1000.0)
    fig = pareto_figure(summary, memory, ["naive", "emulator"], scale, recipes=[recipe])
    naive = trace(fig, "naive")
    assert list(naive.x) == [0.8, 0.95] and list(naive.y) == [0.6, 0.82]  # by ρ; 0.6 has no measured peak
    assert list(naive.text) == ["ρ = 0.5", "ρ = 0.8"] and trace(fig, "emulator").text is None  # first only
    star = trace(fig, "tight recipe, ρ = 0.5")
    assert list(star.x) == [0.85] and list(star.y) == [0.84] and star.marker.symbol == "star"
    assert list(trace(fig, "LoRA on the emulator, 3B").y) == [0.5, 0.8]
    notes = [a.text for a in fig.layout.annotations]
    assert any("full LoRA (peak × 1.10)" in t for t in notes) and any("zero-shot" in t for t in notes)
