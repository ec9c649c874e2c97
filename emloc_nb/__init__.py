"""emloc-nb: EMLoC (emulator-based memory-efficient fine-tuning with LoRA correction), step by step.

calibrate → build emulator → fine-tune → correct → evaluate, each one function over
plain, saveable data objects. This package never imports ipywidgets, plotly or
IPython; the interactive views live in `emloc_nb.widgets`.

The names below load their module on first use, so `import emloc_nb` (or reading a
run's config through `emloc_nb.config`) does not import torch, transformers or peft.
"""

from __future__ import annotations

import importlib
import sys
import types

from .version import __version__ as __version__

_EXPORTS = {  # name -> the module that defines it
    "CalibrationStats": "calibration",
    "InputStats": "calibration",
    "collect_stats": "calibration",
    "CalibrationSpec": "config",
    "EmulatorSpec": "config",
    "EvalSpec": "config",
    "LoraSpec": "config",
    "RunConfig": "config",
    "TaskSpec": "config",
    "TrainSpec": "config",
    "CorrectionReport": "correction",
    "correct_layer": "correction",
    "correct_lora": "correction",
    "MOVIE_SENTIMENT": "data",
    "Task": "data",
    "batches": "data",
    "load_task": "data",
    "movie_sentiment": "data",
    "DriftReport": "drift",
    "drift": "drift",
    "Emulator": "emulator",
    "LowRankLinear": "emulator",
    "build_emulator": "emulator",
    "EmlocError": "errors",
    "EvalResult": "evaluate",
    "evaluate": "evaluate",
    "attach_lora": "lora",
    "load_adapter": "lora",
    "save_adapter": "lora",
    "DEFAULT_MODEL": "models",
    "fingerprint": "models",
    "load_model": "models",
    "tiny_model": "models",
    "RankPlan": "ranks",
    "allocate": "ranks",
    "Run": "run",
    "notebook_run": "run",
    "SpectrumTable": "spectra",
    "finetune": "training",
    "finetune_hf": "training",
    "hf_trainer": "training",
}
__all__ = sorted(_EXPORTS)


class _Package(types.ModuleType):
    def __getattr__(self, name: str):
        if name not in _EXPORTS:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{self.__name__}.{_EXPORTS[name]}"), name)
        setattr(self, name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        # Importing a submodule binds it on the package. Where a function has the module's name
        # (drift, evaluate), `emloc_nb.drift` stays the function, as the exports promise.
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_EXPORTS))


sys.modules[__name__].__class__ = _Package
