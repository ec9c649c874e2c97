"""The stages of a run, one function each in one registry; running them; the results table.

    calibrate → emulator → drift → finetune_emulator (→ finetune_original) → correct → evaluate

Each `Stage` in `STAGES` says what it reads and writes (run artifacts, see
emloc_nb.run.LAYOUT; a stage is done when everything it writes exists) and which
model it loads. Adding a stage is one function and one entry here.

By default every stage runs in a fresh Python process, which both frees memory
between stages and records each stage's true peak resident memory (a stage record:
seconds, peak and baseline RSS). The evaluate stage runs one process per setting
(`SETTINGS`), then writes the results table.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .artifacts import (
    LOCK_ENV,
    atomic_path,
    differences,
    manifest_digest,
    provenance,
    read_manifest,
    run_lock,
    write_json,
)
from .config import RunConfig
from .errors import EmlocError
from .run import ADAPTERS, Run

Body = Callable[[Run, "Stage", "str | None", bool], dict]  # (run, stage, part, progress) -> extra record fields


@dataclass(frozen=True)
class Stage:
    name: str
    body: Body
    reads: tuple[str, ...]  # run artifacts it needs
    writes: tuple[str, ...]  # run artifacts it writes: the stage is done when they all exist
    model: str | None  # the model its function loads (base_model): "original" or "emulator"; evaluate: per setting
    doc: str
    # The config keys (top level or section) its result depends on directly: recorded in its manifests, and a
    # change of one makes it stale (reconfigure).
    settings: tuple[str, ...] = ()
    enabled: Callable[[RunConfig], bool] = lambda config: True  # a disabled stage counts as done
    parts: Callable[[RunConfig], list[str]] | None = None  # run one process each (evaluate: one per setting)
    part_writes: str = ""  # the artifact each part writes, "{}" standing for the part
    part_reads: Callable[[str], tuple[str, ...]] | None = None  # what one part reads, when not all of `reads`
    finish: Callable[[Run], None] | None = None  # after every part

    def done(self, run: Run) -> bool:
        """Whether everything it writes is there, written by this stage with this run's settings and inputs.

        An output that is there but was produced otherwise (copied from another run, or from
        inputs that have changed since) is refused with an EmlocError, never silently reused.
        """
        if not self.enabled(run.config):
            return True
        for artifact in self.writes:
            if not run.has(artifact):
                return False
            if run.path(artifact).is_dir():  # directories carry manifests; the results table is derived
                check_provenance(run, artifact)
        return True

    def inputs(self, part: str | None) -> tuple[str, ...]:
        return self.part_reads(part) if part and self.part_reads else self.reads

    def outputs(self, config: RunConfig) -> list[str]:
        """Every artifact it writes, its parts' included."""
        parts = self.parts(config) if self.parts else []
        return [*self.writes, *(self.part_writes.format(p) for p in parts)]


# ----------------------------------------------------------------------------- provenance


def step_provenance(run: Run, stage: Stage, part: str | None) -> dict:
    """What a step records in the manifests it writes: its settings and the manifests of its inputs."""
    config = run.config.to_dict()
    return {
        "step": f"{stage.name}:{part}" if part else stage.name,
        "config": {k: config[k] for k in stage.settings},
        "inputs": {a: manifest_digest(run.path(a)) for a in stage.inputs(part) if run.has(a)},
    }


def _writer(artifact: str) -> tuple[Stage, str | None]:
    name, _, key = artifact.partition(":")
    for stage in STAGES.values():
        if artifact in stage.writes:
            return stage, None
        if stage.part_writes and stage.part_writes.partition(":")[0] == name and key:
            return stage, key
    return STAGES["emulator"], None  # spectra: written inside the emulator


def check_provenance(run: Run, artifact: str) -> None:
    """Refuse `artifact` unless this run's stage wrote it with this run's settings and its current inputs."""
    stage, part = _writer(artifact)
    path = run.path(artifact)
    recorded = read_manifest(path).get("run")
    step = f"{stage.name}:{part}" if part else stage.name
    fix = f"Delete {path} to have `emloc run` (or the {stage.name} stage) recompute it."
    if not isinstance(recorded, dict) or recorded.get("step") != step:
        raise EmlocError(
            f"{path} was not written by this run's {step} step (it was copied in, or written by hand). {fix}"
        )
    expected = step_provenance(run, stage, part)
    if recorded.get("config") != expected["config"]:
        raise EmlocError(
            f"{path} was produced with other settings than this run's "
            f"({differences(recorded['config'], expected['config'])}). {fix}"
        )
    stale = [a for a, digest in expected["inputs"].items() if (recorded.get("inputs") or {}).get(a) != digest]
    if stale:
        raise EmlocError(f"{path} was computed from another {', '.join(stale)} than the run now holds. {fix}")


