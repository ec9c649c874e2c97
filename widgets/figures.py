"""Pure plotly builders: the core's data objects in, a `go.Figure` out.

Both the live views (which wrap these in FigureWidgets and update their traces) and
the static HTML report draw with these functions, so a figure looks the same in both.
Traces have stable names; the views and the tests find them by name. Nothing here
imports ipywidgets, and nothing here recomputes the pipeline: only cheap arithmetic
on stored spectra, statistics and reports.
"""
from __future__ import annotations

import html
import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from emloc_nb.models import block_index
from emloc_nb.ranks import rank_for_ratio

PLAIN, WHITENED, SELECTED, PLAN = "#9e9e9e", "#1f77b4", "#d62728", "#2ca02c"
BEFORE, AFTER = "#ff7f0e", "#1f77b4"
# The title sits at the top of the canvas and the legend in a row under it, above the plot.
LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=95, b=50), height=400,
              legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, xanchor="left"))
LEGEND_RIGHT = dict(orientation="v", yanchor="top", y=1.0, x=1.02, xanchor="left")  # for stacked subplots


def _title(text: str) -> dict:
    return dict(text=text, x=0.01, xanchor="left", y=0.97, yanchor="top", yref="container")


def trace(fig: go.Figure, name: str):
    """The trace called `name` (views update traces by name, never by position)."""
    for t in fig.data:
        if t.name == name:
            return t
    raise KeyError(f"No trace named {name!r}; traces: {[t.name for t in fig.data]}")


# ----------------------------------------------------------------------------- layer names

def short_names(names: Sequence[str]) -> list[str]:
    """Layer names without their shared prefix ('model.layers.0.self_attn.q_proj' → '0.self_attn.q_proj')."""
    parts = [n.split(".") for n in names]
    if len(parts) < 2:
        return [p[-1] for p in parts]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [".".join(p[common:]) for p in parts]


def _group_axis(rows: Sequence[dict], by: str) -> tuple[list[int], list[list[str]]]:
    """Order of `rows` grouped by block or by layer kind, and a two-level (group, layer) category axis."""
    short = short_names([r["name"] for r in rows])
    kinds = list(dict.fromkeys(r["kind"] for r in rows))  # first-seen order: q, k, v, o, gate, up, down
    block = lambda r: -1 if r.get("block") is None else r["block"]
    if by == "block":
        order = sorted(range(len(rows)), key=lambda i: block(rows[i]))  # stable: model order within a block
        groups = [f"block {rows[i]['block']}" for i in order]
        labels = [short[i].split(".", 1)[-1] if rows[i].get("block") is not None else short[i] for i in order]
    elif by == "kind":
        order = sorted(range(len(rows)), key=lambda i: (kinds.index(rows[i]["kind"]), block(rows[i])))
        groups = [rows[i]["kind"] for i in order]
        labels = [str(rows[i]["block"]) for i in order]
    else:
        raise ValueError(f"group by 'block' or 'kind', not {by!r}")
    if len(set(zip(groups, labels))) < len(order):  # e.g. GPT-2 has attn.c_proj and mlp.c_proj in a block
        labels = [short[i] for i in order]
    return order, [groups, labels]


# ----------------------------------------------------------------------------- calibration activations

def input_label(stats, key: str) -> str:
    """'block 0 · q_proj, k_proj, v_proj': which layers read this input."""
    s = stats.inputs[key]
    b = block_index(key)
    kinds = ", ".join(n.rsplit(".", 1)[-1] for n in s.layers)
    return f"block {b} · {kinds}" if b is not None else f"{key} · {kinds}"


def _positive(values: np.ndarray) -> list:
    """Zeros and negatives cannot sit on a log axis: leave gaps instead of plotting at -inf."""
    return [float(v) if v > 0 else None for v in values]


