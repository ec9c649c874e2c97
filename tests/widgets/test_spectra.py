"""SpectrumView: the ρ/rank slider recomputes energy, parameters and error from the stored spectra alone."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emloc_nb.widgets import SpectrumView
from emloc_nb.widgets.plots.common import trace
from emloc_nb.widgets.plots.spectra import block_grid, kept_energy_figure


def kept_energy(spectra, name: str, rank: int) -> float:
    s = spectra.spectrum(name).double().numpy()
    return float((s[:rank] ** 2).sum() / (s**2).sum())


def test_rank_slider_energy_is_top_r_whitened_energy(spectra):
    view = SpectrumView(spectra)
    name = spectra.names[4]  # a gate projection: 64 singular values
    view.layer.value = name
    for rank in (1, 3, 17):
        view.rank.value = rank
        expected = kept_energy(spectra, name, rank)
        assert trace(view.energy, "selected").x == (rank,)
        assert trace(view.energy, "selected").y[0] == pytest.approx(expected, rel=1e-9)
        assert trace(view.energy, "whitened energy").y[rank] == pytest.approx(expected, rel=1e-9)
        assert view.current["error"] == pytest.approx(math.sqrt(1 - expected), rel=1e-9)
        row = spectra.layer(name)
        assert view.current["params"] == rank * (row["d_out"] + row["d_in"])
        assert f"{expected:.2%}" in view.readout.value
        assert trace(view.spectrum, "selected rank").x == (rank, rank)


def test_ratio_slider_sets_the_rank_and_one_keeps_dense(spectra):
    view = SpectrumView(spectra)
    name = spectra.names[1]  # k_proj: 32 × 64
    view.layer.value = name
    row = spectra.layer(name)
    view.ratio.value = 0.3
    rank = math.floor(0.3 * row["d_in"] * row["d_out"] / (row["d_in"] + row["d_out"]))
    assert view.rank.value == rank and view.current["rank"] == rank
    assert view.current["energy"] == pytest.approx(kept_energy(spectra, name, rank))
    view.ratio.value = 1.0
    assert view.current == {
        "layer": name,
        "rank": None,
        "energy": 1.0,
        "error": 0.0,
        "params": row["d_out"] * row["d_in"],
        "share": 1.0,
    }
    assert "kept dense" in view.readout.value


def test_layer_switch_redraws_both_spectra(spectra):
    view = SpectrumView(spectra)
    name = spectra.names[6]  # down_proj: 64 values, and a different spectrum from layer 0
    view.layer.value = name
    for kind, label in (("plain", "plain σ(W)"), ("whitened", "whitened σ(W S)")):
        s = spectra.spectrum(name, kind).double().numpy()
        np.testing.assert_allclose(trace(view.spectrum, label).y, s / s[0], rtol=1e-6)
    plan = spectra.layer(name)["rank"]
    assert trace(view.spectrum, "plan rank").x == (plan, plan)


def cells(view, name: str) -> list[float]:
    """A summary heatmap's values, one per layer in the spectra's row order (block_grid's cells)."""
    z = trace(view.summary, name).z
    return [z[i][j] for i, j in block_grid(view.spectra.rows)[2]]


def test_summary_heatmap_has_one_cell_per_layer_and_no_overlapping_labels(spectra):
    labels, columns, cell = block_grid(spectra.rows)
    assert len(set(cell)) == len(spectra.rows)  # every layer its own cell
    assert columns == list(dict.fromkeys(r["kind"] for r in spectra.rows))
    assert labels == [f"block {b}" for b in sorted({r["block"] for r in spectra.rows})]
    fig = kept_energy_figure(spectra)
    assert [t.name for t in fig.data] == ["built plan"]
    dense = [r for r in spectra.rows if r["rank"] is None]
    text = trace(fig, "built plan").text
    assert dense and all(text[i][j] == "dense" for (i, j), r in zip(cell, spectra.rows) if r["rank"] is None)


def test_summary_shows_plan_rows_and_live_uniform_ratio(spectra):
    view = SpectrumView(spectra, ratio=0.5)
    assert cells(view, "built plan") == pytest.approx([r["energy_kept"] for r in spectra.rows])
    before = cells(view, "uniform ρ")
    view.ratio.value = 0.2
    after = cells(view, "uniform ρ")
    expected = [
        kept_energy(spectra, r["name"], math.floor(0.2 * r["d_in"] * r["d_out"] / (r["d_in"] + r["d_out"])))
        for r in spectra.rows
    ]
    assert after == pytest.approx(expected, rel=1e-9)
    assert all(a < b for a, b in zip(after, before))  # fewer parameters keep strictly less energy here


def test_rank_slider_moves_the_summary_to_the_new_ratio(spectra):
    view = SpectrumView(spectra, ratio=0.5)
    view.layer.value = spectra.names[4]  # a gate projection: rank 5 is about 11% of its parameters
    view.rank.value = 5
    rho = view.ratio.value
    assert rho == pytest.approx(round(view.current["share"], 2)) and rho != 0.5
    expected = [
        kept_energy(spectra, r["name"], max(1, math.floor(rho * r["d_in"] * r["d_out"] / (r["d_in"] + r["d_out"]))))
        for r in spectra.rows
    ]
    assert cells(view, "uniform ρ") == pytest.approx(expected, rel=1e-9)
    assert f"ρ = {rho:.2f}" in view.summary.layout.title.text


def test_opens_on_the_rank_the_run_planned(spectra, run_dir):
    from emloc_nb.widgets import Dashboard

    assert any(r["rank"] is None for r in spectra.rows)  # the tiny run keeps one layer dense
    for row in spectra.rows:
        view = SpectrumView(spectra, layer=row["name"])
        assert view.current["rank"] == row["rank"]  # None: kept dense
        if row["rank"] is None:
            assert view.ratio.value == 1.0 and "kept dense" in view.readout.value
        else:
            assert trace(view.spectrum, "selected rank").x == trace(view.spectrum, "plan rank").x == (row["rank"],) * 2
            assert trace(view.energy, "selected").x == (row["rank"],)
    least = min((r for r in spectra.rows if r["rank"] is not None), key=lambda r: r["energy_kept"])
    assert Dashboard(run_dir).view("Spectra").current["rank"] == least["rank"]


def test_opens_on_the_compressed_layer_that_keeps_the_least_energy(spectra):
    rows = spectra.rows
    least = min((r for r in rows if r["rank"] is not None), key=lambda r: r["energy_kept"])
    view = SpectrumView(spectra)
    assert view.layer.value == least["name"] != rows[0]["name"]  # the rule, not model order, picks it
    assert view.current["energy"] == pytest.approx(least["energy_kept"]) and least["energy_kept"] < 1.0
    assert all(view.current["energy"] <= r["energy_kept"] + 1e-6 for r in rows)  # no layer keeps less
    assert SpectrumView(spectra, layer=rows[0]["name"]).layer.value == rows[0]["name"]  # an explicit layer wins


def test_an_uninformative_first_layer_is_not_the_default(spectra):
    # As on SmolLM2: layer 0's q_proj keeps all its energy (dense here), while others keep less.
    from emloc_nb.spectra import SpectrumTable

    rows = [dict(r) for r in spectra.rows]
    rows[0].update(rank=None, dense=True, energy_kept=1.0)
    view = SpectrumView(SpectrumTable(rows, spectra.spectra, spectra.skipped))
    assert view.current["energy"] < 1.0 and view.layer.value != rows[0]["name"]


def test_heatmap_colours_span_the_values_shown_and_the_title_fits(spectra):
    fig = kept_energy_figure(spectra, ratio=0.5)
    shown = [r["energy_kept"] for r in spectra.rows] + spectra.energy_at_ratio(0.5)
    for heat in fig.data:  # one scale for both panels, from the lowest value shown to 1
        assert heat.zmin == pytest.approx(min(shown)) and heat.zmax == 1
    title = fig.layout.title.text
    assert len(title.split("<br>")[0]) <= 60  # the first line is short; the details go on a second, smaller one
    assert "ρ = 0.50" in title and f"{min(shown):.3f}" in title
    view = SpectrumView(spectra, ratio=0.5)
    view.ratio.value = 0.1  # the scale follows the uniform ρ's lower values
    low = min([r["energy_kept"] for r in spectra.rows] + spectra.energy_at_ratio(0.1))
    assert low < min(shown) and all(h.zmin == pytest.approx(low) for h in view.summary.data)