@contextlib.contextmanager
def recording(run: Run, stage: Stage, part: str | None) -> Iterator[None]:
    """Artifacts written inside this block record the step's provenance in their manifests."""
    token = provenance.set(step_provenance(run, stage, part))
    try:
        yield
    finally:
        provenance.reset(token)


def base_model(run: Run, which: str, dtype: str | None = None):
    """(model, tokenizer) of the "original" or the "emulator": the one place that picks them.

    On the run's device, in its dtype or in `dtype` (fine-tuning with bf16 frozen weights).
    """
    if which == "original":
        return run.original(dtype)
    if which == "emulator":
        return run.emulator(dtype=dtype).model, run.emulator_tokenizer()
    raise EmlocError(f"Unknown base model {which!r}: use 'original' or 'emulator'.")


# ----------------------------------------------------------------------------- the stage functions


def _streamed(run: Run, progress: bool, **what):
    """emloc_nb.streaming.stream on the run's model, device and dtype (emulator.streaming: true)."""
    from .streaming import stream

    c = run.config
    return stream(
        c.model, dtype=c.dtype, device=c.device, trust_remote_code=run.trust_remote_code, progress=progress, **what
    )


def _calibrate(run: Run, stage: Stage, part: str | None, progress: bool) -> dict:
    from .calibration import collect_stats
    from .memory import weights_mb

    if run.config.emulator.streaming:  # both sets in one pass over the blocks; the whole original is never loaded
        sets = _streamed(
            run, progress, batch_sets={"train": run.batches("train"), "heldout": run.batches("validation")}
        )
        for split, stats in sets.items():
            stats.save(run.path(f"calibration:{split}"), overwrite=True)
        return {}
    model, _ = base_model(run, stage.model)
    for stats, examples in (("train", "train"), ("heldout", "validation")):
        collect_stats(model, run.batches(examples), progress=progress).save(
            run.path(f"calibration:{stats}"), overwrite=True
        )
    return {"weights_mb": weights_mb(model)}


def _emulator(run: Run, stage: Stage, part: str | None, progress: bool) -> dict:
    from .emulator import build_emulator
    from .memory import weights_mb

    e = run.config.emulator
    if e.streaming:
        _streamed(
            run,
            progress,
            stats=run.calibration("train"),
            output=run.path("emulator"),
            plan=run.config.rank_plan(),
            mode=e.mode,
            eps=e.eps,
            shrinkage=e.shrinkage,
            overwrite=True,
        )
        return {}
    model, tokenizer = base_model(run, stage.model)
    emulator = build_emulator(
        model,
        run.calibration("train"),
        run.config.rank_plan(),
        mode=e.mode,
        eps=e.eps,
        shrinkage=e.shrinkage,
        progress=progress,
    )
    emulator.save(run.path("emulator"), tokenizer=tokenizer, overwrite=True)
    return {"weights_mb": weights_mb(emulator.model)}


def _drift(run: Run, stage: Stage, part: str | None, progress: bool) -> dict:
    from .drift import drift

    model, tokenizer = base_model(run, stage.model)
    report = drift(
        model,
        run.emulator(with_original=True),
        run.batches("validation"),
        heldout=run.calibration("heldout"),
        tokenizer=tokenizer,
        progress=progress,
    )
    report.save(run.path("drift"), overwrite=True)
    return {}


def _init_stats(run: Run):
    """The calibration statistics a data-aligned LoRA starts from (lora.init="eigen"), else None."""
    return run.calibration("train") if run.config.lora.init == "eigen" else None


def _finetune(run: Run, stage: Stage, part: str | None, progress: bool) -> dict:
    from .memory import weights_mb
    from .training import finetune

    model, tokenizer = base_model(run, stage.model, run.config.train.frozen_dtype)
    result = finetune(
        model,
        tokenizer,
        run.task(),
        run.path(f"finetune:{stage.model}"),
        lora=run.config.lora,
        config=run.config.train,
        seed=run.config.seed,
        stats=_init_stats(run),
        progress=progress,
    )
    return {"weights_mb": weights_mb(model), "final_loss": result.history[-1]["loss"]}


