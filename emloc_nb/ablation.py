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
for both tables.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .artifacts import atomic_path
from .config import CorrectionSpec, EvalSpec, RunConfig, resolve_prior_target
from .errors import EmlocError
from .evaluation import EvalResult
from .models import load_model
from .ranks import allocate
from .reports import Report
from .run import Run, task_of
from .stage_bodies import evaluate_adapter, transfer_lora
from .stats import mcnemar, mean_std, paired_bootstrap

INF = math.inf


@dataclass(frozen=True)
class Method:
    """One row of the table: which run's LoRA, carried over how."""

    key: str
    label: str
    variant: str | None  # the run whose LoRA it uses: "whitened", "plain", "eigen", "shrinkage", "energy"; None: none
    model: str  # what is scored: "original" or "emulator"
    adapter: str | None  # "emulator", "original" (the run's own adapters), "transfer" (written here) or None
    correction: dict = field(default_factory=dict)  # correct_lora's clamp, kappa, prior, placebo
    every_budget: bool = False  # False: the main budget only
    reference: bool = False  # zero-shot and full LoRA: the same at every budget


def _methods(clamps: list[float]) -> list[Method]:
    def paper(clamp: float) -> Method:
        label = "no clamp" if math.isinf(clamp) else f"L = {clamp:g}"
        return Method(
            f"L={clamp:g}",
            f"paper's correction, {label}",
            "whitened",
            "original",
            "transfer",
            {"clamp": clamp},
            every_budget=clamp == 3.0,
        )

    return [
        Method("zero-shot", "original, zero-shot", None, "original", None, reference=True),
        Method("full", "original + LoRA trained on the original", None, "original", "original", reference=True),
        Method("emulator", "emulator + its LoRA", "whitened", "emulator", "emulator", every_budget=True),
        Method("plain-naive", "plain-SVD emulator, naive transfer", "plain", "original", "transfer", {"clamp": 0.0}),
        Method(
            "naive",
            "whitened emulator, naive transfer",
            "whitened",
            "original",
            "transfer",
            {"clamp": 0.0},
            every_budget=True,
        ),
        *[paper(c) for c in clamps if c != 0],
        Method(
            "placebo",
            "placebo: L = 3 on a random subspace",
            "whitened",
            "original",
            "transfer",
            {"clamp": 3.0, "placebo": True},
        ),
        Method("lstsq", "least-squares κ", "whitened", "original", "transfer", {"clamp": 3.0, "kappa": "lstsq"}),
        Method(
            "naive+prior",
            "naive + prior correction (the emulator's prior)",
            "whitened",
            "original",
            "transfer",
            {"clamp": 0.0, "prior": True, "prior_target": "emulator"},
            every_budget=True,
        ),
        Method(
            "naive+labels",
            "naive + prior correction (the labels' shares)",
            "whitened",
            "original",
            "transfer",
            {"clamp": 0.0, "prior": True, "prior_target": "labels"},
            every_budget=True,
        ),
        Method(
            "L=3+prior",
            "L = 3 + prior correction (the emulator's prior)",
            "whitened",
            "original",
            "transfer",
            {"clamp": 3.0, "prior": True, "prior_target": "emulator"},
            every_budget=True,
        ),
        Method(
            "lstsq+prior",
            "least-squares κ + prior correction",
            "whitened",
            "original",
            "transfer",
            {"clamp": 3.0, "kappa": "lstsq", "prior": True, "prior_target": "emulator"},
        ),
        Method("eigen-naive", "data-aligned LoRA (eigen init), naive", "eigen", "original", "transfer", {"clamp": 0.0}),
        Method("eigen-L=3", "data-aligned LoRA (eigen init), L = 3", "eigen", "original", "transfer", {"clamp": 3.0}),
        Method("energy-naive", "energy-allocated ranks, naive", "energy", "original", "transfer", {"clamp": 0.0}),
        Method(
            "energy+labels",
            "energy-allocated ranks, naive + prior (the labels' shares)",
            "energy",
            "original",
            "transfer",
            {"clamp": 0.0, "prior": True, "prior_target": "labels"},
        ),
        Method(
            "eigen",
            "data-aligned LoRA (eigen init), L = 3 + prior",
            "eigen",
            "original",
            "transfer",
            {"clamp": 3.0, "prior": True, "prior_target": "emulator"},
        ),
        Method(
            "shrinkage",
            "shrunk whitening, L = 3 + prior",
            "shrinkage",
            "original",
            "transfer",
            {"clamp": 3.0, "prior": True, "prior_target": "emulator"},
        ),
    ]


def _normal(correction: dict) -> dict:
    prior = correction.get("prior", False)
    return {
        "clamp": correction.get("clamp", 3.0),
        "kappa": correction.get("kappa", "clamp"),
        "prior": prior,
        "prior_target": correction.get("prior_target", "emulator") if prior else None,
        "placebo": correction.get("placebo", False),
    }


