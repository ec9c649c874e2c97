"""Threads for the stages: which thread count and OpenMP wait policy hold up on a shared machine (issue 31).

Each measurement runs in a fresh process whose environment is set before torch loads
(OMP_NUM_THREADS = MKL_NUM_THREADS = the thread count, OMP_WAIT_POLICY), on the default recipe
(SmolLM2-135M-Instruct, the default task, RunConfig's settings):
- fine-tuning: one example's forward and backward through the original with its LoRA (micro-batch 1,
  as the default recipe trains; a step is 8 of them, `train.batch_size`);
- calibration: one batch of 8 through the original with the statistics' hooks (`collect_stats`);
- evaluation: one batch of 16 test prompts scored against the answers (`choice_logprobs`).
Each runs --warmup iterations untimed, then --iterations timed; a cell is their median.

Conditions, the thread setting the same everywhere:
- idle: nothing started by the bench beside it (the load average says what else ran);
- beside 1 or 2 busy processes: plain Python spin loops, started and stopped by the bench around each
  measurement (each also ends by itself after --busy-seconds);
- beside a fine-tuning: a second process fine-tuning the same model with the same setting (two runs at once).

Every thread count from 1 to the number of cores, each with OMP_WAIT_POLICY passive and active.
`choose_policy` picks one by the rule of issue 31: a policy that loses at most 10% when idle and never
collapses more than 2× beside one busy process (against the fastest idle time) beats one that is fastest
only when idle (details in its docstring). `threads: auto` uses emloc_nb.threads.AUTO_THREADS, which follows
this choice.

    .venv/bin/python bench/threads.py           # results/threads.{json,md}; about 10 min on 2 cores (no other jobs!)
    .venv/bin/python bench/threads.py --quick   # smoke run, tiny model: about a minute idle; /tmp/emloc-threads-quick
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import HERE, RESULTS, child, emit, machine, write_results

from emloc_nb.threads import AUTO_THREADS, SMALL_MACHINE

CONDITIONS = {
    "idle": "idle",
    "busy1": "beside 1 busy process",
    "busy2": "beside 2 busy processes",
    "stage": "beside a fine-tuning",
}
BUSY = {"idle": 0, "busy1": 1, "busy2": 2, "stage": 0}
WORKLOADS = {
    "finetune": "fine-tuning: seconds per example (forward and backward, micro-batch 1; a step is 8)",
    "calibration": "calibration: seconds per batch of 8",
    "evaluation": "evaluation: seconds per batch of 16",
}
WAITS = ("passive", "active")
IDLE_LOSS = 0.10  # at most 10% slower than the fastest policy when idle
COLLAPSE = 2.0  # at most 2× its own idle time beside one busy process
SPIN = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"
QUICK_RESULTS = Path("/tmp/emloc-threads-quick")


def policy_env(threads: int, wait: str) -> dict[str, str]:
    """The environment a measurement (and its companion fine-tuning) starts with."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": wait.upper()}


def policy_name(threads: int, wait: str) -> str:
    return f"{threads} thread{'s' if threads > 1 else ''}, {wait}"


# ----------------------------------------------------------------------------- the pure parts (tested)


