"""The whole EMLoC run as resumable stages over one run directory.

    calibrate → emulator → drift → finetune_emulator (→ finetune_original) → correct → evaluate

Each stage reads what earlier stages wrote and writes its own artifact atomically, so
a run can stop and resume at any stage, and notebooks and widgets can read any stage's
output without recomputing it. By default every stage runs in a fresh Python process,
which both frees memory between stages and lets us record each stage's true peak
resident memory (stages/<stage>.json).

Layout of a run directory:
    run.json                 the RunConfig
    calibration/ heldout/    CalibrationStats on training / held-out examples
    emulator/                the Emulator (weights, spectra/, tokenizer)
    drift.json               DriftReport
    finetune_emulator/       adapter/ (peft) + history.json; finetune_original/ likewise
    corrected/               the corrected peft adapter for the original model
    correction/              CorrectionReport
    eval/<setting>.json      one evaluation per setting
    results.json results.md  the results table
    stages/<stage>.json      seconds, peak and baseline RSS of each stage's process
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .artifacts import atomic_dir, read_json, write_json
from .errors import EmlocError
from .training import LoraSpec, TrainConfig

STAGES = ("calibrate", "emulator", "drift", "finetune_emulator", "finetune_original", "correct", "evaluate")
SETTINGS = {
    "original": "original, zero-shot",
    "original+lora": "original + LoRA trained on the original (upper bound)",
    "emulator": "emulator, zero-shot",
    "emulator+lora": "emulator + LoRA",
    "original+naive": "original + naive (uncorrected) emulator LoRA",
    "original+corrected": "original + corrected LoRA",
}


# ----------------------------------------------------------------------------- configuration

@dataclass
class TaskSpec:
    source: str = "movie-sentiment"  # the default task, or a .jsonl/.csv file
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    choices: list[str] | None = None
    test_size: float | int | None = None  # a share or a count; None: 1000 for the default task, 0.2 for files


@dataclass
class CalibrationSpec:
    examples: int = 64
    heldout_examples: int = 64
    batch_size: int = 8
    max_length: int = 256


@dataclass
class EmulatorSpec:
    plan: dict | str = field(default_factory=lambda: {"ratio": 0.8})  # RankPlan fields, or a plan file
    mode: str = "whitened"
    eps: float = 1e-6


@dataclass
class EvalSpec:
    limit: int = 300
    batch_size: int = 16


def _build(cls, value, where: str):
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise EmlocError(f"{where} must be a mapping of {[f.name for f in fields(cls)]}, not {value!r}.")
    names = {f.name for f in fields(cls)}
    unknown = set(value) - names
    if unknown:
        raise EmlocError(f"Unknown setting(s) {sorted(unknown)} in {where}. Known: {sorted(names)}.")
    return cls(**value)


@dataclass
class RunConfig:
    """Everything a run needs; saved as run.json and loadable from YAML or JSON."""

    model: str = "smollm2-135m-instruct"
    trust_remote_code: bool = False
    seed: int = 0
    baseline: bool = True  # also fine-tune the original model (the upper bound EMLoC avoids paying for)
    clamp: float = 3.0  # the correction's L (inf: no clamp)
    task: TaskSpec = field(default_factory=TaskSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    emulator: EmulatorSpec = field(default_factory=EmulatorSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    # The README's main job must finish in about 15 minutes on 2 CPU cores: fewer, larger steps than TrainConfig().
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=60, lr=5e-4, checkpoint_every=20))
    evaluation: EvalSpec = field(default_factory=EvalSpec)

    def __post_init__(self):
        if self.clamp < 0:
            raise EmlocError(f"clamp={self.clamp} must be ≥ 0 (0: naive transfer, inf: no clamp).")
        # Validated early and stored as the plan itself, not a file name: run.json then says what was built.
        self.emulator.plan = self.rank_plan().to_dict()

    def rank_plan(self):
        from .ranks import RankPlan
        plan = self.emulator.plan
        return RankPlan.load(plan) if isinstance(plan, str) else RankPlan.from_dict(plan)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        nested = {"task": TaskSpec, "calibration": CalibrationSpec, "emulator": EmulatorSpec, "lora": LoraSpec,
                  "train": TrainConfig, "evaluation": EvalSpec}
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise EmlocError(f"Unknown setting(s) {sorted(unknown)} in the run config. Known: {sorted(names)}.")
        values = {k: (_build(nested[k], v, k) if k in nested else v) for k, v in d.items()}
        if isinstance(values.get("clamp"), str):
            values["clamp"] = float(values["clamp"])
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise EmlocError(f"Config file {path} does not exist. See configs/ for examples.")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml
            d = yaml.safe_load(text) or {}
        else:
            d = json.loads(text)
        plan = d.get("emulator", {}).get("plan")
        if isinstance(plan, str):  # a plan file named in a config is relative to the config
            d["emulator"]["plan"] = str(path.parent / Path(plan).expanduser())
        return cls.from_dict(d)


def check_config(config: RunConfig) -> None:
    """Fail before any stage runs: the model must exist and the rank plan must fit its layers."""
    from .models import block_linears, linear_weight, skeleton

    model = skeleton(config.model, trust_remote_code=config.trust_remote_code)
    config.rank_plan().resolve({n: tuple(linear_weight(m).shape) for n, m in block_linears(model).items()})
    if config.emulator.mode not in ("whitened", "plain"):
        raise EmlocError(f"emulator.mode={config.emulator.mode!r}: use 'whitened' or 'plain'.")


def small_settings(config: RunConfig) -> RunConfig:
    """The same run, shrunk to finish in a couple of minutes (EMLOC_SMALL=1: tests, CI, notebooks)."""
    d = config.to_dict()
    d["calibration"].update(examples=16, heldout_examples=16)
    d["train"].update(steps=6, batch_size=4, checkpoint_every=0, warmup_steps=2)
    d["evaluation"].update(limit=32)
    return RunConfig.from_dict(d)


def is_small() -> bool:
    return os.environ.get("EMLOC_SMALL", "") not in ("", "0")


def notebook_run(config: RunConfig | None = None) -> "Run":
    """The run the tutorial notebooks share, small under EMLOC_SMALL=1.

    EMLOC_RUN_DIR, by default the checkout's runs/demo (what `make demo` wrote, with the same
    settings) or runs/notebooks-small. Stages already done there are reused, so each
    notebook can start from any stage.
    """
    config = config or RunConfig()
    if is_small():
        config = small_settings(config)
    default = _project_dir() / "runs" / ("notebooks-small" if is_small() else "demo")
    return Run(Path(os.environ.get("EMLOC_RUN_DIR", default)).expanduser(), config)


def _project_dir() -> Path:
    """The checkout this package runs from (an editable install), else the working directory.

    Jupyter starts kernels in the notebook's folder, so a path relative to it would miss runs/.
    """
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


# ----------------------------------------------------------------------------- the run directory

class Run:
    """A run directory: its config, its stages, and loaders for what they wrote."""

    def __init__(self, run_dir: str | Path, config: RunConfig | None = None, *, overwrite: bool = False):
        self.dir = Path(run_dir)
        config_file = self.dir / "run.json"
        existing = RunConfig.from_dict(read_json(config_file)) if config_file.is_file() else None
        if existing is not None and (config is None or config.to_dict() == existing.to_dict()):
            self.config = existing
        else:
            if config is None:
                raise EmlocError(f"{self.dir} is not a run directory (no run.json). Start one with `emloc run CONFIG --run-dir {self.dir}`.")
            if self.dir.exists() and any(self.dir.iterdir()) and not overwrite:
                what = "already holds a different run (its run.json differs from this config)" if existing else "is not empty and holds no run"
                raise EmlocError(f"{self.dir} {what}. Choose another run directory, or pass overwrite=True (--overwrite) to replace it.")
            check_config(config)
            with atomic_dir(self.dir, overwrite=True) as tmp:
                write_json(tmp / "run.json", config.to_dict())
            self.config = config
        self._cache: dict = {}

    # -- where each stage writes
    def path(self, name: str) -> Path:
        return self.dir / name

    def done(self, stage: str) -> bool:
        markers = {
            "calibrate": ["calibration/calibration.json", "heldout/calibration.json"],
            "emulator": ["emulator/emulator.json"],
            "drift": ["drift.json"],
            "finetune_emulator": ["finetune_emulator/adapter/emloc.json"],
            "finetune_original": ["finetune_original/adapter/emloc.json"] if self.config.baseline else [],
            "correct": ["corrected/emloc.json", "correction/correction.json"],
            "evaluate": ["results.json"],
        }
        return all((self.dir / m).is_file() for m in markers[stage])

    # -- loaders (cached per process)
    def original(self):
        if "original" not in self._cache:
            from .models import load_model
            self._cache["original"] = load_model(self.config.model, trust_remote_code=self.config.trust_remote_code)
        return self._cache["original"]

    def task(self):
        if "task" not in self._cache:
            from .data import load_task
            t = self.config.task
            self._cache["task"] = load_task(t.source, prompt_field=t.prompt_field, answer_field=t.answer_field,
                                            choices=t.choices, test_size=t.test_size, seed=self.config.seed)
        return self._cache["task"]

    def batches(self, split: str) -> list[dict]:
        from .data import batches
        c = self.config.calibration
        n = c.examples if split == "train" else c.heldout_examples
        return batches(self.original()[1], getattr(self.task(), split), batch_size=c.batch_size, limit=n,
                       max_length=c.max_length)

    def calibration(self, which: str = "calibration"):
        from .calibration import CalibrationStats
        return CalibrationStats.load(self.dir / which)

    def emulator(self, *, with_original: bool = False):
        from .emulator import Emulator
        return Emulator.load(self.dir / "emulator", original=self.original()[0] if with_original else None)

    def drift(self):
        from .evaluate import DriftReport
        return DriftReport.load(self.dir / "drift.json")

    def correction(self):
        from .correction import CorrectionReport
        return CorrectionReport.load(self.dir / "correction")

    def history(self, target: str = "emulator") -> list[dict]:
        return read_json(self.dir / f"finetune_{target}" / "history.json")

    def results(self) -> list[dict]:
        return read_json(self.dir / "results.json")["rows"]

    def stage_records(self) -> dict[str, dict]:
        folder = self.dir / "stages"
        return {p.stem: read_json(p) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}

    # -- running
    def run_stage(self, stage: str, *, isolate: bool = True) -> None:
        if stage not in STAGES:
            raise EmlocError(f"Unknown stage {stage!r}. Stages: {', '.join(STAGES)}.")
        if self.done(stage):
            return
        if stage == "evaluate":
            for setting in self.settings():
                self._run_step(f"evaluate:{setting}", isolate)
            self._write_results()
        else:
            self._run_step(stage, isolate)

    def run_all(self, *, isolate: bool = True, until: str | None = None) -> None:
        for stage in STAGES[:STAGES.index(until) + 1] if until else STAGES:
            self.run_stage(stage, isolate=isolate)

    def settings(self) -> list[str]:
        return [s for s in SETTINGS if self.config.baseline or s != "original+lora"]

    def _run_step(self, step: str, isolate: bool) -> None:
        if step.startswith("evaluate:") and (self.dir / "eval" / f"{step.split(':')[1]}.json").is_file():
            return
        if not isolate:
            _execute(self, step, isolated=False)
            return
        started = time.time()
        print(f"[emloc] {step} ...", flush=True)
        code = "import sys; from emloc_nb.pipeline import main; sys.exit(main(sys.argv[1:]))"
        proc = subprocess.Popen([sys.executable, "-c", code, str(self.dir), step],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        tail: list[str] = []
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            print("   ", line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise EmlocError(f"Stage {step} failed:\n" + "\n".join(tail))
        record = read_json(self.dir / "stages" / f"{step.replace(':', '-')}.json")
        print(f"[emloc] {step} done in {time.time() - started:.0f} s, peak {record['peak_rss_mb']:.0f} MB", flush=True)

    def _write_results(self) -> None:
        records = self.stage_records()
        rows = []
        for setting in self.settings():
            ev = read_json(self.dir / "eval" / f"{setting}.json")
            trained_by = {"original+lora": "finetune_original", "emulator+lora": "finetune_emulator",
                          "original+naive": "finetune_emulator", "original+corrected": "finetune_emulator"}.get(setting)
            train = records.get(trained_by, {})
            rows.append({"setting": setting, "description": SETTINGS[setting], "accuracy": ev["accuracy"],
                         "answer_loss": ev["answer_loss"], "examples": ev["examples"],
                         "eval_peak_mb": records.get(f"evaluate-{setting}", {}).get("peak_rss_mb"),
                         "train_peak_mb": train.get("peak_rss_mb"), "train_weights_mb": train.get("weights_mb")})
        write_json(self.dir / "results.json", {"kind": "results", "config": self.config.to_dict(), "rows": rows})
        atomic_text(self.dir / "results.md", results_markdown(rows))


def atomic_text(path: Path, text: str) -> None:
    from .artifacts import atomic_path
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def results_markdown(rows: list[dict]) -> str:
    fmt = lambda v, spec: "–" if v is None else format(v, spec)
    lines = ["| setting | accuracy | answer loss | examples | fine-tuning peak (MB) | eval peak (MB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['description']} | {r['accuracy']:.3f} | {r['answer_loss']:.3f} | {r['examples']} | "
                     f"{fmt(r['train_peak_mb'], '.0f')} | {fmt(r['eval_peak_mb'], '.0f')} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the stages themselves

def _execute(run: Run, step: str, *, isolated: bool) -> None:
    from .memory import peak_rss_mb, rss_mb, weights_mb

    progress = sys.stderr.isatty() or not isolated
    baseline = rss_mb()
    started = time.time()
    record: dict = {}
    if step == "calibrate":
        from .calibration import collect_stats
        model, _ = run.original()
        collect_stats(model, run.batches("train"), progress=progress).save(run.path("calibration"), overwrite=True)
        collect_stats(model, run.batches("test"), progress=progress).save(run.path("heldout"), overwrite=True)
        record["weights_mb"] = weights_mb(model)
    elif step == "emulator":
        from .emulator import build_emulator
        model, tokenizer = run.original()
        e = run.config.emulator
        emulator = build_emulator(model, run.calibration(), run.config.rank_plan(), mode=e.mode, eps=e.eps, progress=progress)
        emulator.save(run.path("emulator"), tokenizer=tokenizer, overwrite=True)
        record["weights_mb"] = weights_mb(emulator.model)
    elif step == "drift":
        from .evaluate import drift
        model, tokenizer = run.original()
        report = drift(model, run.emulator(with_original=True), run.batches("test"), heldout=run.calibration("heldout"),
                       tokenizer=tokenizer, progress=progress)
        report.save(run.path("drift.json"))
    elif step.startswith("finetune_"):
        from .training import finetune
        target = step.removeprefix("finetune_")
        tokenizer = run.original()[1] if target == "original" else _emulator_tokenizer(run)
        model = run.original()[0] if target == "original" else run.emulator().model
        result = finetune(model, tokenizer, run.task(), run.path(step), lora=run.config.lora, config=run.config.train,
                          progress=progress)
        record.update(weights_mb=weights_mb(model), final_loss=result.history[-1]["loss"])
    elif step == "correct":
        from .correction import correct_lora
        model, _ = run.original()
        report = correct_lora(model, run.emulator(with_original=True), run.path("finetune_emulator/adapter"),
                              run.path("corrected"), clamp=run.config.clamp, heldout=run.calibration("heldout"),
                              overwrite=True)
        report.save(run.path("correction"), overwrite=True)
    elif step.startswith("evaluate:"):
        setting = step.split(":", 1)[1]
        from peft import PeftModel

        from .evaluate import evaluate
        model, tokenizer = _model_for(run, setting)
        ev = run.config.evaluation
        try:
            result = evaluate(model, tokenizer, run.task(), limit=ev.limit, batch_size=ev.batch_size, progress=progress)
            record["weights_mb"] = weights_mb(model)
        finally:
            if isinstance(model, PeftModel):  # in-process runs share the loaded models across stages
                model.unload()
        write_json(run.path("eval") / f"{setting}.json", {"setting": setting, **result})
    else:
        raise EmlocError(f"Unknown step {step!r}.")
    record.update(step=step, seconds=time.time() - started, isolated=isolated, baseline_rss_mb=baseline,
                  peak_rss_mb=peak_rss_mb() if isolated else None)
    write_json(run.path("stages") / f"{step.replace(':', '-')}.json", record)


def _emulator_tokenizer(run: Run):
    from transformers import AutoTokenizer
    path = run.path("emulator")
    if not (path / "emulator.json").is_file():
        raise EmlocError(f"{path} holds no emulator yet. Build it first: `emloc run` or `emloc build-emulator`.")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _model_for(run: Run, setting: str):
    from .training import load_adapter
    if setting.startswith("emulator"):
        model, tokenizer = run.emulator().model, _emulator_tokenizer(run)
    else:
        model, tokenizer = run.original()
    adapter = {"original+lora": "finetune_original/adapter", "emulator+lora": "finetune_emulator/adapter",
               "original+naive": "finetune_emulator/adapter", "original+corrected": "corrected"}.get(setting)
    if adapter:
        model = load_adapter(model, run.path(adapter), check_base=setting != "original+naive")
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    """Child-process entry point: main([RUN_DIR, STEP]) runs one step and records its memory."""
    run_dir, step = (argv or sys.argv[1:])[:2]
    if not sys.stderr.isatty():
        import datasets
        datasets.disable_progress_bars()
    try:
        _execute(Run(run_dir), step, isolated=True)
    except EmlocError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def finetune_with_trainer(run: Run, target: str = "emulator", **training_args) -> Path:
    """The fine-tuning stage through transformers' Trainer (runs under torchrun); same adapter format."""
    from .training import finetune_hf

    model, tokenizer = (run.original() if target == "original" else (run.emulator().model, _emulator_tokenizer(run)))
    return finetune_hf(model, tokenizer, run.task(), run.path(f"finetune_{target}"), lora=run.config.lora,
                       config=run.config.train, **training_args).adapter_dir