def _correct(run: Run, stage: Stage, part: str | None, progress: bool) -> dict:
    from .correction import correct_lora, prior_inputs

    model, tokenizer = base_model(run, stage.model)
    c = run.config.correction
    report = correct_lora(
        model,
        run.emulator(with_original=True),
        run.adapter_dir("emulator"),
        run.path("corrected_adapter"),
        clamp=c.clamp,
        kappa=c.kappa,
        heldout=run.calibration("heldout"),
        calibration=run.calibration("train"),
        tokenizer=tokenizer,
        overwrite=True,
        progress=progress,
        **prior_inputs(run, c.prior, c.prior_target),
    )
    report.save(run.path("correction"), overwrite=True)
    return {}


class Setting(NamedTuple):
    description: str
    base: str  # "original" or "emulator"
    adapter: str | None  # Run.adapter_dir(adapter): "original", "emulator" or "corrected"
    check_base: bool  # False: apply an adapter trained on another base (the naive transfer)


SETTINGS = {
    "original": Setting("original, zero-shot", "original", None, True),
    "original+lora": Setting("original + LoRA trained on the original (upper bound)", "original", "original", True),
    "emulator": Setting("emulator, zero-shot", "emulator", None, True),
    "emulator+lora": Setting("emulator + LoRA", "emulator", "emulator", True),
    "original+naive": Setting("original + naive (uncorrected) emulator LoRA", "original", "emulator", False),
    "original+corrected": Setting("original + corrected LoRA", "original", "corrected", True),
}
TRAINED_BY = {"original": "finetune_original", "emulator": "finetune_emulator", "corrected": "finetune_emulator"}


def setting_reads(s: Setting) -> tuple[str, ...]:
    """The run artifacts a setting's evaluation reads: the emulator for an emulator base, and its adapter."""
    return (("emulator",) if s.base == "emulator" else ()) + ((ADAPTERS[s.adapter],) if s.adapter else ())


def settings(config: RunConfig) -> list[str]:
    """The settings a run evaluates: the LoRA trained on the original only with `baseline`."""
    return [s for s, v in SETTINGS.items() if config.baseline or v.adapter != "original"]


def _evaluate(run: Run, stage: Stage, setting: str | None, progress: bool) -> dict:
    from peft import PeftModel

    from .evaluate import evaluate
    from .lora import load_adapter
    from .memory import weights_mb

    s = SETTINGS[setting]
    model, tokenizer = base_model(run, s.base)
    if s.adapter:
        model = load_adapter(model, run.adapter_dir(s.adapter), check_base=s.check_base)
    ev = run.config.evaluation
    try:
        result = evaluate(
            model, tokenizer, run.task(), split=ev.split, limit=ev.limit, batch_size=ev.batch_size, progress=progress
        )
        record = {"weights_mb": weights_mb(model)}
    finally:
        if isinstance(model, PeftModel):  # in-process runs share the loaded models across stages
            model.unload()
    result.save(run.path(f"evaluation:{setting}"), overwrite=True)
    return record


def write_results(run: Run) -> None:
    """The results table (json and markdown): accuracy, loss and memory per setting."""
    records = run.stage_records()
    rows = []
    for setting in settings(run.config):
        ev, s = run.eval_result(setting), SETTINGS[setting]
        train = records.get(TRAINED_BY.get(s.adapter), {})
        rows.append(
            {
                "setting": setting,
                "description": s.description,
                **ev.summary(),
                "eval_peak_mb": records.get(record_name(f"evaluate:{setting}"), {}).get("peak_rss_mb"),
                "train_peak_mb": train.get("peak_rss_mb"),
                "train_weights_mb": train.get("weights_mb"),
            }
        )
    write_json(run.path("results"), {"kind": "results", "config": run.config.to_dict(), "rows": rows})
    with atomic_path(run.path("results_markdown")) as tmp:
        tmp.write_text(results_markdown(rows))


