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
Every field is checked by emloc_nb.checks against its annotation and metadata.
"""

from __future__ import annotations

import json
import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .checks import check_fields, check_value, kind_of
from .errors import PATH, DuplicateKey, EmlocError, argument_kinds, load_yaml, loads_json
from .ranks import RankPlan
from .threads import check_threads

# Field metadata, as emloc_nb.checks reads it.
AT_LEAST_1 = {"min": 1}
PRIOR_TARGETS = ("auto", "labels", "emulator")
CLAMP = {"min": 0, "allow_inf": True, "hint": "0: the naive transfer, inf: no clamp; the paper uses 3"}
POSITIVE = {"gt": 0}


def check_test_size(value, name: str) -> None:
    if isinstance(value, int) and value < 1:
        kind = "validation" if name.endswith("validation_size") else "test"
        raise EmlocError(
            f"{name}={value!r} is a count of {kind} examples and must be ≥ 1. Raise it, or give a share in (0, 1)."
        )
    if isinstance(value, float) and not 0 < value < 1:
        raise EmlocError(
            f"{name}={value!r} is a share of the examples and must lie in (0, 1). Use a share, or a count ≥ 1."
        )


DTYPES = ("float32", "bfloat16")


def check_dtype(name: str, where: str) -> None:
    if name not in DTYPES:
        raise EmlocError(f"{where}={name!r} is not a supported dtype. Use one of {', '.join(DTYPES)}.")


def check_device(name: str) -> None:
    """ "cpu", "cuda", "cuda:N" or "auto" (cuda when there is one, else cpu); existence is checked when used."""
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "auto") or (index and (kind != "cuda" or not index.isdigit())):
        raise EmlocError(f"device={name!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available).")


def check_device_name(value, name: str) -> None:
    check_device(value)


SEED = {"min": 0, "max": 2**32 - 1}


class _Checked:
    """A config section whose fields are checked against their type annotations and metadata on construction."""

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Check every field (and, in subclasses, the fields against each other)."""
        check_fields(self, SECTION_NAMES.get(type(self), type(self).__name__))


@dataclass
class TaskSpec(_Checked):
    """Where the examples come from, how a record becomes a prompt and an answer, and how they split.

    `source`: a built-in task (movie-sentiment, word-analogies), a .jsonl/.csv file, or `hf:NAME` /
    `hf:path/to/dir` (a `datasets` dataset from its cache or the Hub, a `save_to_disk` folder, or a folder of
    parquet/CSV/JSON files). The split into train, validation and test is fixed by `split_seed`, not by the
    run's seed, so runs with different seeds are scored on the same test examples (and can be compared pair
    by pair).
    """

    source: str = field(default="movie-sentiment", metadata={"nonempty": True})
    prompt_field: str = field(default="prompt", metadata={"nonempty": True})
    answer_field: str = field(default="answer", metadata={"nonempty": True})
    choices: list[str] | None = field(default=None, metadata={"unique": True})  # []: score by exact match
    # A share or a count; None: 1000 for built-in tasks, 0.2 otherwise.
    test_size: float | int | None = field(default=None, metadata={"check": check_test_size})
    # Likewise; None: 500 for built-in tasks, 0.1 otherwise.
    validation_size: float | int | None = field(default=None, metadata={"check": check_test_size})
    split_seed: int = field(default=0, metadata=SEED)
    # hf: sources: the one split to read (then cut three ways); None: all its splits.
    split: str | None = field(default=None, metadata={"nonempty": True})
    # str.format over the record's columns, e.g. "Review: {text}\nPositive?".
    prompt_template: str | None = field(default=None, metadata={"nonempty": True})
    answer_map: dict[str, str] | None = None  # answer column value -> answer text, e.g. {0: negative, 1: positive}

    def check(self) -> None:
        super().check()
        # YAML gives int keys, run.json string keys: one form, so both describe the same run.
        if self.answer_map is not None:
            if not self.answer_map:
                raise EmlocError(
                    f"task.answer_map={self.answer_map!r} must be a mapping of label value -> answer text. "
                    "Give one, e.g. {0: negative, 1: positive}, or remove it."
                )
            self.answer_map = {str(k): str(v) for k, v in self.answer_map.items()}


@dataclass
class CalibrationSpec(_Checked):
    examples: int = field(default=64, metadata=AT_LEAST_1)  # training examples, drawn by the run's seed
    # Validation examples: drift and correction errors are measured on them.
    heldout_examples: int = field(default=64, metadata=AT_LEAST_1)
    batch_size: int = field(default=8, metadata=AT_LEAST_1)
    max_length: int = field(default=256, metadata=AT_LEAST_1)