def cells(rows: list[dict]) -> dict[tuple[int, str], dict[tuple[str, str], float]]:
    """{(threads, wait): {(condition, workload): seconds}} from the result rows."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["threads"], r["wait"]), {})[(r["condition"], r["workload"])] = r["seconds"]
    return out


def _best(table: dict, condition: str, workload: str) -> float:
    return min(t[(condition, workload)] for t in table.values() if (condition, workload) in t)


def scores(rows: list[dict]) -> dict[tuple[int, str], dict[str, float]]:
    """Per policy, each the worst over the workloads: `idle_loss`, its idle time over the fastest idle time,
    minus 1; `collapse`, its time beside one busy process over the fastest idle time (the machine's own pace, so
    a policy slow when idle gains nothing by it); `worst`, its time over the fastest in any condition; and `mean`,
    the geometric mean of those ratios.
    """
    table = cells(rows)
    workloads = sorted({w for t in table.values() for _, w in t})
    out = {}
    for policy, t in table.items():
        idle = [t[("idle", w)] / _best(table, "idle", w) for w in workloads if ("idle", w) in t]
        busy = [t[("busy1", w)] / _best(table, "idle", w) for w in workloads if ("busy1", w) in t]
        ratios = [s / _best(table, c, w) for (c, w), s in t.items()]
        out[policy] = {
            "idle_loss": max(idle) - 1 if idle else math.nan,
            "collapse": max(busy) if busy else math.nan,
            "worst": max(ratios),
            "mean": math.exp(statistics.fmean(math.log(r) for r in ratios)),
        }
    return out


def choose_policy(rows: list[dict], *, idle_loss: float = IDLE_LOSS, collapse: float = COLLAPSE) -> dict:
    """The policy for the stages, from measured rows ({condition, threads, wait, workload, seconds}).

    1. Policies that lose at most `idle_loss` when idle and never collapse more than `collapse`× beside
       one busy process (its time there over the fastest idle time, see `scores`): the one with the smallest
       geometric mean of its times over the fastest, across every condition and workload.
    2. Else, those that never collapse: the one that loses least when idle.
    3. Else the one whose worst time over the fastest, in any condition, is smallest.
    Ties go to fewer threads, then to the passive wait policy.
    """
    s = scores(rows)
    if not s or any(math.isnan(v["idle_loss"]) or math.isnan(v["collapse"]) for v in s.values()):
        raise ValueError("choosing a policy needs every policy measured idle and beside one busy process")

    def order(key):
        return lambda p: (s[p][key], p[0], WAITS.index(p[1]) if p[1] in WAITS else len(WAITS))

    both = [p for p in s if s[p]["idle_loss"] <= idle_loss + 1e-12 and s[p]["collapse"] <= collapse]
    robust = [p for p in s if s[p]["collapse"] <= collapse]
    if both:
        policy, why = (
            min(both, key=order("mean")),
            (
                f"it loses at most {idle_loss:.0%} when idle and never collapses more than {collapse:g}× beside one "
                "busy process, and of those it is fastest across every condition (geometric mean)"
            ),
        )
    elif robust:
        policy, why = (
            min(robust, key=order("idle_loss")),
            (
                f"no policy both loses at most {idle_loss:.0%} when idle and stays within {collapse:g}× beside one "
                f"busy process; of those that stay within {collapse:g}×, it loses least when idle"
            ),
        )
    else:
        policy, why = (
            min(s, key=order("worst")),
            (
                f"every policy collapses more than {collapse:g}× beside one busy process; its worst time over the "
                "fastest, in any condition, is the smallest"
            ),
        )
    return {"threads": policy[0], "wait": policy[1], "why": why, **s[policy]}


def markdown(rows: list[dict], choice: dict, header: list[str]) -> str:
    """The report: `header` lines, one table per workload, the scores and the choice."""
    table, s = cells(rows), scores(rows)
    policies = sorted(table, key=lambda p: (p[0], WAITS.index(p[1]) if p[1] in WAITS else len(WAITS)))
    conditions = [c for c in CONDITIONS if any(c == k[0] for t in table.values() for k in t)]
    lines = [*header]
    for w, title in WORKLOADS.items():
        if not any(w == k[1] for t in table.values() for k in t):
            continue
        lines += ["", f"## {title}", ""]
        lines.append("| threads | wait | " + " | ".join(CONDITIONS[c] for c in conditions) + " |")
        lines.append("|---|---|" + "---|" * len(conditions))
        for p in policies:
            t = table[p]
            values = [f"{t[(c, w)]:.3f}" if (c, w) in t else "–" for c in conditions]
            lines.append(f"| {p[0]} | {p[1]} | " + " | ".join(values) + " |")
    lines += [
        "",
        "## Policies",
        "",
        "Each the worst over the workloads. Idle loss: a policy's idle time over the fastest idle time, minus 1. "
        "Collapse: its time beside one busy process over the fastest idle time. Worst and mean: its times over "
        "the fastest in every condition and workload, the largest and the geometric mean.",
        "",
        "| threads | wait | idle loss | collapse beside 1 busy | worst × fastest | mean × fastest |",
        "|---|---|---|---|---|---|",
    ]
    for p in policies:
        v = s[p]
        mark = "**" if (p[0], p[1]) == (choice["threads"], choice["wait"]) else ""
        lines.append(
            f"| {mark}{p[0]}{mark} | {mark}{p[1]}{mark} | {v['idle_loss']:+.0%} | ×{v['collapse']:.2f} | "
            f"×{v['worst']:.2f} | ×{v['mean']:.2f} |"
        )
    lines += [
        "",
        f"**Chosen: {policy_name(choice['threads'], choice['wait'])}**: {choice['why']}. "
        f"`threads: auto` uses {AUTO_THREADS} thread{'s' if AUTO_THREADS > 1 else ''} on machines of up to "
        f"{SMALL_MACHINE} cores (emloc_nb.threads.AUTO_THREADS): "
        + (
            "the same count."
            if choice["threads"] == AUTO_THREADS
            else "another count. If this machine was otherwise idle, change AUTO_THREADS and its reasons there."
        ),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- measuring (child processes)


def _load(model_name: str):
    """(model, tokenizer, task): SmolLM2 through the project's loader, or a tiny llama for --quick."""
    import datasets

    from emloc_nb import load_model, movie_sentiment

    datasets.disable_progress_bars()  # tokenising's bars
    if model_name == "tiny":
        from emloc_nb.tiny import tiny_model

        model, tok = tiny_model("llama")
    else:
        model, tok = load_model(model_name)
    return model, tok, movie_sentiment()


