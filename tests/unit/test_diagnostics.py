"""The measurements behind notebook 04: the correction toy, the emulator's error by direction, label shift."""

from __future__ import annotations

import math

import pytest
import torch

from emloc_nb.diagnostics import (
    class_recalls,
    correction_toy,
    emulator_errors,
    label_shift,
    layer_errors,
    shifted_accuracy,
)
from emloc_nb.errors import EmlocError
from emloc_nb.evaluation import EvalResult
from emloc_nb.lora import load_adapter, lora_factors


def test_the_toy_correction_hurts_a_lora_that_learned_only_the_task_and_helps_one_that_undid_the_emulator():
    error = {(r["setting"], r["clamp"]): r["error"] for r in correction_toy()}
    assert error[("only the task", 0.0)] < 1e-9 < 0.1 < error[("only the task", math.inf)]
    assert error[("undoes W_E", math.inf)] < 1e-9 < 0.1 < error[("undoes W_E", 0.0)]


def test_an_emulator_wrong_only_off_the_inputs_has_no_error_on_their_top_directions():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 6, generator=g, dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64)).Q
    c = q @ torch.diag(torch.tensor([1e-4, 1e-3, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)) @ q.T
    bottom = q[:, :2]
    w_e = w - w @ bottom @ bottom.T  # exact on the top four eigenvectors, blind along the bottom two
    errors = emulator_errors(w, w_e, q[:, -2:].T, c)  # a LoRA whose subspace is the top two eigenvectors
    assert errors["inputs' top r eigenvectors"] < 1e-12 and errors["the LoRA's subspace"] < 1e-12
    assert errors["inputs' bottom r eigenvectors"] == pytest.approx(1.0)  # W_E drops them entirely
    assert 0 < errors["held-out inputs"] < 0.05 < errors["r random directions"]
    assert set(emulator_errors(w, w, q[:, -2:].T, c).values()) == {0.0}
    with pytest.raises(EmlocError, match="Shapes disagree"):
        emulator_errors(w, w_e, q[:, -2:], c)


def test_layer_errors_cover_every_trained_layer(tiny_run):
    original, _ = tiny_run.original()
    emulator = tiny_run.emulator()
    tuned = load_adapter(emulator.model, tiny_run.adapter_dir("emulator"))
    try:
        factors = lora_factors(tuned)
    finally:
        tuned.unload()
    rows = layer_errors(original, emulator.model, factors, tiny_run.calibration("heldout"))
    assert [r["name"] for r in rows] == list(factors)
    assert all(0 <= v < math.inf for r in rows for k, v in r.items() if k != "name")


def test_shifted_accuracy_is_the_measured_accuracy_at_the_test_share_and_a_recall_at_the_ends():
    answers = ["pos"] * 6 + ["neg"] * 4
    predictions = ["pos"] * 5 + ["neg"] + ["neg"] * 3 + ["pos"]
    result = EvalResult(0.8, 0.5, 10, predictions, answers, ["pos", "neg"], [[0.0, -1.0]] * 10)
    assert class_recalls(result) == {"pos": 5 / 6, "neg": 3 / 4}
    assert shifted_accuracy(result, {"pos": 0.6, "neg": 0.4}) == pytest.approx(result.accuracy)
    assert shifted_accuracy(result, {"pos": 1.0}) == pytest.approx(5 / 6)
    with pytest.raises(EmlocError, match="sum to 1"):
        shifted_accuracy(result, {"pos": 0.8, "neg": 0.8})
    with pytest.raises(EmlocError, match="Unknown choice"):
        shifted_accuracy(result, {"yes": 1.0})


def test_label_shift_gives_each_result_at_each_share():
    result = EvalResult(0.5, 0.5, 4, ["a", "a", "a", "b"], ["a", "b", "a", "b"], ["a", "b"], [[0.0, -1.0]] * 4)
    rows = label_shift({"x": result}, [0.0, 0.5, 1.0])
    assert [r["x"] for r in rows] == [pytest.approx(0.5), pytest.approx(0.75), pytest.approx(1.0)]
    with pytest.raises(EmlocError, match="two-choice"):
        label_shift({"gen": EvalResult(1.0, 0.1, 1, ["x"], ["x"])}, [0.5])
