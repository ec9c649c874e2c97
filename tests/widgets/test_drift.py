"""DriftView: per-layer errors grouped two ways, block cosines, token KL as escaped coloured text."""

from __future__ import annotations

import re

from emloc_nb.emulator_drift import DriftReport
from emloc_nb.widgets import DriftView
from emloc_nb.widgets.plots.common import trace
from emloc_nb.widgets.tokens import readable_tokens, token_kl_html


def test_layer_errors_regroup_by_kind(drift_report):
    view = DriftView(drift_report)
    measured = trace(view.layers, "measured (held-out)")
    assert list(measured.y) == [r["measured_error"] for r in drift_report.rows]  # model order = block order
    assert list(trace(view.layers, "predicted (calibration)").y) == [r["predicted_error"] for r in drift_report.rows]
    view.group.value = "kind"
    groups, blocks = measured.x
    kinds = list(dict.fromkeys(r["kind"] for r in drift_report.rows))
    assert list(groups) == [k for k in kinds for _ in range(2)]
    by_name = {(r["kind"], str(r["block"])): r["measured_error"] for r in drift_report.rows}
    assert list(measured.y) == [by_name[(g, b)] for g, b in zip(groups, blocks)]


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


def test_layer_axis_stays_unique_when_kinds_repeat_in_a_block():
    # GPT-2 has attn.c_proj and mlp.c_proj in every block: bars must not collapse onto one category.
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
    for by in ("block", "kind"):
        view.group.value = by
        groups, labels = trace(view.layers, "measured (held-out)").x
        assert len(set(zip(groups, labels))) == len(names)
        assert sorted(trace(view.layers, "measured (held-out)").y) == [i / 10 for i in range(len(names))]
