"""docs/pareto.png: accuracy against the fine-tuning peak, one point per budget ρ (issue 28's picture).

    python docs/pareto.py [ABLATION_DIR] [--output PNG]

Left: each method of the ablation report (default: the committed validation table of the default task) at each
budget it has, at that budget's measured fine-tuning peak × the original's inference peak (`AblationReport.memory`).
Right: the same budgets at larger sizes, from bench/results/scale_curve.json (emulator_peaks_at_scale).
Needs headless Chromium (`apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from emloc_nb.ablation_report import load_ablation
from emloc_nb.widgets.plots.memory import emulator_peaks_at_scale, pareto_figure
from emloc_nb.widgets.static import figure_png

REPO = Path(__file__).resolve().parents[1]
METHODS = ["emulator", "naive", "naive+labels", "L=3+prior"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablation", nargs="?", default=REPO / "docs/ablations/movie-sentiment/validation", type=Path)
    parser.add_argument("--output", default=REPO / "docs/pareto.png", type=Path)
    args = parser.parse_args(argv)
    report = load_ablation(args.ablation)
    scale = json.loads((REPO / "bench/results/scale_curve.json").read_text())
    fig = pareto_figure(report.summary(), report.memory, METHODS, emulator_peaks_at_scale(scale))
    if not figure_png(fig, args.output, width=1200, height=520):
        print("error: no Chromium to render the PNG. Install it (apt-get install chromium).", file=sys.stderr)
        return 1
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
