"""The rank planner: spend a parameter budget across layers, see what it keeps, save the plan for the CLI."""
from __future__ import annotations

import html
import re
from pathlib import Path

import ipywidgets as W

from emloc_nb.errors import EmlocError
from emloc_nb.ranks import RankPlan, allocate
from emloc_nb.spectra import SpectrumTable

from . import figures as F
from .base import View, figure_widget

DTYPES = [("float32 (4 B)", 4), ("bfloat16 / float16 (2 B)", 2)]


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.2f} MB"


class RankPlanner(View):
    """Per-layer ranks from a global budget, a strategy and layers kept dense; `.plan` is a RankPlan.

    Controls: `budget` (share of the compressible layers' parameters kept), `strategy`
    ("uniform": one ρ for all; "energy": ranks go where they buy the most whitened
    energy per parameter), `dense_text` (comma-separated regexes) and `dense_layers`
    (names picked from a list), both passed to `emloc_nb.ranks.allocate(dense=...)`,
    and `dtype` (bytes per weight, for the memory figure). All numbers come from the
    stored spectra: no model is needed.
    """

    def __init__(self, spectra: SpectrumTable, *, budget: float | None = None, strategy: str = "uniform",
                 dense: list[str] | tuple[str, ...] = (), bytes_per_param: int = 4):
        self.spectra = spectra
        self.shapes = {r["name"]: (r["d_out"], r["d_in"]) for r in spectra.rows}
        start = budget if budget is not None else round(spectra.totals()["share_kept"], 2)
        self.budget = W.FloatSlider(value=min(1.0, max(0.05, start)), min=0.05, max=1.0, step=0.01,
                                    description="budget", readout_format=".2f", continuous_update=False)
        self.strategy = W.ToggleButtons(options=["uniform", "energy"], value=strategy, description="strategy")
        self.dense_text = W.Text(value=", ".join(dense), description="dense regex", continuous_update=False,
                                 placeholder=r"e.g. layers\.29\.mlp\.down_proj", layout=W.Layout(width="480px"))
        self.dense_layers = W.SelectMultiple(options=list(zip(F.short_names(spectra.names), spectra.names)),
                                             description="keep dense", rows=6, layout=W.Layout(width="380px"))
        self.dtype = W.Dropdown(options=DTYPES, value=bytes_per_param, description="weights")
        self.status = W.HTML()
        self._plan: RankPlan | None = None
        self._error: str | None = None
        self.figure = figure_widget(F.ranks_figure(spectra, RankPlan(1.0).resolve(self.shapes)))
        for control in (self.budget, self.strategy, self.dense_text, self.dense_layers, self.dtype):
            control.observe(lambda _: self._refresh(), names="value")
        self._refresh()
        header = W.HTML("<h3>Rank planner</h3><p>The budget is the share of the block linears' parameters the "
                        "emulator keeps. Save the plan and build with <code>emloc build-emulator --plan FILE</code>, "
                        "or pass <code>planner.plan</code> to <code>build_emulator</code>.</p>")
        self.widget = W.VBox([header, W.HBox([self.budget, self.strategy]), W.HBox([self.dense_text, self.dtype]),
                              self.dense_layers, self.status, self.figure])

    @classmethod
    def from_run(cls, run_dir: str | Path, **kwargs) -> "RankPlanner":
        return cls(SpectrumTable.load(Path(run_dir) / "emulator" / "spectra"), **kwargs)

    # -- what the planner decided
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
        dense = sum(d_out * d_in for d_out, d_in in self.shapes.values())
        kept = sum(self.spectra.params_at(n, c.rank) for n, c in choices.items())
        energy = [self.spectra.energy_at(n, c.rank) for n, c in choices.items()]
        errors = [self.spectra.error_at(n, c.rank) for n, c in choices.items()]
        bpp = self.dtype.value
        return {"params_dense": dense, "params_kept": kept, "share_kept": kept / dense,
                "layers_dense": sum(c.rank is None for c in choices.values()),
                "mean_energy_kept": sum(energy) / len(energy), "max_predicted_error": max(errors),
                "weights_bytes": kept * bpp, "dense_weights_bytes": dense * bpp}

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON for `emloc build-emulator --plan PATH`."""
        return self.plan.save(path)

    # -- drawing
    def _refresh(self) -> None:
        try:
            self._plan = allocate(self.spectra, self.budget.value, strategy=self.strategy.value, dense=self.dense)
            self._error = None
        except (EmlocError, re.error) as e:
            self._plan, self._error = None, str(e)
            self.status.value = f"<p style='color:#b00'>{html.escape(self._error)}</p>"
            return
        fresh = F.ranks_figure(self.spectra, self.choices)
        with self.figure.batch_update():
            for t in fresh.data:
                F.trace(self.figure, t.name).update(y=t.y, hovertext=t.hovertext)
        t = self.totals
        self.status.value = (
            f"<b>{t['params_kept']:,}</b> of {t['params_dense']:,} parameters kept (<b>{t['share_kept']:.1%}</b>, "
            f"budget {self.budget.value:.0%}) · {t['layers_dense']} layer(s) dense · mean whitened energy kept "
            f"<b>{t['mean_energy_kept']:.1%}</b> · worst predicted layer error {t['max_predicted_error']:.3f}<br>"
            f"Weights of these layers while fine-tuning the emulator: <b>{_size(t['weights_bytes'])}</b> "
            f"(dense: {_size(t['dense_weights_bytes'])}). Not counted: embeddings, LM head and norms (kept dense), "
            "LoRA weights with their gradients and optimiser state, and activations.")
