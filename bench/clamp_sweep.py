"""Accuracy of the original model with the emulator's LoRA corrected at several clamps L.

L = 0 is the naive transfer, L = inf no clamp. Reuses a finished run directory (its
emulator, adapter and held-out statistics) and writes results/clamp_sweep.{json,md}.

    python bench/clamp_sweep.py runs/demo --clamps 0 1 3 10 inf
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from emloc_nb import correct_lora, evaluate, load_adapter
from emloc_nb.run import Run

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--clamps", type=float, nargs="+", default=[0, 1, 3, 10, float("inf")])
    args = parser.parse_args()
    run = Run(args.run_dir)
    model, tok = run.original()
    emulator, heldout = run.emulator(with_original=True), run.calibration("heldout")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for clamp in args.clamps:
            out = Path(tmp) / f"L{clamp}"
            report = correct_lora(model, emulator, run.adapter_dir("emulator"), out, clamp=clamp, heldout=heldout)
            tuned = load_adapter(model, out)
            result = evaluate(tuned, tok, run.task(), limit=run.config.evaluation.limit, progress=False)
            tuned.unload()
            layers = report.rows
            rows.append(
                {
                    "clamp": clamp,
                    "accuracy": result.accuracy,
                    "answer_loss": result.answer_loss,
                    "mean_error_all": sum(r["after_all"] for r in layers) / len(layers),
                    "mean_error_subspace": sum(r["after_subspace"] for r in layers) / len(layers),
                    "clamped_columns": sum(r["clamped"] for r in layers),
                }
            )
            print(rows[-1], flush=True)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "clamp_sweep.json").write_text(
        json.dumps({"run": str(args.run_dir), "config": run.config.to_dict(), "rows": rows}, indent=2)
    )
    lines = [
        "| L | accuracy | answer loss | mean rel. error vs fine-tuned emulator (all / LoRA subspace) | clamped "
        "columns |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clamp']:g} | {r['accuracy']:.3f} | {r['answer_loss']:.3f} | "
            f"{r['mean_error_all']:.3f} / {r['mean_error_subspace']:.3f} | {r['clamped_columns']} |"
        )
    (out / "clamp_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
