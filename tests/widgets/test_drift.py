"""DriftView: per-layer errors grouped two ways, block cosines, token KL as escaped coloured text."""

from __future__ import annotations

import re

import pytest

from emloc_nb.emulator_drift import DriftReport
from emloc_nb.widgets import DriftView
from emloc_nb.widgets.plots.common import trace
from emloc_nb.widgets.tokens import readable_tokens, token_kl_html


def mean_by(rows, key, value):
    """{group: mean of `value` over the rows of the group}, the groups in first-seen order."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(str(r[key]), []).append(r[value])
    return {g: sum(v) / len(v) for g, v in groups.items()}


def test_layer_errors_are_block_means_and_regroup_by_kind(drift_report):
    rows = drift_report.rows
    view = DriftView(drift_report)
    measured = trace(view.layers, "measured (held-out)")
    blocks = mean_by(rows, "block", "measured_error")
    assert list(measured.x) == list(blocks) == ["0", "1"]  # one bar per block, not one per layer
    assert list(measured.y) == pytest.approx(list(blocks.values()))
    predicted = mean_by(rows, "block", "predicted_error")
    assert list(trace(view.layers, "predicted (calibration)").y) == pytest.approx(list(predicted.values()))
    assert all(r["name"].split("layers.", 1)[1] in measured.hovertext[r["block"]] for r in rows)  # every layer
    assert "mean over its layers" in view.layers.layout.xaxis.title.text
    view.group.value = "kind"
    kinds = mean_by(rows, "kind", "measured_error")
    assert list(measured.x) == list(kinds) and len(kinds) == 7
    assert list(measured.y) == pytest.approx(list(kinds.values()))


def test_opens_on_the_layer_with_the_largest_measured_error(drift_report):
    rows = drift_report.rows
    worst = max(rows, key=lambda r: r["measured_error"])
    assert worst["name"] != rows[0]["name"]  # the rule, not model order, picks it here
    view = DriftView(drift_report)
    assert view.layer.value == worst["name"]
    assert worst["name"] in view.detail.value and f"{worst['measured_error']:.4f}" in view.detail.value
    assert f"1 of {len(rows)} by measured error" in view.detail.value
    view.layer.value = rows[0]["name"]
    assert f"{rows[0]['measured_error']:.4f}" in view.detail.value
    assert DriftView(drift_report, layer=rows[3]["name"]).layer.value == rows[3]["name"]  # an explicit layer wins


def test_block_cosine_and_summary(drift_report):
    view = DriftView(drift_report)
    assert list(trace(view.cosine, "cosine").y) == [b["cosine"] for b in drift_report.blocks]
    text = view.widget.children[0].value
    assert f"{drift_report.summary['ppl_emulator']:.4g}" in text and f"{drift_report.summary['kl']:.4g}" in text


def test_example_dropdown_colours_each_token(drift_report):
    view = DriftView(drift_report)
    assert len(view.example.options) == len(drift_report.tokens) > 1
    first = view.tokens.value
    view.example.value = 1
    assert view.tokens.value != first
    assert view.tokens.value.count("<span") == len(drift_report.tokens[1]["tokens"])


def test_results_table_only_when_given(drift_report, tiny_run):
    rows = tiny_run.results()
    with_results = DriftView(drift_report, rows).widget.children[-1].value
    assert all(r["description"] in with_results for r in rows)
    assert "Task accuracy" not in DriftView(drift_report).widget.children[-1].value


def test_tokens_are_readable_and_escaped():
    assert readable_tokens(["ĠHello", "Ċ", "Ã©", "▁word", "<|im_start|>"]) == [
        " Hello",
        "\n",
        "é",
        " word",
        "<|im_start|>",
    ]
    html = token_kl_html({"tokens": ["<script>", "Ġx", "Ċ"], "kl": [0.5, 1.0, 0.0]})
    assert "<script>" not in html and "&lt;script&gt;" in html
    alphas = [float(a) for a in re.findall(r"rgba\(214,39,40,([0-9.]+)\)", html)]
    assert alphas == [0.5, 1.0, 0.0]
    assert "↵<br>" in html


def test_report_without_token_examples_shows_a_note():
    report = DriftReport(
        [
            {
                "name": "model.layers.0.mlp.up_proj",
                "block": 0,
                "kind": "up_proj",
                "rank": 4,
                "predicted_error": 0.1,
                "measured_error": 0.2,
            }
        ],
        [{"block": 0, "cosine": 0.9}],
        {"kl": 0.1, "ppl_original": 2.0, "ppl_emulator": 2.2, "ppl_ratio": 1.1, "tokens": 3},
    )
    view = DriftView(report)
    assert "no token examples" in view.tokens.value and view.example.disabled


def test_layer_kinds_stay_apart_when_they_repeat_in_a_block():
    # GPT-2 has attn.c_proj and mlp.c_proj in every block: by kind, they must not be averaged into one bar.
    names = [
        f"transformer.h.{b}.{part}"
        for b in range(2)
        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    layers = [
        {
            "name": n,
            "block": int(n.split(".")[2]),
            "kind": n.rsplit(".", 1)[-1],
            "rank": 4,
            "predicted_error": 0.1,
            "measured_error": i / 10,
        }
        for i, n in enumerate(names)
    ]
    view = DriftView(DriftReport(layers, [], {}))
    measured = trace(view.layers, "measured (held-out)")
    assert list(measured.x) == ["0", "1"] and list(measured.y) == pytest.approx([0.15, 0.55])
    view.group.value = "kind"
    assert list(measured.x) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert list(measured.y) == pytest.approx([0.2, 0.3, 0.4, 0.5])
    assert view.layer.value == names[-1]
