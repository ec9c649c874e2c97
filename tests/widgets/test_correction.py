"""CorrectionView and ToyCorrection: everything recomputes live in L from the report (or core correct_layer)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import emloc_nb.widgets.toy as toy_module
from emloc_nb.widgets import CorrectionView, ToyCorrection
from emloc_nb.widgets.plots.common import trace


def after(view, part, label="corrected"):
    return list(trace(view.errors, f"{label}, {part}").y)


def per_block(rows, values) -> list[float]:
    """The mean of per-layer `values` over each block's layers, blocks in order: what a bar shows."""
    blocks: dict = {}
    for r, v in zip(rows, values):
        blocks.setdefault(r["block"], []).append(v)
    return [sum(v) / len(v) for _, v in sorted(blocks.items())]


def expected(report, L, key):
    return per_block(report.rows, [report.errors_at(r["name"], L)[key] for r in report.rows])


def test_errors_follow_L(correction_report):
    report = correction_report
    view = CorrectionView(report)
    assert report.clamp == view.L  # it starts where the adapter was written
    view.clamp.set(3.0)
    assert view.L == 3.0
    assert list(trace(view.errors, "corrected, overall").x) == ["0", "1"]  # one bar per block
    assert after(view, "overall") == pytest.approx(expected(report, 3.0, "error_all"))
    assert after(view, "LoRA subspace") == pytest.approx(expected(report, 3.0, "error_subspace"))
    view.clamp.slider.value = 0.5
    assert view.L == 0.5  # the slider's steps are the values themselves
    assert after(view, "overall") == pytest.approx(expected(report, 0.5, "error_all"))
    assert after(view, "overall") != pytest.approx(expected(report, 3.0, "error_all"))


def test_L_zero_is_the_naive_transfer_drawn_once_beside_the_papers_L(correction_report):
    report = correction_report
    view = CorrectionView(report)
    view.clamp.set(1.0)
    view.clamp.mode.value = "naive"
    assert view.L == 0.0
    names = [t.name for t in view.errors.data]
    assert not [n for n in names if n.startswith("corrected")]  # no second, identical "corrected" series
    assert after(view, "overall", "naive") == pytest.approx(
        per_block(report.rows, [r["before_all"] for r in report.rows])
    )
    assert after(view, "overall", "paper's L = 3") == pytest.approx(expected(report, 3.0, "error_all"))
    assert after(view, "LoRA subspace", "paper's L = 3") == pytest.approx(expected(report, 3.0, "error_subspace"))
    assert "L = 0 is the naive transfer" in view.errors.layout.title.text
    assert "naive transfer" in view.summary.value and "at L = 3" in view.summary.value
    # κ at L = 0 is 0 everywhere: the κ figures show the paper's L instead, and say so.
    name = view.layer.value
    np.testing.assert_allclose(trace(view.kappa, "κ").y, report.kappa_at(name, 3.0).numpy())
    assert "L = 3" in view.kappa.layout.title.text and "L = 0" in view.kappa.layout.title.text
    rows = report.rows_at(3.0)
    assert list(trace(view.norms, "mean κ").y) == pytest.approx(per_block(rows, [r["kappa_mean"] for r in rows]))
    view.clamp.set(1.0)  # and back: the corrected series returns
    assert after(view, "overall") == pytest.approx(expected(report, 1.0, "error_all"))


def test_no_clamp_is_exact_on_the_lora_subspace(correction_report):
    report = correction_report
    view = CorrectionView(report)
    view.clamp.set(math.inf)
    assert view.clamp.slider.disabled
    assert max(after(view, "LoRA subspace")) < 1e-6
    assert list(trace(view.norms, "mean κ").y) == pytest.approx(
        per_block(report.rows, [1.0 if r["lora_rank"] else 0.0 for r in report.rows])
    )
    assert "0 of" in view.summary.value


def test_kappa_and_norms(correction_report):
    report = correction_report
    view = CorrectionView(report)
    name = report.rows[5]["name"]
    view.layer.value = name
    view.clamp.set(1.0)
    np.testing.assert_allclose(trace(view.kappa, "κ").y, report.kappa_at(name, 1.0).numpy())
    rows = report.rows_at(1.0)
    assert list(trace(view.norms, "‖D‖").y) == pytest.approx(per_block(rows, [r["d_norm"] for r in rows]))
    assert list(trace(view.norms, "mean κ").y) == pytest.approx(per_block(rows, [r["kappa_mean"] for r in rows]))


def test_opens_on_the_layer_with_the_largest_discrepancy_for_its_lora(correction_report):
    rows = correction_report.layers
    ratio = {r["name"]: r["d_norm"] / r["b_norm"] for r in rows if r["b_norm"] > 0}
    largest = max(ratio, key=ratio.get)
    assert largest != rows[0]["name"]  # the rule, not model order, picks it here
    assert CorrectionView(correction_report).layer.value == largest
    assert CorrectionView(correction_report, layer=rows[2]["name"]).layer.value == rows[2]["name"]


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
    assert seen == [0.5] and clamp.value == 0.5
    clamp.set(math.inf)
    assert seen[1:] == [math.inf] and clamp.slider.disabled
    clamp.set(math.inf)  # unchanged: nothing to report
    assert len(seen) == 2
    clamp.mode.value = "naive"  # the controls themselves still report
    assert seen[2:] == [0.0]


def test_clamp_values_are_exact_and_a_static_page_shows_one_L():
    from emloc_nb.widgets.clamp import ClampControl
    from emloc_nb.widgets.static import view_html

    clamp = ClampControl()
    assert clamp.value == 3.0 and clamp.slider.value == 3.0  # the paper's L, not 10 ** 0.5
    assert {0.01, 0.1, 1.0, 3.0, 10.0, 100.0} <= {v for _, v in clamp.slider.options}
    assert "L: <b>3</b>" in view_html(clamp.widget)
    clamp.set(0.7)  # between two steps: becomes a step of its own
    assert clamp.value == 0.7 and "L: <b>0.7</b>" in view_html(clamp.widget)
    clamp.set(0.0)
    page = view_html(clamp.widget)
    assert "naive (L = 0)" in page and "L: <b>" not in page  # the disabled slider is not a second L
    clamp.set(math.inf)
    assert "L = ∞" in view_html(clamp.widget) and "L: <b>" not in view_html(clamp.widget)
