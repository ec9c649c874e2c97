"""How long a run has left: each stage's work from the config's sizes, at the pace of the stages run so far.

Work is counted in calibration examples: one example's forward pass through the original, with its
share of the stage's start-up. What a stage does per example sets its weight, fitted on the idle demo
run of docs/performance.md (calibration 28 s for 128 examples, fine-tuning 190 s for 60 × 8 examples,
each evaluation 33–47 s for 300 examples):

| stage | work |
|---|---|
| calibrate | calibration examples + held-out examples |
| emulator | half the calibrate stage's (the factoring took about half its time) |
| drift | 2 × held-out examples (through the original and the emulator) |
| finetune_emulator, finetune_original | 2 × steps × batch size (× 1.5 with gradient checkpointing) |
| correct | 2 × held-out examples |
| evaluate | 0.6 × examples scored, for each setting |

The pace is the seconds of the stages run so far over their work; the estimate is the work left at that
pace. It is rough: start-up, the emulator's smaller layers and the machine's load all move it.
"""

from __future__ import annotations

from .eval_settings import settings
from .stages import STAGES


def examples_scored(config) -> int:
    """How many examples the evaluate stage scores per setting (a guess where the split's size is a share)."""
    e, task = config.evaluation, config.task
    size = task.test_size if e.split == "test" else task.validation_size
    default = 1000 if e.split == "test" else 500  # the built-in tasks' split sizes
    size = size if isinstance(size, int) else default
    return min(e.limit, size) if e.limit is not None else size


def stage_work(config) -> dict[str, float]:
    """Each stage's work in calibration examples (see the module); 0 for a disabled stage."""
    c, t = config.calibration, config.train
    trained = 2 * t.steps * t.batch_size * (1.5 if t.gradient_checkpointing else 1)
    work = {
        "calibrate": c.examples + c.heldout_examples,
        "emulator": (c.examples + c.heldout_examples) / 2,
        "drift": 2 * c.heldout_examples,
        "finetune_emulator": trained,
        "finetune_original": trained,
        "correct": 2 * c.heldout_examples,
        "evaluate": 0.6 * examples_scored(config) * len(settings(config)),
    }
    return {name: work.get(name, 0.0) if stage.enabled(config) else 0.0 for name, stage in STAGES.items()}


def seconds_left(work: dict[str, float], measured: dict[str, float], left: dict[str, float]) -> float | None:
    """The work `left` (stage -> share of it still to do) at the pace of the `measured` stages (stage -> seconds).

    None when nothing measured yet did any work.
    """
    done = sum(work[s] for s in measured if work[s] > 0)
    if done <= 0:
        return None
    pace = sum(seconds for s, seconds in measured.items() if work[s] > 0) / done
    return pace * sum(work[s] * share for s, share in left.items())


def rough(seconds: float) -> str:
    """A duration as a person says it: under a minute, about 12 min, about 2 h 05 min."""
    minutes = round(seconds / 60)
    if minutes < 1:
        return "under a minute"
    if minutes < 60:
        return f"about {minutes} min"
    return f"about {minutes // 60} h {minutes % 60:02d} min"


def shares_left(run, names: list[str]) -> dict[str, float]:
    """The share of each stage's outputs (the evaluate stage's settings included) not yet written."""
    left = {}
    for name in names:
        stage = STAGES[name]
        if not stage.enabled(run.config):
            continue
        outputs = stage.outputs(run.config)
        missing = sum(not run.has(a) for a in outputs)
        if missing:
            left[name] = missing / len(outputs)
    return left


class Pace:
    """The stages a run_all call ran, and how long they took; `note` says how long the rest will take."""

    def __init__(self, config):
        self.work = stage_work(config)
        self.measured: dict[str, float] = {}

    def ran(self, name: str, seconds: float) -> None:
        self.measured[name] = seconds

    def note(self, run, later: list[str]) -> str | None:
        """ "about 12 min left for drift, ..., evaluate (...)", or None when nothing is left or measured."""
        left = shares_left(run, later)
        seconds = seconds_left(self.work, self.measured, left)
        if not left or seconds is None:
            return None
        return f"{rough(seconds)} left: {', '.join(left)} (at the pace so far, emloc_nb.eta)"
