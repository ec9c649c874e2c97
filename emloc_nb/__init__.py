"""emloc-nb: EMLoC (emulator-based memory-efficient fine-tuning with LoRA correction), step by step.

calibrate → build emulator → fine-tune → correct → evaluate, each one function over
plain, saveable data objects. This package never imports ipywidgets, plotly or
IPython; the interactive views live in `emloc_nb.widgets`.
"""
from .calibration import CalibrationStats, InputStats, collect_stats
from .correction import CorrectionReport, correct_layer, correct_lora
from .data import MOVIE_SENTIMENT, Task, batches, load_task, movie_sentiment
from .emulator import Emulator, LowRankLinear, build_emulator
from .errors import EmlocError
from .evaluate import DriftReport, drift, evaluate
from .models import DEFAULT_MODEL, fingerprint, load_model, tiny_model
from .pipeline import Run, RunConfig
from .ranks import RankPlan, allocate
from .spectra import SpectrumTable
from .training import LoraSpec, TrainConfig, attach_lora, finetune, finetune_hf, hf_trainer, load_adapter

__version__ = "0.1.0"
__all__ = [
    "CalibrationStats", "InputStats", "collect_stats", "CorrectionReport", "correct_layer", "correct_lora",
    "MOVIE_SENTIMENT", "Task", "batches", "load_task", "movie_sentiment", "Emulator", "LowRankLinear",
    "build_emulator", "EmlocError", "DriftReport", "drift", "evaluate", "DEFAULT_MODEL", "fingerprint",
    "load_model", "tiny_model", "Run", "RunConfig", "RankPlan", "allocate", "SpectrumTable", "LoraSpec",
    "TrainConfig", "attach_lora", "finetune", "finetune_hf", "hf_trainer", "load_adapter",
]
