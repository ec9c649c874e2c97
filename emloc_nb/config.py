"""What a run is: RunConfig and its sections, one `*Spec` per stage that has settings.

    RunConfig
      task: TaskSpec               which task, and how its examples are read
      calibration: CalibrationSpec how many examples the statistics see
      emulator: EmulatorSpec       the rank plan and the SVD mode
      lora: LoraSpec               the LoRA's shape, targets and initialisation
      train: TrainSpec             the fine-tuning schedule
      correction: CorrectionSpec   how the emulator's LoRA is carried over to the original
      evaluation: EvalSpec         which split is scored, and how many of its examples

A RunConfig is saved as a run's run.json and loads from YAML or JSON. This module is
plain data: it imports neither torch, transformers nor peft, so a run.json can be read
anywhere. The check that needs the model's structure is `emloc_nb.run.check_config`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import EmlocError


@dataclass
class TaskSpec:
    """Where the examples come from, how a record becomes a prompt and an answer, and how they split.

    `source`: a built-in task (movie-sentiment, word-analogies), a .jsonl/.csv file, or `hf:NAME` /
    `hf:path/to/dir` (a `datasets` dataset from its cache or the Hub, a `save_to_disk` folder, or a folder of
    parquet/CSV/JSON files). The split into train, validation and test is fixed by `split_seed`, not by the
    run's seed, so runs with different seeds are scored on the same test examples (and can be compared pair
    by pair).
    """

    source: str = "movie-sentiment"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    choices: list[str] | None = None
    test_size: float | int | None = None  # a share or a count; None: 1000 for built-in tasks, 0.2 otherwise
    validation_size: float | int | None = None  # likewise; None: 500 for built-in tasks, 0.1 otherwise
    split_seed: int = 0
    split: str | None = None  # hf: sources: the one split to read (then cut three ways); None: all its splits
    prompt_template: str | None = None  # str.format over the record's columns, e.g. "Review: {text}\nPositive?"
    answer_map: dict[str, str] | None = None  # answer column value -> answer text, e.g. {0: negative, 1: positive}

    def __post_init__(self):
        # YAML gives int keys, run.json string keys: one form, so both describe the same run.
        if self.answer_map is not None:
            if not isinstance(self.answer_map, dict) or not self.answer_map:
                raise EmlocError(
                    f"task.answer_map={self.answer_map!r} must be a mapping of label value -> answer text, "
                    "e.g. {0: negative, 1: positive}."
                )
            self.answer_map = {str(k): str(v) for k, v in self.answer_map.items()}


@dataclass
class CalibrationSpec:
    examples: int = 64  # training examples, drawn by the run's seed
    heldout_examples: int = 64  # validation examples: drift and correction errors are measured on them
    batch_size: int = 8
    max_length: int = 256


@dataclass
class EmulatorSpec:
    plan: dict | str = field(default_factory=lambda: {"ratio": 0.8})  # RankPlan fields, or a plan file
    mode: str = "whitened"
    eps: float = 1e-6
    shrinkage: float = 0.0  # whiten with C + λ·diag(C): less trust in directions 64 examples barely see
    # Calibrate and build one block at a time from the safetensors shards, never holding the whole original
    # (emloc_nb.streaming): the calibrate and emulator stages then peak at about one block.
    streaming: bool = False


@dataclass
class LoraSpec:
    """Which layers get a LoRA, and its shape: ΔW = s · B A with s = alpha / r (alpha / √r for rsLoRA).

    `emloc_nb.lora.peft_config(spec, model)` turns it into peft's LoraConfig.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0  # peft materialises a dropped-out copy of every LoRA input: 40% more activation memory
    targets: list[str] | str | None = (
        None  # layer-name suffixes, or a regex (peft's fullmatch); None: every block linear
    )
    rslora: bool = False
    init: str = "random"  # "random" (peft's), or "eigen": A starts on the top-r eigenvectors of the input's C

    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@dataclass
