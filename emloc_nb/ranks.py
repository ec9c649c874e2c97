"""Rank plans: which layers the emulator compresses, and to what rank.

A plan gives each layer a kept share ρ of its parameters (the rank follows from the
layer's shape), from a uniform default, regex rules (first match wins, the paper's
config style) or explicit per-layer ranks. ρ = 1 keeps a layer dense.
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import PATH, EmlocError, argument_kinds
from .serial import read_json, write_json


def rank_for_ratio(d_out: int, d_in: int, ratio: float) -> int:
    """r = ⌊ρ · d_in · d_out / (d_in + d_out)⌋: the rank whose factors hold a share ρ of the parameters."""
    return max(1, math.floor(ratio * d_in * d_out / (d_in + d_out)))


def _check_ratio(ratio: float, where: str) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise EmlocError(
            f"{where}: kept share ρ={ratio!r} is outside (0, 1]. ρ is the share of a layer's parameters the "
            "emulator keeps: use e.g. 0.5 to halve a layer, or 1 to keep it dense."
        )
    return float(ratio)


@dataclass
class LayerChoice:
    """What a plan decided for one layer."""

    name: str
    d_out: int
    d_in: int
    rank: int | None  # None: kept dense
    reason: str

    @property
    def params_kept(self) -> float:
        """Share of the dense layer's parameters that the emulator keeps."""
        if self.rank is None:
            return 1.0
        return self.rank * (self.d_in + self.d_out) / (self.d_in * self.d_out)


@dataclass
class RankPlan:
    """A per-layer rank choice: `ratio` for every layer, overridden by `rules`, then by `ranks`.

    >>> RankPlan(0.4, rules={r"layers\\.29\\.mlp\\.down_proj": 1.0})  # the paper's setting for 30 blocks
    """

    ratio: float = 0.5
    rules: dict[str, float] = field(default_factory=dict)  # regex (re.search) -> ρ; the first match wins
    ranks: dict[str, int] = field(default_factory=dict)  # exact layer name -> rank

    def __post_init__(self):
        _check_ratio(self.ratio, "RankPlan.ratio")
        for name, value in (("rules", self.rules), ("ranks", self.ranks)):
            if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
                raise EmlocError(
                    f"RankPlan.{name} must map layer patterns or names to values, not {value!r}. "
                    f"Write it as {{'pattern': value}}."
                )
        for pattern, ratio in self.rules.items():
            _check_ratio(ratio, f"rule {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise EmlocError(
                    f"Rule {pattern!r} is not a valid regular expression ({e}). Fix the pattern."
                ) from None
        for name, rank in self.ranks.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise EmlocError(
                    f"Rank {rank!r} for {name} must be a positive integer. Use a rule with ρ = 1 to keep it dense."
                )

    def resolve(self, shapes: dict[str, tuple[int, int]]) -> dict[str, LayerChoice]:
        """Decide every layer in `shapes` (name -> (d_out, d_in)); unmatched rules are an error."""
        unmatched = [p for p in self.rules if not any(re.search(p, n) for n in shapes)]
        if unmatched:
            shown = f"{unmatched[:5]}" + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
            raise EmlocError(
                f"Rule(s) {shown} match no layer. Layer names look like {next(iter(shapes), '?')!r}; fix or drop "
                "the rule."
            )
        unknown = [n for n in self.ranks if n not in shapes]
        if unknown:
            raise EmlocError(
                f"Explicit rank(s) for {unknown[:3]} name no compressible layer. Use full module names, e.g. "
                f"{next(iter(shapes), '?')!r}."
            )
        choices = {}
        for name, (d_out, d_in) in shapes.items():
            if name in self.ranks:
                rank, reason = self.ranks[name], "explicit rank"
                if not 1 <= rank <= min(d_out, d_in):
                    raise EmlocError(
                        f"Rank {rank} for {name} is outside 1…{min(d_out, d_in)} = min(d_out, d_in). "
                        "Use a rank in that range, or a rule with ρ = 1 to keep the layer dense."
                    )
            else:
                pattern = next((p for p in self.rules if re.search(p, name)), None)
                ratio = self.rules[pattern] if pattern else self.ratio
                reason = f"rule {pattern!r}: ρ={ratio:g}" if pattern else f"uniform ρ={ratio:g}"
                rank = None if ratio >= 1 else rank_for_ratio(d_out, d_in, ratio)
                if rank is None:
                    reason = f"kept dense ({reason})"
            choices[name] = LayerChoice(name, d_out, d_in, rank, reason)
        return choices

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RankPlan:
        if not isinstance(d, dict):
            raise EmlocError(
                f"A rank plan is a mapping with 'ratio', 'rules' and 'ranks', not {type(d).__name__}. "
                "Write it as {'ratio': 0.5}."
            )
        extra = set(d) - {"ratio", "rules", "ranks"}
        if extra:
            raise EmlocError(
                f"Unknown plan field(s) {sorted(extra)}. Remove them: a plan has 'ratio', 'rules' and 'ranks'."
            )
        return cls(**d)

    @argument_kinds(path=PATH)
    def save(self, path: str | Path) -> Path:
        write_json(path, {"kind": "rank_plan", **self.to_dict()})
        return Path(path)

    @classmethod
    @argument_kinds(path=PATH)
    def load(cls, path: str | Path) -> RankPlan:
        d = read_json(path)
        if not isinstance(d, dict):
            raise EmlocError(
                f"{path} holds a JSON {type(d).__name__}, not a rank plan. Write the plan as a JSON object."
            )
        d = dict(d)
        d.pop("kind", None)
        return cls.from_dict(d)


