"""Each stage's time and peak memory on this machine, from finished runs' stage records (issue 31, item 4).

    .venv/bin/python bench/stages.py RUN_DIR --name NAME [--note TEXT] [RUN_DIR --name NAME ...]

Reads `Run.stage_records()` of each run (what `emloc run` measured as it went: no stage is rerun) and writes
results/stages.{json,md}: one column of seconds per run, the ratio of the last to the first, and each stage's
peak. Name the conditions each run met with --note (threads, what else ran): a stage's time depends on them,
and the records do not hold them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import machine, write_results

from emloc_nb.run import Run
from emloc_nb.stages import STAGES


def _order(step: str) -> int:
    """The pipeline's order (evaluate's settings after the other stages)."""
    return list(STAGES).index(step.split("-")[0]) if step.split("-")[0] in STAGES else len(STAGES)


def _total(records: dict) -> float:
    return sum(r["seconds"] or 0 for r in records.values())


def table(runs: list[dict]) -> str:
    steps = sorted(dict.fromkeys(step for r in runs for step in r["records"]), key=_order)
    compare = len(runs) > 1
    head = [f"{r['name']} (s)" for r in runs] + (["last ÷ first"] if compare else []) + ["peak MB (last)"]
    lines = ["| stage | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for step in steps + ["total"]:
        seconds = [_total(r["records"]) if step == "total" else r["records"].get(step, {}).get("seconds") for r in runs]
        cells = ["–" if s is None else f"{s:.0f}" for s in seconds]
        if compare:
            cells.append(f"{seconds[-1] / seconds[0]:.2f}" if None not in (seconds[0], seconds[-1]) else "–")
        peak = runs[-1]["records"].get(step, {}).get("peak_rss_mb")
        cells.append("–" if peak is None else f"{peak:.0f}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--name", action="append", required=True, help="one per run, in order")
    parser.add_argument("--note", action="append", default=[], help="the conditions of each run, in order")
    args = parser.parse_args()
    if len(args.name) != len(args.runs):
        parser.error("give one --name per run")
    runs = []
    for path, name, note in zip(args.runs, args.name, args.note + [""] * len(args.runs)):
        records = {
            step: {k: r.get(k) for k in ("seconds", "peak_rss_mb")} for step, r in Run(path).stage_records().items()
        }
        runs.append({"name": name, "run_dir": str(path), "note": note, "records": records})
    where = machine()
    text = "\n".join(
        [
            "# Stage times of `emloc run configs/default.yaml` (SmolLM2-135M-Instruct, movie sentiment)",
            "",
            f"Machine: {where['cpu']}, {where['cores']} cores, torch {where['torch']}. From each run's stage records "
            "(`bench/stages.py`); each stage ran in its own process.",
            "",
            *[f"- **{r['name']}**: {r['note'] or 'no note'}" for r in runs],
            "",
            table(runs),
        ]
    )
    write_results("stages", {"machine": where, "runs": runs}, text)


if __name__ == "__main__":
    main()