class TrainSpec:
    steps: int = 150
    batch_size: int = 8
    lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_length: int = 256
    checkpoint_every: int = 50  # steps; 0: a checkpoint only when stop_after ends a call early
    # Memory levers (bench/results/memory_levers.md measures each):
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: far less memory, ~30% slower
    micro_batch_size: int | None = None  # examples per forward/backward, gradients accumulated; None: the whole batch
    frozen_dtype: str | None = None  # "bfloat16": frozen weights in bf16, LoRA weights in fp32; None: the run's dtype

    def __post_init__(self):
        if self.batch_size < 1:
            raise EmlocError(f"train.batch_size={self.batch_size} must be at least 1.")
        micro = self.micro_batch_size
        if micro is not None and not (1 <= micro <= self.batch_size and self.batch_size % micro == 0):
            raise EmlocError(
                f"train.micro_batch_size={micro} must divide train.batch_size={self.batch_size} "
                "(e.g. 1, 2 or 4 for a batch of 8), or be null for no micro-batching."
            )
        if self.frozen_dtype is not None:
            check_dtype(self.frozen_dtype, "train.frozen_dtype")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth of `lr` (step counts from 0)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class CorrectionSpec:
    """How the LoRA trained on the emulator becomes an adapter for the original.

    `clamp` is the paper's L (0: the naive transfer, inf: no clamp). `kappa="lstsq"`
    replaces the clamp by the per-column factors that minimise the held-out error
    against the fine-tuned emulator. `prior` adds the prior correction: a rank-1 LoRA
    on the output layer that gives the original + corrected LoRA the fine-tuned
    emulator's mean answer distribution on the (unlabelled) calibration prompts.
    """

    clamp: float = 3.0
    kappa: str = "clamp"  # "clamp" (the paper's κ = min(1, L·mean|B'|/mean|D|)) or "lstsq"
    prior: bool = True


@dataclass
class EvalSpec:
    split: str = "test"  # "validation" while choosing settings; "test" only for the final table
    limit: int = 300
    batch_size: int = 16


DTYPES = ("float32", "bfloat16")


def check_dtype(name: str, where: str) -> None:
    if name not in DTYPES:
        raise EmlocError(f"{where}={name!r} is not a supported dtype. Use one of {', '.join(DTYPES)}.")


def check_device(name: str) -> None:
    """ "cpu", "cuda", "cuda:N" or "auto" (cuda when there is one, else cpu); existence is checked when used."""
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "auto") or (index and (kind != "cuda" or not index.isdigit())):
        raise EmlocError(f"device={name!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available).")


