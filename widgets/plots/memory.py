"""Memory: predicted components and measured peaks per setting (rows of `emloc_nb.memory.budget`), and the
measured peak of each phase of each stage (`Run.stage_records()`)."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from .common import BEFORE, LAYOUT, PLAIN, PLAN, SELECTED, WHITENED, layout_title

MEMORY_PARTS = [
    ("weights_mb", "weights", WHITENED),
    ("trainable_state_mb", "LoRA trainable state", PLAN),
    ("activations_mb", "saved activations", BEFORE),
]
MEMORY_MEASURES = [
    ("predicted_peak_mb", "predicted peak", WHITENED),
    ("measured_peak_mb", "measured peak (steady state)", SELECTED),
    ("process_baseline_mb", "process baseline", PLAIN),
]
# The phases the pipeline marks, in the order a run meets them (others follow in the order found).
PHASE_ORDER = [
    "load",
    "fingerprint",
    "calibration",
    "streamed build",
    "factoring",
    "save",
    "drift",
    "adapter_load",
    "correction",
    "train_first_step",
    "train_steps",
    "evaluation",
]


def _memory_bars(rows: Sequence[dict], columns) -> list[go.Bar]:
    settings = [r["setting"] for r in rows]
    return [
        go.Bar(name=label, x=settings, y=[r[key] for r in rows], marker_color=color) for key, label, color in columns
    ]


def memory_components_figure(rows: Sequence[dict]) -> go.Figure:
    """Predicted memory per setting, stacked by component (rows of `emloc_nb.memory.budget`)."""
    fig = go.Figure(_memory_bars(rows, MEMORY_PARTS))
    fig.update_layout(
        **LAYOUT, barmode="stack", title=layout_title("Predicted memory per setting (MB)"), yaxis_title="MB"
    )
    return fig


def memory_measured_figure(rows: Sequence[dict]) -> go.Figure:
    """Predicted total against the measured peak and baseline of the stage's process, per setting."""
    fig = go.Figure(_memory_bars(rows, MEMORY_MEASURES))
    fig.update_layout(
        **LAYOUT, barmode="group", title=layout_title("Predicted total against measured peak (MB)"), yaxis_title="MB"
    )
    return fig


def phase_names(records: dict[str, dict]) -> list[str]:
    """Every phase in the stage records, in PHASE_ORDER, then any others in the order found."""
    found = [p for r in records.values() for p in r.get("phases", {})]
    return [p for p in PHASE_ORDER if p in found] + list(dict.fromkeys(p for p in found if p not in PHASE_ORDER))


def memory_phases_figure(records: dict[str, dict]) -> go.Figure:
    """Peak resident memory of each phase of each stage (`Run.stage_records()`); a phase a stage lacks is a gap.

    The stage's process baseline (Python and the libraries, before any work) is a grey marker.
    """
    steps = list(records)
    fig = go.Figure()
    for name in phase_names(records):
        peaks = [records[s].get("phases", {}).get(name, {}).get("peak_rss_mb") for s in steps]
        fig.add_trace(go.Bar(name=name, x=steps, y=peaks))
    fig.add_trace(
        go.Scatter(
            name="process baseline",
            x=steps,
            y=[records[s].get("baseline_rss_mb") for s in steps],
            mode="markers",
            marker=dict(color=PLAIN, symbol="line-ew-open", size=28, line=dict(width=3)),
        )
    )
    fig.update_layout(
        **LAYOUT, barmode="group", title=layout_title("Peak memory by phase of each stage (MB)"), yaxis_title="MB"
    )
    return fig