def _trainer(model, tok, task, n: int):
    """A LoRA on `model` as the default recipe attaches it, an optimiser, and `n` encoded training examples."""
    import torch

    from emloc_nb.config import RunConfig
    from emloc_nb.lora import attach_lora
    from emloc_nb.tokens import tokenize
    from emloc_nb.training import training_collator

    config = RunConfig()
    peft_model = attach_lora(model, config.lora)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=config.train.lr)
    examples = tokenize(tok, task.train.select(range(n)), max_length=config.train.max_length).to_list()
    return peft_model, optimizer, examples, training_collator(tok, model)


def _micro_step(peft_model, collate, example: dict) -> None:
    from emloc_nb.scoring import answer_nll

    nll, mask = answer_nll(peft_model, collate([example]))
    (nll[mask].sum() / mask.sum()).backward()


def measure(args) -> None:
    """One process, one policy (from its environment): every workload's iteration times."""
    import torch

    from emloc_nb.calibration import _default_forward, collect_stats
    from emloc_nb.config import RunConfig
    from emloc_nb.measure import return_freed_memory
    from emloc_nb.scoring import choice_logprobs
    from emloc_nb.tokens import batches

    return_freed_memory()  # as in a stage process
    torch.manual_seed(0)
    model, tok, task = _load(args.model)
    config, n = RunConfig(), args.warmup + args.iterations
    c, e = config.calibration, config.evaluation
    out = {"threads": torch.get_num_threads(), "wait": os.environ.get("OMP_WAIT_POLICY")}

    times: list[float] = []

    def timed_forward(model, batch):
        start = time.perf_counter()
        _default_forward(model, batch)
        times.append(time.perf_counter() - start)

    data = batches(tok, task.train, batch_size=c.batch_size, limit=c.batch_size * n, max_length=c.max_length)
    collect_stats(model, data, forward_fn=timed_forward, progress=False)
    out["calibration"] = times[args.warmup :]

    prompts = list(task.test.select(range(e.batch_size * n))["messages"])
    times = []
    for i in range(n):
        start = time.perf_counter()
        choice_logprobs(model, tok, prompts[i * e.batch_size : (i + 1) * e.batch_size], task.choices)
        times.append(time.perf_counter() - start)
    out["evaluation"] = times[args.warmup :]

    peft_model, optimizer, examples, collate = _trainer(model, tok, task, n)
    optimizer.zero_grad(set_to_none=True)
    times = []
    for example in examples:
        start = time.perf_counter()
        _micro_step(peft_model, collate, example)
        times.append(time.perf_counter() - start)
    optimizer.step()
    out["finetune"] = times[args.warmup :]
    emit(out)