def default_method(config: RunConfig, clamps: list[float], has_choices: bool) -> Method:
    """The method that is the config's own correction: a row of the table, or one made for it."""
    c = asdict(config.correction)
    c["prior_target"] = resolve_prior_target(c["prior_target"], has_choices)
    for m in _methods(clamps):
        if m.adapter == "transfer" and m.variant == "whitened" and _normal(m.correction) == _normal(c):
            return m
    return Method("default", f"the config's correction ({c})", "whitened", "original", "transfer", c, True)


@dataclass
class AblationSpec:
    """What the ablation varies. `methods=None`: every method (see `_methods`)."""

    seeds: int = 3
    budgets: list[float] = field(default_factory=lambda: [0.8, 0.6])  # the first is the main budget
    clamps: list[float] = field(default_factory=lambda: [0.0, 1.0, 3.0, 10.0, INF])
    split: str = "test"
    shrinkage: float = 0.1
    methods: list[str] | None = None

    def __post_init__(self):
        if self.seeds < 1 or not self.budgets or any(not 0 < b <= 1 for b in self.budgets):
            raise EmlocError("An ablation needs seeds ≥ 1 and budgets in (0, 1], e.g. --seeds 3 --budgets 0.8 0.6.")
        if self.split not in ("validation", "test"):
            raise EmlocError(f"split={self.split!r}: use 'validation' (to choose settings) or 'test' (final table).")
        known = [m.key for m in _methods(self.clamps)] + ["default"]
        unknown = sorted(set(self.methods or []) - set(known))
        if unknown:
            raise EmlocError(f"Unknown ablation method(s) {unknown}. Methods: {', '.join(known)}.")

    def selected(self, config: RunConfig) -> list[Method]:
        """The methods to run; the config's own correction is always one of them (the goals are about it).

        A generation task has no classes, so the label-share prior is not one of its methods."""
        has_choices = bool(task_of(config).choices)
        methods = [m for m in _methods(self.clamps) if has_choices or m.correction.get("prior_target") != "labels"]
        default = default_method(config, self.clamps, has_choices)
        if default not in methods:
            methods.append(default)
        return [m for m in methods if self.methods is None or m.key in self.methods or m == default]


