"""A run directory: its config, where each artifact lives (emloc_nb.layout), a loader per artifact.

Every stage writes one directory named for it; `Run` has a loader for each artifact. Nothing else
in emloc-nb (stages, CLI, widgets, notebooks, benchmarks) spells out a path inside a run: code that
must hand a path to another library (peft, a training loop) asks `Run.path(artifact)`.

Every artifact is written atomically, so it is complete exactly when its path exists. Running the
stages is `Run.run_stage` / `Run.run_all` (emloc_nb.runner). The models, tasks and reports a run
loads live on the torch side; this module names them as "module:function" strings (emloc_nb.lazy),
so that opening a run imports no torch until one of them is needed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from . import runner
from .artifacts import verify_manifest
from .atomic import atomic_dir, discard, is_leftover
from .config import SECTION_NAMES, RunConfig, is_small, resolve_prior_target, small_settings
from .errors import EmlocError
from .layout import ADAPTERS, LAYOUT, SHARED_BY, artifact_path, foreign_files, in_layout
from .lazy import lazy
from .model_sources import DEFAULT_MODEL
from .runlock import run_lock
from .serial import read_json, read_json_object, write_json
from .stages import check_provenance, results_table
from .tasks import BUILT_IN_TASKS, HF_PREFIX

# The torch side a run directory reaches into, imported on first use.
load_model = lazy("emloc_nb.models:load_model")
load_tokenizer = lazy("emloc_nb.models:load_tokenizer")
skeleton = lazy("emloc_nb.models:skeleton")
block_linears = lazy("emloc_nb.structure:block_linears")
check_lora_rank = lazy("emloc_nb.structure:check_lora_rank")
check_max_length = lazy("emloc_nb.tokens:check_max_length")
linear_weight = lazy("emloc_nb.structure:linear_weight")
model_dtype = lazy("emloc_nb.models:model_dtype")
resolve_device = lazy("emloc_nb.models:resolve_device")
torch_dtype = lazy("emloc_nb.models:torch_dtype")
load_task = lazy("emloc_nb.data:load_task")
tokenized_batches = lazy("emloc_nb.tokens:batches")
CalibrationStats = lazy("emloc_nb.calibration:CalibrationStats")
Emulator = lazy("emloc_nb.emulator:Emulator")
SpectrumTable = lazy("emloc_nb.spectra:SpectrumTable")
DriftReport = lazy("emloc_nb.emulator_drift:DriftReport")
CorrectionReport = lazy("emloc_nb.correction_report:CorrectionReport")
EvalResult = lazy("emloc_nb.evaluation:EvalResult")


def check_config(config: RunConfig, *, trust_remote_code: bool = False) -> None:
    """Fail before any stage runs, and before any weight is loaded: the model must exist, and what each stage needs
    must fit it: the rank plan and the LoRA's rank its layers, the lengths its chat template, the counts the task."""
    model = skeleton(config.model, trust_remote_code=trust_remote_code)
    config.rank_plan().resolve({n: tuple(linear_weight(m).shape) for n, m in block_linears(model).items()})
    check_lora_rank(model, config.lora.r, config.lora.targets)
    tokenizer = load_tokenizer(config.model, trust_remote_code=trust_remote_code)
    for section in ("calibration", "train"):
        check_max_length(tokenizer, getattr(config, section).max_length, f"{section}.max_length")
    task = task_of(config)
    calibration, evaluation = config.calibration, config.evaluation
    for split, section, key in (
        ("train", calibration, "examples"),
        ("validation", calibration, "heldout_examples"),
        ("train", config.train, "batch_size"),
        (evaluation.split, evaluation, "limit"),
    ):
        if getattr(section, key) != getattr(type(section), key):  # a default means "up to": a small task gives fewer
            task.check_count(split, getattr(section, key), f"{SECTION_NAMES[type(section)]}.{key}")
    c = config.correction
    if c.prior and resolve_prior_target(c.prior_target, bool(task.choices)) == "labels":
        task.choice_shares()  # every choice must occur among the training answers


def task_of(config: RunConfig):
    """The run's Task, read from its `task` settings (split by `task.split_seed`, not the run's seed)."""
    spec = asdict(config.task)
    spec["seed"] = spec.pop("split_seed")
    return load_task(**spec)


def _inputs(config: RunConfig) -> list[Path]:
    """The files a run reads that the user owns: a local model and a data file or folder (not Hub ids)."""
    named = [config.model] if config.model != DEFAULT_MODEL else []
    named += [config.task.source.removeprefix(HF_PREFIX)] if config.task.source not in BUILT_IN_TASKS else []
    return [p for p in (Path(v).expanduser() for v in named) if p.exists()]


