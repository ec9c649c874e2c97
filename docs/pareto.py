"""docs/pareto.png: accuracy against the fine-tuning peak, one point per budget ρ.

    python docs/pareto.py [ABLATION_DIR] [--output PNG]

Left: each method of the ablation report (default: the committed budget sweep of the default task) at each
budget it has, at that budget's measured fine-tuning peak × the original's inference peak (`AblationReport.memory`),
and the tight-budget recipe (configs/tight-budget.yaml, its own committed report) as a star at ρ = 0.5.
Right: the same budgets at larger sizes, from bench/results/scale_curve.json (emulator_peaks_at_scale).
Needs headless Chromium (`apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from emloc_nb.ablation_report import load_ablation
from emloc_nb.widgets.plots.memory import emulator_peaks_at_scale, pareto_figure, recipe_point
from emloc_nb.widgets.static import figure_png

REPO = Path(__file__).resolve().parents[1]
METHODS = ["naive+labels", "naive", "L=3+prior", "emulator"]  # the default first: its points carry ρ
SWEEP = REPO / "docs/ablations/movie-sentiment-budgets/validation"
TIGHT = REPO / "docs/ablations/movie-sentiment-train/tight-rho0.5-lr0.001-steps120/validation"


def tight_recipe(inference_mb: float) -> dict:
    """The tight-budget recipe's default row at ρ = 0.5, placed against the sweep's inference peak."""
    report = load_ablation(TIGHT)
    label = "tight-budget recipe (aligned, lr 1e-3 × 120) + prior"
    return recipe_point(report.summary(), report.memory, "naive+labels", 0.5, label, inference_mb)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablation", nargs="?", default=SWEEP, type=Path)
    parser.add_argument("--output", default=REPO / "docs/pareto.png", type=Path)
    args = parser.parse_args(argv)
    report = load_ablation(args.ablation)
    scale = json.loads((REPO / "bench/results/scale_curve.json").read_text())
    recipes = [tight_recipe(report.memory["inference"])]
    fig = pareto_figure(report.summary(), report.memory, METHODS, emulator_peaks_at_scale(scale), recipes)
    if not figure_png(fig, args.output, width=1200, height=520):
        print("error: no Chromium to render the PNG. Install it (apt-get install chromium).", file=sys.stderr)
        return 1
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
