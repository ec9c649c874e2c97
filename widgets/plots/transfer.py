"""Transfer diagnostics: how each setting answers (margins, predictions), the prior correction, the
LoRA subspaces, and the ablation's accuracy against the budget and against L."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

from .common import AFTER, BEFORE, LAYOUT, PLAIN, PLAN, WHITENED, by_group, group_title, layout_title

SETTING_COLORS = ["#7f7f7f", "#2ca02c", "#9467bd", "#1f77b4", "#ff7f0e", "#d62728", "#8c564b"]


def margin_figure(results: Mapping[str, object]) -> go.Figure:
    """Per setting, the distribution of the margin score[0] − score[1] (two-choice tasks), zero marked.

    A constant push toward one answer moves the whole distribution off zero; lost task
    signal spreads the two answers' distributions into each other.
    """
    fig = go.Figure()
    choices = None
    for (setting, result), color in zip(results.items(), SETTING_COLORS):
        if not result.scores or len(result.choices) != 2:
            continue
        choices = result.choices
        margins = [s[0] - s[1] for s in result.scores]
        fig.add_trace(
            go.Box(
                name=setting,
                x=margins,
                marker_color=color,
                boxmean=True,
                hovertext=[f"answer {a}" for a in result.answers],
            )
        )
    fig.add_vline(x=0, line_dash="dash", line_color="black")
    first, second = choices or ("first", "second")
    fig.update_layout(
        **{**LAYOUT, "height": max(320, 60 * len(fig.data) + 140)},
        title=layout_title(f"Margin log p({first}) − log p({second}) per example (mean ◇); right of 0 answers {first}"),
        xaxis_title="margin (nats)",
        showlegend=False,
    )
    return fig


def predictions_figure(results: Mapping[str, object]) -> go.Figure:
    """How often each setting gives each answer, beside how often it is the right one."""
    first = next(iter(results.values()))
    keys = first.choices or sorted({p for r in results.values() for p in r.predictions})
    counts = {"reference answers": {k: first.answers.count(k) for k in keys}}
    counts.update({s: r.prediction_counts() for s, r in results.items()})
    fig = go.Figure(
        [
            go.Bar(name=k, x=list(counts), y=[c.get(k, 0) for c in counts.values()], marker_color=color)
            for k, color in zip(keys, [WHITENED, BEFORE, PLAN, PLAIN, "#9467bd"] * (len(keys) // 5 + 1))
        ]
    )
    fig.update_layout(
        **LAYOUT, barmode="stack", title=layout_title("Predicted answers per setting"), yaxis_title="examples"
    )
    return fig


PRIOR_TARGET_NAMES = {"labels": "training labels' shares (target)", "emulator": "fine-tuned emulator (target)"}


def prior_figure(prior: dict) -> go.Figure:
    """The prior correction on its support tokens: the target mean probability (the training labels' shares
    or the fine-tuned emulator's), the original + corrected LoRA's before the offset, and after it."""
    tokens = [repr(t) for t in prior["tokens"]]
    target_name = PRIOR_TARGET_NAMES[prior.get("target_kind", "emulator")]  # older reports name no kind: the emulator's
    fig = go.Figure(
        [
            go.Bar(name=target_name, x=tokens, y=prior["target"], marker_color=PLAIN),
            go.Bar(name="original + LoRA, before", x=tokens, y=prior["before"], marker_color=BEFORE),
            go.Bar(
                name="original + LoRA, after",
                x=tokens,
                y=prior["after"],
                marker_color=AFTER,
                hovertext=[f"logit offset {b:+.3f}" for b in prior["bias"]],
            ),
        ]
    )
    fig.update_layout(
        **LAYOUT,
        barmode="group",
        title=layout_title(
            "Prior correction: mean probability of the answer's first token over the calibration prompts"
        ),
        yaxis_title="mean probability",
    )
    return fig


def subspace_figure(rows: Sequence[dict]) -> go.Figure:
    """Per block (mean over its layers): how far the LoRA's input subspace moved from its initialisation, how
    much it overlaps the input's top eigenvectors, and how much of the corrected adapter is the correction."""
    series = [
        ("overlap with A's initial subspace", "init_overlap", PLAIN),
        ("overlap with the input's top eigenvectors", "data_overlap", PLAN),
        ("share of the adapter that is the correction", "correction_share", BEFORE),
    ]
    bars = []
    for label, key, color in series:
        x, y, hover = by_group(rows, [_none_if_nan(r.get(key)) for r in rows])
        bars.append(go.Bar(name=label, x=x, y=y, hovertext=hover, marker_color=color))
    fig = go.Figure(bars)
    fig.update_layout(
        **LAYOUT,
        barmode="group",
        title=layout_title("The LoRA's subspace", "where it came from, what it sees, and how much the correction adds"),
        xaxis=dict(title=group_title("block"), type="category"),
        yaxis_title="mean cos² of principal angles / share",
        yaxis_range=[0, 1.05],
    )
    return fig


def _none_if_nan(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def ablation_budget_figure(summary: Sequence[dict], methods: Sequence[str]) -> go.Figure:
    """Accuracy (mean ± std over seeds) against the kept share ρ, one line per method; references as lines."""
    fig = go.Figure()
    for key, color in zip(methods, SETTING_COLORS[1:] * 2):
        rows = sorted((r for r in summary if r["method"] == key and r["budget"] is not None), key=lambda r: r["budget"])
        if rows:
            fig.add_trace(
                go.Scatter(
                    name=rows[0]["label"],
                    x=[r["budget"] for r in rows],
                    y=[r["accuracy"] for r in rows],
                    error_y=dict(type="data", array=[r["accuracy_std"] for r in rows]),
                    mode="lines+markers",
                    line=dict(color=color),
                )
            )
    for r, dash in ((_find(summary, "zero-shot"), "dot"), (_find(summary, "full"), "dash")):
        if r:
            fig.add_hline(
                y=r["accuracy"], line_dash=dash, annotation_text=r["label"], annotation_position="bottom left"
            )
    fig.update_layout(
        **LAYOUT, title=layout_title("Accuracy against the budget"), xaxis_title="kept share ρ", yaxis_title="accuracy"
    )
    return fig


def ablation_clamp_figure(summary: Sequence[dict], budget: float) -> go.Figure:
    """Accuracy (mean ± std) against the paper's clamp L at one budget, without and with the prior correction."""
    fig = go.Figure()
    for name, with_prior, color in (("paper's correction", False, WHITENED), ("+ prior correction", True, AFTER)):
        points = sorted(
            (
                (clamp, r)
                for r in summary
                if r["budget"] == budget
                and r["method"].endswith("+prior") == with_prior
                and (clamp := _clamp_of(r["method"])) is not None
            ),
            key=lambda point: point[0],
        )
        if points:
            fig.add_trace(
                go.Scatter(
                    name=name,
                    x=[_clamp_axis(c) for c, _ in points],
                    y=[r["accuracy"] for _, r in points],
                    error_y=dict(type="data", array=[r["accuracy_std"] for _, r in points]),
                    mode="lines+markers",
                    line=dict(color=color),
                )
            )
    fig.update_layout(
        **LAYOUT,
        title=layout_title(f"Accuracy against the clamp L at ρ = {budget:g} (0: the naive transfer)"),
        xaxis=dict(title="L", type="category"),
        yaxis_title="accuracy",
    )
    return fig


def _clamp_of(method: str) -> float | None:
    """The clamp L of a paper's-correction method ("naive" is L = 0), with or without the prior; else None."""
    base = method.removesuffix("+prior")
    if base == "naive":
        return 0.0
    if base.startswith("L="):
        return math.inf if base == "L=inf" else float(base[2:])
    return None


def _clamp_axis(clamp: float) -> str:
    return "∞" if math.isinf(clamp) else f"{clamp:g}"


def _find(summary: Sequence[dict], method: str) -> dict | None:
    return next((r for r in summary if r["method"] == method), None)
