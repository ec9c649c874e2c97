"""Memory and speed of the emulator against the original model, side by side.

Each measurement runs in a fresh process so that its peak resident memory is its own.
Writes results/emulator_vs_original.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent


def build(ratio: float, calib: int, path: str) -> None:
    """Child: calibrate the original and save an emulator (so measuring it never loads the original)."""
    from emloc_nb import batches, build_emulator, collect_stats, load_model, movie_sentiment

    model, tok = load_model()
    stats = collect_stats(model, batches(tok, movie_sentiment().train, batch_size=8, limit=calib), progress=False)
    build_emulator(model, stats, ratio, progress=False).save(path, tokenizer=tok, overwrite=True)


def measure(path: str, steps: int, batch_size: int, checkpointing: bool) -> dict:
    """Child: load the original or a saved emulator, time inference and LoRA steps, report peak memory."""
    import torch
    from transformers import AutoTokenizer

    from emloc_nb import Emulator, LoraSpec, attach_lora, batches, load_model, movie_sentiment
    from emloc_nb.measure import peak_rss_mb, rss_mb, weights_mb
    from emloc_nb.memory import footprint
    from emloc_nb.scoring import answer_nll

    torch.manual_seed(0)
    baseline = rss_mb()
    if path == "original":
        model, tok = load_model()
    else:
        model, tok = Emulator.load(path).model, AutoTokenizer.from_pretrained(path)
    after_load = rss_mb()
    data = batches(tok, movie_sentiment().train, batch_size=batch_size, limit=batch_size * (steps + 1))
    with torch.no_grad():
        start = time.perf_counter()
        for b in data[1:]:
            answer_nll(model, b)
        infer = (time.perf_counter() - start) / steps
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = attach_lora(model, LoraSpec())
    peft_model.train()
    optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    predicted = footprint(peft_model, data[0])
    start = time.perf_counter()
    for b in data[1:]:
        nll, mask = answer_nll(peft_model, b)
        nll[mask].mean().backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
    train = (time.perf_counter() - start) / steps
    return {
        "weights_mb": weights_mb(model),
        "inference_s_per_batch": infer,
        "train_s_per_step": train,
        "predicted_train_mb": predicted["total_mb"],
        "predicted_activations_mb": predicted["activations_mb"],
        "rss_after_load_mb": after_load,
        "peak_rss_mb": peak_rss_mb(),
        "baseline_rss_mb": baseline,
    }


def _child(*args: str) -> str:
    cmd = [sys.executable, __file__, *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--build", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(float(args.build[0]), args.calibration, args.build[1])
        print("built")
        return
    if args.measure:
        print(json.dumps(measure(args.measure, args.steps, args.batch_size, args.gradient_checkpointing)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, ratio in [("original", 1.0)] + [("emulator", r) for r in args.ratios]:
            path = "original"
            if kind == "emulator":
                path = str(Path(tmp) / f"emulator-{ratio}")
                _child("--build", str(ratio), path, "--calibration", str(args.calibration))
            extra = ["--gradient-checkpointing"] if args.gradient_checkpointing else []
            row = json.loads(
                _child("--measure", path, "--steps", str(args.steps), "--batch-size", str(args.batch_size), *extra)
            )
            rows.append({"model": kind, "ratio": ratio, **row})
            print(rows[-1], flush=True)
    base = rows[0]
    for r in rows:
        r["weights_ratio"] = r["weights_mb"] / base["weights_mb"]
        r["peak_ratio"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        r["peak_above_baseline_ratio"] = (r["peak_rss_mb"] - r["baseline_rss_mb"]) / (
            base["peak_rss_mb"] - base["baseline_rss_mb"]
        )
        r["train_speed_ratio"] = base["train_s_per_step"] / r["train_s_per_step"]
        r["inference_speed_ratio"] = base["inference_s_per_batch"] / r["inference_s_per_batch"]
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    name = "emulator_vs_original" + ("_checkpointing" if args.gradient_checkpointing else "")
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    lines = [
        "| model | ρ | weights MB (×orig) | peak RSS MB (×orig) | peak above imports (×orig) | predicted train MB | "
        "train s/step (speed ×orig) | inference s/batch (speed ×orig) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ratio']:g} | {r['weights_mb']:.0f} ({r['weights_ratio']:.2f}) | "
            f"{r['peak_rss_mb']:.0f} ({r['peak_ratio']:.2f}) | {r['peak_above_baseline_ratio']:.2f} | "
            f"{r['predicted_train_mb']:.0f} | {r['train_s_per_step']:.2f} ({r['train_speed_ratio']:.2f}) | "
            f"{r['inference_s_per_batch']:.2f} ({r['inference_speed_ratio']:.2f}) |"
        )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
