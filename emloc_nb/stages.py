"""The stages of a run, in one registry: what each reads and writes, its settings, and its provenance.

    calibrate → emulator → drift → finetune_emulator (→ finetune_original) → correct → evaluate

Each `Stage` in `STAGES` says what it reads and writes (run artifacts, see emloc_nb.layout; a
stage is done when everything it writes exists), which model it loads and which settings decide
its result. Its function lives in emloc_nb.stage_bodies, which reaches the torch side only through
lazy names, so the registry, the runner and the CLI import no torch. Adding a stage is one function
there and one entry here. Running the stages is emloc_nb.runner.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .artifacts import differences, manifest_digest, read_manifest, verify_manifest
from .config import RunConfig, with_added_defaults, with_settings
from .errors import EmlocError
from .eval_settings import SETTINGS, setting_reads, settings
from .provenance import provenance
from .results import read_results, rows_digest, write_results
from .stage_bodies import (
    calibrate_stage,
    correct_stage,
    drift_stage,
    emulator_stage,
    evaluate_stage,
    finetune_stage,
)

Body = Callable[..., dict]  # (run, stage, part, progress) -> extra fields of the stage record


@dataclass(frozen=True)
class Stage:
    name: str
    body: Body
    reads: tuple[str, ...]  # run artifacts it needs
    writes: tuple[str, ...]  # run artifacts it writes: the stage is done when they all exist
    model: str | None  # the model its function loads (base_model): "original" or "emulator"; evaluate: per setting
    doc: str
    # The config keys (top level or section) its result depends on directly: recorded in its manifests, and a
    # change of one makes it stale (reconfigure).
    settings: tuple[str, ...] = ()
    enabled: Callable[[RunConfig], bool] = lambda config: True  # a disabled stage counts as done
    parts: Callable[[RunConfig], list[str]] | None = None  # run one process each (evaluate: one per setting)
    part_writes: str = ""  # the artifact each part writes, "{}" standing for the part
    part_reads: Callable[[str], tuple[str, ...]] | None = None  # what one part reads, when not all of `reads`
    finish: Callable[..., None] | None = None  # (run) -> None, after every part

    def done(self, run) -> bool:
        """Whether everything it writes is there, written by this stage with this run's settings and inputs, and
        still as written: every resume checks each file's size and sampled blocks against its manifest.

        An output that is there but was produced otherwise (copied from another run, or from
        inputs that have changed since), or has changed since, is refused with an EmlocError, never
        silently reused. A results table computed for another config or from other evaluations is
        not done: it is derived, and computed again.
        """
        if not self.enabled(run.config):
            return True
        parts = [a for a in self.outputs(run.config) if a not in self.writes]
        for artifact in [*parts, *self.writes]:  # the parts first: the results table is computed from them
            if not run.has(artifact):
                return False
            if run.path(artifact).is_dir():  # directories carry manifests; the results table is derived
                check_provenance(run, artifact)
                verify_manifest(run.path(artifact), kind=None, quick=True)
            elif artifact == "results" and not results_current(run):
                return False
        return True

    def inputs(self, part: str | None) -> tuple[str, ...]:
        return self.part_reads(part) if part and self.part_reads else self.reads

    def outputs(self, config: RunConfig) -> list[str]:
        """Every artifact it writes, its parts' included."""
        parts = self.parts(config) if self.parts else []
        return [*self.writes, *(self.part_writes.format(p) for p in parts)]


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "calibrate",
            calibrate_stage,
            reads=(),
            writes=("calibration:train", "calibration:heldout"),
            model="original",
            settings=("model", "dtype", "seed", "task", "calibration"),
            doc="second moments of every block linear's input, on training and on held-out examples",
        ),
        Stage(
            "emulator",
            emulator_stage,
            reads=("calibration:train",),
            writes=("emulator",),
            model="original",
            settings=("dtype", "emulator"),
            doc="the activation-aware SVD emulator and its spectra",
        ),
        Stage(
            "drift",
            drift_stage,
            reads=("emulator", "calibration:heldout"),
            writes=("drift",),
            model="original",
            settings=("dtype",),
            doc="how far the emulator strays from the original, per layer, per block and end to end",
        ),
        Stage(
            "finetune_emulator",
            finetune_stage,
            reads=("emulator", "calibration:train"),
            writes=("adapter:emulator",),
            model="emulator",
            settings=("model", "dtype", "seed", "task", "lora", "train"),
            doc="LoRA fine-tuning on the emulator",
        ),
        Stage(
            "finetune_original",
            finetune_stage,
            reads=("calibration:train",),  # for a data-aligned LoRA (lora.init="eigen")
            writes=("adapter:original",),
            model="original",
            settings=("model", "dtype", "seed", "task", "baseline", "lora", "train"),
            doc="LoRA fine-tuning on the original: the upper bound EMLoC avoids paying for",
            enabled=lambda config: config.baseline,
        ),
        Stage(
            "correct",
            correct_stage,
            reads=("emulator", "adapter:emulator", "calibration:train", "calibration:heldout"),
            writes=("corrected_adapter", "correction"),
            model="original",
            doc="the emulator's LoRA corrected for the original model (Algorithm 1, then the prior correction)",
            settings=("dtype", "correction"),
        ),
        Stage(
            "evaluate",
            evaluate_stage,
            reads=("emulator", "adapter:emulator", "corrected_adapter"),
            writes=("results",),
            model=None,
            doc="task accuracy of every setting, and the results table",
            settings=("model", "dtype", "seed", "task", "baseline", "evaluation"),
            parts=settings,
            part_writes="evaluation:{}",
            part_reads=lambda setting: setting_reads(SETTINGS[setting]),
            finish=lambda run: write_results(run, results_inputs(run)),
        ),
    ]
}