def channel_figure(inp, *, factor: float = 6.0, title: str = "") -> go.Figure:
    """Per-channel mean |x| and max |x| of one layer input (log y), outlier channels ringed."""
    mean, peak = inp.mean_abs.double().numpy(), inp.abs_max.double().numpy()
    outliers = inp.outlier_channels(factor).numpy()
    ch = np.arange(inp.dim)
    fig = go.Figure([
        go.Scatter(name="max |x|", x=ch, y=_positive(peak), mode="lines", line=dict(color="#d62728", width=1)),
        go.Scatter(name="mean |x|", x=ch, y=_positive(mean), mode="lines", line=dict(color=WHITENED, width=1)),
        go.Scatter(name="outliers", x=outliers, y=_positive(peak[outliers]), mode="markers",
                   marker=dict(symbol="circle-open", size=10, color="black", line=dict(width=2))),
    ])
    fig.update_layout(**LAYOUT, title=_title(f"{title or 'Per-channel magnitude'} (outlier: max > {factor:g}× median)"),
                      xaxis_title="channel",
                      yaxis_title="|x| over real tokens", yaxis_type="log")
    return fig


def eigen_figure(inp, *, title: str = "", eigenvalues=None) -> go.Figure:
    """Eigenvalues of E[x xᵀ], largest first (log y): how many directions the input really uses.

    `eigenvalues`: `inp.eigenvalues()` if the caller already has them (an eigen-decomposition is the slow part).
    """
    eig = (inp.eigenvalues() if eigenvalues is None else eigenvalues).double().numpy()
    fig = go.Figure(go.Scatter(name="eigenvalues", x=np.arange(1, len(eig) + 1), y=_positive(eig), mode="lines+markers",
                               marker=dict(size=3), line=dict(color=WHITENED)))
    fig.update_layout(**LAYOUT, title=_title(title or "Eigen-spectrum of C = E[x xᵀ]"), xaxis_title="index (largest first)",
                      yaxis_title="eigenvalue", yaxis_type="log", showlegend=False)
    return fig


def activation_heatmap(stats, *, bins: int = 64) -> go.Figure:
    """Inputs × channels sorted by max |x|, as log10(max |x| / median channel's max |x|).

    Channels are sorted per input (largest first) and grouped into equal quantile
    bins, keeping each bin's largest value, so inputs of different widths line up and
    an outlier channel is never averaged away. Rows read top to bottom in model order.
    """
    keys = list(stats.inputs)
    width = min(bins, min(s.dim for s in stats.inputs.values()))
    z, hover = [], []
    for key in keys:
        s = stats.inputs[key].abs_max.double()
        median = float(s.median()) or 1.0  # torch's (lower) median, as in InputStats.outlier_channels
        peak = np.sort(s.numpy())[::-1]
        chunks = np.array_split(peak, width)
        z.append([math.log10(max(float(c.max()) / median, 1e-12)) for c in chunks])
        hover.append([f"{key}<br>channels {sum(map(len, chunks[:j]))}–{sum(map(len, chunks[:j + 1])) - 1} "
                      f"of {len(peak)}<br>max |x| = {float(c.max()):.3g} (median {median:.3g})"
                      for j, c in enumerate(chunks)])
    labels = [input_label(stats, k) for k in keys]
    fig = go.Figure(go.Heatmap(name="channel magnitude", z=z, y=labels, x=[f"{(j + 0.5) / width:.0%}" for j in range(width)],
                               text=hover, hoverinfo="text", colorscale="Viridis",
                               colorbar=dict(title="log10(max / median)")))
    fig.update_layout(**{**LAYOUT, "height": max(300, 22 * len(keys) + 120)},
                      title=_title("Channel magnitude per input: max |x| relative to the median channel, channels sorted"),
                      xaxis_title="channel quantile (sorted by max |x|, largest first)",
                      yaxis=dict(autorange="reversed", type="category"))
    return fig


# ----------------------------------------------------------------------------- spectra

def _vline(name: str, x: float | None, y0: float, y1: float, color: str, dash: str) -> go.Scatter:
    xs, ys = ([x, x], [y0, y1]) if x is not None else ([], [])
    return go.Scatter(name=name, x=xs, y=ys, mode="lines", line=dict(color=color, dash=dash, width=2))


