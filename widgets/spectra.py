"""Singular-value spectra: what a rank costs and keeps, per layer, from the stored spectra alone."""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as W

from emloc_nb.spectra import SpectrumTable

from .base import View, figure_widget, refresh
from .focus import least_energy_layer
from .plots.common import short_names, trace
from .plots.spectra import (
    energy_figure,
    energy_floor,
    kept_energy_figure,
    kept_energy_markers,
    kept_energy_title,
    spectrum_figure,
)


class SpectrumView(View):
    """Plain vs whitened spectra of one layer, a live ρ/rank slider, and kept energy across all layers.

    Controls: `layer`, `ratio` (kept share ρ of the layer's parameters; ρ = 1 keeps it
    dense) and `rank` (set either; the other follows). `current` holds the readout:
    rank, energy kept, predicted error and parameters kept, all from
    `SpectrumTable.energy_at` / `error_at` / `params_at`. Without `layer`, the view opens on
    the compressed layer that keeps the least energy (`least_energy_layer`); without `ratio`,
    on the rank the run's plan gave the layer.
    """

    def __init__(self, spectra: SpectrumTable, *, layer: str | None = None, ratio: float | None = None):
        self.spectra = spectra
        names = spectra.names
        layer = layer or least_energy_layer(spectra)
        self.layer = W.Dropdown(
            options=list(zip(short_names(names), names)),
            value=layer,
            description="layer",
            layout=W.Layout(width="380px"),
        )
        self.ratio = W.FloatSlider(
            value=1.0, min=0.01, max=1.0, step=0.01, description="ρ kept", readout_format=".2f", continuous_update=True
        )
        self.rank = W.IntSlider(value=1, min=1, max=self._full(layer), description="rank", continuous_update=True)
        self.readout = W.HTML()
        self._dense = False  # ρ = 1 means "keep dense", which no rank on the slider expresses
        self._syncing = False
        if ratio is None:
            self._select_planned_rank()
        else:
            self.ratio.value = ratio
            self._set_rank_from_ratio()
        self.spectrum = figure_widget(spectrum_figure(spectra, layer, self._rank))
        self.energy = figure_widget(energy_figure(spectra, layer, self.rank.value))
        self.summary = figure_widget(kept_energy_figure(spectra, ratio=self.ratio.value))
        self.layer.observe(self._on_layer, names="value")
        self.ratio.observe(self._on_ratio, names="value")
        self.rank.observe(self._on_rank, names="value")
        self._update_layer()
        totals = spectra.totals()
        header = W.HTML(
            f"<h3>Spectra</h3><p>{totals['compressed']} of {totals['layers']} block linears compressed; the built plan "
            f"keeps {totals['share_kept']:.1%} of their parameters. Whitened values are those of W S (S Sᵀ = C): "
            "their energy is E‖W x‖² on the calibration inputs, which the emulator's truncation maximises.</p>"
        )
        self.widget = W.VBox(
            [
                header,
                W.HBox([self.layer, self.ratio, self.rank]),
                self.readout,
                self.spectrum,
                self.energy,
                self.summary,
            ]
        )

    @classmethod
    def from_run(cls, run_dir: str | Path, **kwargs) -> SpectrumView:
        from emloc_nb.run import Run

        return cls(Run(run_dir).spectra(), **kwargs)

    # -- state
    def _full(self, name: str) -> int:
        return len(self.spectra.spectrum(name))

    @property
    def _rank(self) -> int | None:
        """The selected rank; None when ρ = 1 keeps the layer dense."""
        return None if self._dense else self.rank.value

    @property
    def current(self) -> dict:
        name, r = self.layer.value, self._rank
        row = self.spectra.layer(name)
        params = self.spectra.params_at(name, r)
        return {
            "layer": name,
            "rank": r,
            "energy": self.spectra.energy_at(name, r),
            "error": self.spectra.error_at(name, r),
            "params": params,
            "share": params / (row["d_out"] * row["d_in"]),
        }

    def _slider_ratio(self, share: float) -> float:
        """The ρ slider position that shows a share of parameters."""
        return max(self.ratio.min, min(1.0, round(share, 2)))

    def _select_planned_rank(self) -> None:
        """Show the rank the run's plan gave the layer (ρ = 1 for a layer it kept dense)."""
        planned = self.spectra.layer(self.layer.value)["rank"]
        self._syncing = True
        try:
            self._dense = planned is None
            self.rank.value = self.rank.max if self._dense else planned
            self.ratio.value = 1.0 if self._dense else self._slider_ratio(self.current["share"])
        finally:
            self._syncing = False

    def _set_rank_from_ratio(self) -> None:
        self._dense = self.ratio.value >= 1.0
        r = (
            self._full(self.layer.value)
            if self._dense
            else self.spectra.rank_at_ratio(self.layer.value, self.ratio.value)
        )
        self._syncing = True
        try:
            self.rank.max = self._full(self.layer.value)
            self.rank.value = min(r, self.rank.max)
        finally:
            self._syncing = False

    # -- events
    def _on_layer(self, _) -> None:
        self._set_rank_from_ratio()  # ρ is the knob that means the same for every layer
        self._update_layer()

    def _on_ratio(self, _) -> None:
        if self._syncing:
            return
        self._set_rank_from_ratio()
        self._update_rank()
        self._update_summary()

    def _on_rank(self, _) -> None:
        if self._syncing:
            return
        self._dense = False
        self._syncing = True  # show the share this rank costs, without re-deriving the rank from it
        try:
            self.ratio.value = self._slider_ratio(self.current["share"])
        finally:
            self._syncing = False
        self._update_rank()
        self._update_summary()

    # -- drawing
    def _update_layer(self) -> None:
        name = self.layer.value
        refresh(self.spectrum, spectrum_figure(self.spectra, name, self._rank), "x", "y")
        refresh(self.energy, energy_figure(self.spectra, name, self.rank.value), "x", "y")
        self._update_rank()

    def _update_summary(self) -> None:
        """The uniform-ρ panel, the colour scale's floor and the title follow ρ, whichever slider moved it."""
        floor = energy_floor(self.spectra, self.ratio.value)
        with self.summary.batch_update():
            trace(self.summary, "uniform ρ").z = kept_energy_markers(self.spectra, self.ratio.value)
            for heat in self.summary.data:  # both panels share one scale
                heat.zmin = floor
            self.summary.layout.title = kept_energy_title(self.ratio.value, floor)

    def _update_rank(self) -> None:
        c = self.current
        name, full = c["layer"], self._full(c["layer"])
        shown = full if c["rank"] is None else c["rank"]
        ys = trace(self.spectrum, "whitened σ(W S)").y + trace(self.spectrum, "plain σ(W)").y
        lo = min([v for v in ys if v is not None and v > 0], default=1e-6)
        with self.spectrum.batch_update():
            trace(self.spectrum, "selected rank").update(x=[shown, shown], y=[lo, 1.0])
        with self.energy.batch_update():
            trace(self.energy, "selected").update(x=[shown], y=[c["energy"]])
        row = self.spectra.layer(name)
        dense = row["d_out"] * row["d_in"]
        plan = "dense" if row["rank"] is None else f"rank {row['rank']}"
        chosen = "kept dense" if c["rank"] is None else f"rank {c['rank']} of {full}"
        self.readout.value = (
            f"<b>{html.escape(name)}</b> ({row['d_out']}×{row['d_in']}, built with {plan}) · "
            f"{chosen}: "
            f"<b>{c['energy']:.2%}</b> of the whitened energy kept · predicted output error "
            f"<b>{c['error']:.3f}</b> · {c['params']:,} of {dense:,} parameters (<b>{c['share']:.1%}</b>)"
        )
