"""What an ablation compares: its methods (one way each of getting a LoRA onto the original) and its spec."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .config import RunConfig, resolve_prior_target
from .errors import EmlocError
from .run import task_of

INF = math.inf


@dataclass(frozen=True)
class Method:
    """One row of the table: which run's LoRA, carried over how."""

    key: str
    label: str
    # The run whose LoRA it uses: "whitened", "plain", "eigen", "shrinkage", "energy", "aligned"; None: none.
    variant: str | None
    model: str  # what is scored: "original" or "emulator"
    adapter: str | None  # "emulator", "original" (the run's own adapters), "transfer" (written here) or None
    correction: dict = field(default_factory=dict)  # correct_lora's clamp, kappa, prior, placebo
    every_budget: bool = False  # False: the main budget only
    reference: bool = False  # zero-shot and full LoRA: the same at every budget


def all_methods(clamps: list[float]) -> list[Method]:
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
        # Energy plans matter most where the budget is tight: at every budget.
        Method(
            "energy-naive",
            "energy-allocated ranks, naive",
            "energy",
            "original",
            "transfer",
            {"clamp": 0.0},
            every_budget=True,
        ),
        Method(
            "energy+labels",
            "energy-allocated ranks, naive + prior (the labels' shares)",
            "energy",
            "original",
            "transfer",
            {"clamp": 0.0, "prior": True, "prior_target": "labels"},
            every_budget=True,
        ),
        # The emulator distilled toward the original first (emloc_nb.alignment): meant for tight budgets.
        Method("aligned-emulator", "aligned emulator + its LoRA", "aligned", "emulator", "emulator", every_budget=True),
        Method(
            "aligned-naive",
            "aligned emulator, naive transfer",
            "aligned",
            "original",
            "transfer",
            {"clamp": 0.0},
            every_budget=True,
        ),
        Method(
            "aligned+labels",
            "aligned emulator, naive + prior (the labels' shares)",
            "aligned",
            "original",
            "transfer",
            {"clamp": 0.0, "prior": True, "prior_target": "labels"},
            every_budget=True,
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
    for m in all_methods(clamps):
        if m.adapter == "transfer" and m.variant == "whitened" and _normal(m.correction) == _normal(c):
            return m
    return Method("default", f"the config's correction ({c})", "whitened", "original", "transfer", c, True)


@dataclass
class AblationSpec:
    """What the ablation varies. `methods=None`: every method (see `all_methods`)."""

    seeds: int = 3
    budgets: list[float] = field(default_factory=lambda: [0.8, 0.6])  # the first is the main budget
    clamps: list[float] = field(default_factory=lambda: [0.0, 1.0, 3.0, 10.0, INF])
    split: str = "test"
    shrinkage: float = 0.1
    align_steps: int = 32  # the "aligned" runs' emulator.align_steps
    methods: list[str] | None = None

    def __post_init__(self):
        if self.seeds < 1 or not self.budgets or any(not 0 < b <= 1 for b in self.budgets):
            raise EmlocError("An ablation needs seeds ≥ 1 and budgets in (0, 1], e.g. --seeds 3 --budgets 0.8 0.6.")
        if self.align_steps < 1:
            raise EmlocError(f"align_steps={self.align_steps}: the aligned rows need at least one step, e.g. 32.")
        if self.split not in ("validation", "test"):
            raise EmlocError(f"split={self.split!r}: use 'validation' (to choose settings) or 'test' (final table).")
        known = [m.key for m in all_methods(self.clamps)] + ["default"]
        unknown = sorted(set(self.methods or []) - set(known))
        if unknown:
            raise EmlocError(f"Unknown ablation method(s) {unknown}. Methods: {', '.join(known)}.")

    def selected(self, config: RunConfig) -> list[Method]:
        """The methods to run; the config's own correction is always one of them (the goals are about it).

        A generation task has no classes, so the label-share prior is not one of its methods."""
        has_choices = bool(task_of(config).choices)
        methods = [m for m in all_methods(self.clamps) if has_choices or m.correction.get("prior_target") != "labels"]
        default = default_method(config, self.clamps, has_choices)
        if default not in methods:
            methods.append(default)
        return [m for m in methods if self.methods is None or m.key in self.methods or m == default]
