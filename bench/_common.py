"""What the benchmarks share: measurements in child processes, interleaved repeats, the machine, results files.

Each measurement runs in a fresh process (`child`), so that its memory is its own; it
prints one JSON line last. Timings on this shared machine are noisy, so settings are
repeated in interleaved rounds (A B C A B C ...) and reported as medians; the load
average before and after is recorded to say how contended the run was.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def child(script: str | Path, *args: str, timeout: float = 3600, env: dict | None = None) -> dict:
    """Run `python script args...` (`env`: added to this environment) and return the JSON object on its last line."""
    done = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(map(str, args))} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def emit(result: dict) -> None:
    """The child's answer: one JSON line, last."""
    print(json.dumps(result), flush=True)


def interleaved(settings: list, rounds: int, measure) -> dict:
    """measure(setting) for each setting, in `rounds` interleaved rounds; {setting: [results...]}."""
    out = {s: [] for s in settings}
    for r in range(rounds):
        for s in settings:
            out[s].append(measure(s))
            print(f"round {r + 1}/{rounds} {s}: {json.dumps(out[s][-1])[:300]}", flush=True)
    return out


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def machine() -> dict:
    """Where and under what load the benchmark ran."""
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%d %H:%M"),
    }


def build_default_emulator(path: str | Path, stats_path: str | Path | None = None) -> dict:
    """SmolLM2's emulator as the default recipe builds it (64 calibration examples, RunConfig's rank plan).

    `stats_path`: also save the calibration statistics it was built from there.
    """
    from emloc_nb import batches, build_emulator, collect_stats, load_model, movie_sentiment
    from emloc_nb.config import RunConfig

    config = RunConfig()
    model, tok = load_model()
    c = config.calibration
    calib = batches(tok, movie_sentiment().train, batch_size=c.batch_size, limit=c.examples, max_length=c.max_length)
    stats = collect_stats(model, calib, progress=False)
    if stats_path is not None:
        stats.save(stats_path, overwrite=True)
    build_emulator(model, stats, config.rank_plan(), progress=False).save(path, tokenizer=tok, overwrite=True)
    return {"built": str(path)}


def random_batch(vocab: int, batch: int, sequence: int, *, answer: int = 0, generator=None) -> dict:
    """Random token ids (memory depends only on shapes), no padding; with `answer`, its last tokens labelled."""
    import torch

    ids = torch.randint(0, vocab, (batch, sequence), generator=generator)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if answer:
        out["labels"] = torch.full_like(ids, -100)
        out["labels"][:, -answer:] = ids[:, -answer:]
    return out


def train_step(peft_model, optimizer, batch: dict) -> float:
    """One LoRA step on the answer tokens' mean loss, as `finetune` takes one on a whole batch; the loss."""
    from emloc_nb.scoring import answer_nll

    optimizer.zero_grad(set_to_none=True)
    nll, mask = answer_nll(peft_model, batch)
    loss = nll[mask].mean()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def write_results(name: str, payload: dict, markdown: str, *, directory: Path = RESULTS) -> None:
    """<directory>/<name>.json and .md (bench/results by default)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (directory / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)


def contention_note(before: dict, after: dict) -> str:
    la, lb = before.get("load_average") or [0, 0, 0], after.get("load_average") or [0, 0, 0]
    return (
        f"Machine: {before['cpu']}, {before['cores']} cores, torch {before['torch']} with "
        f"{before['torch_threads']} thread(s). Load average {la[0]:.1f} at the start and {lb[0]:.1f} at the end "
        "(the machine is shared: times are medians of interleaved repeats; memory figures do not depend on load)."
    )
