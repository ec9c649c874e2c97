"""LoRA correction (EMLoC, Algorithm 1): move a LoRA trained on the emulator onto the original.

The LoRA ΔW = s · B A was fitted on top of W_E, not W. On the LoRA's input subspace
span(U_A), with Aᵀ = U_A Σ_A V_Aᵀ, we re-parametrise ΔW = B' A' (A' = U_Aᵀ,
B' = s · B V_A Σ_A) and subtract the original-vs-emulator discrepancy on that basis,
D = (W − W_E) U_A, clamped per column:

    κ_i = min(1, L · mean|B'_{:,i}| / mean|D_{:,i}|),   B_c = B' − D diag(κ),   A_c = A'.

With no clamp, (W + B_c A_c) x = (W_E + ΔW) x for x in span(U_A), and = W x for x ⊥ span(U_A).
The result is a standard peft adapter for the original model with the scaling folded in
(lora_alpha = r). Directions where A is zero are not in the LoRA's subspace and get no
correction, so a zero LoRA stays zero. L = 0 is the naive transfer, L = inf no clamp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from peft import LoraConfig
from torch import nn
from transformers.pytorch_utils import Conv1D

from .artifacts import FORMAT_VERSION, atomic_dir, check_fingerprint, write_json, write_tensors
from .calibration import CalibrationStats
from .config import CLAMP, check_value
from .drift import output_energy
from .emulator import Emulator
from .errors import EmlocError
from .lora import load_adapter, lora_factors
from .models import block_index, fingerprint, linear_weight
from .reports import LayerReport

_NULL_TOL = 1e-6  # singular values of A below this share of the largest span no LoRA direction


@dataclass
class LayerCorrection:
    """The corrected factors of one layer and what is needed to report on them."""

    a: torch.Tensor  # A_c = U_Aᵀ, (r, d_in)
    b: torch.Tensor  # B_c, (d_out, r)
    kappa: torch.Tensor  # (r,) clamp factors; 0 outside the LoRA's subspace
    b_mean: torch.Tensor  # mean|B'_{:,i}|
    d_mean: torch.Tensor  # mean|D_{:,i}|
    d: torch.Tensor  # D = (W − W_E) U_A
    b_prime: torch.Tensor  # B'
    valid: torch.Tensor  # bool (r,): directions inside the LoRA's input subspace


def clamp_factors(b_mean: torch.Tensor, d_mean: torch.Tensor, clamp: float) -> torch.Tensor:
    """κ_i = min(1, L · mean|B'_i| / mean|D_i|); a zero column of D needs no clamp (κ = 1)."""
    if math.isinf(clamp):
        return torch.ones_like(b_mean)
    ratio = clamp * b_mean / d_mean.clamp_min(torch.finfo(d_mean.dtype).tiny)
    return torch.where(d_mean > 0, ratio.clamp(max=1.0), torch.ones_like(ratio))


def correct_layer(
    w: torch.Tensor, w_e: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, clamp: float = 3.0
) -> LayerCorrection:
    """Algorithm 1 for one layer, in float64: W (d_out, d_in), W_E, A (r, d_in), B (d_out, r), ΔW = s·B A."""
    w, w_e, a, b = (t.detach().double().cpu() for t in (w, w_e, a, b))
    u_a, sigma, v_at = torch.linalg.svd(a.T, full_matrices=False)  # Aᵀ = U_A Σ_A V_Aᵀ
    valid = sigma > _NULL_TOL * sigma.max() if sigma.max() > 0 else torch.zeros_like(sigma, dtype=torch.bool)
    b_prime = scaling * b @ v_at.T * sigma  # s · B V_A Σ_A
    d = (w - w_e) @ u_a
    b_mean, d_mean = b_prime.abs().mean(0), d.abs().mean(0)
    kappa = clamp_factors(b_mean, d_mean, clamp) * valid
    return LayerCorrection(u_a.T.contiguous(), b_prime - d * kappa, kappa, b_mean, d_mean, d, b_prime, valid)


def error_terms(
    w: torch.Tensor, w_e: torch.Tensor, lc: LayerCorrection, covariance: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Quadratic-form terms giving, for any κ, the error against the fine-tuned emulator on held-out inputs.

    With Δ = W − W_E, U = U_A (valid columns) and C the held-out E[x xᵀ]:
      overall²  = tr(ΔCΔᵀ) − 2 κ·m + κᵀ Q κ,       m_i = ⟨(Δ C U)_i, D_i⟩,  Q = (UᵀCU) ∘ (DᵀD)
      subspace² = (1−κ)ᵀ Q (1−κ)                   (inputs projected onto span(U))
    and the reference norms of the fine-tuned emulator's output, overall and on the subspace.
    """
    c = covariance.double()
    w, w_e = w.detach().double().cpu(), w_e.detach().double().cpu()
    delta = w - w_e
    u = lc.a.T[:, lc.valid]
    d = lc.d[:, lc.valid]
    cu = c @ u
    tuned = w_e + lc.b_prime[:, lc.valid] @ u.T  # W_E + ΔW (ΔW lives on the valid directions)
    return {
        "a": output_energy(delta, c),
        "m": ((delta @ cu) * d).sum(0),
        "q": (u.T @ cu) * (d.T @ d),
        "ref_all": output_energy(tuned, c),
        "ref_sub": output_energy(tuned @ u, u.T @ cu),
    }


def _errors(terms: dict[str, torch.Tensor], kappa: torch.Tensor) -> tuple[float, float]:
    q = terms["q"]
    k = kappa.double()
    overall = float(terms["a"] - 2 * k @ terms["m"] + k @ q @ k)
    sub = float((1 - k) @ q @ (1 - k))
    rel = lambda sq, ref: math.sqrt(max(sq, 0.0) / float(ref)) if float(ref) > 0 else 0.0
    return rel(overall, terms["ref_all"]), rel(sub, terms["ref_sub"])


@dataclass
class CorrectionReport(LayerReport):
    """Per layer: ‖D‖, κ, clamped columns, and the error against the fine-tuned emulator before/after.

    `layers` holds what does not depend on L (name, LoRA rank, scaling, ‖D‖, ‖B′‖) and
    `stats` the stored terms; `rows` is the layer table at the report's own clamp and
    `rows_at(L)` the same for any L, both computed from those alone.
    """

    kind = "correction"

    clamp: float
    layers: list[dict]  # name, block, kind, lora_rank, scaling, d_norm, b_norm
    stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # b_mean, d_mean, valid + error terms

    @cached_property
    def rows(self) -> list[dict]:
        return self.rows_at(self.clamp)

    def kappa_at(self, name: str, clamp: float) -> torch.Tensor:
        s = self.stats[name]
        return clamp_factors(s["b_mean"], s["d_mean"], clamp) * s["valid"]

    def errors_at(self, name: str, clamp: float) -> dict:
        """Relative error against the fine-tuned emulator for any L (L = 0: the naive transfer)."""
        s = self.stats[name]
        if "q" not in s:
            raise EmlocError("This report has no held-out statistics. Pass heldout= to correct_lora to get errors.")
        valid = s["valid"].bool()
        overall, sub = _errors(s, self.kappa_at(name, clamp)[valid])
        return {"error_all": overall, "error_subspace": sub}

    def rows_at(self, clamp: float) -> list[dict]:
        """The layer table for any L, from the stored terms alone ("before" is the naive transfer, L = 0)."""
        rows = []
        for row in self.layers:
            kappa = self.kappa_at(row["name"], clamp)
            valid = self.stats[row["name"]]["valid"].bool()
            new = {
                **row,
                "clamped": int((kappa[valid] < 1).sum()),
                "kappa_mean": float(kappa[valid].mean()) if valid.any() else 0.0,
            }
            if "q" in self.stats[row["name"]]:
                before, after = self.errors_at(row["name"], 0.0), self.errors_at(row["name"], clamp)
                new.update(
                    before_all=before["error_all"],
                    before_subspace=before["error_subspace"],
                    after_all=after["error_all"],
                    after_subspace=after["error_subspace"],
                )
            rows.append(new)
        return rows

    def _tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.stats

    def _config(self) -> dict:
        return {"clamp": self.clamp}

    def _metadata(self) -> dict:
        return {"clamp": self.clamp, "layers": self.layers}

    @classmethod
    def _from_saved(cls, meta: dict, tensors: dict) -> CorrectionReport:
        return cls(meta["clamp"], meta["layers"], tensors)


@torch.no_grad()
def correct_lora(
    original: nn.Module,
    emulator: Emulator,
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    clamp: float = 3.0,
    heldout: CalibrationStats | None = None,
    overwrite: bool = False,
) -> CorrectionReport:
    """Write a corrected, standard peft adapter for `original` to `output_dir`; return the report.

    `adapter_dir` must hold a LoRA trained on this `emulator`, which must have been
    built from `original` (both are checked by fingerprint). `heldout` (statistics of
    the original's layer inputs on held-out examples) adds before/after errors.
    """
    clamp = check_value(clamp, float, "clamp", CLAMP)
    original_fp = fingerprint(original)
    check_fingerprint(emulator.original_fingerprint, original_fp, artifact="The emulator", model="the original model")
    if heldout is not None:
        check_fingerprint(
            heldout.model_fingerprint, original_fp, artifact="The held-out statistics", model="the original model"
        )
    peft_emulator = load_adapter(emulator.model, adapter_dir)  # refuses an adapter trained on another base
    try:
        factors = lora_factors(peft_emulator)
        config = peft_emulator.peft_config[peft_emulator.active_adapter]
        trained = {
            n.removeprefix("base_model.model.").split(".lora_")[0]
            for n, _ in peft_emulator.named_parameters()
            if ".lora_" in n
        }
    finally:
        peft_emulator.unload()
    # load_adapter has refused DoRA, trained biases and modules_to_save already (peft defaults only).
    if trained - set(factors):
        raise EmlocError(
            f"The adapter at {adapter_dir} puts LoRA on non-linear layers {sorted(trained - set(factors))[:3]}, "
            "which the correction cannot carry over to the original. Train a plain LoRA on linear layers instead."
        )
    originals, emulated = dict(original.named_modules()), dict(emulator.model.named_modules())

    tensors, rows, stats, ranks = {}, [], {}, {}
    for name, (a, b, s) in factors.items():
        if name not in originals:
            raise EmlocError(
                f"The adapter targets {name}, which the original model lacks. Correct it against the "
                "original model its emulator was built from."
            )
        w, w_e = linear_weight(originals[name]), linear_weight(emulated[name])
        if tuple(w.shape) != (b.shape[0], a.shape[1]) or w.shape != w_e.shape:
            raise EmlocError(
                f"Shapes disagree at {name}: W {tuple(w.shape)}, W_E {tuple(w_e.shape)}, "
                f"B·A {(b.shape[0], a.shape[1])}. The adapter does not belong to this model."
            )
        if not (torch.isfinite(w).all() and torch.isfinite(w_e).all()):
            raise EmlocError(
                f"The {'original' if not torch.isfinite(w).all() else 'emulator'} weights of {name} are not finite "
                "(NaN/Inf). Reload the model in float32, or rebuild the emulator."
            )
        lc = correct_layer(w, w_e, a, b, s, clamp)
        if not (torch.isfinite(lc.a).all() and torch.isfinite(lc.b).all()):
            raise EmlocError(
                f"The corrected LoRA of {name} is not finite (NaN/Inf). Check the adapter and the emulator."
            )
        dtype = originals[name].weight.dtype
        tensors[f"base_model.model.{name}.lora_A.weight"] = lc.a.to(dtype)
        tensors[f"base_model.model.{name}.lora_B.weight"] = lc.b.to(dtype)
        ranks[name] = a.shape[0]
        stats[name] = {"b_mean": lc.b_mean, "d_mean": lc.d_mean, "valid": lc.valid}
        if heldout is not None:
            stats[name].update(error_terms(w, w_e, lc, heldout.layer(name).covariance))
        rows.append(
            {
                "name": name,
                "block": block_index(name),
                "kind": name.rsplit(".", 1)[-1],
                "lora_rank": a.shape[0],
                "scaling": s,
                "d_norm": float(lc.d.norm()),
                "b_norm": float(lc.b_prime.norm()),
            }
        )

    r_values = set(ranks.values())
    r = max(r_values)
    corrected = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(ranks),
        use_rslora=False,
        lora_dropout=0.0,
        bias="none",
        task_type=config.task_type,
        fan_in_fan_out=any(isinstance(originals[n], Conv1D) for n in ranks),
        rank_pattern={n: k for n, k in ranks.items() if k != r},
        alpha_pattern={n: k for n, k in ranks.items() if k != r},
    )
    with atomic_dir(
        output_dir,
        overwrite=overwrite,
        kind="corrected_adapter",
        model_fingerprint=original_fp,
        config={"clamp": clamp},
    ) as tmp:
        corrected.save_pretrained(str(tmp))
        write_tensors(tmp / "adapter_model.safetensors", tensors)
        write_json(
            tmp / "emloc.json",
            {
                "format_version": FORMAT_VERSION,
                "kind": "corrected_adapter",
                "base_fingerprint": original_fp,
                "emulator_fingerprint": emulator.fingerprint,
                "clamp": clamp,
                "source_adapter": str(adapter_dir),
            },
        )
    return CorrectionReport(clamp, rows, stats)
