"""A run directory and the one place that knows its layout.

Every stage writes one directory named for it; `LAYOUT` below maps each artifact to
its path, and `Run` has a loader per artifact. Nothing else in emloc-nb (stages,
CLI, widgets, notebooks, benchmarks) spells out a path inside a run: code that must
hand a path to another library (peft, a training loop) asks `Run.path(artifact)`.

    run.json                          the RunConfig
    calibrate/train/ calibrate/heldout/   CalibrationStats on training / held-out examples
    emulator/                         the Emulator (weights, tokenizer) with emulator/spectra/ (SpectrumTable)
    drift/                            DriftReport
    finetune_emulator/                adapter/ (peft), history.json, checkpoint/ (while training)
    finetune_original/                the same for the LoRA trained on the original (the baseline)
    correct/adapter/ correct/report/  the corrected peft adapter for the original model; CorrectionReport
    evaluate/<setting>/               EvalResult of each setting
    evaluate/results.json, results.md the results table
    stages/<step>.json                seconds, peak and baseline RSS of each step's process
    report.html                       the static report, `emloc report`
    scratch/                          files notebooks write beside a run (not read by any stage)

Every artifact is written atomically, so it is complete exactly when its path exists.
Running the stages is `Run.run_stage` / `Run.run_all` (implemented in emloc_nb.stages).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .artifacts import atomic_dir, read_json, write_json
from .config import RunConfig, is_small, small_settings
from .errors import EmlocError

# artifact -> path in the run directory; "{}" is filled from the part after ":" in "name:key".
LAYOUT: dict[str, str] = {
    "config": "run.json",
    "calibration": "calibrate/{}",  # calibration:train, calibration:heldout
    "emulator": "emulator",
    "spectra": "emulator/spectra",
    "drift": "drift",
    "finetune": "finetune_{}",  # finetune:emulator, finetune:original (the training loop's output directory)
    "adapter": "finetune_{}/adapter",
    "history": "finetune_{}/history.json",
    "corrected_adapter": "correct/adapter",
    "correction": "correct/report",
    "evaluation": "evaluate/{}",  # evaluation:<setting>
    "results": "evaluate/results.json",
    "results_markdown": "evaluate/results.md",
    "stage_record": "stages/{}.json",  # stage_record:<step>
    "report": "report.html",  # the static HTML report (emloc report)
    "scratch": "scratch/{}",
}
# What decides an artifact, by config key: two runs that agree on these may share it (Run.copy_from).
SHARED_BY = {"calibration": ("model", "seed", "task", "calibration")}
TARGETS = ("emulator", "original")  # the models a LoRA is trained on
ADAPTERS = {"emulator": "adapter:emulator", "original": "adapter:original", "corrected": "corrected_adapter"}


def check_config(config: RunConfig) -> None:
    """Fail before any stage runs: the model must exist and the rank plan must fit its layers."""
    from .models import block_linears, linear_weight, skeleton

    model = skeleton(config.model, trust_remote_code=config.trust_remote_code)
    config.rank_plan().resolve({n: tuple(linear_weight(m).shape) for n, m in block_linears(model).items()})


class Run:
    """A run directory: its config, where each artifact lives, and a loader for each."""

    def __init__(self, run_dir: str | Path, config: RunConfig | None = None, *, overwrite: bool = False):
        self.dir = Path(run_dir)
        config_file = self.path("config")
        existing = RunConfig.from_dict(read_json(config_file)) if config_file.is_file() else None
        if existing is not None and (config is None or config.to_dict() == existing.to_dict()):
            self.config = existing
        else:
            if config is None:
                raise EmlocError(
                    f"{self.dir} is not a run directory (no run.json). "
                    f"Start one with `emloc run CONFIG --run-dir {self.dir}`."
                )
            if self.dir.exists() and any(self.dir.iterdir()) and not overwrite:
                what = (
                    "already holds a different run (its run.json differs from this config)"
                    if existing
                    else "is not empty and holds no run"
                )
                raise EmlocError(
                    f"{self.dir} {what}. Choose another run directory, or pass overwrite=True "
                    "(--overwrite) to replace it."
                )
            check_config(config)
            with atomic_dir(self.dir, overwrite=True) as tmp:
                write_json(tmp / LAYOUT["config"], config.to_dict())
            self.config = config
        self._cache: dict = {}

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"

    # -- where artifacts live
    def path(self, artifact: str) -> Path:
        """The path of `artifact` ("emulator", "calibration:heldout", "evaluation:original", ...; see LAYOUT).

        For code that must hand a path to another library; to read an artifact, use its loader.
        """
        name, _, key = artifact.partition(":")
        if name not in LAYOUT:
            raise EmlocError(f"Unknown run artifact {name!r}. Artifacts: {', '.join(LAYOUT)}.")
        template = LAYOUT[name]
        if ("{}" in template) != bool(key):
            raise EmlocError(
                f"Run artifact {name!r} " + (f"needs a key: '{name}:KEY'." if "{}" in template else "takes no key.")
            )
        return self.dir / template.format(key)

    def has(self, artifact: str) -> bool:
        """Whether `artifact` has been written (artifacts are written atomically: complete when present)."""
        return self.path(artifact).exists()

    def copy_from(self, other: Run, artifact: str) -> None:
        """Take `other`'s `artifact` (a calibration, say) instead of computing the same thing again.

        Allowed only where what decides that artifact is the same in both configs; see SHARED_BY.
        """
        name = artifact.partition(":")[0]
        keys = SHARED_BY.get(name)
        if keys is None:
            raise EmlocError(f"Run artifact {name!r} cannot be shared between runs. Shareable: {', '.join(SHARED_BY)}.")
        mine, theirs = self.config.to_dict(), other.config.to_dict()
        differ = [k for k in keys if mine[k] != theirs[k]]
        if differ:
            raise EmlocError(
                f"{other} differs from {self} in {', '.join(differ)}, so its {artifact} is not this run's."
            )
        if not other.has(artifact):
            raise EmlocError(f"{other} has no {artifact} yet. Compute it there first.")
        with atomic_dir(self.path(artifact), overwrite=True) as tmp:
            shutil.copytree(other.path(artifact), tmp, dirs_exist_ok=True)

    def discard(self, artifact: str) -> None:
        """Remove an artifact that a settings change made stale (`emloc_nb.stages.reconfigure`)."""
        path = self.path(artifact)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def update_config(self, config: RunConfig) -> None:
        """Replace run.json; only `emloc_nb.stages.reconfigure` calls it, after dropping the stale results."""
        check_config(config)
        write_json(self.path("config"), config.to_dict())
        self.config = config
        self._cache.clear()

    def scratch(self, name: str) -> Path:
        """A path for files a notebook writes beside the run (a saved plan, an extra adapter)."""
        return self.path(f"scratch:{name}")

    # -- models and data (cached per process)
    def original(self, dtype: str | None = None):
        """(model, tokenizer) of the original model, on the run's device, in its dtype (or `dtype`)."""
        dtype = dtype or self.config.dtype
        key = f"original:{dtype}"
        if key not in self._cache:
            from .models import load_model

            self._cache[key] = load_model(
                self.config.model,
                dtype=dtype,
                device=self.config.device,
                trust_remote_code=self.config.trust_remote_code,
            )
        return self._cache[key]

    def tokenizer(self):
        """The original model's tokenizer, without loading its weights."""
        if "tokenizer" not in self._cache:
            from .models import load_tokenizer

            self._cache["tokenizer"] = load_tokenizer(
                self.config.model, trust_remote_code=self.config.trust_remote_code
            )
        return self._cache["tokenizer"]

    def use_original(self, model, tokenizer) -> None:
        """Share an original this process already loaded from `config.model`, instead of loading another copy.

        Several runs of one model in one process (an ablation's) then hold it once; artifacts are
        still checked against it by fingerprint wherever they are loaded with it.
        """
        self._cache[f"original:{self.config.dtype}"] = (model, tokenizer)
        self._cache["tokenizer"] = tokenizer

    def task(self):
        if "task" not in self._cache:
            from dataclasses import asdict

            from .data import load_task

            spec = asdict(self.config.task)
            spec["seed"] = spec.pop("split_seed")
            self._cache["task"] = load_task(**spec)
        return self._cache["task"]

    def calibration_examples(self, split: str):
        """The examples calibration sees: "train" ones drawn by the run's seed, or the first "validation" ones."""
        c, task = self.config.calibration, self.task()
        if split == "train":
            data = task.train.shuffle(seed=self.config.seed)
            return data.select(range(min(c.examples, len(data))))
        if split == "validation":
            return task.validation.select(range(min(c.heldout_examples, len(task.validation))))
        raise EmlocError(f"Calibration examples come from 'train' or 'validation', not {split!r}.")

    def batches(self, split: str) -> list[dict]:
        """Padded batches of `calibration_examples(split)`."""
        from .data import batches

        c = self.config.calibration
        examples = self.calibration_examples(split)
        return batches(self.tokenizer(), examples, batch_size=c.batch_size, max_length=c.max_length)

    # -- a loader per artifact
    def calibration(self, split: str = "train"):
        """CalibrationStats of the "train" examples (what the emulator was built from) or the "heldout" ones."""
        from .calibration import CalibrationStats

        if split not in ("train", "heldout"):
            raise EmlocError(f"Calibration split {split!r}: use 'train' or 'heldout'.")
        return CalibrationStats.load(self.path(f"calibration:{split}"))

    def emulator(self, *, with_original: bool = False, dtype: str | None = None):
        """The Emulator on the run's device, in its dtype (or `dtype`).

        `with_original=True` checks it against the original model (which it loads).
        """
        from .emulator import Emulator

        return Emulator.load(
            self.path("emulator"),
            original=self.original()[0] if with_original else None,
            dtype=dtype or self.config.dtype,
            device=self.config.device,
        )

    def emulator_tokenizer(self):
        from transformers import AutoTokenizer

        path = self.path("emulator")
        if not self.has("emulator"):
            raise EmlocError(f"{path} holds no emulator yet. Build it first: `emloc run` or `emloc build-emulator`.")
        return AutoTokenizer.from_pretrained(path, local_files_only=True)

    def spectra(self):
        """The emulator's SpectrumTable, without loading the emulator's weights."""
        from .spectra import SpectrumTable

        return SpectrumTable.load(self.path("spectra"))

    def drift(self):
        from .drift import DriftReport

        return DriftReport.load(self.path("drift"))

    def correction(self):
        from .correction import CorrectionReport

        return CorrectionReport.load(self.path("correction"))

    def adapter_dir(self, which: str) -> Path:
        """The peft adapter trained on the "emulator" or the "original", or the "corrected" one."""
        if which not in ADAPTERS:
            raise EmlocError(f"Unknown adapter {which!r}. Adapters: {', '.join(ADAPTERS)}.")
        return self.path(ADAPTERS[which])

    def history(self, target: str = "emulator") -> list[dict]:
        """The training history (one event per step) of the LoRA on the "emulator" or the "original"."""
        return read_json(self.path(f"history:{target}"))

    def eval_result(self, setting: str):
        from .evaluate import EvalResult

        return EvalResult.load(self.path(f"evaluation:{setting}"))

    def results(self) -> list[dict]:
        """The results table: one row per evaluated setting."""
        return read_json(self.path("results"))["rows"]

    def stage_records(self) -> dict[str, dict]:
        """Seconds and memory of each step, by step name ("calibrate", "evaluate-original", ...)."""
        folder = self.dir / Path(LAYOUT["stage_record"]).parent
        return {p.stem: read_json(p) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}

    # -- running (emloc_nb.stages holds the stages themselves)
    def run_stage(self, stage: str, *, isolate: bool = True) -> None:
        """Run one stage unless it is done; `isolate`: in a fresh process that records its peak memory."""
        from .stages import run_stage

        run_stage(self, stage, isolate=isolate)

    def run_all(self, *, isolate: bool = True, until: str | None = None) -> None:
        """Run every stage not yet done, in order (up to and including `until`)."""
        from .stages import run_all

        run_all(self, isolate=isolate, until=until)


def notebook_run(config: RunConfig | None = None) -> Run:
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