def spectrum_figure(spectra, name: str, rank: int | None = None) -> go.Figure:
    """Plain σ(W) and whitened σ(W S) of one layer, each relative to its largest (log y); ranks marked.

    The whitened spectrum is what the emulator truncates: the faster it falls, the
    less a low rank loses. "plan rank" is the rank in the table; "selected rank" is `rank`.
    """
    plain = spectra.spectrum(name, "plain").double().numpy()
    white = spectra.spectrum(name, "whitened").double().numpy()
    rel = lambda s: s / s[0] if len(s) and s[0] > 0 else s
    p, w = rel(plain), rel(white)
    lo = min([v for v in np.concatenate([p, w]) if v > 0], default=1e-6)
    row = spectra.row(name)
    fig = go.Figure([
        go.Scatter(name="plain σ(W)", x=np.arange(1, len(p) + 1), y=_positive(p), mode="lines", line=dict(color=PLAIN)),
        go.Scatter(name="whitened σ(W S)", x=np.arange(1, len(w) + 1), y=_positive(w), mode="lines", line=dict(color=WHITENED)),
        _vline("plan rank", row["rank"], lo, 1.0, PLAN, "dash"),
        _vline("selected rank", rank, lo, 1.0, SELECTED, "dot"),
    ])
    fig.update_layout(**LAYOUT, title=_title(f"Singular values · {name}"), xaxis_title="index i",
                      yaxis_title="σᵢ / σ₁", yaxis_type="log")
    return fig


def cumulative_energy(values) -> np.ndarray:
    """Share of Σσ² kept by the top r values, for r = 0 … n."""
    e = np.asarray(values, dtype=np.float64) ** 2
    total = e.sum()
    return np.concatenate([[0.0], np.cumsum(e) / total]) if total > 0 else np.ones(len(e) + 1)


def energy_figure(spectra, name: str, rank: int | None = None) -> go.Figure:
    """Kept energy against rank: whitened (the emulator's metric, E‖W x‖²) and plain (‖W‖²)."""
    white = cumulative_energy(spectra.spectrum(name, "whitened").double().numpy())
    plain = cumulative_energy(spectra.spectrum(name, "plain").double().numpy())
    r = rank if rank is not None else len(white) - 1
    fig = go.Figure([
        go.Scatter(name="whitened energy", x=np.arange(len(white)), y=white, mode="lines", line=dict(color=WHITENED)),
        go.Scatter(name="plain energy", x=np.arange(len(plain)), y=plain, mode="lines", line=dict(color=PLAIN)),
        go.Scatter(name="selected", x=[r], y=[spectra.energy_at(name, r)], mode="markers",
                   marker=dict(color=SELECTED, size=11)),
    ])
    fig.update_layout(**LAYOUT, title=_title(f"Energy kept by rank · {name}"), xaxis_title="rank r",
                      yaxis_title="share of energy kept", yaxis_range=[0, 1.02])
    return fig


def uniform_energy(spectra, ratio: float) -> list[float]:
    """Kept whitened energy of every layer if each kept a share ρ of its parameters."""
    out = []
    for r in spectra.rows:
        rank = None if ratio >= 1 else rank_for_ratio(r["d_out"], r["d_in"], ratio)
        out.append(spectra.energy_at(r["name"], rank))
    return out


def kept_energy_markers(spectra, ratio: float) -> list[float]:
    """`uniform_energy` in the order of kept_energy_figure's axis (layers grouped by block)."""
    order, _ = _group_axis(spectra.rows, "block")
    energy = uniform_energy(spectra, ratio)
    return [energy[i] for i in order]


def kept_energy_title(ratio: float | None = None) -> str:
    return "Whitened energy kept per layer" + (f" (markers: every layer at ρ = {ratio:.2f})" if ratio is not None else "")