@dataclass
class AblationReport(Report):
    """One row per method, budget and seed (accuracy, AUC, ...); `summary()` aggregates over seeds."""

    kind = "ablation"

    spec: dict
    config: dict
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> list[dict]:
        """Per method and budget: mean ± std over seeds, the recovered share, and the paired test against naive."""
        groups: dict[tuple, list[dict]] = {}
        for r in self.rows:
            groups.setdefault((r["method"], r["budget"]), []).append(r)
        zero = _mean(groups.get(("zero-shot", None), []), "accuracy")
        full = _mean(groups.get(("full", None), []), "accuracy")
        out = []
        for (method, budget), rows in groups.items():
            acc, std = mean_std([r["accuracy"] for r in rows])
            row = {
                "method": method,
                "label": rows[0]["label"],
                "budget": budget,
                "seeds": len(rows),
                "accuracy": acc,
                "accuracy_std": std,
                "auc": _mean(rows, "auc"),
                "balanced_accuracy": _mean(rows, "balanced_accuracy"),
                "recovered": (acc - zero) / (full - zero) if None not in (zero, full) and full != zero else None,
            }
            naive = groups.get(("naive", budget))
            if naive and method != "naive":
                row.update(_paired(rows, naive))
            out.append(row)
        return out

    def goals(self, method: str | None = None) -> dict:
        """The goals at the main budget, for `method` (default: the base config's own correction)."""
        spec = AblationSpec(**self.spec)
        has_choices = any(r.get("predicted") for r in self.rows)  # rows of a choice task count predictions per class
        method = method or default_method(RunConfig.from_dict(self.config), spec.clamps, has_choices).key
        summary = {(r["method"], r["budget"]): r for r in self.summary()}
        budget = spec.budgets[0]
        chosen, naive = summary.get((method, budget)), summary.get(("naive", budget))
        zero = summary.get(("zero-shot", None))
        if not (chosen and naive and zero):
            return {}
        margin = chosen["accuracy"] - naive["accuracy"]
        # One seed has no spread to beat: the goal cannot be judged, not met for free.
        std = max(chosen["accuracy_std"], naive["accuracy_std"]) if spec.seeds > 1 else None
        full = summary.get(("full", None))
        return {
            "method": method,
            "budget": budget,
            "beats_zero_shot": chosen["accuracy"] > zero["accuracy"],
            "beats_naive_by_more_than_one_std": None if std is None else margin > std,
            "margin_over_naive": margin,
            "std_to_beat": std,
            # The ceiling of that margin: a transfer as good as LoRA trained on the original itself.
            "full_lora_margin": None if full is None else full["accuracy"] - naive["accuracy"],
            "recovered": chosen["recovered"],
            "recovered_at_least_0.8": chosen["recovered"] is not None and chosen["recovered"] >= 0.8,
        }

    def markdown(self) -> str:
        spec = AblationSpec(**self.spec)
        head = (
            f"Task `{self.config['task']['source']}`, model `{self.config['model']}`, {spec.seeds} seed(s), "
            f"{spec.split} split ({self.config['evaluation']['limit']} examples), budgets ρ = "
            f"{', '.join(f'{b:g}' for b in spec.budgets)}; LoRA r = {self.config['lora']['r']}, "
            f"{self.config['train']['steps']} steps × {self.config['train']['batch_size']} at lr "
            f"{self.config['train']['lr']:g}. Mean ± std over seeds. Recovered: (accuracy − zero-shot) / "
            "(full LoRA − zero-shot). Paired against the naive transfer at the same budget, pooled over seeds: "
            "bootstrap 95% interval of the accuracy difference, and McNemar's exact p.\n"
        )
        lines = [
            head,
            "| method | ρ | accuracy | AUC | balanced acc. | recovered | Δ vs naive [95% CI] | McNemar p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.summary():
            delta = f"{r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]" if "diff" in r else "–"
            lines.append(
                f"| {r['label']} | {_fmt(r['budget'], 'g')} | {r['accuracy']:.3f} ± {r['accuracy_std']:.3f} | "
                f"{_fmt(r['auc'], '.3f')} | {_fmt(r['balanced_accuracy'], '.3f')} | {_fmt(r['recovered'], '.2f')} | "
                f"{delta} | {_fmt(r.get('p_mcnemar'), '.3g')} |"
            )
        goals = self.goals()
        if goals:
            lines += [
                "",
                f"Goals at ρ = {goals['budget']:g} for `{goals['method']}`: beats zero-shot: "
                f"{goal_text(goals['beats_zero_shot'])}; beats naive by more than one std: "
                f"{std_goal_text(goals)}; recovered share "
                f"{_fmt(goals['recovered'], '.2f')} ≥ 0.8: {goal_text(goals['recovered_at_least_0.8'])}.",
            ]
        lines.append(f"\nRuntime: {self.seconds / 3600:.2f} h.")
        return "\n".join(lines) + "\n"

    def _metadata(self) -> dict:
        return asdict(self)

    @classmethod
    def _from_saved(cls, meta: dict, tensors: dict) -> AblationReport:
        return cls(meta["spec"], meta["config"], meta["rows"], meta["seconds"])


def load_ablation(directory: str | Path, split: str | None = None) -> AblationReport:
    """The report of an ablation directory: `split`'s, or else the test table if there is one, else validation's."""
    directory = Path(directory)
    if (directory / "ablation.json").is_file():  # a split's own folder
        return AblationReport.load(directory)
    for name in [split] if split else ["test", "validation"]:
        if (directory / name / "ablation.json").is_file():
            return AblationReport.load(directory / name)
    raise EmlocError(
        f"{directory} holds no ablation report{f' for the {split} split' if split else ''}. "
        f"Write one with `emloc ablate CONFIG --dir {directory}`."
    )


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _paired(rows: list[dict], naive: list[dict]) -> dict:
    by_seed = {r["seed"]: r for r in naive}
    a, b = [], []
    for r in rows:
        if r["seed"] in by_seed:
            a += r["correct"]
            b += by_seed[r["seed"]]["correct"]
    boot, test = paired_bootstrap(a, b), mcnemar(a, b)
    return {"diff": boot["diff"], "low": boot["low"], "high": boot["high"], "p_mcnemar": test["p"]}


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def goal_text(flag: bool | None) -> str:
    return "undetermined (needs 2 or more seeds)" if flag is None else "met" if flag else "not met"


def std_goal_text(goals: dict) -> str:
    """The std goal with its figures: the margin over naive, the std it must exceed, and full LoRA's margin.

    Full LoRA's margin says whether the goal was in reach at all: where it too falls short of the
    std, no transfer could meet the goal on these seeds.
    """
    if goals["std_to_beat"] is None:
        return goal_text(None)
    ceiling = goals["full_lora_margin"]
    ceiling = "" if ceiling is None else f"; LoRA trained on the original: {ceiling:+.3f}"
    flag = goal_text(goals["beats_naive_by_more_than_one_std"])
    return f"{flag} ({goals['margin_over_naive']:+.3f} against a std of {goals['std_to_beat']:.3f}{ceiling})"


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
        elif variant == "energy":
            d["emulator"]["plan"] = self._energy_plan(seed, budget)
        return RunConfig.from_dict(d)

    def _energy_plan(self, seed: int, budget: float) -> dict:
        """The plan that spends `budget` where the whitened energy is, from the seed's uniform run's spectra."""
        uniform = self.run(seed, self.spec.budgets[0], "whitened")
        uniform.run_stage("calibrate", isolate=self.isolate)
        uniform.run_stage("emulator", isolate=self.isolate)
        return allocate(uniform.spectra(), budget, strategy="energy").to_dict()

    def run(self, seed: int, budget: float, variant: str):
        run = Run(
            self.dir / "runs" / f"seed{seed}-rho{budget:g}-{variant}",
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
        previous = self.out / "ablation.json"
        spent = AblationReport.load(self.out).seconds if previous.is_file() else 0.0
        report = AblationReport(asdict(self.spec), self.config.to_dict(), rows, spent + time.time() - started)
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