def _inside(path: Path, directory: Path) -> bool:
    path, directory = Path(os.path.abspath(path)), Path(os.path.abspath(directory))
    real, real_dir = Path(os.path.realpath(path)), Path(os.path.realpath(directory))
    return any(p == d or d in p.parents for p, d in ((path, directory), (real, real_dir)))


def _must_be_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise EmlocError(f"{name} must be True or False, not {type(value).__name__} {value!r}. Pass a real boolean.")
    return value


def _only_threads_differ(a: RunConfig, b: RunConfig) -> bool:
    """No stage records `threads` (emloc_nb.stages), so a run resumed on another thread count keeps its results."""
    return a.threads != b.threads and {**a.to_dict(), "threads": None} == {**b.to_dict(), "threads": None}


class Run:
    """A run directory: its config, where each artifact lives, and a loader for each.

    `trust_remote_code` (default False) lets the model's own code run; it is only ever
    this argument (or --trust-remote-code), never a setting read from run.json.
    `overwrite=True` replaces a directory that holds another run of emloc-nb, and
    nothing else: a directory with other files, or with the run's own inputs, is refused.
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: RunConfig | None = None,
        *,
        overwrite: bool = False,
        trust_remote_code: bool = False,
    ):
        if not isinstance(run_dir, (str, os.PathLike)) or not str(run_dir):
            raise EmlocError(f"A run directory is a path, not {run_dir!r}. Pass the directory to use.")
        self.dir = Path(run_dir).expanduser()
        self.trust_remote_code = _must_be_bool(trust_remote_code, "trust_remote_code")
        overwrite = _must_be_bool(overwrite, "overwrite")
        self._cache: dict = {}
        if self.dir.exists() and not self.dir.is_dir():
            raise EmlocError(f"{self.dir} is a file, not a run directory. Choose a directory.")
        existing = self._saved_config()
        if existing is not None and isinstance(config, RunConfig) and _only_threads_differ(existing, config):
            existing = self._rethread(config)
        if existing is not None and (config is None or config.to_dict() == existing.to_dict()):
            self.config = existing
            return
        if config is None:
            raise EmlocError(
                f"{self.dir} is not a run directory (no run.json). "
                f"Start one with `emloc run CONFIG --run-dir {self.dir}`."
            )
        if not isinstance(config, RunConfig):
            raise EmlocError(f"config must be a RunConfig, not {type(config).__name__}. Build it with RunConfig(...).")
        config.validate()
        self._check_replaceable(existing, config, overwrite)  # fast, before the model is looked at
        check_config(config, trust_remote_code=self.trust_remote_code)
        with run_lock(self.dir):
            existing = self._saved_config()  # again under the lock: another process may have been quicker
            if existing is None or config.to_dict() != existing.to_dict():
                self._check_replaceable(existing, config, overwrite)
                for entry in sorted(self._entries(), key=lambda p: p.name == LAYOUT["config"]):
                    discard(entry)  # run.json goes last: an interrupted clear-out leaves the old run, consistent
                write_json(self.path("config"), config.to_dict())
        self.config = config

    def _rethread(self, config: RunConfig) -> RunConfig:
        """The same run with another `threads` (how fast it runs, not what it computes): run.json takes it."""
        config.validate()
        with run_lock(self.dir):
            existing = self._saved_config()  # again under the lock
            if existing is not None and _only_threads_differ(existing, config):
                write_json(self.path("config"), config.to_dict())
                return config
        return existing

    def _saved_config(self) -> RunConfig | None:
        config_file = self.path("config")
        if not config_file.is_file():
            return None
        try:
            return RunConfig.from_dict(read_json(config_file))
        except EmlocError as e:
            raise EmlocError(f"{config_file}: {e}") from None

    def _entries(self) -> list[Path]:
        """What the run directory holds, apart from its lock and the temporaries of writes in progress."""
        if not self.dir.is_dir():
            return []
        return [p for p in self.dir.iterdir() if p.name != LAYOUT["lock"] and not is_leftover(p.name)]

    def _check_replaceable(self, existing: RunConfig | None, config: RunConfig, overwrite: bool) -> None:
        """Refuse to start `config` here unless the directory is empty, or (with overwrite) holds only a run."""
        for path in _inputs(config) + (_inputs(existing) if existing else []):
            if _inside(path, self.dir):
                raise EmlocError(
                    f"{path} is an input of the run and lies inside its run directory {self.dir}, where a new run "
                    "replaces what is there. Move it out of the run directory, or choose another run directory."
                )
        entries = self._entries()
        if not entries:
            return
        if not overwrite:
            what = (
                "already holds a different run (its run.json differs from this config)"
                if existing
                else "is not empty and holds no run"
            )
            raise EmlocError(
                f"{self.dir} {what}. Choose another run directory, or pass overwrite=True "
                "(--overwrite) to replace a run."
            )
        if existing is None:
            raise EmlocError(
                f"{self.dir} holds files but no emloc-nb run (no run.json), and --overwrite replaces only a run. "
                "Choose another run directory, or empty this one yourself."
            )
        foreign = sorted(p.name for p in entries if not in_layout(p.name) or p.is_symlink())
        foreign = foreign or foreign_files(self.dir, temporary=is_leftover)  # deeper: inside emloc-nb's own folders
        if foreign:
            raise EmlocError(
                f"{self.dir} holds {foreign[:3]}, which emloc-nb did not write, so --overwrite will not replace it. "
                "Move those out, or choose another run directory."
            )

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the run's write lock, after checking that run.json is still this Run's config."""
        with run_lock(self.dir):
            current = self._saved_config()
            if current is None or current.to_dict() != self.config.to_dict():
                raise EmlocError(
                    f"{self.path('config')} changed since this Run was opened (another process replaced the run). "
                    "Open the run again."
                )
            yield

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"

    # -- where artifacts live
    def path(self, artifact: str) -> Path:
        """The path of `artifact` ("emulator", "calibration:heldout", "evaluation:original", ...; see LAYOUT).

        For code that must hand a path to another library; to read an artifact, use its loader.
        """
        return artifact_path(self.dir, artifact)

    def checked(self, artifact: str) -> Path:
        """The path of `artifact` after checking that this run's stage wrote it with this run's settings and inputs.

        An artifact copied in from another run, or computed from inputs that have changed since, is refused.
        """
        check_provenance(self, artifact)
        return self.path(artifact)

    def verify(self, artifact: str, *, quick: bool = False) -> Path:
        """`checked`, and every file of the artifact against the SHA-256 in its manifest (`quick`: its size and
        sampled blocks, emloc_nb.artifacts)."""
        verify_manifest(self.checked(artifact), kind=None, quick=quick)
        return self.path(artifact)

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
        other.verify(artifact)  # written by its own stage, every file as its manifest says
        with self.writing(), atomic_dir(self.path(artifact), overwrite=True) as tmp:
            # The manifest comes along: its provenance names the same step, settings and (no) inputs as this run's.
            shutil.copytree(other.path(artifact), tmp, dirs_exist_ok=True, copy_function=_link_or_copy)

    def discard(self, artifact: str) -> None:
        """Remove an artifact that a settings change made stale (`emloc_nb.stages.reconfigure`), in one step."""
        with self.writing():
            discard(self.path(artifact))

    def check_new_config(self, config: RunConfig) -> None:
        """Check a config this run is about to take (`update_config`), as a new run's would be: before any change."""
        if not isinstance(config, RunConfig):
            raise EmlocError(f"config must be a RunConfig, not {type(config).__name__}. Build it with RunConfig(...).")
        config.validate()
        check_config(config, trust_remote_code=self.trust_remote_code)

    def update_config(self, config: RunConfig, *, checked: bool = False) -> None:
        """Replace run.json; only `emloc_nb.stages.reconfigure` calls it, after checking the new config
        (`checked`: it did already) and dropping the stale results."""
        if not checked:
            self.check_new_config(config)
        with self.writing():
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
            self._cache[key] = load_model(
                self.config.model,
                dtype=dtype,
                device=self.config.device,
                trust_remote_code=self.trust_remote_code,
            )
        return self._cache[key]

    def tokenizer(self):
        """The original model's tokenizer, without loading its weights."""
        if "tokenizer" not in self._cache:
            self._cache["tokenizer"] = load_tokenizer(self.config.model, trust_remote_code=self.trust_remote_code)
        return self._cache["tokenizer"]

    def use_original(self, model, tokenizer) -> None:
        """Share an original this process already loaded from `config.model`, instead of loading another copy.

        Several runs of one model in one process (an ablation's) then hold it once; artifacts are
        still checked against it by fingerprint wherever they are loaded with it. It must be in the run's
        dtype and on its device: the fingerprint ignores both, and the results would not be this run's.
        """
        dtype, device = model_dtype(model), next(model.parameters()).device
        wanted_dtype, wanted_device = torch_dtype(self.config.dtype), resolve_device(self.config.device)
        if dtype != wanted_dtype or device.type != wanted_device.type:
            raise EmlocError(
                f"The shared original is {dtype} on {device}, but this run computes in {wanted_dtype} on "
                f"{wanted_device}. Load it with load_model(..., dtype={self.config.dtype!r}, "
                f"device={self.config.device!r})."
            )
        self._cache[f"original:{self.config.dtype}"] = (model, tokenizer)
        self._cache["tokenizer"] = tokenizer

    def task(self):
        if "task" not in self._cache:
            self._cache["task"] = task_of(self.config)
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
        c = self.config.calibration
        examples = self.calibration_examples(split)
        return tokenized_batches(self.tokenizer(), examples, batch_size=c.batch_size, max_length=c.max_length)

    # -- a loader per artifact
    def calibration(self, split: str = "train"):
        """CalibrationStats of the "train" examples (what the emulator was built from) or the "heldout" ones."""
        if split not in ("train", "heldout"):
            raise EmlocError(f"Calibration split {split!r}: use 'train' or 'heldout'.")
        return CalibrationStats.load(self.checked(f"calibration:{split}"))

    def emulator(self, *, with_original: bool = False, dtype: str | None = None):
        """The Emulator on the run's device, in its dtype (or `dtype`).

        `with_original=True` checks it against the original model (which it loads).
        """
        return Emulator.load(
            self.checked("emulator"),
            original=self.original()[0] if with_original else None,
            dtype=dtype or self.config.dtype,
            device=self.config.device,
        )

    def emulator_tokenizer(self):
        from transformers import AutoTokenizer

        path = self.path("emulator")
        if not self.has("emulator"):
            raise EmlocError(f"{path} holds no emulator yet. Build it first: `emloc run` or `emloc build-emulator`.")
        return AutoTokenizer.from_pretrained(self.checked("emulator"), local_files_only=True, trust_remote_code=False)

    def spectra(self):
        """The emulator's SpectrumTable, without loading the emulator's weights."""
        return SpectrumTable.load(self.checked("spectra"))

    def drift(self):
        return DriftReport.load(self.checked("drift"))

    def correction(self):
        return CorrectionReport.load(self.checked("correction"))

    def adapter_dir(self, which: str) -> Path:
        """The peft adapter trained on the "emulator" or the "original", or the "corrected" one."""
        if which not in ADAPTERS:
            raise EmlocError(f"Unknown adapter {which!r}. Use one of: {', '.join(ADAPTERS)}.")
        return self.checked(ADAPTERS[which]) if self.has(ADAPTERS[which]) else self.path(ADAPTERS[which])

    def history(self, target: str = "emulator") -> list[dict]:
        """The training history (one event per step) of the LoRA on the "emulator" or the "original"."""
        history = read_json(self.path(f"history:{target}"))
        if not isinstance(history, list) or not all(isinstance(h, dict) and "loss" in h for h in history):
            raise EmlocError(
                f"{self.path(f'history:{target}')} is not a list of training steps. Rerun the fine-tuning."
            )
        return history

    def eval_result(self, setting: str):
        return EvalResult.load(self.checked(f"evaluation:{setting}"))

    def results(self) -> list[dict]:
        """The results table: one row per evaluated setting, once checked to be this run's (emloc_nb.stages)."""
        return results_table(self)

    def stage_records(self) -> dict[str, dict]:
        """Seconds and memory of each step, by step name ("calibrate", "evaluate-original", ...)."""
        folder = self.dir / Path(LAYOUT["stage_record"]).parent
        return {p.stem: read_json_object(p) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}

    # -- running (emloc_nb.runner)
    def run_stage(self, stage: str, *, part: str | None = None, isolate: bool = True) -> None:
        """Run one stage (or one `part` of it) unless it is done; `isolate`: in a fresh process that records its
        peak memory."""
        runner.run_stage(self, stage, part=part, isolate=isolate)

    def run_all(self, *, isolate: bool = True, until: str | None = None) -> None:
        """Run every stage not yet done, in order (up to and including `until`)."""
        runner.run_all(self, isolate=isolate, until=until)


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


def _link_or_copy(source: str, target: str) -> None:
    """A hard link where the file system allows one (a calibration is 1.6 GB on SmolLM2), else a copy.

    Sharing the file is safe: no artifact is ever written in place (every write is an atomic rename).
    """
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
