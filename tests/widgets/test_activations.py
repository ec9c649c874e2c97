"""ActivationsView: the chosen input's channel statistics, outliers and eigen-spectrum, and the overview heatmap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emloc_nb.widgets import ActivationsView
from emloc_nb.widgets.plots.common import trace


def peaked_input(stats) -> str:
    return max(stats.inputs, key=lambda k: float(stats.inputs[k].abs_max.max() / stats.inputs[k].abs_max.median()))


def test_chosen_input_shows_its_own_statistics(stats):
    view = ActivationsView(stats)
    key = "model.layers.1.mlp.down_proj"
    view.select(key)
    s = stats.inputs[key]
    np.testing.assert_allclose(trace(view.channels, "max |x|").y, s.abs_max.numpy())
    np.testing.assert_allclose(trace(view.channels, "mean |x|").y, (s.abs_sum / s.tokens).numpy())
    eig = trace(view.eigen, "eigenvalues").y
    np.testing.assert_allclose(
        [v for v in eig if v is not None], [v for v in s.eigenvalues().tolist() if v > 0], rtol=1e-9
    )
    assert len(eig) == s.dim == 160
    assert f"{s.tokens} tokens seen" in view.info.value
    view.select("model.layers.0.self_attn.v_proj")  # a layer name selects the input it reads
    assert view.input.value == "model.layers.0.self_attn.q_proj"
    assert len(trace(view.eigen, "eigenvalues").y) == 64


def test_outlier_factor_marks_the_cores_outlier_channels(stats):
    view = ActivationsView(stats)
    key = peaked_input(stats)
    view.select(key)
    counts = []
    for factor in (2.0, 50.0):
        view.factor.value = factor
        expected = stats.inputs[key].outlier_channels(factor).tolist()
        assert list(trace(view.channels, "outliers").x) == expected
        counts.append(len(expected))
    assert counts[0] > 0 and counts[1] == 0  # the slider really changes what is marked


def test_block_dropdown_filters_the_inputs(stats):
    view = ActivationsView(stats)
    view.block.value = 1
    keys = [k for _, k in view.input.options]
    assert keys and all(".layers.1." in k for k in keys)
    assert view.input.value in keys and ".layers.1." in view.info.value


def test_heatmap_rows_are_inputs_and_first_bin_is_the_peak_over_median(stats):
    view = ActivationsView(stats)
    heat = view.heatmap.data[0]
    assert len(heat.z) == len(stats.inputs)
    for row, s in zip(heat.z, stats.inputs.values()):
        peak = s.abs_max.double()
        assert row[0] == pytest.approx(math.log10(float(peak.max() / peak.median())))
        assert list(row) == sorted(row, reverse=True)  # channels sorted, largest first


def test_eigenvalues_are_computed_once_per_input(stats, monkeypatch):
    input_stats = type(next(iter(stats.inputs.values())))
    computed = []
    eigenvalues = input_stats.eigenvalues

    def counted(self):
        computed.append(self)
        return eigenvalues(self)

    monkeypatch.setattr(input_stats, "eigenvalues", counted)
    view = ActivationsView(stats)
    first = view.input.value
    assert len(computed) == 1
    shown = trace(view.eigen, "eigenvalues").y
    view.factor.value = 2.0  # the outlier factor does not touch C
    assert len(computed) == 1 and trace(view.eigen, "eigenvalues").y == shown
    other = next(k for k in stats.inputs if k != first)
    view.select(other)
    assert len(computed) == 2 and len(trace(view.eigen, "eigenvalues").y) == stats.inputs[other].dim
    view.select(first)  # back to an input seen before: redrawn from the cache
    assert len(computed) == 2 and trace(view.eigen, "eigenvalues").y == shown


def test_opens_on_the_input_whose_largest_channel_stands_out_most(stats):
    key = peaked_input(stats)
    view = ActivationsView(stats)
    assert view.input.value == key and view.block.value == "all blocks"
    ratio = lambda s: float(s.abs_max.max() / s.abs_max.median())
    assert all(ratio(stats.inputs[key]) >= ratio(s) for s in stats.inputs.values())
    assert list(trace(view.channels, "max |x|").y) == pytest.approx(stats.inputs[key].abs_max.tolist())
    # An explicit layer wins: an input key, or a layer that reads one.
    first = next(iter(stats.inputs))
    assert ActivationsView(stats, layer=first).input.value == first
    assert ActivationsView(stats, layer="model.layers.0.self_attn.v_proj").input.value == (
        "model.layers.0.self_attn.q_proj"
    )