@dataclass
class EmulatorSpec(_Checked):
    plan: dict | str = field(default_factory=lambda: {"ratio": 0.8})  # RankPlan fields, or a plan file
    mode: str = field(default="whitened", metadata={"choices": ("whitened", "plain")})
    eps: float = field(default=1e-6, metadata=POSITIVE)
    # Whiten with C + λ·diag(C): less trust in directions 64 examples barely see.
    shrinkage: float = field(default=0.0, metadata={"min": 0})
    # Calibrate and build one block at a time from the safetensors shards, never holding the whole original
    # (emloc_nb.streaming): the calibrate and emulator stages then peak at about one block.
    streaming: bool = False
    # Distil the built emulator toward the original on the calibration examples before the task LoRA, in the spirit
    # of LoRAM's alignment (emloc_nb.alignment): steps of training its low-rank factors; 0: none.
    align_steps: int = field(default=0, metadata={"min": 0})
    align_lr: float = field(default=1e-4, metadata={"gt": 0, "max": 1, "hint": "AdamW learning rates lie far below 1"})

    def check(self) -> None:
        super().check()
        if self.align_steps and self.streaming:
            raise EmlocError(
                "emulator.align_steps needs the whole original model as the teacher, which a streamed build never "
                "holds: set emulator.streaming: false, or emulator.align_steps: 0."
            )


@dataclass
class LoraSpec(_Checked):
    """Which layers get a LoRA, and its shape: ΔW = s · B A with s = alpha / r (alpha / √r for rsLoRA).

    `emloc_nb.lora.peft_config(spec, model)` turns it into peft's LoraConfig.
    """

    r: int = field(default=8, metadata=AT_LEAST_1)
    alpha: float = field(default=16, metadata=POSITIVE)
    # peft materialises a dropped-out copy of every LoRA input: 40% more activation memory
    dropout: float = field(default=0.0, metadata={"min": 0, "lt": 1})
    # Layer-name suffixes, or a regex (peft's fullmatch); None: every block linear.
    targets: list[str] | str | None = field(default=None, metadata={"nonempty": True, "regex": True})
    rslora: bool = False
    # "random" (peft's), or "eigen": A starts on the top-r eigenvectors of the input's C.
    init: str = field(default="random", metadata={"choices": ("random", "eigen")})

    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@dataclass
