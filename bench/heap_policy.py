"""What the stages' heap policy costs and saves: each stage's time and peak under three policies.

Every stage process fixes glibc's mmap threshold at 128 KiB (`emloc_nb.measure.return_freed_memory`): each
large block is its own mapping, returned when freed. That is what keeps fine-tuning within the original's
inference peak (results/transients.md, item 1), and it costs time: each freed activation is mapped and faulted
in again, 4 KiB at a time. The policies:
- glibc: glibc's default (its threshold rises as blocks are freed, so they are reused from its heap);
- 128k: the threshold fixed at 128 KiB;
- 128k+thp: the same, with glibc asking for transparent huge pages on those mappings
  (`emloc_nb.measure.huge_pages_env`, glibc 2.35 and later).

Each stage's measurement is one step of a finished run (`make demo`'s, by default), executed in a fresh process as
`emloc run` executes it, on its own hard-linked copy of that run: every write is an atomic rename, so the run
itself is never changed. Time and peak come from the step's own stage record. Fine-tuning, the longest stage, is
measured on --train-steps steps of the run's emulator instead (bench/transients.py's allocator: the seconds a
step and the peak of the steady state). Interleaved rounds, one thread.

    OMP_NUM_THREADS=1 .venv/bin/python bench/heap_policy.py [--run runs/demo] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from _common import HERE, child, contention_note, emit, interleaved, machine, median, write_results

POLICIES = {"glibc": (None, False), "128k": (128 * 1024, False), "128k+thp": (128 * 1024, True)}  # threshold, thp
STEPS = ("finetune", "calibrate", "drift", "correct", "evaluate:original", "evaluate:original+corrected")


def measure_step(args) -> None:
    """Child: execute one step of the run at args.child under args.policy's threshold; its stage record's figures."""
    from emloc_nb import runner
    from emloc_nb.layout import record_name
    from emloc_nb.measure import return_freed_memory
    from emloc_nb.run import Run

    threshold = POLICIES[args.policy][0]
    runner.return_freed_memory = lambda: threshold is None or return_freed_memory(threshold)  # what execute calls
    run = Run(args.child)
    runner.execute(run, args.step, isolated=True)
    record = run.stage_records()[record_name(args.step)]
    emit({"seconds": record["seconds"], "peak_rss_mb": record["peak_rss_mb"]})


def measure(run: Path, step: str, policy: str, train_steps: int) -> dict:
    """One measurement in a fresh process, with the policy's environment."""
    from emloc_nb.measure import huge_pages_env

    threshold, thp = POLICIES[policy]
    env = huge_pages_env() if thp else {"GLIBC_TUNABLES": ""}
    if step == "finetune":
        t = "default" if threshold is None else str(threshold)
        r = child(HERE / "transients.py", "--steps", train_steps, "--child", "allocator", t, run / "emulator", env=env)
        return {"seconds": r["s_per_step"], "peak_rss_mb": r["steady_peak_mb"]}
    with tempfile.TemporaryDirectory(prefix="emloc-heap-", dir=run.parent) as scratch:
        copy = Path(scratch) / "run"  # a step rerun makes its successors stale: a fresh copy each time
        shutil.copytree(run, copy, copy_function=os.link)
        return child(__file__, "--child", copy, "--step", step, "--policy", policy, env=env)


def markdown(results: dict, before: dict, after: dict, source: str) -> str:
    names = list(POLICIES)
    lines = [
        "# Heap policy per stage: glibc's default, a fixed 128 KiB mmap threshold, and huge pages",
        "",
        f"Steps of `{source}` (SmolLM2-135M-Instruct, the default recipe), each executed in a fresh process on its",
        "own hard-linked copy of the run, one thread; medians of interleaved rounds (peaks: the largest). finetune:",
        "seconds a step and the steady-state peak of emulator fine-tuning at the default recipe.",
        "",
        "| step | " + " | ".join(f"{p} s" for p in names) + " | " + " | ".join(f"{p} peak MB" for p in names) + " |",
        "|---|" + "---|" * 2 * len(names),
    ]
    for step, by_policy in results.items():
        s = {p: median(r["seconds"] for r in by_policy[p]) for p in names}
        m = {p: max(r["peak_rss_mb"] for r in by_policy[p]) for p in names}
        times = [f"{s[p]:.1f}" + ("" if p == names[0] else f" (×{s[p] / s[names[0]]:.2f})") for p in names]
        lines.append(f"| {step} | " + " | ".join(times) + " | " + " | ".join(f"{m[p]:.0f}" for p in names) + " |")
    return "\n".join([*lines, "", contention_note(before, after)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished run (make demo's)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", nargs="+", default=list(STEPS))
    parser.add_argument("--train-steps", type=int, default=4, help="fine-tuning steps (the first is not timed)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--policy", choices=POLICIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure_step(args)
    if not (args.run / "run.json").is_file():
        sys.exit(f"{args.run} is not a run directory: run `make demo` first, or pass --run")
    before, results = machine(), {}
    for step in args.steps:
        print(f"[heap] {step}", flush=True)
        results[step] = interleaved(
            list(POLICIES), args.rounds, lambda policy, step=step: measure(args.run, step, policy, args.train_steps)
        )
    after = machine()
    payload = {"run": str(args.run), "rounds": args.rounds, "results": results, "before": before, "after": after}
    write_results("heap_policy", payload, markdown(results, before, after, str(args.run)))


if __name__ == "__main__":
    main()
