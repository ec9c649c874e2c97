"""What a run is: RunConfig and its sections, one `*Spec` per stage that has settings.

    RunConfig
      task: TaskSpec               which task, and how its examples are read
      calibration: CalibrationSpec how many examples the statistics see
      emulator: EmulatorSpec       the rank plan and the SVD mode
      lora: LoraSpec               the LoRA's shape and targets
      train: TrainSpec             the fine-tuning schedule
      evaluation: EvalSpec         how many test examples are scored

A RunConfig is saved as a run's run.json and loads from YAML or JSON. This module is
plain data: it imports neither torch, transformers nor peft, so a run.json can be read
anywhere. The check that needs the model's structure is `emloc_nb.run.check_config`.
"""

from __future__ import annotations

import json
import math
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import EmlocError

# Field metadata the checks read: min/max (inclusive), gt/lt (exclusive), choices, allow_inf (floats are
# finite unless this is set), regex (a string that must compile), nonempty (a string or list), unique (a list),
# check (a function of the value and its name), hint (what the values mean, for the message).
AT_LEAST_1 = {"min": 1}
CLAMP = {"min": 0, "allow_inf": True, "hint": "0: the naive transfer, inf: no clamp; the paper uses 3"}
POSITIVE = {"gt": 0}


def check_test_size(value, name: str) -> None:
    if isinstance(value, int) and value < 1:
        raise EmlocError(
            f"{name}={value!r} is a count of test examples and must be ≥ 1. Raise it, or give a share in (0, 1)."
        )
    if isinstance(value, float) and not 0 < value < 1:
        raise EmlocError(
            f"{name}={value!r} is a share of the examples and must lie in (0, 1). Use a share, or a count ≥ 1."
        )


class _Checked:
    """A config section whose fields are checked against their type annotations and metadata on construction."""

    def __post_init__(self):
        check_fields(self, SECTION_NAMES.get(type(self), type(self).__name__))


@dataclass
class TaskSpec(_Checked):
    source: str = field(default="movie-sentiment", metadata={"nonempty": True})  # the default task, or a file
    prompt_field: str = field(default="prompt", metadata={"nonempty": True})
    answer_field: str = field(default="answer", metadata={"nonempty": True})
    choices: list[str] | None = field(default=None, metadata={"unique": True})  # []: score by exact match
    # A share or a count; None: 1000 for the default task, 0.2 for files.
    test_size: float | int | None = field(default=None, metadata={"check": check_test_size})


@dataclass
class CalibrationSpec(_Checked):
    examples: int = field(default=64, metadata=AT_LEAST_1)
    heldout_examples: int = field(default=64, metadata=AT_LEAST_1)
    batch_size: int = field(default=8, metadata=AT_LEAST_1)
    max_length: int = field(default=256, metadata=AT_LEAST_1)


@dataclass
class EmulatorSpec(_Checked):
    plan: dict | str = field(default_factory=lambda: {"ratio": 0.8})  # RankPlan fields, or a plan file
    mode: str = field(default="whitened", metadata={"choices": ("whitened", "plain")})
    eps: float = field(default=1e-6, metadata=POSITIVE)


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
    seed: int = field(default=0, metadata={"min": 0, "max": 2**32 - 1})
    # Steps; 0: a checkpoint only when stop_after ends a call early.
    checkpoint_every: int = field(default=50, metadata={"min": 0})
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: far less memory, ~30% slower

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth of `lr` (step counts from 0)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class EvalSpec(_Checked):
    limit: int | None = field(default=300, metadata=AT_LEAST_1)  # None: the whole test split
    batch_size: int = field(default=16, metadata=AT_LEAST_1)


SECTIONS = {
    "task": TaskSpec,
    "calibration": CalibrationSpec,
    "emulator": EmulatorSpec,
    "lora": LoraSpec,
    "train": TrainSpec,
    "evaluation": EvalSpec,
}
SECTION_NAMES = {cls: name for name, cls in SECTIONS.items()}

# ----------------------------------------------------------------------------- field checks

_NON_FINITE = {"inf": math.inf, "+inf": math.inf, "-inf": -math.inf}  # how run.json wrote them before 0.2


def _kind(value) -> str:
    return "a boolean" if isinstance(value, bool) else f"{type(value).__name__} {value!r}"


def _matches(value, hint) -> bool:
    """Whether `value` has the (non-union) type `hint`; bool is never an int or a float here."""
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint) or (object,)
        return isinstance(value, list) and all(item is object or _matches(v, item) for v in value)
    return isinstance(value, origin)


_TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", dict: "a mapping"}


