"""The fine-tuning memory levers, each measured, and the memory goal, on SmolLM2 at the default recipe.

Goal: the steady-state peak of emulator fine-tuning (its train_steps phase: the steps after
the first, which also allocates the optimiser state) is at most the original model's
inference peak (the evaluation phase of the evaluate stage, 300 examples at batch 16).
Both are measured in this run, each in its own process, with glibc returning freed memory
as the pipeline's stage processes do.

1. A child calibrates SmolLM2 (64 examples) and builds the default emulator (ρ = 0.8).
2. A child evaluates the original: its evaluation phase's peak.
3. Children fine-tune the emulator at the default recipe (batch 8, LoRA r = 8 on all seven
   projections, sequences up to 256 tokens) under each lever setting, in interleaved
   rounds: steady-state peak, seconds per step, and the planner's prediction
   (emloc_nb.memory.predict_training on the longest micro-batch, plus the process baseline).
4. The same for the original, with no levers and with the default ones.

    .venv/bin/python bench/memory_levers.py          # writes results/memory_levers.{json,md}
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from _common import build_default_emulator, child, contention_note, emit, interleaved, machine, median, write_results

LEVERS = ["none", "micro=4", "micro=2", "micro=1", "gc", "bf16", "bf16,micro=2", "default"]


def train_spec(levers: str, steps: int):
    """The default recipe's TrainSpec with `levers` ("none", "default" or e.g. "gc,micro=2,bf16") and `steps`."""
    from emloc_nb.config import RunConfig

    base = RunConfig().train
    if levers == "default":
        return dataclasses.replace(base, steps=steps, checkpoint_every=0)
    spec = dict(micro_batch_size=None, gradient_checkpointing=False, frozen_dtype=None)
    for lever in filter(None, levers.split(",")):
        if lever == "gc":
            spec["gradient_checkpointing"] = True
        elif lever == "bf16":
            spec["frozen_dtype"] = "bfloat16"
        elif lever.startswith("micro="):
            spec["micro_batch_size"] = int(lever.split("=")[1])
        elif lever != "none":
            raise SystemExit(f"unknown lever {lever!r}")
    return dataclasses.replace(base, steps=steps, checkpoint_every=0, **spec)


def measure_eval() -> dict:
    from emloc_nb import evaluate, load_model, movie_sentiment
    from emloc_nb.config import RunConfig
    from emloc_nb.measure import PhaseMeter, return_freed_memory, rss_mb

    return_freed_memory()
    ev = RunConfig().evaluation
    task = movie_sentiment()
    with PhaseMeter() as meter:
        baseline = rss_mb()
        model, tok = load_model()
        evaluate(model, tok, task, limit=ev.limit, batch_size=ev.batch_size, progress=False)
    phase = meter.phases["evaluation"]
    return {"baseline_rss_mb": baseline, "peak_mb": phase["peak_rss_mb"], "seconds": phase["seconds"]}


