"""The static report: one offline HTML file with inline plotly.js, every figure, and the tables."""

from __future__ import annotations

import re
import shutil

from plotly.offline import get_plotlyjs

from emloc_nb.cli import main
from emloc_nb.run import Run
from emloc_nb.widgets import write_report

FIGURES = {
    "fig-memory-phases",
    "fig-kept-energy",
    "fig-ranks",
    "fig-spectrum-worst",
    "fig-energy-worst",
    "fig-activation-heatmap",
    "fig-activation-channels",
    "fig-activation-eigen",
    "fig-drift-by-block",
    "fig-drift-by-kind",
    "fig-block-cosine",
    "fig-correction-errors",
    "fig-correction-norms",
    "fig-loss-emulator",
    "fig-loss-original",
}


def test_report_is_self_contained(run_dir, tiny_run, tmp_path):
    out = write_report(run_dir, tmp_path / "report.html")
    text = out.read_text(encoding="utf-8")
    assert text.count(get_plotlyjs()[:2000]) == 1  # the plotly.js bundle, inline, exactly once
    assert not re.search(r"<script[^>]*\bsrc=", text)
    assert "require.config" not in text and "requirejs" not in text
    divs = set(re.findall(r'<div id="([^"]+)" class="plotly-graph-div"', text))
    plots = set(re.findall(r'Plotly\.newPlot\(\s*"([^"]+)"', text))
    assert divs == plots == FIGURES
    for row in tiny_run.results():
        assert row["description"] in text
    assert text.count("<span title='KL") == sum(len(t["tokens"]) for t in tiny_run.drift().tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left behind


def test_cli_report_on_a_partial_run(run_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    run = Run(partial)
    shutil.rmtree(run.path("drift"))
    shutil.rmtree(run.path("correction"))
    assert main(["report", "--run-dir", str(partial)]) == 0
    text = run.path("report").read_text(encoding="utf-8")
    assert "No drift report yet" in text and "No correction report yet" in text
    assert 'id="fig-kept-energy"' in text and 'id="fig-drift-by-block"' not in text
