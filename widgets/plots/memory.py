"""Memory: predicted components and measured peaks per setting (rows of `emloc_nb.memory.budget`), and the
measured peak of each phase of each stage (`Run.stage_records()`)."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .common import BEFORE, LAYOUT, PLAIN, PLAN, SELECTED, WHITENED, layout_title

SCALE_BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the Pareto plot's right panel
SCALE_SIZES = ("135M", "1.7B", "3B", "8B")
SIZE_GREYS = ["#bdbdbd", "#969696", "#636363", "#252525"]  # the model sizes, small to large
METHOD_COLORS = ["#2ca02c", "#9467bd", "#1f77b4", "#ff7f0e", "#d62728", "#8c564b"]
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


def emulator_peaks_at_scale(
    scale_curve: dict, budgets: Sequence[float] = SCALE_BUDGETS, sizes: Sequence[str] | None = SCALE_SIZES
) -> list[dict]:
    """The emulator's fine-tuning peak at each budget ρ and model size (`sizes`; None: all), × the original's
    inference peak.

    From bench/scale_curve.json (`scale_curve`: its "rows", measured, and "extrapolated", per block): ρ is the kept
    share of the block linears' parameters, so LoRA on the emulator holds (1 − ρ) of their weights less than LoRA on
    the original. Their weights W come from the ρ = 0.5 row: W = (LoRA − emulator@0.5) / 0.5; then
    peak(ρ) = LoRA − (1 − ρ) W.
    """
    scale_rows = scale_curve["rows"] + scale_curve.get("extrapolated", [])
    peak = {}  # a measured peak ("size", "peak_mb") over an extrapolated one ("model", "predicted_mb")
    for r in sorted(scale_rows, key=lambda r: "peak_mb" in r):
        peak[r.get("size") or r["model"], r["setting"]] = r.get("peak_mb") or r["predicted_mb"]
    out = []
    for model in dict.fromkeys(r.get("size") or r["model"] for r in scale_rows):
        if sizes is not None and model not in sizes:
            continue
        lora, half, inference = (peak.get((model, s)) for s in ("lora", "emulator@0.5", "inference"))
        if None in (lora, half, inference):
            continue
        weights = (lora - half) / 0.5
        out += [
            {
                "model": model,
                "budget": b,
                "peak_mb": lora - (1 - b) * weights,
                "ratio": (lora - (1 - b) * weights) / inference,
            }
            for b in budgets
        ]
    return out


def recipe_point(
    summary: Sequence[dict], memory: dict, method: str, budget: float, label: str, inference_mb: float
) -> dict:
    """One row of another ablation (its `summary()` and `memory`: `method` at `budget`) as a point for
    `pareto_figure(recipes=...)`, its fine-tuning peak over `inference_mb`, the plotted ablation's inference peak,
    so that every point shares one denominator."""
    row = next((r for r in summary if r["method"] == method and r["budget"] == budget), None)
    peak = memory.get("finetune", {}).get(f"{budget:g}")
    if row is None or peak is None:
        raise ValueError(
            f"The ablation has no {method!r} row with a fine-tuning peak at ρ = {budget:g}; pick one it measured."
        )
    return {
        "label": label,
        "accuracy": row["accuracy"],
        "accuracy_std": row["accuracy_std"],
        "ratio": peak / inference_mb,
    }


def pareto_figure(
    summary: Sequence[dict],
    memory: dict,
    methods: Sequence[str],
    scale: Sequence[dict] = (),
    recipes: Sequence[dict] = (),
) -> go.Figure:
    """Accuracy against the fine-tuning peak (× the original's inference peak), one point per budget ρ, per method
    (an ablation's `summary()` and `memory`); LoRA on the original and zero-shot as references. The first method's
    points are labelled with their ρ. `recipes` adds single points measured elsewhere (a recipe tuned for one
    budget: "label", "accuracy", "accuracy_std", "ratio"). With `scale` (`emulator_peaks_at_scale`), a second
    panel: what the same budgets cost at larger sizes."""
    inference, finetune = memory.get("inference"), memory.get("finetune", {})
    fig = make_subplots(
        rows=1,
        cols=2 if scale else 1,
        column_widths=[0.62, 0.38] if scale else None,
        subplot_titles=["measured here (SmolLM2-135M)", "the same ρ at larger sizes (per-block extrapolation)"]
        if scale
        else None,
    )
    for i, (key, color) in enumerate(zip(methods, METHOD_COLORS * 2)):
        rows = sorted(
            (r for r in summary if r["method"] == key and r["budget"] is not None and f"{r['budget']:g}" in finetune),
            key=lambda r: r["budget"],
        )
        if rows and inference:
            fig.add_scatter(
                name=rows[0]["label"],
                x=[finetune[f"{r['budget']:g}"] / inference for r in rows],
                y=[r["accuracy"] for r in rows],
                error_y=dict(type="data", array=[r["accuracy_std"] for r in rows]),
                text=[f"ρ = {r['budget']:g}" for r in rows] if i == 0 else None,
                mode="lines+markers+text" if i == 0 else "lines+markers",
                textposition="top center",
                line=dict(color=color),
                row=1,
                col=1,
            )
    for recipe in recipes:
        fig.add_scatter(
            name=recipe["label"],
            x=[recipe["ratio"]],
            y=[recipe["accuracy"]],
            error_y=dict(type="data", array=[recipe["accuracy_std"]]),
            mode="markers",
            marker=dict(symbol="star", size=14, color="black"),
            row=1,
            col=1,
        )
    for key, dash, where in (("zero-shot", "dot", "bottom left"), ("full", "dash", "top left")):
        r = next((r for r in summary if r["method"] == key), None)
        if r:
            x = memory.get("full", 0) / inference if key == "full" and inference and memory.get("full") else None
            fig.add_hline(
                y=r["accuracy"], line_dash=dash, row=1, col=1, annotation_position=where,
                annotation_text=r["label"] + (f" (peak × {x:.2f})" if x else ""),
            )  # fmt: skip
    for model, color in zip(dict.fromkeys(r["model"] for r in scale), SIZE_GREYS * 2):
        pts = [r for r in scale if r["model"] == model]
        fig.add_scatter(
            name=f"LoRA on the emulator, {model}",
            x=[r["budget"] for r in pts],
            y=[r["ratio"] for r in pts],
            mode="lines+markers",
            line=dict(color=color, dash="dot"),
            row=1,
            col=2,
        )
    if scale:
        fig.add_hline(y=1.0, line_dash="dash", row=1, col=2, annotation_text="the original's inference peak")
        fig.update_xaxes(title_text="kept share ρ", row=1, col=2)
        fig.update_yaxes(title_text="fine-tuning peak × inference peak", row=1, col=2)
    fig.update_xaxes(title_text="fine-tuning peak × the original's inference peak", row=1, col=1)
    fig.update_yaxes(title_text="accuracy", row=1, col=1)
    fig.update_layout(
        **{**LAYOUT, "height": 520, "margin": dict(l=60, r=20, t=60, b=150)},
        title=layout_title("Accuracy against memory, one point per ρ"),
    )
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.18, x=0, xanchor="left"))
    return fig
