"""Dashboard: tabs built lazily from saved files; missing artifacts become notes."""

from __future__ import annotations

import shutil

from emloc_nb.run import Run
from emloc_nb.widgets import ActivationsView, CorrectionView, Dashboard, DriftView, RankPlanner, SpectrumView


def test_every_tab_builds_from_the_run_directory(run_dir, tiny_run):
    dash = Dashboard(run_dir)
    assert dash.titles == [
        "Results",
        "Spectra",
        "Rank plan",
        "Activations",
        "Drift",
        "Correction",
        "Transfer",
        "Training",
    ]  # the Ablation tab comes with Dashboard(run_dir, ablation=DIR)
    results = dash.tabs.children[0].children[0].children[1].value
    for row in tiny_run.results():
        assert row["description"] in results and f"{row['answer_loss']:.3f}" in results
    assert set(dash._views) == {"Results"}  # nothing else is loaded until opened
    dash.tabs.selected_index = 4
    assert isinstance(dash._views["Drift"], DriftView)
    assert dash.tabs.children[4].children[0] is dash._views["Drift"].widget
    kinds = {
        "Spectra": SpectrumView,
        "Rank plan": RankPlanner,
        "Activations": ActivationsView,
        "Correction": CorrectionView,
    }
    for title, cls in kinds.items():
        assert isinstance(dash.view(title), cls)
    dash.view("Training")
    assert [len(m.history) for m in dash.monitors] == [
        len(tiny_run.history("emulator")),
        len(tiny_run.history("original")),
    ]


def test_missing_artifacts_show_a_note(run_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    run = Run(partial)
    shutil.rmtree(run.path("drift"))
    shutil.rmtree(run.path("correction"))
    dash = Dashboard(partial)
    assert dash.view("Drift") is None and dash.view("Correction") is None
    assert "the drift stage" in dash.tabs.children[4].children[0].value
    assert "the correct stage" in dash.tabs.children[5].children[0].value
    assert isinstance(dash.view("Spectra"), SpectrumView)


def test_a_tab_that_fails_to_build_says_so(run_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("no spectra today")

    monkeypatch.setattr("emloc_nb.widgets.dashboard.SpectrumView", broken)
    dash = Dashboard(run_dir)
    assert dash.view("Spectra") is None
    shown = dash.tabs.children[dash.titles.index("Spectra")].children[0].value
    assert "Spectra failed: ValueError: no spectra today" in shown
    assert isinstance(dash.view("Rank plan"), RankPlanner)  # the other tabs still build


def test_views_and_report_need_no_model(run_dir, tiny_ablation, tmp_path, monkeypatch):
    from emloc_nb.widgets import write_report

    def no_model(*args, **kwargs):
        raise AssertionError("a view loaded a model")

    for loader in ("emloc_nb.load_model", "emloc_nb.models.load_model"):  # the package's first: it caches what it finds
        monkeypatch.setattr(loader, no_model)
    monkeypatch.setattr(Run, "original", no_model)
    monkeypatch.setattr(Run, "emulator", no_model)  # the views read the spectra, not the emulator's weights
    dash = Dashboard(run_dir, ablation=tiny_ablation[0])
    for index, title in enumerate(dash.titles):
        dash.tabs.selected_index = index
        shown = dash.tabs.children[index].children[0]
        assert dash.view(title) is not None, f"{title}: {getattr(shown, 'value', shown)}"
    text = write_report(run_dir, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "class='note'" not in text  # every section drawn, none missing