def kept_energy_figure(spectra, *, ratio: float | None = None) -> go.Figure:
    """Kept whitened energy per layer under the built plan (bars) and, optionally, a uniform ρ (markers)."""
    rows = spectra.rows
    order, axis = _group_axis(rows, "block")
    hover = [f"{rows[i]['name']}<br>rank {rows[i]['rank'] or 'dense'}<br>{rows[i]['reason']}" for i in order]
    data = [go.Bar(name="built plan", x=axis, y=[rows[i]["energy_kept"] for i in order], hovertext=hover,
                   marker_color=PLAN)]
    if ratio is not None:
        data.append(go.Scatter(name="uniform ρ", x=axis, y=kept_energy_markers(spectra, ratio), mode="markers",
                               marker=dict(color=SELECTED, size=8, symbol="diamond")))
    fig = go.Figure(data)
    fig.update_layout(**LAYOUT, title=_title(kept_energy_title(ratio)), yaxis_title="share of E‖W x‖² kept",
                      yaxis_range=[0, 1.02])
    return fig


def ranks_figure(spectra, choices: dict) -> go.Figure:
    """Planned rank per layer (bars; dense layers in grey at full rank) and the energy each keeps."""
    rows = spectra.rows
    order, axis = _group_axis(rows, "block")
    full = [min(rows[i]["d_out"], rows[i]["d_in"]) for i in order]
    rank = [choices[rows[i]["name"]].rank for i in order]
    energy = [spectra.energy_at(rows[i]["name"], r) for i, r in zip(order, rank)]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(name="rank", x=axis, y=[r if r is not None else 0 for r in rank], marker_color=WHITENED,
                         hovertext=[choices[rows[i]["name"]].reason for i in order]), secondary_y=False)
    fig.add_trace(go.Bar(name="kept dense", x=axis, y=[f if r is None else 0 for f, r in zip(full, rank)],
                         marker_color=PLAIN), secondary_y=False)
    fig.add_trace(go.Scatter(name="full rank", x=axis, y=full, mode="markers", marker=dict(symbol="line-ew-open", size=14,
                                                                                           color="black")), secondary_y=False)
    fig.add_trace(go.Scatter(name="energy kept", x=axis, y=energy, mode="markers", marker=dict(color=SELECTED, size=6)),
                  secondary_y=True)
    fig.update_layout(**LAYOUT, title=_title("Planned rank per layer"), barmode="overlay")
    fig.update_yaxes(title_text="rank", secondary_y=False)
    fig.update_yaxes(title_text="whitened energy kept", range=[0, 1.02], secondary_y=True)
    return fig


# ----------------------------------------------------------------------------- drift

def layer_error_figure(layers: Sequence[dict], *, by: str = "block") -> go.Figure:
    """Measured (held-out) and predicted relative output error per layer, grouped by block or by kind."""
    order, axis = _group_axis(layers, by)
    fig = go.Figure([
        go.Bar(name="measured (held-out)", x=axis, y=[layers[i]["measured_error"] for i in order], marker_color=WHITENED,
               hovertext=[layers[i]["name"] for i in order]),
        go.Scatter(name="predicted (calibration)", x=axis, y=[layers[i]["predicted_error"] for i in order], mode="markers",
                   marker=dict(color="black", symbol="line-ew-open", size=14, line=dict(width=2))),
    ])
    fig.update_layout(**LAYOUT, title=_title(f"Relative output error per layer, by {by}"),
                      yaxis_title="‖(W − W_E) x‖ / ‖W x‖")
    return fig


def block_cosine_figure(blocks: Sequence[dict]) -> go.Figure:
    """Mean cosine between the original's and the emulator's hidden states after each block."""
    fig = go.Figure(go.Scatter(name="cosine", x=[b["block"] for b in blocks], y=[b["cosine"] for b in blocks],
                               mode="lines+markers", line=dict(color=WHITENED)))
    fig.update_layout(**LAYOUT, title=_title("Hidden-state cosine, original vs emulator"), xaxis_title="block",
                      yaxis_title="mean cosine over real tokens", showlegend=False)
    return fig


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE spells every byte as a printable character; this maps them back."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES = _byte_decoder()