def results_markdown(rows: list[dict]) -> str:
    """The results table; for a choice task also the bias-free views (AUC, balanced accuracy, predictions)."""

    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    def predicted(counts):
        return "–" if not counts else " / ".join(str(n) for n in counts.values())

    choice_task = any(r.get("auc") is not None for r in rows)
    extra = " AUC | balanced accuracy | predicted " + " / ".join(rows[0]["predicted"]) + " |" if choice_task else ""
    lines = [
        "| setting | accuracy | answer loss |" + extra + " examples | fine-tuning peak (MB) | eval peak (MB) |",
        "|---|---|---|" + ("---|---|---|" if choice_task else "") + "---|---|---|",
    ]
    for r in rows:
        views = (
            f" {fmt(r['auc'], '.3f')} | {fmt(r['balanced_accuracy'], '.3f')} | {predicted(r['predicted'])} |"
            if choice_task
            else ""
        )
        lines.append(
            f"| {r['description']} | {r['accuracy']:.3f} | {r['answer_loss']:.3f} |{views} {r['examples']} | "
            f"{fmt(r['train_peak_mb'], '.0f')} | {fmt(r['eval_peak_mb'], '.0f')} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the registry

STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "calibrate",
            _calibrate,
            reads=(),
            writes=("calibration:train", "calibration:heldout"),
            model="original",
            settings=("model", "dtype", "seed", "task", "calibration"),
            doc="second moments of every block linear's input, on training and on held-out examples",
        ),
        Stage(
            "emulator",
            _emulator,
            reads=("calibration:train",),
            writes=("emulator",),
            model="original",
            settings=("dtype", "emulator"),
            doc="the activation-aware SVD emulator and its spectra",
        ),
        Stage(
            "drift",
            _drift,
            reads=("emulator", "calibration:heldout"),
            writes=("drift",),
            model="original",
            settings=("dtype",),
            doc="how far the emulator strays from the original, per layer, per block and end to end",
        ),
        Stage(
            "finetune_emulator",
            _finetune,
            reads=("emulator", "calibration:train"),
            writes=("adapter:emulator",),
            model="emulator",
            settings=("model", "dtype", "seed", "task", "lora", "train"),
            doc="LoRA fine-tuning on the emulator",
        ),
        Stage(
            "finetune_original",
            _finetune,
            reads=("calibration:train",),  # for a data-aligned LoRA (lora.init="eigen")
            writes=("adapter:original",),
            model="original",
            settings=("model", "dtype", "seed", "task", "baseline", "lora", "train"),
            doc="LoRA fine-tuning on the original: the upper bound EMLoC avoids paying for",
            enabled=lambda config: config.baseline,
        ),
        Stage(
            "correct",
            _correct,
            reads=("emulator", "adapter:emulator", "calibration:train", "calibration:heldout"),
            writes=("corrected_adapter", "correction"),
            model="original",
            doc="the emulator's LoRA corrected for the original model (Algorithm 1, then the prior correction)",
            settings=("dtype", "correction"),
        ),
        Stage(
            "evaluate",
            _evaluate,
            reads=("emulator", "adapter:emulator", "corrected_adapter"),
            writes=("results",),
            model=None,
            doc="task accuracy of every setting, and the results table",
            settings=("model", "dtype", "seed", "task", "baseline", "evaluation"),
            parts=settings,
            part_writes="evaluation:{}",
            part_reads=lambda setting: setting_reads(SETTINGS[setting]),
            finish=write_results,
        ),
    ]
}


def stale_stages(changed: set[str]) -> list[str]:
    """The stages whose results a change of these config keys invalidates, and every stage that reads theirs."""
    stale: list[str] = []
    for stage in STAGES.values():  # registry order: readers come after writers
        upstream = {a for name in stale for a in STAGES[name].writes}
        if set(stage.settings) & changed or set(stage.reads) & upstream:
            stale.append(stage.name)
    return stale


def reconfigure(run: Run, changes: list[tuple[str, object]], *, command_stage: str) -> list[str]:
    """Change an existing run's settings (`--set`) and drop the results they make stale; returns those stages.

    Only `command_stage` and later stages may go stale: `emloc correct --clamp 10` redoes the correction and
    the evaluation, but a change that reaches back to an earlier stage needs `emloc run --overwrite`.
    """
    from .config import with_settings

    config = with_settings(run.config, changes)
    old, new = run.config.to_dict(), config.to_dict()
    changed = {k for k in new if new[k] != old[k]}
    if not changed:
        return []
    stale = stale_stages(changed)
    order = list(STAGES)
    early = [s for s in stale if order.index(s) < order.index(command_stage)]
    if early:
        raise EmlocError(
            f"Changing {', '.join(sorted(changed))} makes the {', '.join(early)} stage(s) stale, which this command "
            f"does not run. Start again with `emloc run CONFIG --run-dir {run.dir} --overwrite --set ...`."
        )
    for name in stale:
        for artifact in STAGES[name].outputs(run.config):
            run.discard(artifact)
    run.update_config(config)
    return stale


def get(name: str) -> Stage:
    if name not in STAGES:
        raise EmlocError(f"Unknown stage {name!r}. Stages: {', '.join(STAGES)}.")
    return STAGES[name]


