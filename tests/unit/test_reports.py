"""Every report has the same shape: save(path, overwrite=) / load(path), rows, to_frame(), layer(name)."""

import math

import pytest
import torch

from emloc_nb import EmlocError
from emloc_nb.calibration import CalibrationStats, InputStats
from emloc_nb.correction_report import CorrectionReport
from emloc_nb.emulator_drift import DriftReport
from emloc_nb.evaluation import EvalResult
from emloc_nb.reports import LayerReport, Report
from emloc_nb.spectra import SpectrumTable

LAYER = "model.layers.0.mlp.up_proj"


def _reports() -> list[Report]:
    stats = CalibrationStats(
        {
            LAYER: InputStats(
                torch.eye(3, dtype=torch.float64) * 4,
                torch.ones(3, dtype=torch.float64),
                torch.ones(3, dtype=torch.float64),
                4,
                [LAYER, "model.layers.0.mlp.gate_proj"],
            )
        },
        "abc",
        2,
    )
    row = {
        "name": LAYER,
        "block": 0,
        "kind": "up_proj",
        "d_out": 4,
        "d_in": 3,
        "rank": 1,
        "dense": False,
        "reason": "uniform",
        "params_kept": 0.5,
        "energy_kept": 0.9,
        "predicted_error": 0.3,
        "whitening": "cholesky",
    }
    spectra = SpectrumTable(
        [row], {LAYER: {"plain": torch.tensor([3.0, 1.0, 0.5]), "whitened": torch.tensor([2.0, 1.0, 0.1])}}
    )
    drift = DriftReport(
        [{"name": LAYER, "block": 0, "kind": "up_proj", "rank": 1, "predicted_error": 0.3, "measured_error": 0.4}],
        [{"block": 0, "cosine": 0.99}],
        {"kl": 0.1},
        [],
    )
    correction = CorrectionReport(
        3.0,
        [{"name": LAYER, "block": 0, "kind": "up_proj", "lora_rank": 2, "scaling": 2.0, "d_norm": 0.5, "b_norm": 1.0}],
        {
            LAYER: {
                "b_mean": torch.tensor([1.0, 0.1], dtype=torch.float64),
                "d_mean": torch.tensor([0.2, 1.0], dtype=torch.float64),
                "valid": torch.tensor([True, True]),
                "d_norm2": torch.tensor([0.04, 1.0], dtype=torch.float64),
                "kappa": torch.tensor([1.0, 0.3], dtype=torch.float64),
            }
        },
        "clamp",
        {
            "token_ids": [5, 9],
            "tokens": ["yes", "no"],
            "bias": [-1.0, 0.5],
            "target": [0.4, 0.5],
            "before": [0.6, 0.3],
            "after": [0.4, 0.5],
        },
    )
    evaluation = EvalResult(0.5, 0.7, 2, ["yes", "no"], ["yes", "yes"], ["yes", "no"], [[-0.1, -2.0], [-3.0, -0.2]])
    return [stats, spectra, drift, correction, evaluation]


@pytest.mark.parametrize("report", _reports(), ids=lambda r: type(r).__name__)
def test_every_report_round_trips_and_refuses_to_overwrite_by_default(report, tmp_path):
    path = report.save(tmp_path / "report")
    assert {f"{report.kind}.json", "manifest.json"} <= {p.name for p in path.iterdir()}
    loaded = type(report).load(path)
    assert loaded.rows == report.rows and len(report.rows) > 0
    frame = report.to_frame()
    assert len(frame) == len(report.rows)
    with pytest.raises(EmlocError, match="overwrite=True"):
        report.save(path)
    report.save(path, overwrite=True)
    if isinstance(report, (LayerReport, CalibrationStats)):
        assert report.layer(LAYER) is not None
    if isinstance(report, LayerReport):
        assert frame.index.name == "name" and report.names == [LAYER]
        with pytest.raises(EmlocError, match="not a layer"):
            report.layer("model.layers.9.mlp.up_proj")


def test_loading_a_report_of_another_kind_is_refused(tmp_path):
    drift = _reports()[2]
    drift.save(tmp_path / "d")
    (tmp_path / "d" / "drift.json").rename(tmp_path / "d" / "evaluation.json")
    with pytest.raises(EmlocError, match="holds a 'drift' artifact, not 'evaluation'"):
        EvalResult.load(tmp_path / "d")


def test_eval_rows_are_one_per_example_with_the_prediction_and_its_scores():
    result = _reports()[4]
    assert result.rows == [
        {
            "example": 0,
            "answer": "yes",
            "prediction": "yes",
            "correct": True,
            "score:yes": -0.1,
            "score:no": -2.0,
            "margin": pytest.approx(1.9),
        },
        {
            "example": 1,
            "answer": "yes",
            "prediction": "no",
            "correct": False,
            "score:yes": -3.0,
            "score:no": -0.2,
            "margin": pytest.approx(-2.8),
        },
    ]
    assert result.prediction_counts() == {"yes": 1, "no": 1}
    assert result.balanced_accuracy == 0.5  # only "yes" is in the answers: its recall
    assert math.isnan(result.auc)  # one class only: nothing to rank against
    assert result.mean_margin == pytest.approx((1.9 - 2.8) / 2)


def test_calibration_layer_is_the_input_a_layer_reads():
    stats = _reports()[0]
    assert stats.layer("model.layers.0.mlp.gate_proj") is stats.inputs[LAYER]
    assert stats.rows[0]["input"] == LAYER and stats.to_frame().shape == (1, 9)


def test_the_correction_report_is_built_once():
    report = _reports()[3]
    assert report.rows == report.rows_at(3.0) and report.layer(LAYER)["kappa_mean"] == report.rows[0]["kappa_mean"]
    assert "clamped" not in report.layers[0]  # the facts that do not depend on L are left as given
