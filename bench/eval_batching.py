"""Evaluation batched by prompt length against batches in example order, side by side.

The original SmolLM2 scores the default task's 300 test examples at batch 16, each setting
in a fresh process set up like a stage process (the fixed allocator threshold), in
interleaved rounds:
- in order: consecutive examples per batch (what `evaluate` did before);
- by length: `evaluate` itself, which batches examples of similar prompt length.
Both score with the same `choice_logprobs`; the table gives seconds, peak memory, padded
tokens and whether every prediction agrees.

    .venv/bin/python bench/eval_batching.py     # results/eval_batching.{json,md}; about 10 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import HERE, child, contention_note, emit, interleaved, machine, median, write_results

SETTINGS = ("in order", "by length")


def measure(setting: str, limit: int, batch_size: int) -> None:
    import torch

    from emloc_nb import evaluate, load_model, movie_sentiment
    from emloc_nb.measure import PhaseMeter, return_freed_memory
    from emloc_nb.scoring import choice_logprobs
    from emloc_nb.tokens import encode_example

    return_freed_memory()
    model, tok = load_model()
    task = movie_sentiment()
    data = task.test.select(range(limit))
    prompts = list(data["messages"])
    lengths = [len(encode_example(tok, m)["input_ids"]) for m in prompts]
    order = list(range(limit)) if setting == "in order" else sorted(range(limit), key=lengths.__getitem__)
    batches = [order[i : i + batch_size] for i in range(0, limit, batch_size)]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    start = time.perf_counter()
    with PhaseMeter() as meter, torch.no_grad():
        if setting == "in order":
            scores = torch.cat([choice_logprobs(model, tok, [prompts[i] for i in b], task.choices)[0] for b in batches])
            predictions = [task.choices[i] for i in scores.argmax(1).tolist()]
        else:
            predictions = evaluate(model, tok, task, limit=limit, batch_size=batch_size, progress=False).predictions
    seconds = time.perf_counter() - start
    emit(
        {
            "seconds": seconds,
            "peak_rss_mb": meter.peak_rss_mb,
            "padded_tokens": padded,
            "tokens": sum(lengths),
            "predictions": predictions,
            "accuracy": sum(p == a for p, a in zip(predictions, data["answer"])) / limit,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats of every setting")
    parser.add_argument("--limit", type=int, default=300, help="test examples scored")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure(args.child, args.limit, args.batch_size)

    before = machine()
    runs = interleaved(
        list(SETTINGS),
        args.rounds,
        lambda s: child(
            HERE / "eval_batching.py", "--child", s, "--limit", args.limit, "--batch-size", args.batch_size
        ),
    )
    after = machine()
    seconds = {s: median(r["seconds"] for r in runs[s]) for s in SETTINGS}
    peak = {s: max(r["peak_rss_mb"] for r in runs[s]) for s in SETTINGS}
    first = {s: runs[s][0] for s in SETTINGS}
    same = first["in order"]["predictions"] == first["by length"]["predictions"]
    lines = [
        "# Evaluation batched by prompt length",
        "",
        f"SmolLM2-135M-Instruct scoring {args.limit} test examples of the default task at batch {args.batch_size}, "
        f"each run in a fresh process with the stages' allocator setting; medians of {args.rounds} interleaved "
        "rounds (peaks: the largest).",
        "",
        "| batches | seconds | × in order | peak MB | padded tokens | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        lines.append(
            f"| {s} | {seconds[s]:.1f} | {seconds[s] / seconds['in order']:.2f} | {peak[s]:.0f} | "
            f"{first[s]['padded_tokens']} | {first[s]['accuracy']:.3f} |"
        )
    lines += ["", f"Every prediction the same: {same}. Real tokens: {first['in order']['tokens']}.", ""]
    lines.append(contention_note(before, after))
    for s in SETTINGS:
        for r in runs[s]:
            r.pop("predictions")
    write_results(
        "eval_batching",
        {"runs": runs, "seconds": seconds, "peak_rss_mb": peak, "same_predictions": same, "args": vars(args)},
        "\n".join(lines),
    )


if __name__ == "__main__":
    sys.exit(main())
