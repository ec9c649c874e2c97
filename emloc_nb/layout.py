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

import json
import os
import re
from collections.abc import Callable
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
    path = run_dir / template.format(key)
    real_dir, real = os.path.realpath(run_dir), os.path.realpath(path)
    if real != real_dir and not real.startswith(real_dir.rstrip(os.sep) + os.sep):
        raise EmlocError(
            f"{path} leads outside its run directory, to {real} (a symbolic link), but a run keeps its artifacts "
            "inside it, where a rerun or --overwrite may replace them. Move what the link points to into the run "
            "in its place, or remove the link to have its stage recompute it."
        )
    return path


def in_layout(name: str) -> bool:
    """Whether an entry named `name` at the top of a run directory is one the layout provides for."""
    return any(t.match(name) for t in _TOP_LEVEL)


# What emloc-nb writes in a run directory besides its artifact directories (which list their files in a manifest).
_OWN_FILES = re.compile(
    r"^(run\.json|\.lock|report\.html|stages/[^/]+\.json|evaluate/results\.(json|md)|finetune_[^/]+/history\.json"
    r"|scratch/.+)$"  # scratch/: what notebooks save beside the run, through Run.scratch
)
_ARTIFACT_DIRS = re.compile(
    r"^(emulator|drift|calibrate/[^/]+|finetune_[^/]+/(adapter|checkpoint)|correct/(adapter|report)|evaluate/[^/]+)$"
)


def _listed(directory: Path) -> set[str] | None:
    """The files an artifact directory's manifest lists, and the manifest; None when it has no readable one."""
    try:
        files = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))["files"]
        return {*files, "manifest.json"} if isinstance(files, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # damaged after emloc-nb wrote it: still its own


def foreign_files(run_dir: Path, *, temporary: Callable[[str], bool]) -> list[str]:
    """The files under a run directory that emloc-nb did not write, as relative paths: what --overwrite must keep.

    Its own are run.json and the other files the layout names, every file an artifact directory's
    manifest lists (all of a damaged one's, which has none), and the temporaries of writes
    (`temporary`, emloc_nb.atomic.is_leftover). The rest is the user's: a notes file, a folder, a link.
    """
    foreign = []
    for dirpath, dirnames, filenames in os.walk(run_dir):
        dirnames[:] = [d for d in dirnames if not temporary(d)]  # a write in progress, or a dead writer's
        here = Path(dirpath)
        rel = here.relative_to(run_dir).as_posix()
        listed = _listed(here) if _ARTIFACT_DIRS.match(rel) else None
        if _ARTIFACT_DIRS.match(rel) and listed is None:
            dirnames.clear()
            continue
        for name in [*filenames, *(d for d in dirnames if (here / d).is_symlink())]:
            path = (here / name).relative_to(run_dir).as_posix()
            inner = (here / name).relative_to(here).as_posix()
            ours = (inner in listed) if listed is not None else bool(_OWN_FILES.match(path))
            if not temporary(name) and (not ours or (here / name).is_symlink()):
                foreign.append(path)
        if listed is not None:  # its subdirectories' files are listed as "sub/name"
            for sub in dirnames:
                for root, _, names in os.walk(here / sub):
                    for name in names:
                        inner = (Path(root) / name).relative_to(here).as_posix()
                        if not temporary(name) and inner not in listed:
                            foreign.append((Path(root) / name).relative_to(run_dir).as_posix())
            dirnames.clear()
    return sorted(foreign)


def record_name(step: str) -> str:
    """The stage record's name of a step ("evaluate:original" -> "evaluate-original")."""
    return step.replace(":", "-")