def get(name: str) -> Stage:
    if name not in STAGES:
        raise EmlocError(f"Unknown stage {name!r}. Stages: {', '.join(STAGES)}.")
    return STAGES[name]


# ----------------------------------------------------------------------------- provenance


def step_provenance(run, stage: Stage, part: str | None) -> dict:
    """What a step records in the manifests it writes: its settings and the manifests of its inputs."""
    config = run.config.to_dict()
    return {
        "step": f"{stage.name}:{part}" if part else stage.name,
        "config": {k: config[k] for k in stage.settings},
        "inputs": {a: manifest_digest(run.path(a)) for a in stage.inputs(part) if run.has(a)},
    }


def _writer(artifact: str) -> tuple[Stage, str | None]:
    name, _, key = artifact.partition(":")
    for stage in STAGES.values():
        if artifact in stage.writes:
            return stage, None
        if stage.part_writes and stage.part_writes.partition(":")[0] == name and key:
            return stage, key
    return STAGES["emulator"], None  # spectra: written inside the emulator


def check_provenance(run, artifact: str) -> None:
    """Refuse `artifact` unless this run's stage wrote it with this run's settings and its current inputs."""
    stage, part = _writer(artifact)
    path = run.path(artifact)
    recorded = read_manifest(path).get("run")
    step = f"{stage.name}:{part}" if part else stage.name
    fix = f"Delete {path} to have `emloc run` (or the {stage.name} stage) recompute it."
    if not isinstance(recorded, dict) or recorded.get("step") != step:
        raise EmlocError(
            f"{path} was not written by this run's {step} step (it was copied in, or written by hand). {fix}"
        )
    expected = step_provenance(run, stage, part)
    settings = with_added_defaults(recorded["config"]) if isinstance(recorded.get("config"), dict) else None
    if settings != expected["config"]:
        raise EmlocError(
            f"{path} was produced with other settings than this run's "
            f"({differences(settings or {}, expected['config'])}). {fix}"
        )
    stale = [a for a, digest in expected["inputs"].items() if (recorded.get("inputs") or {}).get(a) != digest]
    if stale:
        raise EmlocError(f"{path} was computed from another {', '.join(stale)} than the run now holds. {fix}")


