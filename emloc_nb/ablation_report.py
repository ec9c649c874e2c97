"""An ablation's table: one row per method, budget and seed; means over seeds, paired tests and the goals."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .ablation_methods import AblationSpec, all_methods, default_method
from .config import RunConfig
from .errors import EmlocError
from .reports import Report
from .stats import mcnemar, mean_std, paired_bootstrap


@dataclass
class AblationReport(Report):
    """One row per method, budget and seed (accuracy, AUC, ...); `summary()` aggregates over seeds."""

    kind = "ablation"

    spec: dict
    config: dict
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    # Peak resident memory (MB) from the runs' stage records: "inference" (the original, evaluating),
    # "full" (LoRA on the original) and "finetune" ({budget: the emulator's LoRA}), each a mean over seeds.
    memory: dict = field(default_factory=dict)

    def summary(self, budget: float | None = None) -> list[dict]:
        """Per method and budget: mean ± std over seeds, the recovered share, and the paired test against naive.

        `budget`: only that budget's rows, and the references (zero-shot, full LoRA)."""
        groups: dict[tuple, list[dict]] = {}
        for r in self.rows:
            if budget is None or r["budget"] in (None, budget):
                groups.setdefault((r["method"], r["budget"]), []).append(r)
        zero = _mean(groups.get(("zero-shot", None), []), "accuracy")
        full = _mean(groups.get(("full", None), []), "accuracy")
        order = _method_order(self.spec)
        out = []
        for (method, budget), rows in sorted(
            groups.items(), key=lambda g: (order.get(g[0][0], len(order)), -(g[0][1] or 2))
        ):
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

    def pair(self, method: str, against: str, budget: float | None = None) -> dict:
        """Two rows compared directly, pooled over the seeds both have: Δ accuracy, its bootstrap 95% interval and
        McNemar's p (as `summary` compares each row with the naive transfer). `budget`: the main one by default."""
        budget = self.spec["budgets"][0] if budget is None else budget
        rows = {
            m: [r for r in self.rows if r["method"] == m and r["budget"] in (None, budget)] for m in (method, against)
        }
        seeds = {r["seed"] for r in rows[method]} & {r["seed"] for r in rows[against]}
        if not seeds:
            raise EmlocError(f"No seed has both {method!r} and {against!r} at ρ = {budget:g} in this ablation.")
        return {"seeds": len(seeds), **_paired([r for r in rows[method] if r["seed"] in seeds], rows[against])}

    def merged_with(self, earlier: AblationReport) -> AblationReport:
        """This report, plus the rows of an earlier one on the same config and split that it did not recompute:
        an ablation extended by another `emloc ablate` (more seeds, budgets or methods) keeps what it had."""
        if _recipe(earlier.config) != _recipe(self.config) or earlier.spec["split"] != self.spec["split"]:
            return self
        key = lambda r: (r["method"], r["seed"], r["budget"])  # noqa: E731
        recomputed = {key(r) for r in self.rows}
        rows = self.rows + [r for r in earlier.rows if key(r) not in recomputed]
        order = _method_order(self.spec)
        budgets = self.spec["budgets"] + [b for b in earlier.spec["budgets"] if b not in self.spec["budgets"]]
        methods = (
            None
            if None in (self.spec["methods"], earlier.spec["methods"])
            else sorted({*self.spec["methods"], *earlier.spec["methods"]}, key=lambda m: order.get(m, len(order)))
        )
        spec = {
            **self.spec,
            "seeds": max(self.spec["seeds"], earlier.spec["seeds"]),
            "budgets": budgets,
            "methods": methods,
        }
        return AblationReport(spec, self.config, rows, self.seconds + earlier.seconds, earlier.with_memory(self.memory))

    def with_memory(self, measured: dict) -> dict:
        """This report's memory, with what `measured` has (None: not measured) taking the place of its figures."""
        memory = {**self.memory, **{k: v for k, v in measured.items() if v is not None or k not in self.memory}}
        memory["finetune"] = {**self.memory.get("finetune", {}), **measured.get("finetune", {})}
        return memory

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
        lines += self._memory_lines()
        lines.append(f"\nRuntime: {self.seconds / 3600:.2f} h.")
        return "\n".join(lines) + "\n"

    def _memory_lines(self) -> list[str]:
        """Each budget's fine-tuning peak, against LoRA on the original and the original's inference."""
        finetune = self.memory.get("finetune", {})
        if not finetune:
            return []
        inference, full = self.memory.get("inference"), self.memory.get("full")
        lines = [
            "",
            "Peak resident memory of each stage process (the process itself, about 400 MB, included), mean over seeds:",
            "",
            "| fine-tuning | peak MB | × LoRA on the original | × the original's inference |",
            "|---|---|---|---|",
        ]
        for name, peak in [("LoRA on the original", full)] + [
            (f"LoRA on the emulator, ρ = {float(b):g}", p)
            for b, p in sorted(finetune.items(), key=lambda x: -float(x[0]))
        ]:
            if peak is not None:
                ratios = [_fmt(peak / ref if ref else None, ".2f") for ref in (full, inference)]
                lines.append(f"| {name} | {peak:.0f} | {ratios[0]} | {ratios[1]} |")
        lines.append(f"\nThe original's inference peak (evaluation, batch of its config): {_fmt(inference, '.0f')} MB.")
        return lines

    def _metadata(self) -> dict:
        return asdict(self)

    @classmethod
    def _from_saved(cls, meta: dict, tensors: dict) -> AblationReport:
        return cls(meta["spec"], meta["config"], meta["rows"], meta["seconds"], meta.get("memory", {}))


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


def _method_order(spec: dict) -> dict[str, int]:
    """Each method's place in the table: `all_methods`' order."""
    return {m.key: i for i, m in enumerate(all_methods(spec["clamps"]))}


def _recipe(config: dict) -> dict:
    """What a config's rows depend on, as JSON reads it back: its settings with their defaults filled in (a report
    saved before a setting existed has the same recipe), but not `threads`, which changes no result."""
    normal = json.loads(json.dumps(RunConfig.from_dict(config).to_dict()))
    normal.pop("threads", None)
    return normal


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