def measure_train(which: str, levers: str, emulator_dir: str, steps: int) -> dict:
    from emloc_nb import Emulator, load_model, movie_sentiment
    from emloc_nb.config import RunConfig
    from emloc_nb.measure import PhaseMeter, return_freed_memory, rss_mb, weights_mb
    from emloc_nb.memory import longest_examples, predict_training
    from emloc_nb.models import load_tokenizer
    from emloc_nb.tasks import Task
    from emloc_nb.training import finetune, training_collator

    return_freed_memory()
    config, lora = train_spec(levers, steps), RunConfig().lora
    full = movie_sentiment()
    task = Task(full.name, full.train.select(range(config.batch_size * steps)), full.test, full.choices)
    dtype = config.frozen_dtype or "float32"
    with PhaseMeter() as meter, tempfile.TemporaryDirectory() as out:
        baseline = rss_mb()
        tok = load_tokenizer()
        model = load_model(dtype=dtype)[0] if which == "original" else Emulator.load(emulator_dir, dtype=dtype).model
        finetune(model, tok, task, out, lora=lora, config=config, progress=False)
    phases = meter.phases
    micro = config.micro_batch_size or config.batch_size
    examples = longest_examples(tok, task.train, micro, max_length=config.max_length)  # it trains on all of them
    batch = training_collator(tok, model)(examples)
    predicted = predict_training(model, lora, config, batch)
    return {
        "baseline_rss_mb": baseline,
        "weights_mb": weights_mb(model),
        "first_step_peak_mb": phases["train_first_step"]["peak_rss_mb"],
        "steady_peak_mb": phases["train_steps"]["peak_rss_mb"],
        "s_per_step": phases["train_steps"]["seconds"] / (steps - 1),
        "predicted": predicted,
        "predicted_peak_mb": predicted["total_mb"] + baseline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="steps per measurement (the first is not steady state)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats of every setting")
    parser.add_argument("--levers", nargs="+", default=LEVERS, help="emulator settings; none and default always run")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            emit(build_default_emulator(rest[0]))
        elif kind == "eval":
            emit(measure_eval())
        else:
            emit(measure_train(rest[0], rest[1], rest[2], args.steps))
        return

    before = machine()
    with tempfile.TemporaryDirectory() as tmp:
        emulator_dir = str(Path(tmp) / "emulator")
        child(__file__, "--child", "build", emulator_dir)
        inference = child(__file__, "--child", "eval")
        print("original inference:", inference, flush=True)
        # "none" (the times' reference) and "default" (the goal) are always measured
        levers = ["none", *(lv for lv in args.levers if lv not in ("none", "default")), "default"]
        settings = [("emulator", lv) for lv in levers] + [("original", "none"), ("original", "default")]
        runs = interleaved(
            settings,
            args.rounds,
            lambda s: child(__file__, "--steps", args.steps, "--child", "train", s[0], s[1], emulator_dir),
        )
    after = machine()
    budget = inference["peak_mb"]
    rows = []
    for (which, levers), results in runs.items():
        first = results[0]
        steady = max(r["steady_peak_mb"] for r in results)
        rows.append(
            {
                "model": which,
                "levers": levers,
                "spec": {
                    k: getattr(train_spec(levers, args.steps), k)
                    for k in ("micro_batch_size", "gradient_checkpointing", "frozen_dtype")
                },
                "weights_mb": first["weights_mb"],
                "baseline_rss_mb": median(r["baseline_rss_mb"] for r in results),
                "first_step_peak_mb": max(r["first_step_peak_mb"] for r in results),
                "steady_peak_mb": steady,
                "steady_vs_inference": steady / budget,
                "s_per_step": median(r["s_per_step"] for r in results),
                "s_per_step_runs": [r["s_per_step"] for r in results],
                "predicted_peak_mb": first["predicted_peak_mb"],
                "predicted": first["predicted"],
                "planner_error": first["predicted_peak_mb"] / steady - 1,
            }
        )
    none = {r["model"]: r["s_per_step"] for r in rows if r["levers"] == "none"}
    for r in rows:
        r["time_vs_no_levers"] = r["s_per_step"] / none[r["model"]]
    default = next(r for r in rows if r["model"] == "emulator" and r["levers"] == "default")
    goal = {
        "emulator_steady_peak_mb": default["steady_peak_mb"],
        "original_inference_peak_mb": budget,
        "ratio": default["steady_peak_mb"] / budget,
        "met": default["steady_peak_mb"] <= budget,
    }
    lines = [
        "# Fine-tuning memory levers on SmolLM2-135M-Instruct, default recipe",
        "",
        f"Original model, inference (evaluation phase, 300 examples at batch 16): peak **{budget:.0f} MB** "
        f"(process baseline {inference['baseline_rss_mb']:.0f} MB).",
        "",
        "Fine-tuning at batch 8, LoRA r = 8 on all seven projections, sequences up to 256 tokens; the emulator keeps "
        f"ρ = 0.8. Steady state: steps 2–{args.steps} of each run ({args.rounds} interleaved rounds per setting; "
        "peak: the largest, time: the median).",
        "",
        "| model | levers | steady-state peak MB | × inference peak | first step peak MB | s/step | time × no levers "
        "| planner MB | planner error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['levers']} | {r['steady_peak_mb']:.0f} | {r['steady_vs_inference']:.2f} | "
            f"{r['first_step_peak_mb']:.0f} | {r['s_per_step']:.2f} | {r['time_vs_no_levers']:.2f} | "
            f"{r['predicted_peak_mb']:.0f} | {r['planner_error']:+.1%} |"
        )
    spec = default["spec"]
    lines += [
        "",
        f"`default` is RunConfig()'s levers: micro_batch_size={spec['micro_batch_size']}, "
        f"gradient_checkpointing={spec['gradient_checkpointing']}, frozen_dtype={spec['frozen_dtype']}.",
        "",
        f"**Goal** (emulator fine-tuning steady-state peak ≤ original inference peak): "
        f"{goal['emulator_steady_peak_mb']:.0f} MB vs {budget:.0f} MB = ×{goal['ratio']:.2f}: "
        f"**{'met' if goal['met'] else 'not met'}**.",
        "",
        "Planner: tensor accounting of one step (weights, LoRA state, saved activations of the longest micro-batch) "
        "plus the process baseline, against the measured steady-state peak.",
        "",
        contention_note(before, after),
    ]
    write_results(
        "memory_levers",
        {"inference": inference, "rows": rows, "goal": goal, "args": vars(args), "machine": [before, after]},
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
