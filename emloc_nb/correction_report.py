"""What a correction did, per layer and for any clamp L: the CorrectionReport."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from .errors import EmlocError
from .layer_correction import clamp_factors, kappa_errors
from .reports import LayerReport


@dataclass
class CorrectionReport(LayerReport):
    """Per layer: ‖D‖, κ, clamped columns, the correction's share of the adapter, the LoRA subspace's
    overlap with its initialisation and with the input's top eigenvectors, and the error against the
    fine-tuned emulator before/after; plus the prior correction, if any.

    `layers` holds what does not depend on L and `stats` the stored terms; `rows` is the layer table
    as the adapter was written (its own κ), and `rows_at(L)` the table for the paper's clamp at any L,
    both computed from those alone.
    """

    kind = "correction"

    clamp: float
    layers: list[dict]  # name, block, kind, lora_rank, scaling, d_norm, b_norm, init_overlap, data_overlap
    stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # per layer: see correct_lora
    kappa_mode: str = "clamp"
    prior: dict | None = None  # PriorFit.to_dict(), when the adapter carries the prior correction

    @cached_property
    def rows(self) -> list[dict]:
        return [self._row(row, self.stats[row["name"]]["kappa"]) for row in self.layers]

    def kappa_at(self, name: str, clamp: float) -> torch.Tensor:
        """The paper's κ of layer `name` at clamp L."""
        s = self.stats[name]
        return clamp_factors(s["b_mean"], s["d_mean"], clamp) * s["valid"]

    def errors_at(self, name: str, clamp: float) -> dict:
        """Relative error against the fine-tuned emulator for any L (L = 0: the naive transfer)."""
        return self._errors(name, self.kappa_at(name, clamp))

    def _errors(self, name: str, kappa: torch.Tensor) -> dict:
        s = self.stats[name]
        if "q" not in s:
            raise EmlocError("This report has no held-out statistics. Pass heldout= to correct_lora to get errors.")
        overall, sub = kappa_errors(s, kappa[s["valid"].bool()])
        return {"error_all": overall, "error_subspace": sub}

    def rows_at(self, clamp: float) -> list[dict]:
        """The layer table for the paper's clamp at any L ("before" is the naive transfer, L = 0)."""
        return [self._row(row, self.kappa_at(row["name"], clamp)) for row in self.layers]

    def _row(self, row: dict, kappa: torch.Tensor) -> dict:
        s = self.stats[row["name"]]
        valid = s["valid"].bool()
        correction = float((s["d_norm2"] * kappa.double() ** 2).sum().sqrt())
        new = {
            **row,
            "clamped": int((kappa[valid] < 1).sum()),
            "kappa_mean": float(kappa[valid].mean()) if valid.any() else 0.0,
            # how much of the corrected adapter is the correction −Dκ rather than the LoRA B′
            "correction_share": correction / (correction + row["b_norm"]) if correction + row["b_norm"] > 0 else 0.0,
        }
        if "q" in s:
            before, after = self._errors(row["name"], torch.zeros_like(kappa)), self._errors(row["name"], kappa)
            new.update(
                before_all=before["error_all"],
                before_subspace=before["error_subspace"],
                after_all=after["error_all"],
                after_subspace=after["error_subspace"],
            )
        return new

    def _tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.stats

    def _config(self) -> dict:
        return {"clamp": self.clamp, "kappa": self.kappa_mode, "prior": self.prior is not None}

    def prior_error(self) -> float | None:
        """The largest gap between the corrected model's mean prior and its target on the support; None: no prior."""
        if self.prior is None:
            return None
        return max(abs(a - t) for a, t in zip(self.prior["after"], self.prior["target"], strict=True))

    def _metadata(self) -> dict:
        return {"clamp": self.clamp, "kappa_mode": self.kappa_mode, "layers": self.layers, "prior": self.prior}

    @classmethod
    def _from_saved(cls, meta: dict, tensors: dict) -> CorrectionReport:
        return cls(meta["clamp"], meta["layers"], tensors, meta["kappa_mode"], meta["prior"])
