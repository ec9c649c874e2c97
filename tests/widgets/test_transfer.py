"""Transfer diagnostics and the ablation views, built from saved tiny-model artifacts."""

from __future__ import annotations

import math

import pytest

from emloc_nb.widgets import AblationView, Dashboard, TransferView
from emloc_nb.widgets.plots.common import trace


def test_transfer_view_shows_every_evaluated_setting(tiny_run):
    view = TransferView.of(tiny_run)
    assert set(view.results) == {r["setting"] for r in tiny_run.results()}
    margins = {t.name: list(t.x) for t in view.margins.data}
    for setting, result in view.results.items():
        assert margins[setting] == [s[0] - s[1] for s in result.scores]
    counts = trace(view.predictions, tiny_run.task().choices[0]).y
    assert counts[0] == sum(a == tiny_run.task().choices[0] for a in view.results["original"].answers)
    prior = tiny_run.correction().prior
    assert view.prior is not None and list(trace(view.prior, "original + LoRA, after").y) == prior["after"]
    rows = tiny_run.correction().rows
    shares = trace(view.subspaces, "share of the adapter that is the correction")
    assert list(shares.x) == ["0", "1"]  # one bar per block, the mean over its layers
    for block, share in zip((0, 1), shares.y):
        layers = [r["correction_share"] for r in rows if r["block"] == block]
        assert share == pytest.approx(sum(layers) / len(layers)) and 0 <= share < 1


def test_ablation_view_curves_are_the_summary(tiny_ablation):
    directory, _, spec, report = tiny_ablation
    view = AblationView.from_dir(directory)
    summary = {(r["method"], r["budget"]): r for r in report.summary()}
    naive = trace(view.by_budget, summary[("naive", 0.5)]["label"])
    assert list(naive.x) == [0.5, 0.8]
    assert list(naive.y) == [summary[("naive", 0.5)]["accuracy"], summary[("naive", 0.8)]["accuracy"]]
    assert list(naive.error_y.array) == [summary[("naive", b)]["accuracy_std"] for b in (0.5, 0.8)]
    paper = trace(view.by_clamp, "paper's correction")
    assert list(paper.x) == ["0", "1", "3", "10", "∞"]
    assert paper.y[2] == summary[("L=3", 0.5)]["accuracy"]
    view.budget.value = 0.8  # only L = 0 and 3 were run at the second budget
    assert list(trace(view.by_clamp, "paper's correction").x) == ["0", "3"]
    with_prior = trace(view.by_clamp, "+ prior correction")
    assert math.isclose(with_prior.y[-1], summary[("L=3+prior", 0.8)]["accuracy"])


def test_dashboard_has_transfer_and_ablation_tabs(run_dir, tiny_ablation):
    dash = Dashboard(run_dir, ablation=tiny_ablation[0])
    assert isinstance(dash.view("Transfer"), TransferView)
    assert isinstance(dash.view("Ablation"), AblationView)
    assert "Ablation" not in Dashboard(run_dir).titles  # no ablation directory: no empty tab
