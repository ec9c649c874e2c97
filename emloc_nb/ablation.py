"""`emloc ablate`: a paper-style table on one task, over seeds and budgets, with paired tests.

Every row is one way of getting a LoRA onto the original (a *method*) at one budget ρ and
one seed, scored on one split. Fine-tuning happens in ordinary runs (one per seed, budget
and emulator variant); the corrections and evaluations are done here, on those runs'
emulators and adapters, so each LoRA is trained once however many methods use it.

    ablation_dir/runs/<run>/                   a Run per (seed, budget, variant): calibration, emulator, LoRAs
    ablation_dir/<split>/ablation.json         an AblationReport: the spec, the base config and every row
    ablation_dir/<split>/ablation.md           mean ± std per method and budget, paired tests, the goals
    ablation_dir/<split>/transfers/<run>/<method>/   the adapter a method writes (if any) and its evaluation

Each piece is written atomically and reused when present, so an interrupted ablation
resumes where it stopped. Choose settings with `split="validation"`, then write the final
table with `split="test"` in the same directory: the runs do not depend on the split or on
the base config's correction (the ablation applies its own), so each LoRA is trained once
for both tables. The corrections and evaluations are the pipeline's own steps (emloc_nb.stage_bodies).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .ablation_methods import AblationSpec, Method, all_methods
from .ablation_report import AblationReport
from .atomic import atomic_path
from .config import CorrectionSpec, EvalSpec, RunConfig
from .lazy import lazy
from .ranks import allocate
from .run import Run
from .stage_bodies import evaluate_adapter, transfer_lora

EvalResult = lazy("emloc_nb.evaluation:EvalResult")
load_model = lazy("emloc_nb.models:load_model")


# ----------------------------------------------------------------------------- running it


class Ablation:
    """An ablation directory: its runs, transfers and report (see the module docstring)."""

    def __init__(
        self, directory: str | Path, config: RunConfig, spec: AblationSpec, *, trust_remote_code: bool = False
    ):
        self.dir, self.config, self.spec = Path(directory), config, spec
        self.trust_remote_code = trust_remote_code  # the caller's choice, never the config's
        self._original = None  # (model, tokenizer), loaded once and shared by every run
        self.isolate = True  # stages in fresh processes; execute() sets it

    def original(self):
        if self._original is None:
            self._original = load_model(
                self.config.model,
                dtype=self.config.dtype,
                device=self.config.device,
                trust_remote_code=self.trust_remote_code,
            )
        return self._original

    def run_config(self, seed: int, budget: float, variant: str) -> RunConfig:
        d = copy.deepcopy(self.config.to_dict())
        d["seed"] = seed
        d["emulator"]["plan"] = {**d["emulator"]["plan"], "ratio": budget}
        d["baseline"] = variant == "whitened" and budget == self.spec.budgets[0]  # one full LoRA per seed
        # What the runs never use here, fixed, so that a validation table, a test table and a base config
        # that differs only in its correction all share one set of trained LoRAs.
        d["correction"], d["evaluation"] = asdict(CorrectionSpec()), asdict(EvalSpec())
        if variant == "plain":
            d["emulator"]["mode"] = "plain"
        elif variant == "eigen":
            d["lora"]["init"] = "eigen"
        elif variant == "shrinkage":
            d["emulator"]["shrinkage"] = self.spec.shrinkage
        elif variant == "aligned":
            d["emulator"]["align_steps"] = self.spec.align_steps
        elif variant == "energy":
            d["emulator"]["plan"] = self._energy_plan(seed, budget)
        return RunConfig.from_dict(d)

    def _energy_plan(self, seed: int, budget: float) -> dict:
        """The plan that spends `budget` where the whitened energy is, from the seed's uniform run's spectra."""
        uniform = self.run(seed, self.spec.budgets[0], "whitened")
        uniform.run_stage("calibrate", isolate=self.isolate)
        uniform.run_stage("emulator", isolate=self.isolate)
        return allocate(uniform.spectra(), budget, strategy="energy").to_dict()

    def run_dir(self, seed: int, budget: float, variant: str) -> Path:
        return self.dir / "runs" / f"seed{seed}-rho{budget:g}-{variant}"

    def run(self, seed: int, budget: float, variant: str):
        run = Run(
            self.run_dir(seed, budget, variant),
            self.run_config(seed, budget, variant),
            trust_remote_code=self.trust_remote_code,
        )
        run.use_original(*self.original())
        return run

    def cells(self) -> list[tuple[Method, int, float | None]]:
        """(method, seed, budget) of every row; a reference method has one budget, None."""
        out = []
        for seed in range(self.spec.seeds):
            for m in self.spec.selected(self.config):
                budgets = [None] if m.reference else self.spec.budgets if m.every_budget else self.spec.budgets[:1]
                out += [(m, seed, b) for b in budgets]
        return out

    @property
    def out(self) -> Path:
        """Where this split's report and transfers go."""
        return self.dir / self.spec.split

    def execute(self, *, isolate: bool = True, log: Callable[[str], None] = print) -> AblationReport:
        """Train what the rows need, then correct and evaluate each row; write <split>/ablation.json and .md."""
        started = time.time()
        self.isolate = isolate
        cells = self.cells()
        rows = []
        for i, (method, seed, budget) in enumerate(cells, 1):
            log(f"[ablate] {i}/{len(cells)}: {method.label}, seed {seed}" + (f", ρ = {budget:g}" if budget else ""))
            rows.append(self._row(method, seed, budget, isolate))
        report = AblationReport(asdict(self.spec), self.config.to_dict(), rows, time.time() - started)
        if (self.out / "ablation.json").is_file():  # another invocation's rows stay (more seeds, budgets, methods)
            report = report.merged_with(AblationReport.load(self.out))
        # measured over every row's run, the earlier invocations' too: a budget's peak is a mean over all its seeds
        report.memory = report.with_memory(self._memory(report.rows))
        report.save_into(self.out)
        with atomic_path(self.out / "ablation.md") as tmp:
            tmp.write_text(report.markdown())
        return report

    def _row(self, method: Method, seed: int, budget: float | None, isolate: bool) -> dict:
        run = self.run(seed, budget or self.spec.budgets[0], method.variant or "whitened")
        # zero-shot depends on no seed: scored once
        where = self.out / "transfers" / ("zero-shot" if method.key == "zero-shot" else f"{run.dir.name}/{method.key}")
        result = self._saved_evaluation(where, run)
        if result is None:
            if method.adapter:
                self._calibrate(run, seed, isolate)
            stages = ["emulator", "finetune_emulator"] if method.variant else []
            stages += ["finetune_original"] if method.adapter == "original" else []
            for stage in stages:
                run.run_stage(stage, isolate=isolate)
            self._evaluate(run, method, where)
            result = EvalResult.load(where / "evaluation")
        return {
            "method": method.key,
            "label": method.label,
            "seed": seed,
            "budget": budget,
            **{k: v for k, v in result.summary().items() if k != "predicted"},
            "predicted": result.prediction_counts() if result.choices else None,
            "correct": result.correct,
        }

    def _memory(self, rows: list[dict]) -> dict:
        """Peak memory from the stage records of the runs behind `rows` (AblationReport.memory): the emulator's
        fine-tuning per budget, LoRA on the original, and the original's inference, measured here once."""
        # Every seed's run at this invocation's budgets, earlier invocations' included (their runs share this
        # one's configs); other budgets keep the figures their own invocation measured.
        whitened = {m.key for m in all_methods(self.spec.clamps) if m.variant == "whitened"} | {"default"}
        runs = {
            (r["seed"], r["budget"])
            for r in rows
            if r["method"] in whitened
            and r["budget"] in self.spec.budgets
            and self.run_dir(r["seed"], r["budget"], "whitened").is_dir()
        }
        main = self.spec.budgets[0]
        full = [
            (r["seed"], main)
            for r in rows
            if r["method"] == "full" and self.run_dir(r["seed"], main, "whitened").is_dir()
        ]

        def peaks(cells, step: str) -> list[float]:
            records = (self.run(seed, budget, "whitened").stage_records().get(step, {}) for seed, budget in cells)
            return [r["peak_rss_mb"] for r in records if r.get("isolated") and r.get("peak_rss_mb")]

        finetune = {
            f"{b:g}": _mean_or_none(peaks([c for c in runs if c[1] == b], "finetune_emulator"))
            for b in sorted({b for _, b in runs})
        }
        inference = None
        if runs and self.isolate:
            first = self.run(min(s for s, _ in runs), main, "whitened")
            first.run_stage("evaluate", part="original", isolate=True)
            inference = _mean_or_none(peaks([(first.config.seed, main)], "evaluate-original"))
        return {
            "inference": inference,
            "full": _mean_or_none(peaks(full, "finetune_original")),
            "finetune": {b: p for b, p in finetune.items() if p is not None},
        }

    def _saved_evaluation(self, where: Path, run):
        """The evaluation saved at `where` if it has as many examples as the base config's limit asks, else None."""
        if not (where / "evaluation").is_dir():
            return None
        result = EvalResult.load(where / "evaluation")
        available = len(getattr(run.task(), self.spec.split))
        limit = self.config.evaluation.limit
        return result if result.examples == min(available, limit or available) else None

    def _calibrate(self, run, seed: int, isolate: bool) -> None:
        """Every run of a seed sees the same calibration examples: compute them once, copy them to the others."""
        first = self.run(seed, self.spec.budgets[0], "whitened")
        first.run_stage("calibrate", isolate=isolate)
        if run.dir != first.dir and not run.has("calibration:heldout"):
            for split in ("train", "heldout"):
                run.copy_from(first, f"calibration:{split}")

    def _evaluate(self, run, method: Method, where: Path) -> None:
        """Score one row: its LoRA (carried over by the pipeline's own correction, for a transfer) on its model."""
        original, tokenizer = run.original()
        model = run.emulator().model if method.model == "emulator" else original
        adapter = {"emulator": run.adapter_dir("emulator"), "original": run.adapter_dir("original")}.get(method.adapter)
        if method.adapter == "transfer":
            c = dict(method.correction)
            adapter = where / "adapter"
            transfer_lora(
                run,
                adapter,
                prior=c.pop("prior", False),
                prior_target=c.pop("prior_target", "emulator"),
                placebo_seed=run.config.seed if c.pop("placebo", False) else None,
                data_overlap=False,  # the report is not kept: no need for its eigendecompositions
                **c,
            )
        ev = self.config.evaluation
        evaluate_adapter(
            run,
            model,
            tokenizer,
            adapter,
            where / "evaluation",
            check_base=method.adapter != "transfer",
            split=self.spec.split,
            limit=ev.limit,
            batch_size=ev.batch_size,
            progress=False,
        )


def _mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def ablate(
    config: RunConfig,
    directory: str | Path,
    spec: AblationSpec | None = None,
    *,
    isolate: bool = True,
    log=print,
    trust_remote_code: bool = False,
) -> AblationReport:
    """Run (or resume) the ablation of `config` in `directory`; see the module docstring."""
    ablation = Ablation(directory, config, spec or AblationSpec(), trust_remote_code=trust_remote_code)
    return ablation.execute(isolate=isolate, log=log)
