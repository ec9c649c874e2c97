"""CorrectionView and ToyCorrection: everything recomputes live in L from the report (or core correct_layer)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import emloc_nb.widgets.toy as toy_module
from emloc_nb.widgets import CorrectionView, ToyCorrection
from emloc_nb.widgets.plots.common import trace


def after(view, part):
    return list(trace(view.errors, f"corrected, {part}").y)


def expected(report, L, key):
    return [report.errors_at(r["name"], L)[key] for r in report.rows]


def test_errors_follow_L(correction_report):
    report = correction_report
    view = CorrectionView(report)
    assert report.clamp == view.L  # it starts where the adapter was written
    view.clamp.set(3.0)
    assert view.L == 3.0
    assert after(view, "overall") == pytest.approx(expected(report, 3.0, "error_all"))
    assert after(view, "LoRA subspace") == pytest.approx(expected(report, 3.0, "error_subspace"))
    view.clamp.slider.value = 0.5
    L = view.L
    assert pytest.approx(0.5, rel=0.15) == L
    assert after(view, "overall") == pytest.approx(expected(report, L, "error_all"))
    assert after(view, "overall") != pytest.approx(expected(report, 3.0, "error_all"))


def test_L_zero_is_the_naive_transfer(correction_report):
    view = CorrectionView(correction_report)
    view.clamp.mode.value = "naive"
    assert view.L == 0.0
    assert after(view, "overall") == pytest.approx([r["before_all"] for r in correction_report.rows])
    assert after(view, "LoRA subspace") == pytest.approx([r["before_subspace"] for r in correction_report.rows])
    assert list(trace(view.errors, "naive, overall").y) == pytest.approx(
        [r["before_all"] for r in correction_report.rows]
    )


def test_no_clamp_is_exact_on_the_lora_subspace(correction_report):
    view = CorrectionView(correction_report)
    view.clamp.set(math.inf)
    assert view.clamp.slider.disabled
    assert max(after(view, "LoRA subspace")) < 1e-6
    assert list(trace(view.norms, "mean κ").y) == pytest.approx(
        [1.0 if r["lora_rank"] else 0.0 for r in correction_report.rows]
    )
    assert "0 of" in view.summary.value


def test_kappa_and_norms(correction_report):
    report = correction_report
    view = CorrectionView(report)
    name = report.rows[5]["name"]
    view.layer.value = name
    view.clamp.set(1.0)
    np.testing.assert_allclose(trace(view.kappa, "κ").y, report.kappa_at(name, 1.0).numpy())
    assert list(trace(view.norms, "‖D‖").y) == [r["d_norm"] for r in report.rows]
    assert list(trace(view.norms, "mean κ").y) == pytest.approx([r["kappa_mean"] for r in report.rows_at(1.0)])


@pytest.mark.parametrize("dim", [2, 3])
def test_toy_geometry(dim, monkeypatch):
    calls = []
    real = toy_module.correct_layer
    monkeypatch.setattr(toy_module, "correct_layer", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    toy = ToyCorrection(dim=dim, seed=1)
    fig = toy.figure
    coords = ("x", "y", "z")[:dim]
    points = lambda name: np.array([list(getattr(trace(fig, name), c)) for c in coords], dtype=float)

    toy.clamp.set(0.0)
    assert calls[-1] == 0.0  # the core's correct_layer does the math
    np.testing.assert_allclose(points("W + ΔW_c (corrected)"), points("W + ΔW (naive transfer)"), atol=1e-9)

    toy.clamp.set(math.inf)
    np.testing.assert_allclose(points("corrected on subspace"), points("target on subspace"), atol=1e-9)
    assert not np.allclose(points("naive on subspace"), points("target on subspace"), atol=1e-3)
    n = toy.numbers
    assert n["corrected_subspace_error"] < 1e-9 < n["naive_subspace_error"]
    assert n["corrected_change_off_subspace"] < 1e-9 < n["emulator_error_off_subspace"]

    toy.error.value = 0.0  # a perfect emulator: nothing to correct, every transfer is exact
    np.testing.assert_allclose(
        points("W_E + ΔW (target: fine-tuned emulator)"), points("W + ΔW (naive transfer)"), atol=1e-9
    )
    assert toy.numbers["d_norm"] == pytest.approx(0.0, abs=1e-12)


def test_clamp_set_reports_once_with_the_new_value():
    from emloc_nb.widgets.clamp import ClampControl

    clamp = ClampControl(0.0)
    seen = []
    clamp.observe(seen.append)
    clamp.set(0.5)  # moves the slider, then leaves the naive mode: one report, already with the new L
    assert seen == [clamp.value] and clamp.value == pytest.approx(0.5, rel=0.15)
    clamp.set(math.inf)
    assert seen[1:] == [math.inf] and clamp.slider.disabled
    clamp.set(math.inf)  # unchanged: nothing to report
    assert len(seen) == 2
    clamp.mode.value = "naive"  # the controls themselves still report
    assert seen[2:] == [0.0]