def results_inputs(run) -> dict[str, str]:
    """The manifests the results table is computed from (each evaluated setting's), by digest."""
    return {a: manifest_digest(run.path(a)) for a in STAGES["evaluate"].outputs(run.config) if a != "results"}


def check_results(run, table: dict, *, inputs_known: bool = False) -> None:
    """Refuse a results table that another config or other evaluations produced (run.json edited by hand, a setting
    evaluated again); `inputs_known`: it must also name its evaluations, which tables written before did not."""
    path, fix = run.path("results"), "Rerun `emloc evaluate` to compute it for this run."
    recorded = with_added_defaults(table["config"]) if isinstance(table.get("config"), dict) else {}
    if recorded != run.config.to_dict():  # as JSON gives it back: inf is Infinity, and no tuples
        raise EmlocError(
            f"{path} was computed for other settings than {run.path('config').name} holds now "
            f"({differences(recorded, run.config.to_dict()) or 'its config is malformed'}). {fix}"
        )
    if ("inputs" in table or inputs_known) and table.get("inputs") != results_inputs(run):
        raise EmlocError(f"{path} was computed from other evaluations than the run now holds. {fix}")
    if ("rows_sha256" in table or inputs_known) and table.get("rows_sha256") != rows_digest(table.get("rows")):
        raise EmlocError(f"{path}: its rows changed after they were written (their SHA-256 differs). {fix}")


def results_table(run) -> list[dict]:
    """The rows of the run's results table, once checked to be this run's: computed for its config, from its
    evaluations, each of them checked in full against its manifest (it is what the run reports)."""
    table = read_results(run)
    check_results(run, table)
    if not all(isinstance(r, dict) and isinstance(r.get("setting"), str) for r in table["rows"]):
        raise EmlocError(f"{run.path('results')} is malformed. Delete it and rerun `emloc evaluate`.")
    for row in table["rows"]:
        run.verify(f"evaluation:{row['setting']}")
    return table["rows"]


def results_current(run) -> bool:
    """Whether the results table on disk is this run's: computed for its config, from its evaluations."""
    try:
        check_results(run, read_results(run), inputs_known=True)
    except EmlocError:
        return False
    return True


@contextlib.contextmanager
def recording(run, stage: Stage, part: str | None) -> Iterator[None]:
    """Artifacts written inside this block record the step's provenance in their manifests."""
    token = provenance.set(step_provenance(run, stage, part))
    try:
        yield
    finally:
        provenance.reset(token)


# ----------------------------------------------------------------------------- changing settings


def stale_stages(changed: set[str]) -> list[str]:
    """The stages whose results a change of these config keys invalidates, and every stage that reads theirs."""
    stale: list[str] = []
    for stage in STAGES.values():  # registry order: readers come after writers
        upstream = {a for name in stale for a in STAGES[name].writes}
        if set(stage.settings) & changed or set(stage.reads) & upstream:
            stale.append(stage.name)
    return stale


def reconfigure(run, changes: list[tuple[str, object]], *, command_stage: str) -> list[str]:
    """Change an existing run's settings (`--set`) and drop the results they make stale; returns those stages.

    Only `command_stage` and later stages may go stale: `emloc correct --clamp 10` redoes the correction and
    the evaluation, but a change that reaches back to an earlier stage needs `emloc run --overwrite`.
    """
    config = with_settings(run.config, changes)
    old, new = run.config.to_dict(), config.to_dict()
    changed = {k for k in new if new[k] != old[k]}
    if not changed:
        return []
    run.check_new_config(config)  # a refused change leaves the run as it was: nothing is dropped before this
    stale = stale_stages(changed)
    order = list(STAGES)
    early = [s for s in stale if order.index(s) < order.index(command_stage)]
    if early:
        raise EmlocError(
            f"Changing {', '.join(sorted(changed))} makes the {', '.join(early)} stage(s) stale, which this command "
            f"does not run. Start again with `emloc run CONFIG --run-dir {run.dir} --overwrite --set ...`."
        )
    for name in stale:
        for artifact in STAGES[name].outputs(run.config):
            run.discard(artifact)
    run.update_config(config, checked=True)
    return stale