def companion(args) -> None:
    """The other fine-tuning: ready once loaded, then LoRA steps (batch 8, micro-batch 1) until --busy-seconds."""
    model, tok, task = _load(args.model)
    peft_model, optimizer, examples, collate = _trainer(model, tok, task, 8)
    print("ready", flush=True)
    deadline = time.monotonic() + args.busy_seconds
    i = 0
    while time.monotonic() < deadline:
        _micro_step(peft_model, collate, examples[i % len(examples)])
        i += 1
        if i % len(examples) == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def beside(condition: str, threads: int, wait: str, args):
    """The condition's other processes, running while the block runs, stopped after it (each by its own pid)."""
    procs = [
        subprocess.Popen([sys.executable, "-c", SPIN, str(args.busy_seconds)], stdout=subprocess.DEVNULL)
        for _ in range(BUSY[condition])
    ]
    try:
        if condition == "stage":
            other = subprocess.Popen(
                [sys.executable, str(HERE / "threads.py"), "--companion", *_shared(args)],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, **policy_env(threads, wait)},
            )
            procs.append(other)
            if other.stdout.readline().strip() != "ready":
                raise RuntimeError("the companion fine-tuning did not start (run it alone: --companion)")
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _shared(args) -> list[str]:
    return [
        "--model", args.model, "--warmup", str(args.warmup), "--iterations", str(args.iterations),
        "--busy-seconds", str(args.busy_seconds),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny model, 1 + 1 iterations, 2 policies, 3 conditions"
    )
    parser.add_argument("--model", help="smollm2-135m-instruct (default), or tiny")
    parser.add_argument("--warmup", type=int, help="untimed iterations of each workload (default 1)")
    parser.add_argument("--iterations", type=int, help="timed iterations of each workload (default 2)")
    parser.add_argument("--threads", type=int, nargs="+", help="thread counts (default: 1 to the number of cores)")
    parser.add_argument("--waits", nargs="+", choices=WAITS, default=list(WAITS), help="OMP_WAIT_POLICY values")
    parser.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), help="default: all (--quick: 3)")
    parser.add_argument("--busy-seconds", type=float, default=900, help="longest life of a busy process")
    parser.add_argument("--results", type=Path, help=f"where to write (default {RESULTS}; --quick: {QUICK_RESULTS})")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--companion", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or ("tiny" if args.quick else "smollm2-135m-instruct")
    args.warmup = 1 if args.warmup is None else args.warmup
    args.iterations = args.iterations or (1 if args.quick else 2)
    args.conditions = args.conditions or [c for c in CONDITIONS if not (args.quick and c == "busy2")]
    if args.child:
        return measure(args)
    if args.companion:
        return companion(args)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    counts = args.threads or list(range(1, cores + 1))
    policies = [(n, w) for n in counts for w in args.waits]
    if args.quick and not args.threads:  # both ends, each wait policy once
        policies = [(1, "passive"), (max(counts), "active")]
    before = machine()
    started, rows = time.time(), []
    for condition in args.conditions:
        for threads, wait in policies:
            with beside(condition, threads, wait, args):
                r = child(HERE / "threads.py", "--child", *_shared(args), env=policy_env(threads, wait), timeout=1800)
            for workload in WORKLOADS:
                rows.append(
                    {
                        "condition": condition,
                        "threads": threads,
                        "wait": wait,
                        "workload": workload,
                        "seconds": statistics.median(r[workload]),
                        "times": r[workload],
                        "torch_threads": r["threads"],
                    }
                )
            print(f"{CONDITIONS[condition]}, {policy_name(threads, wait)}: "
                  + ", ".join(f"{w} {statistics.median(r[w]):.3f} s" for w in WORKLOADS), flush=True)  # fmt: skip
    after = machine()
    la, lb = before["load_average"] or [0, 0, 0], after["load_average"] or [0, 0, 0]
    header = [
        "# Threads: which thread count holds up on a shared machine",
        "",
        f"CPU: {before['cpu']}, {before['cores']} cores; torch {before['torch']}. Model: {args.model}, the default "
        "recipe. Each cell: the median seconds of "
        f"{args.iterations} timed iterations after {args.warmup} warm-up, in a fresh process started with "
        "OMP_NUM_THREADS = MKL_NUM_THREADS = threads and that OMP_WAIT_POLICY. Busy processes are Python spin "
        "loops; a fine-tuning beside it is a second process fine-tuning the same model with the same setting. "
        f"Load average {la[0]:.1f} at the start, {lb[0]:.1f} at the end; {time.time() - started:.0f} s in all.",
    ]
    conditions_present = {r["condition"] for r in rows}
    if {"idle", "busy1"} <= conditions_present:
        choice = choose_policy(rows)
    else:
        choice = {"threads": None, "wait": None, "why": "not chosen: needs the idle and busy1 conditions"}
    text = markdown(rows, choice, header) if choice["threads"] is not None else "\n".join(header + ["", choice["why"]])
    directory = args.results or (QUICK_RESULTS if args.quick else RESULTS)
    payload = {"rows": rows, "choice": choice, "args": {k: str(v) for k, v in vars(args).items()}}
    write_results("threads", {**payload, "machine": [before, after]}, text, directory=directory)


if __name__ == "__main__":
    sys.exit(main())