class TrainSpec(_Checked):
    steps: int = field(default=150, metadata=AT_LEAST_1)
    batch_size: int = field(default=8, metadata=AT_LEAST_1)
    lr: float = field(default=3e-4, metadata={"gt": 0, "max": 10, "hint": "AdamW learning rates lie far below 1"})
    warmup_steps: int = field(default=10, metadata={"min": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    max_length: int = field(default=256, metadata=AT_LEAST_1)
    # Steps; 0: a checkpoint only when stop_after ends a call early.
    checkpoint_every: int = field(default=50, metadata={"min": 0})
    # Memory levers (bench/results/memory_levers.md measures each):
    # Examples per forward/backward, gradients accumulated (None: the whole batch). One at a time keeps
    # fine-tuning within the inference budget on its own, at about the step time of whole batches (no padding).
    micro_batch_size: int | None = field(default=1, metadata=AT_LEAST_1)
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory still, ×1.5 step time
    # "bfloat16": frozen weights in bf16, LoRA weights in fp32; None: the run's dtype.
    frozen_dtype: str | None = field(default=None, metadata={"check": check_dtype})

    def check(self) -> None:
        super().check()
        micro = self.micro_batch_size
        if micro is not None and not (1 <= micro <= self.batch_size and self.batch_size % micro == 0):
            raise EmlocError(
                f"train.micro_batch_size={micro} must divide train.batch_size={self.batch_size} "
                "(e.g. 1, 2 or 4 for a batch of 8), or be null for no micro-batching."
            )

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth of `lr` (step counts from 0)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class CorrectionSpec(_Checked):
    """How the LoRA trained on the emulator becomes an adapter for the original.

    `clamp` is the paper's L (0: the naive transfer, inf: no clamp). `kappa="lstsq"`
    replaces the clamp by the per-column factors that minimise the held-out error
    against the fine-tuned emulator. `prior` adds the prior correction: a rank-1 LoRA
    on the output layer that gives the original + corrected LoRA a target mean answer
    distribution on the (unlabelled) calibration prompts. `prior_target` is that target:
    "labels" (the training answers' class shares; tasks with choices), "emulator" (the
    fine-tuned emulator's mean answer distribution), or "auto" (labels when the task has
    choices, else emulator).
    """

    # 0 by default: on validation, over 3 seeds and two tasks, the clamped correction never beat naive + prior
    # and lost 7 points on word analogies (docs/findings.md).
    clamp: float = field(default=0.0, metadata=CLAMP)
    # "clamp" (the paper's κ = min(1, L·mean|B'|/mean|D|)) or "lstsq".
    kappa: str = field(default="clamp", metadata={"choices": ("clamp", "lstsq")})
    prior: bool = True
    # "auto" by default: on validation (3 seeds) the label shares beat the emulator's prior, 0.837 against 0.826
    # (docs/findings.md); a generation task has no classes, so it keeps the emulator's.
    prior_target: str = field(default="auto", metadata={"choices": PRIOR_TARGETS})


def resolve_prior_target(setting: str, has_choices: bool) -> str:
    """`correction.prior_target` for a task: "labels" or "emulator" ("auto": labels when the task has choices)."""
    if setting == "auto":
        return "labels" if has_choices else "emulator"
    if setting == "labels" and not has_choices:
        raise EmlocError(
            "correction.prior_target: labels needs a task with choices, and this task is scored by generation. "
            "Set correction.prior_target: emulator (or auto)."
        )
    return setting


@dataclass
class EvalSpec(_Checked):
    # "validation" while choosing settings; "test" only for the final table.
    split: str = field(default="test", metadata={"choices": ("validation", "test")})
    limit: int | None = field(default=300, metadata=AT_LEAST_1)  # None: the whole split
    batch_size: int = field(default=16, metadata=AT_LEAST_1)


SECTIONS = {
    "task": TaskSpec,
    "calibration": CalibrationSpec,
    "emulator": EmulatorSpec,
    "lora": LoraSpec,
    "train": TrainSpec,
    "correction": CorrectionSpec,
    "evaluation": EvalSpec,
}
SECTION_NAMES = {cls: name for name, cls in SECTIONS.items()}


def with_added_defaults(recorded: dict) -> dict:
    """Settings as a manifest recorded them, with the section fields added since at their defaults.

    RunConfig.from_dict reads an older run.json the same way, so a setting added in a later version does not make
    the results of an older one stale.
    """
    return {
        k: {**section_defaults(k), **v} if k in SECTIONS and isinstance(v, dict) else v for k, v in recorded.items()
    }


def section_defaults(name: str) -> dict:
    """A section's settings in a config that leaves them out: the run's defaults (its train section is not
    TrainSpec()'s), so a section written in part takes the rest from them too."""
    return asdict(next(f for f in fields(RunConfig) if f.name == name).default_factory())


def _build(where: str, value):
    """Section `where` of a config: what it sets, over the run's defaults."""
    cls = SECTIONS[where]
    if value is None:
        return cls(**section_defaults(where))
    if not isinstance(value, dict):
        raise EmlocError(
            f"{where} must be a mapping of {[f.name for f in fields(cls)]}, not {kind_of(value)}. Write it as one."
        )
    names = {f.name for f in fields(cls)}
    unknown = set(value) - names
    if unknown:
        known = ", ".join(sorted(names))
        raise EmlocError(
            f"Unknown setting(s) {sorted(unknown)} in {where}. Fix the name, or remove it (known: {known})."
        )
    return cls(**{**section_defaults(where), **value})


TRUST_REMOTE_CODE_HINT = (
    "trust_remote_code is never read from a config or run.json: pass --trust-remote-code on the command line, "
    "or trust_remote_code=True to Run or load_model, and remove it from the config"
)


@dataclass
class RunConfig:
    """Everything a run needs; saved as run.json and loadable from YAML or JSON.

    Every field is checked on construction (type, range, regexes), so a bad config fails
    before any stage runs. Whether to run a model's own code is not part of it: that is
    only ever the caller's choice (`Run(..., trust_remote_code=True)`, `--trust-remote-code`).
    """

    # Or a checkpoint directory, a .gguf file, or a Hub id (org/name).
    model: str = field(default="smollm2-135m-instruct", metadata={"nonempty": True})
    # The LoRA's initialisation, the order of the training data and the calibration subset.
    seed: int = field(default=0, metadata=SEED)
    # Where every stage runs: "cpu", "cuda", "cuda:N", or "auto" (cuda when there is one).
    device: str = field(default="cpu", metadata={"check": check_device_name})
    # The dtype every stage loads the models in: "float32" or "bfloat16".
    dtype: str = field(default="float32", metadata={"check": check_dtype})
    threads: int | str = field(default="auto", metadata={"check": check_threads})  # per stage: emloc_nb.threads
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
        self.validate()
        # Validated early and stored as the plan itself, not a file name: run.json then says what was built.
        self.emulator.plan = self.rank_plan().to_dict()

    def validate(self) -> None:
        """Check every field again (a field may have been assigned since construction)."""
        for name, cls in SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                raise EmlocError(
                    f"{name} must be a {cls.__name__}, not {kind_of(section)}. Build it with {cls.__name__}(...)."
                )
            section.check()
        hints = typing.get_type_hints(RunConfig)
        for f in fields(self):
            if f.name not in SECTIONS:
                setattr(self, f.name, check_value(getattr(self, f.name), hints[f.name], f.name, f.metadata))

    def rank_plan(self) -> RankPlan:
        plan = self.emulator.plan
        return RankPlan.load(plan) if isinstance(plan, str) else RankPlan.from_dict(plan)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        if not isinstance(d, dict):
            raise EmlocError(
                f"A run config must be a mapping of settings, not {kind_of(d)}. Write it like configs/default.yaml."
            )
        d = dict(d)
        # run.json files written before 0.2 carry `false`; anything else asks for what a config cannot grant.
        if "trust_remote_code" in d and d.pop("trust_remote_code") is not False:
            raise EmlocError(f"{TRUST_REMOTE_CODE_HINT}.")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise EmlocError(
                f"Unknown setting(s) {sorted(unknown)} in the run config. Fix the name, or remove it "
                f"(known: {', '.join(sorted(names))})."
            )
        values = {k: (_build(k, v) if k in SECTIONS else v) for k, v in d.items()}
        return cls(**values)

    @classmethod
    @argument_kinds(path=PATH)
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if path.is_dir():
            raise EmlocError(f"Config file {path} is a directory, not a file. Pass a YAML or JSON file.")
        if not path.is_file():
            raise EmlocError(f"Config file {path} does not exist. Check the path; configs/ holds examples.")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark at the start is no setting
        except UnicodeDecodeError as e:
            raise EmlocError(
                f"Config file {path} is not UTF-8 text ({e.reason} at byte {e.start}). Save it as UTF-8."
            ) from None
        try:
            d = load_yaml(text) if path.suffix in (".yaml", ".yml") else loads_json(text)
        except DuplicateKey as e:
            raise EmlocError(e.explain(f"Config file {path}")) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark else "somewhere"
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise EmlocError(f"Config file {path} is not valid YAML ({problem} at {where}). Fix it there.") from None
        except json.JSONDecodeError as e:
            raise EmlocError(
                f"Config file {path} is not valid JSON ({e.msg} at line {e.lineno}). Fix it there."
            ) from None
        if d is None or d == {}:
            raise EmlocError(
                f"Config file {path} is empty. Write the settings to change (see configs/default.yaml), "
                "or pass configs/default.yaml for the default run."
            )
        if isinstance(d, dict) and isinstance(d.get("emulator"), dict) and isinstance(d["emulator"].get("plan"), str):
            # A plan file named in a config is relative to the config.
            d["emulator"] = {**d["emulator"], "plan": str(path.parent / Path(d["emulator"]["plan"]).expanduser())}
        return cls.from_dict(d)


def settings_names() -> list[str]:
    """Every `--set` key: top-level settings and `section.key`."""
    top = [f.name for f in fields(RunConfig) if f.name not in SECTIONS]
    return top + [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in fields(cls)]


def parse_setting(text: str, *, flag: str = "--set") -> tuple[str, object]:
    """`key=value` (`--set section.key=value`) as (key, value), the value read as YAML (`true`, `.inf`, `{0: no}`)."""
    key, sep, value = text.partition("=")
    if not sep or not all(key.strip().split(".")):
        raise EmlocError(f"{flag} {text!r}: write KEY=VALUE, e.g. --set train.steps=100.")
    try:
        return key.strip(), load_yaml(value)
    except DuplicateKey as e:
        raise EmlocError(e.explain(f"{flag} {text!r}")) from None
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
            raise EmlocError(f"Unknown setting {key!r}. Fix the name; known: {', '.join(known)}.")
        if len(path) == 1:
            d[name] = value
        elif len(path) == 2:
            d[path[0]][path[1]] = value
        elif len(path) == 3 and isinstance(d[path[0]][path[1]], dict):  # e.g. emulator.plan.ratio
            d[path[0]][path[1]][path[2]] = value
        else:
            raise EmlocError(f"Setting {key!r}: {name} takes no nested key {'.'.join(path[2:])!r}. Set {name} itself.")
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