def allocate(spectra, budget: float, *, strategy: str = "uniform", dense: list[str] = ()) -> RankPlan:
    """A plan that keeps a share `budget` of the compressible layers' parameters.

    `spectra` is a SpectrumTable. "uniform" gives every layer the same ρ; "energy"
    spends the budget greedily where it buys the most whitened energy per
    parameter (which minimises the sum of the layers' squared predicted errors).
    Layers matching a `dense` regex stay dense and are paid for first.
    """
    _check_ratio(budget, "budget")
    rows = spectra.rows
    is_dense = {r["name"]: any(re.search(p, r["name"]) for p in dense) for r in rows}
    total = sum(r["d_out"] * r["d_in"] for r in rows)
    fixed = sum(r["d_out"] * r["d_in"] for r in rows if is_dense[r["name"]])
    free = [r for r in rows if not is_dense[r["name"]]]
    left = budget * total - fixed
    if not free or left <= 0:
        raise EmlocError(
            f"A budget of {budget:g} cannot even hold the layers kept dense ({fixed / total:.2f} of the parameters). "
            "Raise the budget or keep fewer layers dense."
        )
    smallest = sum(r["d_out"] + r["d_in"] for r in free)  # rank 1 everywhere
    if left < smallest:
        raise EmlocError(
            f"A budget of {budget:g} is below the smallest emulator, rank 1 in every compressed layer "
            f"({(fixed + smallest) / total:.4f} of the parameters). Raise the budget or keep fewer layers dense."
        )
    rules = {re.escape(r["name"]): 1.0 for r in rows if is_dense[r["name"]]}
    if strategy == "uniform":
        ratio = min(1.0, left / sum(r["d_out"] * r["d_in"] for r in free))
        return RankPlan(ratio, rules=rules)
    if strategy != "energy":
        raise EmlocError(f"Unknown allocation strategy {strategy!r}. Use 'uniform' or 'energy'.")
    ranks, heap = {}, []
    for r in free:
        energy = spectra.spectrum(r["name"], "whitened").double() ** 2
        cost = r["d_out"] + r["d_in"]
        ranks[r["name"]] = 1
        left -= cost
        gains = (energy / energy.sum()).tolist()
        cap = rank_for_ratio(r["d_out"], r["d_in"], 1.0) - 1  # beyond this the factors cost more than W
        heapq.heappush(heap, (-gains[1] / cost if cap > 1 else 0.0, r["name"], gains, cost, cap))
    while heap and left > 0:
        neg, name, gains, cost, cap = heapq.heappop(heap)
        if neg == 0.0 or cost > left:
            continue
        ranks[name] += 1
        left -= cost
        if ranks[name] < cap:
            heapq.heappush(heap, (-gains[ranks[name]] / cost, name, gains, cost, cap))
    return RankPlan(1.0, rules=rules, ranks=ranks)
