"""Running the stages of a run: each in a fresh process by default, its seconds and peak memory recorded.

A stage process both frees memory between stages and records the stage's true peak resident
memory (a stage record: seconds, peak and baseline RSS, the peak of each phase). The evaluate
stage runs one process per setting, then writes the results table. The child process is
emloc_nb.stage_process; `execute` is what it runs, and what an in-process run calls directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import EmlocError
from .eta import Pace
from .layout import record_name
from .measure import PhaseMeter, huge_pages_env, return_freed_memory, rss_mb
from .runlock import LOCK_ENV, run_lock
from .serial import write_json
from .stage_bodies import finetune_with_trainer as trainer_lora
from .stages import STAGES, check_provenance, get, recording
from .threads import thread_env, using_threads

PARENT_ENV = "EMLOC_PARENT_PID"  # a stage process dies with the process that started it (emloc_nb.stage_process)
_CHILD = "import sys; from emloc_nb.stage_process import main; sys.exit(main(sys.argv[1:]))"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is (`sigterm_interrupts`): it stops as on Ctrl-C."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops this process as Ctrl-C does (an exception, not the default immediate exit), so that every write
    in progress removes its temporary, a stage child is stopped and the run's lock released."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted(e: KeyboardInterrupt) -> tuple[str, int]:
    """The one line and the exit status (128 + the signal) for a run stopped by Ctrl-C or SIGTERM."""
    terminated = isinstance(e, Terminated)
    return (
        f"interrupted by {'SIGTERM' if terminated else 'SIGINT (Ctrl-C)'}; nothing half-written was kept. "
        "Rerun the same command to resume.",
        128 + (signal.SIGTERM if terminated else signal.SIGINT),
    )


def run_stage(run, name: str, *, part: str | None = None, isolate: bool = True) -> None:
    """Run one stage unless it is done; `isolate`: in a fresh process that records its peak memory.

    `part`: only that part of a stage that has parts (evaluate: one setting, e.g. "original")."""
    stage = get(name)
    if part is not None:
        if stage.parts is None or part not in stage.parts(run.config):
            raise EmlocError(
                f"Stage {name} has no part {part!r}. Its parts: {stage.parts and stage.parts(run.config)}."
            )
        with run.writing():
            if not run.has(stage.part_writes.format(part)):
                for needed in stage.inputs(part):  # in full, as for a whole stage below
                    run.verify(needed)
            _run_part(run, stage, part, isolate)
        return
    with run.writing():
        if stage.done(run):
            return
        missing = [a for a in stage.reads if not run.has(a)]
        if missing:
            writers = [s.name for s in STAGES.values() if set(s.writes) & set(missing)]
            raise EmlocError(
                f"Stage {name} needs {', '.join(missing)} in {run.dir}, which {' and '.join(writers)} "
                "writes. Run that stage first (`emloc run`, or Run.run_all)."
            )
        for artifact in stage.reads:  # in full, before anything is computed or written
            run.verify(artifact)
        if stage.parts is None:
            _run_step(run, name, isolate)
            return
        for part in stage.parts(run.config):
            _run_part(run, stage, part, isolate)
        stage.finish(run)


def _run_part(run, stage, part: str, isolate: bool) -> None:
    """One part of a stage (evaluate: one setting) unless it is written; then its provenance is checked."""
    artifact = stage.part_writes.format(part)
    if not run.has(artifact):
        _run_step(run, f"{stage.name}:{part}", isolate)
    check_provenance(run, artifact)


def run_all(run, *, isolate: bool = True, until: str | None = None) -> None:
    """Run every stage not yet done, in order (up to and including `until`)."""
    names = list(STAGES)
    if until is not None:
        names = names[: names.index(get(until).name) + 1]
    with run.writing():
        pace = Pace(run.config)  # after each stage it ran, how long the rest will take (emloc_nb.eta)
        for i, name in enumerate(names):
            started, ran = time.time(), not get(name).done(run)
            run_stage(run, name, isolate=isolate)
            if ran:
                pace.ran(name, time.time() - started)
                note = pace.note(run, names[i + 1 :])
                if note:
                    print(f"[emloc] {note}", flush=True)


def _run_step(run, step: str, isolate: bool) -> None:
    if not isolate:
        execute(run, step, isolated=False)
        return
    started = time.time()
    print(f"[emloc] {step} ...", flush=True)
    with run_lock(run.dir) as lock_fd:  # held already; the child shares it through the inherited descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                str(run.dir),
                step,
                *(["--trust-remote-code"] if run.trust_remote_code else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            pass_fds=(lock_fd,),
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                LOCK_ENV: f"{lock_fd}:{os.path.realpath(run.dir)}",
                PARENT_ENV: str(os.getpid()),
                **thread_env(run.config.threads),  # before torch loads in the child (emloc_nb.threads)
                **huge_pages_env(),  # glibc reads it at start: the fixed mmap threshold at a fraction of its cost
            },
        )
        try:
            tail: list[str] = []
            for line in proc.stdout:
                tail = (tail + [line.rstrip()])[-20:]
                print("   ", line.rstrip(), flush=True)
            code = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted here (Ctrl-C, SIGTERM): the child stops too, cleaning up after itself
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()  # its temporaries go at the next start (emloc_nb.atomic.clean_leftovers)
                    proc.wait()
    if code != 0:
        errors = [line.removeprefix("error: ") for line in tail if line.startswith("error: ")]
        if errors:
            raise EmlocError(f"Stage {step} failed: {errors[-1]}")
        raise EmlocError(
            f"Stage {step} crashed (exit code {code}); its output is above. Rerun to resume, or report the bug."
        )
    record = run.stage_records()[record_name(step)]
    print(f"[emloc] {step} done in {time.time() - started:.0f} s, peak {record['peak_rss_mb']:.0f} MB", flush=True)


def execute(run, step: str, *, isolated: bool) -> None:
    """Run one step ("calibrate", "evaluate:original", ...) in this process and write its stage record."""
    import torch  # noqa: F401  (loaded first, as it always was: the baseline counts it; the stage imports the rest)

    return_freed_memory()
    name, _, part = step.partition(":")
    stage = get(name)
    if stage.parts is not None and part not in stage.parts(run.config):
        raise EmlocError(f"{step} is not a step of this run. Steps of {name}: {', '.join(stage.parts(run.config))}.")
    progress = True  # a bar in a terminal or notebook, else a line every few seconds (emloc_nb.progress)
    baseline = rss_mb()
    started = time.time()
    with run.writing(), recording(run, stage, part or None):
        with using_threads(run.config.threads) as threads, PhaseMeter() as meter:  # in process: the caller's after
            record = stage.body(run, stage, part or None, progress)
        record.update(
            step=step,
            seconds=time.time() - started,
            threads=threads,
            isolated=isolated,
            baseline_rss_mb=baseline,
            # In a shared process the peak includes what earlier stages left; each phase's peak is its own either way.
            peak_rss_mb=meter.peak_rss_mb if isolated else None,
            phases=meter.phases,
            peak_method=meter.method,
        )
        if meter.peak_cuda_mb is not None:
            record["peak_cuda_mb"] = meter.peak_cuda_mb
        write_json(run.path(f"stage_record:{record_name(step)}"), record)


def finetune_with_trainer(run, target: str = "emulator", **training_args) -> Path:
    """The fine-tuning stage through transformers' Trainer (runs under torchrun); same adapter format."""
    stage = get(f"finetune_{target}")
    # Under torchrun only the first rank writes (checkpoints, adapter), so only it holds the run's lock.
    first_rank = int(os.environ.get("RANK", "0")) == 0
    with run.writing() if first_rank else contextlib.nullcontext(), recording(run, stage, None):
        if stage.done(run):
            return run.adapter_dir(target)
        return trainer_lora(run, target, **training_args)
