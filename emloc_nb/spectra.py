"""The spectrum table: one row per compressible layer, with its raw singular values.

Rows hold what the emulator kept (rank, share of parameters, whitened energy,
predicted relative output error); `spectra` holds each layer's plain singular
values (of W) and whitened ones (of W S). Everything a rank slider needs (energy,
error and parameters at any rank or kept share ρ) is computed here from the stored
spectra alone, without the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .ranks import rank_for_ratio
from .reports import LayerReport


@dataclass
class SpectrumTable(LayerReport):
    kind = "spectra"

    rows: list[
        dict
    ]  # name, block, kind, d_out, d_in, rank, dense, reason, params_kept, energy_kept, predicted_error, whitening
    spectra: dict[str, dict[str, torch.Tensor]]  # name -> {"plain": σ(W), "whitened": σ(W S)}
    skipped: list[dict] = field(default_factory=list)  # linear layers left out, each with a reason

    def spectrum(self, name: str, kind: str = "whitened") -> torch.Tensor:
        """Singular values, largest first; the whitened ones fall back to plain when there were no statistics."""
        s = self.spectra[self.layer(name)["name"]]
        return s.get(kind, s["plain"])

    def cumulative_energy(self, name: str, kind: str = "whitened") -> torch.Tensor:
        """Share of Σσ² kept by the top r singular values, for r = 0 … n (float64)."""
        e = self.spectrum(name, kind).double() ** 2
        total = e.sum()
        if total <= 0:
            return torch.ones(len(e) + 1, dtype=torch.float64)
        return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(e, 0) / total])

    def energy_at(self, name: str, rank: int | None) -> float:
        """Share of the whitened energy ‖W S‖² kept by the top `rank` directions (None: dense)."""
        e = self.spectrum(name).double() ** 2
        return 1.0 if rank is None or rank >= len(e) else float(e[:rank].sum() / e.sum())

    def error_at(self, name: str, rank: int | None) -> float:
        """Predicted relative output error ‖(W − W_E) S‖_F / ‖W S‖_F of the whitened SVD at `rank`."""
        return max(0.0, 1.0 - self.energy_at(name, rank)) ** 0.5

    def params_at(self, name: str, rank: int | None) -> int:
        r = self.layer(name)
        return r["d_out"] * r["d_in"] if rank is None else rank * (r["d_out"] + r["d_in"])

    def rank_at_ratio(self, name: str, ratio: float) -> int | None:
        """The rank that keeps a share ρ of the layer's parameters (None: ρ ≥ 1 keeps it dense)."""
        r = self.layer(name)
        return None if ratio >= 1 else rank_for_ratio(r["d_out"], r["d_in"], ratio)

    def energy_at_ratio(self, ratio: float) -> list[float]:
        """Kept whitened energy of every layer (in row order) if each kept a share ρ of its parameters."""
        return [self.energy_at(r["name"], self.rank_at_ratio(r["name"], ratio)) for r in self.rows]

    def totals(self) -> dict:
        dense = sum(r["d_out"] * r["d_in"] for r in self.rows)
        kept = sum(self.params_at(r["name"], r["rank"]) for r in self.rows)
        return {
            "layers": len(self.rows),
            "compressed": sum(not r["dense"] for r in self.rows),
            "params_dense": dense,
            "params_kept": kept,
            "share_kept": kept / dense if dense else 1.0,
        }

    def _tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.spectra

    def _metadata(self) -> dict:
        return {"rows": self.rows, "skipped": self.skipped}

    @classmethod
    def _from_saved(cls, meta: dict, tensors: dict) -> SpectrumTable:
        return cls(meta["rows"], tensors, meta["skipped"])
