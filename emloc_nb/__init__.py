"""emloc-nb: EMLoC (emulator-based memory-efficient fine-tuning with LoRA correction), step by step.

calibrate → build emulator → fine-tune → correct → evaluate, each one function over
plain, saveable data objects. This package never imports ipywidgets, plotly or
IPython; the interactive views live in `emloc_nb.widgets`.

The names below load their module on first use (emloc_nb.lazy), so `import emloc_nb` (or
reading a run's config through `emloc_nb.config`) does not import torch, transformers or peft.
No module has the name of a function exported here, so `emloc_nb.drift` and `emloc_nb.evaluate`
are always the functions (their modules are emloc_nb.emulator_drift and emloc_nb.evaluation).
"""

from __future__ import annotations

from .errors import BATCHES, COUNT, DATASET, MODEL, PATH, TENSOR, TOKENIZER, Kind, argument_kinds
from .lazy import resolve as _resolve
from .version import __version__ as __version__

_EXPORTS = {  # name -> "module:name", where it is defined
    "CalibrationStats": "emloc_nb.calibration:CalibrationStats",
    "InputStats": "emloc_nb.calibration:InputStats",
    "collect_stats": "emloc_nb.calibration:collect_stats",
    "CalibrationSpec": "emloc_nb.config:CalibrationSpec",
    "EmulatorSpec": "emloc_nb.config:EmulatorSpec",
    "EvalSpec": "emloc_nb.config:EvalSpec",
    "LoraSpec": "emloc_nb.config:LoraSpec",
    "RunConfig": "emloc_nb.config:RunConfig",
    "TaskSpec": "emloc_nb.config:TaskSpec",
    "TrainSpec": "emloc_nb.config:TrainSpec",
    "CorrectionReport": "emloc_nb.correction_report:CorrectionReport",
    "correct_layer": "emloc_nb.layer_correction:correct_layer",
    "correct_lora": "emloc_nb.correction:correct_lora",
    "MOVIE_SENTIMENT": "emloc_nb.tasks:MOVIE_SENTIMENT",
    "Task": "emloc_nb.tasks:Task",
    "batches": "emloc_nb.tokens:batches",
    "load_task": "emloc_nb.data:load_task",
    "movie_sentiment": "emloc_nb.builtin_tasks:movie_sentiment",
    "DriftReport": "emloc_nb.emulator_drift:DriftReport",
    "drift": "emloc_nb.emulator_drift:drift",
    "Emulator": "emloc_nb.emulator:Emulator",
    "LowRankLinear": "emloc_nb.factoring:LowRankLinear",
    "build_emulator": "emloc_nb.emulator:build_emulator",
    "EmlocError": "emloc_nb.errors:EmlocError",
    "EvalResult": "emloc_nb.evaluation:EvalResult",
    "evaluate": "emloc_nb.evaluation:evaluate",
    "attach_lora": "emloc_nb.lora:attach_lora",
    "load_adapter": "emloc_nb.lora:load_adapter",
    "save_adapter": "emloc_nb.lora:save_adapter",
    "DEFAULT_MODEL": "emloc_nb.model_sources:DEFAULT_MODEL",
    "fingerprint": "emloc_nb.fingerprints:fingerprint",
    "load_model": "emloc_nb.models:load_model",
    "tiny_model": "emloc_nb.tiny:tiny_model",
    "RankPlan": "emloc_nb.ranks:RankPlan",
    "allocate": "emloc_nb.ranks:allocate",
    "Run": "emloc_nb.run:Run",
    "notebook_run": "emloc_nb.run:notebook_run",
    "SpectrumTable": "emloc_nb.spectra:SpectrumTable",
    "finetune": "emloc_nb.training:finetune",
    "finetune_hf": "emloc_nb.hf_training:finetune_hf",
    "hf_trainer": "emloc_nb.hf_training:hf_trainer",
}
__all__ = sorted(_EXPORTS)

# The kinds of the public functions' arguments: checked on every call (emloc_nb.errors.argument_kinds), so an
# argument of the wrong kind is an EmlocError that names it, not an AttributeError deep inside.
TASK = Kind(("emloc_nb.tasks:Task",), "a Task", "load_task('movie-sentiment')")
STATS = Kind(("emloc_nb.calibration:CalibrationStats",), "CalibrationStats", "collect_stats(model, batches)")
EMULATOR = Kind(("emloc_nb.emulator:Emulator",), "an Emulator", "build_emulator(...) or Run.emulator()")
PLAN = Kind(("emloc_nb.ranks:RankPlan", int, float), "a RankPlan or a kept share ρ in (0, 1]", "0.5")
LORA = Kind(("emloc_nb.config:LoraSpec",), "a LoraSpec", "LoraSpec(r=8)")
TRAIN = Kind(("emloc_nb.config:TrainSpec",), "a TrainSpec", "TrainSpec(steps=100)")
SPECTRA = Kind(("emloc_nb.spectra:SpectrumTable",), "a SpectrumTable", "Run.spectra()")
_TRAINING = dict(
    model=MODEL,
    tokenizer=TOKENIZER,
    task=TASK,
    output_dir=PATH,
    lora=LORA.optional(),
    config=TRAIN.optional(),
    stats=STATS.optional(),
)
_ARGUMENT_KINDS = {
    "collect_stats": dict(model=MODEL, batches=BATCHES),
    "build_emulator": dict(model=MODEL, stats=STATS.optional(), plan=PLAN),
    "drift": dict(
        original=MODEL, emulator=EMULATOR, batches=BATCHES, heldout=STATS.optional(), tokenizer=TOKENIZER.optional()
    ),
    "finetune": _TRAINING,
    "finetune_hf": _TRAINING,
    "hf_trainer": _TRAINING,
    "correct_lora": dict(
        original=MODEL,
        emulator=EMULATOR,
        adapter_dir=PATH,
        output_dir=PATH,
        heldout=STATS.optional(),
        calibration=STATS.optional(),
        tokenizer=TOKENIZER.optional(),
    ),
    "correct_layer": dict(w=TENSOR, w_e=TENSOR, a=TENSOR, b=TENSOR),
    "evaluate": dict(model=MODEL, tokenizer=TOKENIZER, task=TASK),
    "attach_lora": dict(model=MODEL, spec=LORA, stats=STATS.optional()),
    "load_adapter": dict(model=MODEL, path=PATH),
    "save_adapter": dict(peft_model=MODEL, path=PATH),
    "batches": dict(
        tokenizer=TOKENIZER, dataset=DATASET, batch_size=COUNT, limit=COUNT.optional(), max_length=COUNT.optional()
    ),
    "fingerprint": dict(model=MODEL),
    "allocate": dict(spectra=SPECTRA),
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _resolve(_EXPORTS[name])
    if name in _ARGUMENT_KINDS:
        value = argument_kinds(**_ARGUMENT_KINDS[name])(value)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