def record_name(step: str) -> str:
    """The stage record's name of a step ("evaluate:original" -> "evaluate-original")."""
    return step.replace(":", "-")


# ----------------------------------------------------------------------------- running


def run_stage(run: Run, name: str, *, isolate: bool = True) -> None:
    stage = get(name)
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
            artifact = stage.part_writes.format(part)
            if not run.has(artifact):
                _run_step(run, f"{name}:{part}", isolate)
            check_provenance(run, artifact)
        stage.finish(run)


def run_all(run: Run, *, isolate: bool = True, until: str | None = None) -> None:
    names = list(STAGES)
    if until is not None:
        names = names[: names.index(get(until).name) + 1]
    with run.writing():
        for name in names:
            run_stage(run, name, isolate=isolate)


def _run_step(run: Run, step: str, isolate: bool) -> None:
    if not isolate:
        execute(run, step, isolated=False)
        return
    started = time.time()
    print(f"[emloc] {step} ...", flush=True)
    code = "import sys; from emloc_nb.stages import main; sys.exit(main(sys.argv[1:]))"
    with run_lock(run.dir) as lock_fd:  # held already; the child shares it through the inherited descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
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
                _PARENT_ENV: str(os.getpid()),
            },
        )
        try:
            tail: list[str] = []
            for line in proc.stdout:
                tail = (tail + [line.rstrip()])[-20:]
                print("   ", line.rstrip(), flush=True)
            code = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted here (Ctrl-C): the child goes too
                proc.kill()
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


def execute(run: Run, step: str, *, isolated: bool) -> None:
    """Run one step ("calibrate", "evaluate:original", ...) in this process and write its stage record."""
    from .memory import PhaseMeter, return_freed_memory, rss_mb

    return_freed_memory()
    name, _, part = step.partition(":")
    stage = get(name)
    if stage.parts is not None and part not in stage.parts(run.config):
        raise EmlocError(f"{step} is not a step of this run. Steps of {name}: {', '.join(stage.parts(run.config))}.")
    progress = True  # a bar in a terminal or notebook, else a line every few seconds (emloc_nb.progress)
    baseline = rss_mb()
    started = time.time()
    with run.writing(), recording(run, stage, part or None):
        with PhaseMeter() as meter:
            record = stage.body(run, stage, part or None, progress)
        record.update(
            step=step,
            seconds=time.time() - started,
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


_PARENT_ENV = "EMLOC_PARENT_PID"


def _die_with_parent() -> None:
    """A stage child must not outlive the process that started it (it would keep training as an orphan).

    On Linux the kernel kills it when the parent dies (prctl PR_SET_PDEATHSIG); everywhere a
    watcher thread checks the parent's pid once a second, which also covers a parent that died
    before the prctl call.
    """
    parent = int(os.environ.get(_PARENT_ENV, "0"))
    if not parent:
        return
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="emloc-parent-watch").start()


def main(argv: list[str] | None = None) -> int:
    """Child-process entry point: main([RUN_DIR, STEP, --trust-remote-code]) runs one step and records its memory."""
    from . import progress

    _die_with_parent()
    args = list(sys.argv[1:] if argv is None else argv)
    trust_remote_code = "--trust-remote-code" in args
    run_dir, step = [a for a in args if a != "--trust-remote-code"][:2]
    progress.stage = step
    if not sys.stderr.isatty():  # datasets' own bars (tokenising) would print carriage returns into the pipe
        import datasets

        datasets.disable_progress_bars()
    try:
        execute(Run(run_dir, trust_remote_code=trust_remote_code), step, isolated=True)
    except EmlocError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def finetune_with_trainer(run: Run, target: str = "emulator", **training_args) -> Path:
    """The fine-tuning stage through transformers' Trainer (runs under torchrun); same adapter format."""
    from .training import finetune_hf

    stage = get(f"finetune_{target}")
    # Under torchrun only the first rank writes (checkpoints, adapter), so only it holds the run's lock.
    first_rank = int(os.environ.get("RANK", "0")) == 0
    with run.writing() if first_rank else contextlib.nullcontext(), recording(run, stage, None):
        if stage.done(run):
            return run.adapter_dir(target)
        model, tokenizer = base_model(run, target)
        return finetune_hf(
            model,
            tokenizer,
            run.task(),
            run.path(f"finetune:{target}"),
            lora=run.config.lora,
            config=run.config.train,
            seed=run.config.seed,
            stats=_init_stats(run),
            **training_args,
        ).adapter_dir
