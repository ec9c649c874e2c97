"""The static report: one self-contained HTML file with a run's figures and tables, for sharing.

plotly.js is embedded once, inline, in the page head; every figure is a div drawn by
it, so the file opens offline, with no CDN and no require.js. Sections whose
artifacts are missing say so. The file is written atomically.
"""

from __future__ import annotations

import datetime
import html
import re
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from emloc_nb.atomic import atomic_path
from emloc_nb.ranks import LayerChoice
from emloc_nb.run import Run

from . import tables as T
from .focus import least_energy_layer, most_peaked_input
from .plots.activations import activation_heatmap, channel_figure, eigen_figure, input_label
from .plots.common import clamp_label
from .plots.correction import PAPER_L, correction_error_figure, correction_norms_figure
from .plots.drift import block_cosine_figure, layer_error_figure
from .plots.memory import memory_phases_figure
from .plots.spectra import energy_figure, kept_energy_figure, ranks_figure, spectrum_figure
from .plots.training import loss_figure
from .static import figure_html
from .tables import config_summary
from .tokens import token_kl_html

PAGE_STYLE = (
    "body{font:14px sans-serif;max-width:1200px;margin:20px auto;padding:0 16px;color:#222}"
    "h2{border-bottom:2px solid #eee;padding-bottom:4px;margin-top:32px}.note{color:#666;font-style:italic}"
)


class _Page:
    """Collects sections; each figure becomes a div with a stable id."""

    def __init__(self):
        self.parts: list[str] = []
        self.figure_ids: list[str] = []

    def section(self, title: str) -> None:
        self.parts.append(f"<h2>{html.escape(title)}</h2>")

    def text(self, markup: str) -> None:
        self.parts.append(markup)

    def note(self, message: str) -> None:
        self.parts.append(f"<p class='note'>{html.escape(message)}</p>")

    def figure(self, fig_id: str, fig: go.Figure) -> None:
        fig_id = "fig-" + re.sub(r"[^A-Za-z0-9_-]+", "-", fig_id)
        self.parts.append(figure_html(fig, div_id=fig_id))
        self.figure_ids.append(fig_id)


def _spectra_section(page: _Page, run: Run) -> None:
    page.section("Emulator: spectra and rank plan")
    if not run.has("spectra"):
        page.note("No spectra yet (the emulator stage writes them).")
        return
    spectra = run.spectra()  # a damaged or foreign artifact fails the report; it is never left out quietly
    t = spectra.totals()
    page.text(
        f"<p>{t['compressed']} of {t['layers']} block linears compressed; {t['share_kept']:.1%} of their "
        f"{t['params_dense']:,} parameters kept.</p>"
    )
    page.figure("kept-energy", kept_energy_figure(spectra))
    choices = {r["name"]: LayerChoice(r["name"], r["d_out"], r["d_in"], r["rank"], r["reason"]) for r in spectra.rows}
    page.figure("ranks", ranks_figure(spectra, choices))
    worst = spectra.layer(least_energy_layer(spectra))
    page.text(f"<p>The layer with the largest predicted error: <code>{html.escape(worst['name'])}</code>.</p>")
    page.figure("spectrum-worst", spectrum_figure(spectra, worst["name"], worst["rank"]))
    page.figure("energy-worst", energy_figure(spectra, worst["name"], worst["rank"]))


def _activations_section(page: _Page, run: Run) -> None:
    page.section("Calibration activations")
    if not run.has("calibration:train"):
        page.note("No calibration statistics yet (the calibrate stage writes them).")
        return
    stats = run.calibration()  # a damaged or foreign artifact fails the report; it is never left out quietly
    page.text(f"<p>{stats.examples} examples, up to {stats.tokens} real tokens per input.</p>")
    page.figure("activation-heatmap", activation_heatmap(stats))
    peaked = most_peaked_input(stats)  # the input whose largest channel stands out most from its median channel
    label = input_label(stats, peaked)
    page.text(f"<p>The most peaked input: <code>{html.escape(peaked)}</code> ({html.escape(label)}).</p>")
    page.figure("activation-channels", channel_figure(stats.inputs[peaked], title=f"Per-channel |x| · {label}"))
    page.figure("activation-eigen", eigen_figure(stats.inputs[peaked], title=f"Eigen-spectrum of C · {label}"))