def _describe(hint) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ')}s"
    return _TYPE_WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def check_value(value, hint, name: str, meta: typing.Mapping = types.MappingProxyType({})):
    """`value` checked against the annotation `hint` and the field's metadata; returns it (inf spelt out restored)."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in members:
            return None
        raise EmlocError(f"{name} is empty (null). Set it to {_describe(members[0])}, or remove it for the default.")
    floats = float in members and meta.get("allow_inf")
    if floats and isinstance(value, str) and value.strip().lower() in _NON_FINITE:
        value = _NON_FINITE[value.strip().lower()]
    hint = next((m for m in members if m is not type(None) and _matches(value, m)), None)
    if hint is None:
        wanted = " or ".join(_describe(m) for m in members if m is not type(None))
        extra = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) and float in members else ""
        raise EmlocError(f"{name} must be {wanted}, not {_kind(value)}{extra}. Fix it in the config.")
    if hint is float and not math.isfinite(value) and (math.isnan(value) or not meta.get("allow_inf")):
        raise EmlocError(f"{name}={value!r} is not a finite number. Give a finite value.")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, ok, word in (
            ("min", lambda v, b: v >= b, "≥"),
            ("max", lambda v, b: v <= b, "≤"),
            ("gt", lambda v, b: v > b, ">"),
            ("lt", lambda v, b: v < b, "<"),
        ):
            if key in meta and not ok(value, meta[key]):
                hint = f" ({meta['hint']})" if "hint" in meta else ""
                raise EmlocError(f"{name}={value!r} must be {word} {meta[key]}{hint}. Change it in the config.")
    if "choices" in meta and value not in meta["choices"]:
        raise EmlocError(f"{name}={value!r} is not one of {list(meta['choices'])}. Use one of those.")
    if meta.get("nonempty") and isinstance(value, (str, list)) and not value:
        raise EmlocError(f"{name} is empty. Give a value, or remove the setting for the default.")
    if isinstance(value, list) and meta.get("unique") and len(set(value)) != len(value):
        raise EmlocError(f"{name}={value!r} lists a value twice. List each once.")
    if isinstance(value, list) and meta.get("nonempty") and any(not v for v in value):
        raise EmlocError(f"{name}={value!r} holds an empty entry. Remove it.")
    if meta.get("regex") and isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise EmlocError(f"{name}={value!r} is not a valid regular expression ({e}). Fix the pattern.") from None
    if "check" in meta:
        meta["check"](value, name)
    return value


def check_fields(obj, prefix: str) -> None:
    """Check (and normalise) every field of the dataclass `obj` against its type annotation and metadata."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        setattr(obj, f.name, check_value(getattr(obj, f.name), hints[f.name], f"{prefix}.{f.name}", f.metadata))


def _build(cls, value, where: str):
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise EmlocError(
            f"{where} must be a mapping of {[f.name for f in fields(cls)]}, not {_kind(value)}. Write it as one."
        )
    names = {f.name for f in fields(cls)}
    unknown = set(value) - names
    if unknown:
        known = ", ".join(sorted(names))
        raise EmlocError(
            f"Unknown setting(s) {sorted(unknown)} in {where}. Fix the name, or remove it (known: {known})."
        )
    return cls(**value)


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

    model: str = field(default="smollm2-135m-instruct", metadata={"nonempty": True})
    seed: int = field(default=0, metadata={"min": 0, "max": 2**32 - 1})
    baseline: bool = True  # also fine-tune the original model (the upper bound EMLoC avoids paying for)
    clamp: float = field(default=3.0, metadata=CLAMP)  # the correction's L
    task: TaskSpec = field(default_factory=TaskSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    emulator: EmulatorSpec = field(default_factory=EmulatorSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    # The README's main job must finish in about 15 minutes on 2 CPU cores: fewer, larger steps than TrainSpec().
    train: TrainSpec = field(default_factory=lambda: TrainSpec(steps=60, lr=5e-4, checkpoint_every=20))
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
                    f"{name} must be a {cls.__name__}, not {_kind(section)}. Build it with {cls.__name__}(...)."
                )
            check_fields(section, name)
        hints = typing.get_type_hints(RunConfig)
        for f in fields(self):
            if f.name not in SECTIONS:
                setattr(self, f.name, check_value(getattr(self, f.name), hints[f.name], f.name, f.metadata))

    def rank_plan(self):
        from .ranks import RankPlan

        plan = self.emulator.plan
        return RankPlan.load(plan) if isinstance(plan, str) else RankPlan.from_dict(plan)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        if not isinstance(d, dict):
            raise EmlocError(
                f"A run config must be a mapping of settings, not {_kind(d)}. Write it like configs/default.yaml."
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
        values = {k: (_build(SECTIONS[k], v, k) if k in SECTIONS else v) for k, v in d.items()}
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if path.is_dir():
            raise EmlocError(f"Config file {path} is a directory, not a file. Pass a YAML or JSON file.")
        if not path.is_file():
            raise EmlocError(f"Config file {path} does not exist. Check the path; configs/ holds examples.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise EmlocError(
                f"Config file {path} is not UTF-8 text ({e.reason} at byte {e.start}). Save it as UTF-8."
            ) from None
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                d = yaml.safe_load(text)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f"line {mark.line + 1}" if mark else "somewhere"
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise EmlocError(
                    f"Config file {path} is not valid YAML ({problem} at {where}). Fix it there."
                ) from None
        else:
            try:
                d = json.loads(text)
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


def small_settings(config: RunConfig) -> RunConfig:
    """The same run, shrunk to finish in a couple of minutes (EMLOC_SMALL=1: tests, CI, notebooks)."""
    d = config.to_dict()
    d["calibration"].update(examples=16, heldout_examples=16)
    d["train"].update(steps=6, batch_size=4, checkpoint_every=0, warmup_steps=2)
    d["evaluation"].update(limit=32)
    return RunConfig.from_dict(d)


def is_small() -> bool:
    return os.environ.get("EMLOC_SMALL", "") not in ("", "0")
