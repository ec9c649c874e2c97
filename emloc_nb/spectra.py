"""The spectrum table: one row per compressible layer, with its raw singular values.

Rows hold what the emulator kept (rank, share of parameters, whitened energy,
predicted relative output error); `spectra` holds each layer's plain singular
values (of W) and whitened ones (of W S). Everything a rank slider needs can be
recomputed from the stored spectra alone, without the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .artifacts import FORMAT_VERSION, atomic_dir, read_grouped, read_json, write_grouped, write_json
from .errors import EmlocError


@dataclass
class SpectrumTable:
    rows: list[dict]  # name, block, kind, d_out, d_in, rank, dense, reason, params_kept, energy_kept, predicted_error, whitening
    spectra: dict[str, dict[str, torch.Tensor]]  # name -> {"plain": σ(W), "whitened": σ(W S)}
    skipped: list[dict] = field(default_factory=list)  # linear layers left out, each with a reason

    def row(self, name: str) -> dict:
        for r in self.rows:
            if r["name"] == name:
                return r
        raise EmlocError(f"{name!r} is not in the spectrum table. Layers: {[r['name'] for r in self.rows[:3]]}...")

    @property
    def names(self) -> list[str]:
        return [r["name"] for r in self.rows]

    def spectrum(self, name: str, kind: str = "whitened") -> torch.Tensor:
        """Singular values, largest first; the whitened ones fall back to plain when there were no statistics."""
        s = self.spectra[self.row(name)["name"]]
        return s.get(kind, s["plain"])

    def energy_at(self, name: str, rank: int | None) -> float:
        """Share of the whitened energy ‖W S‖² kept by the top `rank` directions (None: dense)."""
        e = self.spectrum(name).double() ** 2
        return 1.0 if rank is None or rank >= len(e) else float(e[:rank].sum() / e.sum())

    def error_at(self, name: str, rank: int | None) -> float:
        """Predicted relative output error ‖(W − W_E) S‖_F / ‖W S‖_F of the whitened SVD at `rank`."""
        return max(0.0, 1.0 - self.energy_at(name, rank)) ** 0.5

    def params_at(self, name: str, rank: int | None) -> int:
        r = self.row(name)
        return r["d_out"] * r["d_in"] if rank is None else rank * (r["d_out"] + r["d_in"])

    def totals(self) -> dict:
        dense = sum(r["d_out"] * r["d_in"] for r in self.rows)
        kept = sum(self.params_at(r["name"], r["rank"]) for r in self.rows)
        return {"layers": len(self.rows), "compressed": sum(not r["dense"] for r in self.rows),
                "params_dense": dense, "params_kept": kept, "share_kept": kept / dense if dense else 1.0}

    def to_frame(self):
        import pandas as pd  # pandas comes with datasets; imported here to keep `import emloc_nb` light
        return pd.DataFrame(self.rows).set_index("name")

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        with atomic_dir(path, overwrite=overwrite) as tmp:
            write_grouped(tmp / "spectra.safetensors", self.spectra)
            write_json(tmp / "spectra.json", {"format_version": FORMAT_VERSION, "kind": "spectra",
                                              "rows": self.rows, "skipped": self.skipped})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "SpectrumTable":
        path = Path(path)
        meta = read_json(path / "spectra.json")
        return cls(meta["rows"], read_grouped(path / "spectra.safetensors"), meta["skipped"])