def _drift_section(page: _Page, run: Run) -> None:
    page.section("Drift: emulator vs original")
    if not run.has("drift"):
        page.note("No drift report yet (the drift stage writes it).")
        return
    drift = run.drift()  # a damaged or foreign artifact fails the report; it is never left out quietly
    page.text(T.drift_summary_table(drift.summary))
    page.figure("drift-by-block", layer_error_figure(drift.rows, by="block"))
    page.figure("drift-by-kind", layer_error_figure(drift.rows, by="kind"))
    page.figure("block-cosine", block_cosine_figure(drift.blocks))
    if drift.tokens:
        vmax = max(max(t["kl"], default=0.0) for t in drift.tokens)
        page.text("<h3>Next-token KL per token</h3>")
        for i, example in enumerate(drift.tokens):
            page.text(f"<p>example {i}</p>" + token_kl_html(example, vmax=vmax))


def _correction_section(page: _Page, run: Run) -> None:
    page.section("LoRA correction")
    if not run.has("correction"):
        page.note("No correction report yet (the correct stage writes it).")
        return
    report = run.correction()  # a damaged or foreign artifact fails the report; it is never left out quietly
    rows = report.rows
    page.text(
        f"<p>Corrected with L = {clamp_label(report.clamp)}; {sum(r['clamped'] for r in rows)} LoRA directions "
        "clamped.</p>"
    )
    paper = report.rows_at(PAPER_L) if report.clamp == 0 else None  # L = 0 corrects nothing: show the paper's L
    if all("before_all" in r for r in rows):
        page.figure("correction-errors", correction_error_figure(rows, clamp=report.clamp, paper=paper))
    else:
        page.note("The report has no held-out statistics, so no before/after errors.")
    page.figure("correction-norms", correction_norms_figure(paper or rows, clamp=report.clamp))
    columns = [
        ("name", "layer", "text"),
        ("d_norm", "‖D‖", ".4g"),
        ("b_norm", "‖B′‖", ".4g"),
        ("clamped", "clamped", "d"),
        ("kappa_mean", "mean κ", ".3f"),
        ("before_all", "naive error", ".4f"),
        ("after_all", "corrected error", ".4f"),
        ("before_subspace", "naive, subspace", ".4f"),
        ("after_subspace", "corrected, subspace", ".4f"),
    ]
    page.text(f"<details><summary>Per-layer table</summary>{T.html_table(rows, columns)}</details>")


def _training_section(page: _Page, run: Run) -> None:
    page.section("Fine-tuning")
    shown = False
    for target in ("emulator", "original"):
        if run.has(f"history:{target}"):
            history = run.history(target)
            total = max((h.get("steps") or 0 for h in history), default=0) or None
            page.figure(
                f"loss-{target}", loss_figure(history, total_steps=total, title=f"Training loss · LoRA on the {target}")
            )
            shown = True
    if not shown:
        page.note("No fine-tuning history yet (the finetune stages write it).")


def write_report(run_dir: str | Path, output_path: str | Path | None = None) -> Path:
    """Write RUN_DIR's figures and tables to one offline HTML file (default RUN_DIR/report.html)."""
    run = Run(run_dir)
    output = Path(output_path) if output_path is not None else run.path("report")
    page = _Page()
    page.text(
        f"<h1>EMLoC run report</h1><p>{html.escape(run.dir.resolve().name)} · written "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}</p>" + config_summary(run)
    )
    page.section("Results")
    if run.has("results"):
        page.text(T.results_table(run.results()))
    else:
        page.note("No results yet (the evaluate stage writes them).")
    records = run.stage_records()
    if records:
        page.text("<h3>Stages</h3>" + T.stages_table(records))
        page.figure("memory-phases", memory_phases_figure(records))
        page.text("<h3>Memory by phase</h3>" + T.phases_table(records))
    for section in (_spectra_section, _activations_section, _drift_section, _correction_section, _training_section):
        section(page, run)
    document = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>EMLoC report · {html.escape(run.dir.name)}</title><style>{PAGE_STYLE}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head>\n<body>\n"
        + "\n".join(page.parts)
        + "\n</body></html>\n"
    )
    with atomic_path(output) as tmp:
        tmp.write_text(document, encoding="utf-8")
    return output