def readable_tokens(tokens: Sequence[str]) -> list[str]:
    """Token strings as text: byte-level BPE ('Ġ' space, 'Ċ' newline) and SentencePiece ('▁') undone."""
    byte_level = any(("Ġ" in t or "Ċ" in t) for t in tokens)
    out = []
    for t in tokens:
        if byte_level and all(c in _BYTES for c in t):
            t = bytes(_BYTES[c] for c in t).decode("utf-8", errors="replace")
        out.append(t.replace("▁", " "))
    return out


def token_kl_html(example: dict, *, vmax: float | None = None) -> str:
    """One example's tokens coloured by next-token KL(original ‖ emulator); hover shows the value.

    White is zero, full red is `vmax` (default: this example's largest KL). Text is
    HTML-escaped; a newline shows as ↵ and breaks the line.
    """
    kl = [float(v) for v in example["kl"]]
    top = vmax if vmax is not None else max(kl, default=0.0)
    spans = []
    for text, value in zip(readable_tokens(example["tokens"]), kl):
        alpha = 0.0 if top <= 0 else min(1.0, max(0.0, value / top))
        shown = html.escape(text).replace("\n", "↵<br>")
        spans.append(f"<span title='KL {value:.4f}' style='background:rgba(214,39,40,{alpha:.3f});"
                     f"border-radius:2px'>{shown}</span>")
    legend = (f"<div style='font-size:12px;color:#555;margin-top:4px'>colour: KL(original ‖ emulator) of the "
              f"prediction made at each token, white = 0, red = {top:.3g} nats; mean {np.mean(kl) if kl else 0:.3g} "
              f"over {len(kl)} tokens</div>")
    return (f"<div style='font-family:monospace;white-space:pre-wrap;line-height:1.6;border:1px solid #ddd;"
            f"padding:6px'>{''.join(spans)}</div>{legend}")


# ----------------------------------------------------------------------------- correction

def correction_error_figure(rows: Sequence[dict], *, clamp: float) -> go.Figure:
    """Error against the fine-tuned emulator, naive (L = 0) vs corrected at L, overall and on the LoRA subspace."""
    order, axis = _group_axis(rows, "block")
    lab = "∞" if math.isinf(clamp) else f"{clamp:g}"
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("overall (held-out inputs)", "on the LoRA input subspace"))
    for r, part in ((1, "all"), (2, "subspace")):
        suffix = "overall" if part == "all" else "LoRA subspace"
        fig.add_trace(go.Bar(name=f"naive, {suffix}", x=axis, y=[rows[i].get(f"before_{part}") for i in order],
                             marker_color=BEFORE, legendgroup="naive"), row=r, col=1)
        fig.add_trace(go.Bar(name=f"corrected, {suffix}", x=axis, y=[rows[i].get(f"after_{part}") for i in order],
                             marker_color=AFTER, legendgroup="corrected"), row=r, col=1)
    fig.update_layout(**{**LAYOUT, "height": 580, "legend": LEGEND_RIGHT}, barmode="group",
                      title=_title(f"Error vs the fine-tuned emulator: naive (L = 0) and corrected (L = {lab})"))
    fig.update_yaxes(title_text="relative error")
    return fig


def correction_norms_figure(rows: Sequence[dict]) -> go.Figure:
    """‖D‖ (what the emulator got wrong on the LoRA basis) against ‖B′‖ (the LoRA itself), and the clamp."""
    order, axis = _group_axis(rows, "block")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("discrepancy ‖D‖ = ‖(W − W_E) U_A‖ and LoRA ‖B′‖", "clamp factors"))
    fig.add_trace(go.Bar(name="‖D‖", x=axis, y=[rows[i]["d_norm"] for i in order], marker_color=BEFORE), row=1, col=1)
    fig.add_trace(go.Bar(name="‖B′‖", x=axis, y=[rows[i]["b_norm"] for i in order], marker_color=AFTER), row=1, col=1)
    fig.add_trace(go.Bar(name="mean κ", x=axis, y=[rows[i]["kappa_mean"] for i in order], marker_color=PLAN,
                         hovertext=[f"{rows[i]['clamped']} of {rows[i]['lora_rank']} columns clamped" for i in order]),
                  row=2, col=1)
    fig.update_layout(**{**LAYOUT, "height": 540, "legend": LEGEND_RIGHT}, barmode="group",
                      title=_title("What the correction subtracts"))
    fig.update_yaxes(type="log", title_text="Frobenius norm", row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], title_text="κ (1: full correction)", row=2, col=1)
    return fig