SECTIONS = {
    "task": TaskSpec,
    "calibration": CalibrationSpec,
    "emulator": EmulatorSpec,
    "lora": LoraSpec,
    "train": TrainSpec,
    "correction": CorrectionSpec,
    "evaluation": EvalSpec,
}


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

    model: str = "smollm2-135m-instruct"  # or a checkpoint directory, a .gguf file, or a Hub id (org/name)
    trust_remote_code: bool = False
    seed: int = 0  # the LoRA's initialisation, the order of the training data and the calibration subset
    device: str = "cpu"  # where every stage runs: "cpu", "cuda", "cuda:N", or "auto" (cuda when there is one)
    dtype: str = "float32"  # the dtype every stage loads the models in: "float32" or "bfloat16"
    baseline: bool = True  # also fine-tune the original model (the upper bound EMLoC avoids paying for)
    task: TaskSpec = field(default_factory=TaskSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    emulator: EmulatorSpec = field(default_factory=EmulatorSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    # The README's main job must finish in about 15 minutes on 2 CPU cores: fewer steps than TrainSpec(), at a
    # higher rate (chosen on validation: docs/findings.md).
    train: TrainSpec = field(default_factory=lambda: TrainSpec(steps=60, lr=2e-3, checkpoint_every=20))
    correction: CorrectionSpec = field(default_factory=CorrectionSpec)
    evaluation: EvalSpec = field(default_factory=EvalSpec)

    def __post_init__(self):
        check_device(self.device)
        check_dtype(self.dtype, "dtype")
        c = self.correction
        if math.isnan(c.clamp) or c.clamp < 0:
            raise EmlocError(f"correction.clamp={c.clamp} must be ≥ 0 (0: naive transfer, inf: no clamp).")
        if c.kappa not in ("clamp", "lstsq"):
            raise EmlocError(f"correction.kappa={c.kappa!r}: use 'clamp' (the paper's) or 'lstsq'.")
        if self.lora.init not in ("random", "eigen"):
            raise EmlocError(f"lora.init={self.lora.init!r}: use 'random' (peft's) or 'eigen'.")
        if self.evaluation.split not in ("validation", "test"):
            raise EmlocError(f"evaluation.split={self.evaluation.split!r}: use 'validation' or 'test'.")
        if self.emulator.mode not in ("whitened", "plain"):
            raise EmlocError(f"emulator.mode={self.emulator.mode!r}: use 'whitened' or 'plain'.")
        # Validated early and stored as the plan itself, not a file name: run.json then says what was built.
        self.emulator.plan = self.rank_plan().to_dict()

    def rank_plan(self):
        from .ranks import RankPlan

        plan = self.emulator.plan
        return RankPlan.load(plan) if isinstance(plan, str) else RankPlan.from_dict(plan)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise EmlocError(f"Unknown setting(s) {sorted(unknown)} in the run config. Known: {sorted(names)}.")
        values = {k: (_build(SECTIONS[k], v, k) if k in SECTIONS else v) for k, v in d.items()}
        correction = values.get("correction")
        if correction is not None and isinstance(correction.clamp, str):  # JSON stores inf as "inf"
            correction.clamp = float(correction.clamp)
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
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


def settings_names() -> list[str]:
    """Every `--set` key: top-level settings and `section.key`."""
    top = [f.name for f in fields(RunConfig) if f.name not in SECTIONS]
    return top + [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in fields(cls)]


def parse_setting(text: str, *, flag: str = "--set") -> tuple[str, object]:
    """`key=value` (`--set section.key=value`) as (key, value), the value read as YAML (`true`, `.inf`, `{0: no}`)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not all(key.strip().split(".")):
        raise EmlocError(f"{flag} {text!r}: write KEY=VALUE, e.g. --set train.steps=100.")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise EmlocError(
            f"{flag} {text!r}: the value is not valid YAML ({str(e).splitlines()[0]}). Quote it."
        ) from None


def with_settings(config: RunConfig, settings: list[tuple[str, object]]) -> RunConfig:
    """A copy of `config` with (key, value) settings applied, keys as `settings_names()` lists them.

    A mapping-valued setting takes a nested key too (`emulator.plan.ratio`). Unknown keys are refused.
    """
    d = config.to_dict()
    known = settings_names()
    for key, value in settings:
        path = key.split(".")
        name = ".".join(path[:2])
        if name not in known:
            raise EmlocError(f"Unknown setting {key!r}. Known: {', '.join(known)}.")
        if len(path) == 1:
            d[name] = value
        elif len(path) == 2:
            d[path[0]][path[1]] = value
        elif len(path) == 3 and isinstance(d[path[0]][path[1]], dict):  # e.g. emulator.plan.ratio
            d[path[0]][path[1]][path[2]] = value
        else:
            raise EmlocError(f"Setting {key!r}: {name} takes no nested key {'.'.join(path[2:])!r}.")
    return RunConfig.from_dict(d)


def small_settings(config: RunConfig) -> RunConfig:
    """The same run, shrunk to finish in a couple of minutes (EMLOC_SMALL=1: tests, CI, notebooks)."""
    d = config.to_dict()
    d["calibration"].update(examples=16, heldout_examples=16)
    d["train"].update(steps=6, batch_size=4, checkpoint_every=0, warmup_steps=2)
    d["evaluation"].update(limit=32)
    return RunConfig.from_dict(d)


def is_small() -> bool:
    return os.environ.get("EMLOC_SMALL", "") not in ("", "0")
