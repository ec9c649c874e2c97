"""Where each artifact of a run lives: the one place that spells out paths inside a run directory.

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

Everything else (stages, CLI, widgets, notebooks, benchmarks) asks `Run.path(artifact)` or a
`Run` loader.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import EmlocError

# artifact -> path in the run directory; "{}" is filled from the part after ":" in "name:key".
LAYOUT: dict[str, str] = {
    "config": "run.json",
    "lock": ".lock",  # held by every process that writes into the run (emloc_nb.runlock)
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
ADAPTERS = {"emulator": "adapter:emulator", "original": "adapter:original", "corrected": "corrected_adapter"}
_KEY = re.compile(r"^[A-Za-z0-9_+=-][A-Za-z0-9_.+=-]*$")  # a key names one entry: no separators, no "..", not hidden
# What may sit at the top of a run directory: the layout's first components (a "{}" matching any one name).
_TOP_LEVEL = [re.compile("^" + re.escape(t.split("/")[0]).replace(r"\{\}", "[^/]+") + "$") for t in LAYOUT.values()]


def artifact_path(run_dir: Path, artifact: str) -> Path:
    """The path of `artifact` ("emulator", "calibration:heldout", "evaluation:original", ...) in `run_dir`."""
    name, _, key = artifact.partition(":")
    if name not in LAYOUT:
        raise EmlocError(f"Unknown run artifact {name!r}. Use one of: {', '.join(LAYOUT)}.")
    template = LAYOUT[name]
    if ("{}" in template) != bool(key):
        raise EmlocError(
            f"Run artifact {name!r} " + (f"needs a key: '{name}:KEY'." if "{}" in template else "takes no key.")
        )
    if key and not _KEY.match(key):
        raise EmlocError(f"{key!r} cannot name an entry of a run. Use letters, digits, '_', '-', '.', '+' or '='.")
    return run_dir / template.format(key)


def in_layout(name: str) -> bool:
    """Whether an entry named `name` at the top of a run directory is one the layout provides for."""
    return any(t.match(name) for t in _TOP_LEVEL)


def record_name(step: str) -> str:
    """The stage record's name of a step ("evaluate:original" -> "evaluate-original")."""
    return step.replace(":", "-")
