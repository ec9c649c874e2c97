"""The rank planner: spend a parameter or memory budget across layers, see what it keeps, save the plan for the CLI."""

from __future__ import annotations

import html
import re
from pathlib import Path

import ipywidgets as W

from emloc_nb.errors import EmlocError
from emloc_nb.ranks import RankPlan, allocate
from emloc_nb.spectra import SpectrumTable

from .base import View, figure_widget, refresh
from .plots.common import short_names
from .plots.spectra import ranks_figure

DTYPES = [("float32 (4 B)", 4), ("bfloat16 / float16 (2 B)", 2)]
UNITS = [("share of parameters", "share"), ("GB of fine-tuning memory", "gb")]
GB = 1e9


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.2f} MB"


class RankPlanner(View):
    """Per-layer ranks from a global budget, a strategy and layers kept dense; `.plan` is a RankPlan.

    Controls: `unit` ("share" or "gb") picks which budget applies: `budget` (share of
    the compressible layers' parameters kept) or `memory` (GB that these layers'
    weights take while fine-tuning the emulator, at `dtype` bytes per weight: the
    memory figure below, so the plan's figure stays within it). `strategy` ("uniform":
    one ρ for all; "energy": ranks go where they buy the most whitened energy per
    parameter), `dense_text` (comma-separated regexes) and `dense_layers` (names
    picked from a list), both passed to `emloc_nb.ranks.allocate(dense=...)`. All
    numbers come from the stored spectra: no model is needed.
    """

    def __init__(
        self,
        spectra: SpectrumTable,
        *,
        budget: float | None = None,
        memory_gb: float | None = None,
        strategy: str = "uniform",
        dense: list[str] | tuple[str, ...] = (),
        bytes_per_param: int = 4,
    ):
        """`memory_gb` sets the budget in GB (and `unit` to "gb") instead of a share `budget`."""
        self.spectra = spectra
        self.shapes = {r["name"]: (r["d_out"], r["d_in"]) for r in spectra.rows}
        self.params_dense = sum(d_out * d_in for d_out, d_in in self.shapes.values())
        start = budget if budget is not None else round(spectra.totals()["share_kept"], 2)
        self.budget = W.FloatSlider(
            value=min(1.0, max(0.05, start)),
            min=0.05,
            max=1.0,
            step=0.01,
            description="budget",
            readout_format=".2f",
            continuous_update=False,
        )
        self.unit = W.ToggleButtons(
            options=UNITS, value="share" if memory_gb is None else "gb", description="budget in"
        )
        self.memory = W.FloatSlider(description="budget GB", readout_format=".3g", continuous_update=False)
        self.strategy = W.ToggleButtons(options=["uniform", "energy"], value=strategy, description="strategy")
        self.dense_text = W.Text(
            value=", ".join(dense),
            description="dense regex",
            continuous_update=False,
            placeholder=r"e.g. layers\.29\.mlp\.down_proj",
            layout=W.Layout(width="480px"),
        )
        self.dense_layers = W.SelectMultiple(
            options=list(zip(short_names(spectra.names), spectra.names)),
            description="keep dense",
            rows=6,
            layout=W.Layout(width="380px"),
        )
        self.dtype = W.Dropdown(options=DTYPES, value=bytes_per_param, description="weights")
        self._fit_memory_range()
        self.memory.value = memory_gb if memory_gb is not None else self.budget.value * self._dense_gb()
        self.status = W.HTML()
        self._plan: RankPlan | None = None
        self._error: str | None = None
        self.figure = figure_widget(ranks_figure(spectra, RankPlan(1.0).resolve(self.shapes)))
        self.dtype.observe(lambda _: self._fit_memory_range(), names="value")  # before the refresh below
        self.unit.observe(lambda _: self._on_unit(), names="value")
        for control in (
            self.budget,
            self.unit,
            self.memory,
            self.strategy,
            self.dense_text,
            self.dense_layers,
            self.dtype,
        ):
            control.observe(lambda _: self._refresh(), names="value")
        self._show_unit()
        self._refresh()
        header = W.HTML(
            "<h3>Rank planner</h3><p>The budget is the share of the block linears' parameters the "
            "emulator keeps, or the GB their weights take while fine-tuning the emulator. Save the plan "
            "and build with <code>emloc build-emulator --plan FILE</code>, or pass <code>planner.plan</code> "
            "to <code>build_emulator</code>.</p>"
        )
        self.widget = W.VBox(
            [
                header,
                W.HBox([self.unit, self.strategy]),
                W.HBox([self.budget, self.memory]),
                W.HBox([self.dense_text, self.dtype]),
                self.dense_layers,
                self.status,
                self.figure,
            ]
        )

    @classmethod
    def from_run(cls, run_dir: str | Path, **kwargs) -> RankPlanner:
        from emloc_nb.run import Run

        return cls(Run(run_dir).spectra(), **kwargs)

    # -- what the planner decided
    @property
    def budget_share(self) -> float:
        """The budget as the share of parameters passed to `allocate`, whichever unit it was set in."""
        if self.unit.value == "share":
            return self.budget.value
        params = self.memory.value * GB / self.dtype.value  # the memory figure's model: kept parameters × bytes each
        return min(1.0, params / self.params_dense)

    @property
    def dense(self) -> list[str]:
        """The regexes passed as `dense=`: the typed ones, then each picked layer's exact name."""
        typed = [p.strip() for p in self.dense_text.value.split(",") if p.strip()]
        return typed + [re.escape(n) for n in self.dense_layers.value]

    @property
    def plan(self) -> RankPlan:
        if self._plan is None:
            raise EmlocError(f"The planner has no valid plan: {self._error}")
        return self._plan

    @property
    def choices(self) -> dict:
        """Per layer, the LayerChoice (rank or dense, and why) the plan resolves to."""
        return self.plan.resolve(self.shapes)

    @property
    def totals(self) -> dict:
        """Parameters, energy and weight memory of the compressible layers under the plan."""
        choices = self.choices
        dense = self.params_dense
        kept = sum(self.spectra.params_at(n, c.rank) for n, c in choices.items())
        energy = [self.spectra.energy_at(n, c.rank) for n, c in choices.items()]
        errors = [self.spectra.error_at(n, c.rank) for n, c in choices.items()]
        bpp = self.dtype.value
        return {
            "params_dense": dense,
            "params_kept": kept,
            "share_kept": kept / dense,
            "layers_dense": sum(c.rank is None for c in choices.values()),
            "mean_energy_kept": sum(energy) / len(energy),
            "max_predicted_error": max(errors),
            "weights_bytes": kept * bpp,
            "dense_weights_bytes": dense * bpp,
        }

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON for `emloc build-emulator --plan PATH`."""
        return self.plan.save(path)

    # -- drawing
    def _dense_gb(self) -> float:
        return self.params_dense * self.dtype.value / GB

    def _fit_memory_range(self) -> None:
        """The GB slider spans the same shares as `budget`, at the chosen bytes per weight."""
        dense_gb = self._dense_gb()
        with self.memory.hold_trait_notifications():
            self.memory.max = dense_gb
            self.memory.min = self.budget.min * dense_gb
            self.memory.step = dense_gb / 1000

    def _on_unit(self) -> None:
        """Carry the budget over to the other unit, so that switching shows the same plan."""
        if self.unit.value == "gb":
            self.memory.value = self.budget.value * self._dense_gb()
        else:
            self.budget.value = self.memory.value * GB / self.dtype.value / self.params_dense
        self._show_unit()

    def _show_unit(self) -> None:
        self.budget.layout.display = None if self.unit.value == "share" else "none"
        self.memory.layout.display = None if self.unit.value == "gb" else "none"

    def _refresh(self) -> None:
        try:
            self._plan = allocate(self.spectra, self.budget_share, strategy=self.strategy.value, dense=self.dense)
            self._error = None
        except (EmlocError, re.error) as e:
            self._plan, self._error = None, str(e)
            self.status.value = f"<p style='color:#b00'>{html.escape(self._error)}</p>"
            return
        refresh(self.figure, ranks_figure(self.spectra, self.choices), "y", "hovertext")
        t = self.totals
        budget = f"{self.budget.value:.0%}" if self.unit.value == "share" else _size(self.memory.value * GB)
        self.status.value = (
            f"<b>{t['params_kept']:,}</b> of {t['params_dense']:,} parameters kept (<b>{t['share_kept']:.1%}</b>, "
            f"budget {budget}) · {t['layers_dense']} layer(s) dense · mean whitened energy kept "
            f"<b>{t['mean_energy_kept']:.1%}</b> · worst predicted layer error {t['max_predicted_error']:.3f}<br>"
            f"Weights of these layers while fine-tuning the emulator: <b>{_size(t['weights_bytes'])}</b> "
            f"(dense: {_size(t['dense_weights_bytes'])}). Not counted: embeddings, LM head and norms (kept dense), "
            "LoRA weights with their gradients and optimiser state, and activations."
        )
