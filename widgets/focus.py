"""Which layer (or input) a view opens on: the one with the most to show, not simply the first.

Layer 0's q_proj, the first in model order, often keeps all its energy and says nothing.
Each rule below reads the saved data objects only; an explicit `layer=` given to a view wins.
Every rule falls back to the first layer when no layer qualifies (None when there is none).
"""

from __future__ import annotations

import math


def _usable(value) -> bool:
    return value is not None and math.isfinite(value)


def _first(rows) -> str | None:
    return rows[0]["name"] if rows else None


def least_energy_layer(spectra) -> str | None:
    """SpectrumView: the compressed layer that keeps the least whitened energy (the largest predicted error).

    Layers kept dense keep all their energy, so they are never picked while any layer is compressed.
    """
    compressed = [r for r in spectra.rows if r["rank"] is not None and _usable(r["energy_kept"])]
    return min(compressed, key=lambda r: r["energy_kept"])["name"] if compressed else _first(spectra.rows)


def peak_ratio(inp) -> float:
    """How far an input's largest channel stands above its median channel: max |x| over the median channel's."""
    peaks = inp.abs_max.double()
    return float(peaks.max() / peaks.median().clamp_min(1e-12))


def most_peaked_input(stats) -> str:
    """ActivationsView: the input with the largest `peak_ratio`, the one whose outlier channels stand out most
    (the same ratio as the first column of the activation heatmap and the outlier factor)."""
    return max(stats.inputs, key=lambda k: peak_ratio(stats.inputs[k]))


def worst_drift_layer(rows) -> str | None:
    """DriftView: the layer with the largest measured (held-out) relative output error."""
    measured = [r for r in rows if _usable(r.get("measured_error"))]
    return max(measured, key=lambda r: r["measured_error"])["name"] if measured else _first(rows)


def largest_discrepancy_layer(rows) -> str | None:
    """CorrectionView: the layer with the largest ‖D‖ / ‖B′‖, where the correction changes the LoRA the most
    (layers whose LoRA is zero, ‖B′‖ = 0, are left out: their correction is zero too)."""
    trained = [r for r in rows if r["b_norm"] > 0 and _usable(r["d_norm"])]
    return max(trained, key=lambda r: r["d_norm"] / r["b_norm"])["name"] if trained else _first(rows)
