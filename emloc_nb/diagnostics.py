"""When does the paper's correction help? The measurements notebook 04 teaches with.

- `correction_toy`: one small layer, where the correction helps or hurts depending on
  whether the LoRA learned to undo the emulator's error;
- `emulator_errors` / `layer_errors`: the emulator's relative error along different sets
  of input directions of a real layer (the inputs themselves, their top and bottom
  eigenvectors, the LoRA's subspace, random directions);
- `shifted_accuracy`: a choice task's accuracy at another class share, from stored results.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .calibration import CalibrationStats
from .errors import EmlocError
from .evaluation import EvalResult
from .layer_correction import correct_layer
from .structure import linear_weight

TOY_SETTINGS = {
    "only the task": "training inputs where the emulator is exact: the LoRA learns only the task",
    "undoes W_E": "training inputs everywhere: the LoRA also learns to undo the emulator's error",
}


def correction_toy(clamps=(0.0, 1.0, 3.0, math.inf), *, d: int = 6, r: int = 2, seed: int = 0) -> list[dict]:
    """The transfer's error for each setting of TOY_SETTINGS and each clamp L, against the original plus the task.

    One d × d layer W; an emulator W_E exact on an r-dimensional subspace S and wrong off it (what a
    whitened emulator aims for); a task that asks for a change T the LoRA can express; a LoRA whose A
    stays at its random initialisation and whose B is what training converges to, the least-squares
    fit of (W_E + B A) x ≈ (W + T) x over the training inputs. The error is ‖(W′ − W − T) x‖ / ‖T x‖
    over inputs from where training saw them.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    w = randn(d, d)
    s = torch.linalg.qr(randn(d, r)).Q
    w_e = w - randn(d, d) @ (torch.eye(d, dtype=torch.float64) - s @ s.T)
    a = randn(r, d)
    t = randn(d, r) @ a
    second_moments = {"only the task": s @ s.T, "undoes W_E": torch.eye(d, dtype=torch.float64)}
    rows = []
    for setting, c in second_moments.items():
        b = (w + t - w_e) @ c @ a.T @ torch.linalg.pinv(a @ c @ a.T)
        for clamp in clamps:
            lc = correct_layer(w, w_e, a, b, 1.0, clamp=clamp)
            gap = w + lc.b @ lc.a - (w + t)
            error = math.sqrt(torch.trace(gap @ c @ gap.T) / torch.trace(t @ c @ t.T))
            rows.append({"setting": setting, "clamp": clamp, "error": error})
    return rows


def emulator_errors(w: torch.Tensor, w_e: torch.Tensor, a: torch.Tensor, covariance: torch.Tensor, *, seed: int = 0):
    """The emulator's relative error ‖(W − W_E) U‖ / ‖W U‖ along r orthonormal directions U of each kind,
    and on inputs with second moment C: √(tr(ΔCΔᵀ) / tr(WCWᵀ)). r is the LoRA's rank (A is r × d_in)."""
    w, w_e, a, c = (t.detach().double().cpu() for t in (w, w_e, a, covariance))
    if w.shape != w_e.shape or a.shape[1] != w.shape[1] or c.shape != (w.shape[1], w.shape[1]):
        raise EmlocError(
            f"Shapes disagree: W {tuple(w.shape)}, W_E {tuple(w_e.shape)}, A {tuple(a.shape)}, C {tuple(c.shape)}. "
            "Pass one layer's weights, its LoRA's A and its input's second moment."
        )
    delta, r = w - w_e, a.shape[0]
    eigenvectors = torch.linalg.eigh(c).eigenvectors  # ascending eigenvalues
    g = torch.Generator().manual_seed(seed)

    def along(u: torch.Tensor) -> float:
        return float((delta @ u).norm() / (w @ u).norm())

    return {
        "held-out inputs": math.sqrt(max(float(torch.trace(delta @ c @ delta.T) / torch.trace(w @ c @ w.T)), 0.0)),
        "inputs' top r eigenvectors": along(eigenvectors[:, -r:]),
        "the LoRA's subspace": along(torch.linalg.qr(a.T).Q),
        "r random directions": along(torch.linalg.qr(torch.randn(w.shape[1], r, generator=g, dtype=w.dtype)).Q),
        "inputs' bottom r eigenvectors": along(eigenvectors[:, :r]),
    }


def layer_errors(original: nn.Module, emulator: nn.Module, factors: dict, heldout: CalibrationStats) -> list[dict]:
    """`emulator_errors` for every layer the LoRA trained (`factors`: lora.lora_factors of the tuned emulator)."""
    rows = []
    for name, (a, _, _) in factors.items():
        w, w_e = linear_weight(original.get_submodule(name)), linear_weight(emulator.get_submodule(name))
        rows.append({"name": name, **emulator_errors(w, w_e, a, heldout.layer(name).covariance)})
    return rows


def class_recalls(result: EvalResult) -> dict[str, float]:
    """Per choice: the share of the examples with that answer that were answered right."""
    if not result.choices:
        raise EmlocError("Class recalls need a choice task; this evaluation was scored by generation.")
    recalls = {}
    for choice in result.choices:
        hits = [p.strip() == a.strip() for p, a in zip(result.predictions, result.answers) if a.strip() == choice]
        recalls[choice] = sum(hits) / len(hits) if hits else math.nan
    return recalls


def shifted_accuracy(result: EvalResult, shares: dict[str, float]) -> float:
    """The accuracy on a test set whose answers have `shares` (choice -> share, summing to 1): Σ share · recall."""
    if abs(sum(shares.values()) - 1) > 1e-9 or any(v < 0 for v in shares.values()):
        raise EmlocError(f"shares={shares!r} must be non-negative and sum to 1, e.g. {{'positive': 0.8, ...}}.")
    recalls = class_recalls(result)
    unknown = sorted(set(shares) - set(recalls))
    if unknown:
        raise EmlocError(f"Unknown choice(s) {unknown} in shares. Choices: {', '.join(recalls)}.")
    return sum(share * recalls[c] for c, share in shares.items())


def label_shift(results: dict[str, EvalResult], positive_shares) -> list[dict]:
    """Each result's accuracy at each share of the first choice of a two-choice task, one row per share."""
    rows = []
    for share in positive_shares:
        row = {"first choice's share": share}
        for name, result in results.items():
            if not result.choices or len(result.choices) != 2:
                raise EmlocError(f"{name}: label shift here needs a two-choice task; it has {result.choices}.")
            first, second = result.choices
            row[name] = shifted_accuracy(result, {first: share, second: 1 - share})
        rows.append(row)
    return rows