def kappa_figure(report, name: str, clamp: float) -> go.Figure:
    """κ per LoRA direction of one layer at L: 1 subtracts that column of D fully, 0 not at all."""
    kappa = report.kappa_at(name, clamp).double().numpy()
    valid = report.stats[name]["valid"].bool().numpy()
    fig = go.Figure(go.Bar(name="κ", x=np.arange(len(kappa)), y=kappa,
                           marker_color=[PLAN if v else PLAIN for v in valid],
                           hovertext=["in the LoRA subspace" if v else "outside (A is zero there)" for v in valid]))
    fig.update_layout(**LAYOUT, title=_title(f"Clamp factors · {name}"), xaxis_title="LoRA direction i",
                      yaxis_title="κᵢ", yaxis_range=[0, 1.05], showlegend=False)
    return fig


# ----------------------------------------------------------------------------- training

def loss_figure(history: Sequence[dict] = (), *, total_steps: int | None = None, title: str = "Training loss") -> go.Figure:
    """Loss per step, and the learning rate on a second axis."""
    clean = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else v
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(name="loss", x=[h["step"] for h in history], y=[clean(h["loss"]) for h in history],
                             mode="lines+markers", marker=dict(size=4), line=dict(color=WHITENED)), secondary_y=False)
    fig.add_trace(go.Scatter(name="lr", x=[h["step"] for h in history], y=[clean(h.get("lr")) for h in history],
                             mode="lines", line=dict(color=PLAIN, dash="dot")), secondary_y=True)
    fig.update_layout(**LAYOUT, title=_title(title), xaxis_title="step")
    if total_steps:
        fig.update_xaxes(range=[0, total_steps])
    fig.update_yaxes(title_text="loss (answer tokens)", secondary_y=False)
    fig.update_yaxes(title_text="learning rate", secondary_y=True, showgrid=False)
    return fig


# ----------------------------------------------------------------------------- memory

MEMORY_PARTS = [("weights_mb", "weights", WHITENED), ("trainable_state_mb", "LoRA trainable state", PLAN),
                ("activations_mb", "saved activations", BEFORE)]
MEMORY_MEASURES = [("total_mb", "predicted total", WHITENED), ("measured_peak_mb", "measured peak", SELECTED),
                   ("process_baseline_mb", "process baseline", PLAIN)]


def _memory_bars(rows: Sequence[dict], columns) -> list[go.Bar]:
    settings = [r["setting"] for r in rows]
    return [go.Bar(name=label, x=settings, y=[r[key] for r in rows], marker_color=color) for key, label, color in columns]


def memory_components_figure(rows: Sequence[dict]) -> go.Figure:
    """Predicted memory per setting, stacked by component (rows of `emloc_nb.memory.budget`)."""
    fig = go.Figure(_memory_bars(rows, MEMORY_PARTS))
    fig.update_layout(**LAYOUT, barmode="stack", title=_title("Predicted memory per setting (MB)"), yaxis_title="MB")
    return fig


def memory_measured_figure(rows: Sequence[dict]) -> go.Figure:
    """Predicted total against the measured peak and baseline of the stage's process, per setting."""
    fig = go.Figure(_memory_bars(rows, MEMORY_MEASURES))
    fig.update_layout(**LAYOUT, barmode="group", title=_title("Predicted total against measured peak (MB)"),
                      yaxis_title="MB")
    return fig
