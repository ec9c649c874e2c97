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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = _resolve(_EXPORTS[name])
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
