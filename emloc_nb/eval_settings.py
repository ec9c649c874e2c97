"""The settings the evaluate stage scores: which base model, with which adapter.

The evaluate stage runs one process per setting; the results table has one row each.
"""

from __future__ import annotations

from typing import NamedTuple

from .config import RunConfig
from .layout import ADAPTERS


class Setting(NamedTuple):
    description: str
    base: str  # "original" or "emulator"
    adapter: str | None  # Run.adapter_dir(adapter): "original", "emulator" or "corrected"
    check_base: bool  # False: apply an adapter trained on another base (the naive transfer)


SETTINGS = {
    "original": Setting("original, zero-shot", "original", None, True),
    "original+lora": Setting("original + LoRA trained on the original (upper bound)", "original", "original", True),
    "emulator": Setting("emulator, zero-shot", "emulator", None, True),
    "emulator+lora": Setting("emulator + LoRA", "emulator", "emulator", True),
    "original+naive": Setting("original + naive (uncorrected) emulator LoRA", "original", "emulator", False),
    "original+corrected": Setting("original + corrected LoRA", "original", "corrected", True),
}
# The stage that trained each adapter: its record holds the fine-tuning's memory.
TRAINED_BY = {"original": "finetune_original", "emulator": "finetune_emulator", "corrected": "finetune_emulator"}


def setting_reads(s: Setting) -> tuple[str, ...]:
    """The run artifacts a setting's evaluation reads: the emulator for an emulator base, and its adapter."""
    return (("emulator",) if s.base == "emulator" else ()) + ((ADAPTERS[s.adapter],) if s.adapter else ())


def settings(config: RunConfig) -> list[str]:
    """The settings a run evaluates: the LoRA trained on the original only with `baseline`."""
    return [s for s, v in SETTINGS.items() if config.baseline or v.adapter != "original"]
