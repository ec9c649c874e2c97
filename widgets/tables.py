"""Small HTML tables from the core's rows (lists of dicts), shared by the widgets and the static report.

Plain HTML rather than a DataFrame styler: it renders the same in JupyterLab, in an
ipywidgets HTML widget and in the offline report, and needs no pandas. Nothing here
imports ipywidgets or plotly.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence

from emloc_nb.errors import EmlocError

MISSING = (EmlocError, FileNotFoundError)  # what the core's loaders raise for an absent artifact

STYLE = (
    "<style>.emloc-table{border-collapse:collapse;font:13px sans-serif;margin:4px 0}"
    ".emloc-table th,.emloc-table td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}"
    ".emloc-table th{background:#f4f4f4}.emloc-table td.text,.emloc-table th.text{text-align:left}</style>"
)


def fmt(value, spec: str = ".3f") -> str:
    """A cell: '–' for missing or NaN, numbers with `spec`, anything else as text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        try:
            return format(value, spec)
        except ValueError:  # e.g. an int column formatted as float, or the reverse
            return str(value)
    return str(value)


def html_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str | Callable]]) -> str:
    """`columns`: (key, header, format spec or a function of the value). Text cells are left-aligned."""
    head = "".join(
        f"<th class='{'text' if spec == 'text' else ''}'>{html.escape(title)}</th>" for _, title, spec in columns
    )
    body = []
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            text = spec(value) if callable(spec) else fmt(value, "" if spec == "text" else spec)
            cells.append(f"<td class='{'text' if spec == 'text' else ''}'>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"{STYLE}<table class='emloc-table'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


RESULT_COLUMNS = [
    ("description", "setting", "text"),
    ("accuracy", "accuracy", ".3f"),
    ("answer_loss", "answer loss", ".3f"),
    ("auc", "AUC", ".3f"),
    ("balanced_accuracy", "balanced accuracy", ".3f"),
    ("predicted", "predicted", lambda counts: "–" if not counts else ", ".join(f"{k} {n}" for k, n in counts.items())),
    ("examples", "examples", "d"),
    ("train_peak_mb", "fine-tuning peak (MB)", ".0f"),
    ("train_weights_mb", "weights while fine-tuning (MB)", ".1f"),
    ("eval_peak_mb", "eval peak (MB)", ".0f"),
]


SCORE_COLUMNS = [
    ("setting", "setting", "text"),
    ("accuracy", "accuracy", ".3f"),
    ("auc", "AUC", ".3f"),
    ("balanced_accuracy", "balanced accuracy", ".3f"),
    ("mean_margin", "mean margin", "+.3f"),
    ("predicted", "predicted", lambda counts: "–" if not counts else ", ".join(f"{k} {n}" for k, n in counts.items())),
    ("examples", "examples", "d"),
]

ABLATION_COLUMNS = [
    ("label", "method", "text"),
    ("budget", "ρ", "g"),
    ("seeds", "seeds", "d"),
    ("accuracy", "accuracy", ".3f"),
    ("accuracy_std", "± std", ".3f"),
    ("auc", "AUC", ".3f"),
    ("recovered", "recovered share", ".2f"),
    ("diff", "Δ vs naive", "+.3f"),
    ("p_mcnemar", "McNemar p", ".3g"),
]


def results_table(rows: Sequence[dict]) -> str:
    """Accuracy, answer loss and memory per setting (`Run.results()`)."""
    return html_table(rows, RESULT_COLUMNS)


def stages_table(records: dict[str, dict]) -> str:
    """Seconds and memory per stage (`Run.stage_records()`)."""
    rows = [{"stage": name, **rec} for name, rec in records.items()]
    return html_table(
        rows,
        [
            ("stage", "stage", "text"),
            ("seconds", "seconds", ".1f"),
            ("peak_rss_mb", "peak RSS (MB)", ".0f"),
            ("baseline_rss_mb", "process baseline (MB)", ".0f"),
            ("weights_mb", "weights (MB)", ".1f"),
            ("isolated", "own process", "text"),
        ],
    )


def phases_table(records: dict[str, dict]) -> str:
    """Peak memory and seconds of each phase of each stage (the `phases` of `Run.stage_records()`)."""
    rows = [
        {"stage": step, "phase": name, **phase}
        for step, record in records.items()
        for name, phase in record.get("phases", {}).items()
    ]
    return html_table(
        rows,
        [
            ("stage", "stage", "text"),
            ("phase", "phase", "text"),
            ("peak_rss_mb", "peak RSS (MB)", ".0f"),
            ("start_rss_mb", "RSS at start (MB)", ".0f"),
            ("end_rss_mb", "RSS at end (MB)", ".0f"),
            ("seconds", "seconds", ".1f"),
        ],
    )


def drift_summary_table(summary: dict) -> str:
    rows = [
        {"what": "next-token KL(original ‖ emulator), nats/token", "value": summary.get("kl")},
        {"what": "perplexity, original", "value": summary.get("ppl_original")},
        {"what": "perplexity, emulator", "value": summary.get("ppl_emulator")},
        {"what": "perplexity ratio", "value": summary.get("ppl_ratio")},
        {"what": "mean measured layer error", "value": summary.get("mean_measured_error")},
        {"what": "held-out tokens", "value": summary.get("tokens")},
    ]
    return html_table(rows, [("what", "drift, end to end", "text"), ("value", "value", ".4g")])


def config_summary(run) -> str:
    """The run's main settings (an `emloc_nb.run.Run`), headed by its directory."""
    c = run.config
    plan = c.emulator.plan if isinstance(c.emulator.plan, str) else json.dumps(c.emulator.plan)
    rows = [
        ("model", c.model),
        ("task", c.task.source),
        ("rank plan", plan),
        ("emulator mode", c.emulator.mode),
        ("LoRA", f"r = {c.lora.r}, alpha = {c.lora.alpha}"),
        ("training", f"{c.train.steps} steps × {c.train.batch_size}"),
        ("correction", f"L = {c.correction.clamp:g}, κ: {c.correction.kappa}, prior: {c.correction.prior}"),
        ("seed", c.seed),
    ]
    return html_table(
        [{"k": k, "v": v} for k, v in rows], [("k", "run", "text"), ("v", run.dir.resolve().name, "text")]
    )
