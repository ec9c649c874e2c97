"""RankPlanner: allocations hit the budget, dense layers stay dense, and the plan builds an emulator."""

from __future__ import annotations

import re

import pytest
import torch

from emloc_nb.errors import EmlocError
from emloc_nb.ranks import RankPlan
from emloc_nb.widgets import RankPlanner
from emloc_nb.widgets.plots.common import trace


def kept_params(spectra, plan: RankPlan) -> tuple[int, int]:
    """Parameters the plan keeps, counted independently from the layer shapes."""
    choices = plan.resolve({r["name"]: (r["d_out"], r["d_in"]) for r in spectra.rows})
    kept = dense = 0
    for r in spectra.rows:
        full, rank = r["d_out"] * r["d_in"], choices[r["name"]].rank
        dense += full
        kept += full if rank is None else rank * (r["d_out"] + r["d_in"])
    return kept, dense


@pytest.mark.parametrize("strategy", ["uniform", "energy"])
@pytest.mark.parametrize("budget", [0.25, 0.6])
def test_plan_totals_hit_the_budget(spectra, strategy, budget):
    planner = RankPlanner(spectra, strategy=strategy)
    planner.budget.value = budget
    kept, dense = kept_params(spectra, planner.plan)
    # One rank step of every layer is the most that rounding (uniform) or the last greedy step (energy) can leave.
    slack = sum(r["d_out"] + r["d_in"] for r in spectra.rows)
    assert budget * dense - slack <= kept <= budget * dense
    assert planner.totals["params_kept"] == kept
    assert planner.totals["share_kept"] == pytest.approx(kept / dense)
    assert f"{kept:,}" in planner.status.value
    # One bar per block: the share of its parameters kept.
    blocks: dict = {}
    for r in spectra.rows:
        rank, full = planner.choices[r["name"]].rank, r["d_out"] * r["d_in"]
        kept_dense = blocks.setdefault(r["block"], [0, 0])
        kept_dense[0] += full if rank is None else rank * (r["d_out"] + r["d_in"])
        kept_dense[1] += full
    bars = trace(planner.figure, "parameters kept")
    assert list(bars.x) == [str(b) for b in sorted(blocks)]
    assert list(bars.y) == pytest.approx([k / d for k, d in (blocks[b] for b in sorted(blocks))])


def test_energy_strategy_keeps_at_least_the_uniform_energy(spectra):
    planner = RankPlanner(spectra, budget=0.3)
    uniform = planner.totals["mean_energy_kept"]
    planner.strategy.value = "energy"
    assert planner.totals["mean_energy_kept"] >= uniform - 1e-9
    assert planner.plan.ranks  # explicit per-layer ranks from the greedy allocation


def test_dense_layers_by_regex_and_by_pick(spectra):
    planner = RankPlanner(spectra, budget=0.6)
    planner.dense_text.value = r"layers\.0\.self_attn\.q_proj"
    planner.dense_layers.value = ("model.layers.1.mlp.up_proj",)
    choices = planner.choices
    dense = {n for n, c in choices.items() if c.rank is None}
    assert dense == {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"}
    assert re.escape("model.layers.1.mlp.up_proj") in planner.plan.rules
    hover = trace(planner.figure, "parameters kept").hovertext  # block 0, block 1: each layer's rank
    assert "0.self_attn.q_proj: dense" in hover[0] and "1.mlp.up_proj: dense" in hover[1]
    assert "0.mlp.up_proj: rank" in hover[0]


def test_impossible_budget_is_reported_not_raised_by_the_controls(spectra):
    planner = RankPlanner(spectra, budget=0.6)
    planner.dense_text.value = r"mlp"  # the MLPs alone hold most of the parameters
    planner.budget.value = 0.1
    assert "cannot even hold" in planner.status.value
    with pytest.raises(EmlocError):
        _ = planner.plan
    planner.dense_text.value = "("  # an invalid regex is reported the same way
    assert "color:#b00" in planner.status.value


def test_memory_follows_the_bytes_per_weight(spectra):
    planner = RankPlanner(spectra, budget=0.5)
    t4 = planner.totals
    planner.dtype.value = 2
    assert t4["weights_bytes"] == 4 * t4["params_kept"]
    assert planner.totals["weights_bytes"] == t4["weights_bytes"] / 2


def build(plan: RankPlan, tiny_files, stats):
    from emloc_nb.emulator import build_emulator
    from emloc_nb.models import load_model

    model, _ = load_model(str(tiny_files[1]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny SVDs run ~10× slower with threads contending on a busy 2-core runner
    try:
        return build_emulator(model, stats, plan, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_saved_plan_builds_the_planned_emulator(spectra, tiny_files, stats, tmp_path):
    planner = RankPlanner(spectra, budget=0.4, strategy="energy", dense=[r"layers\.1\.mlp\.down_proj"])
    path = planner.save(tmp_path / "plan.json")
    plan = RankPlan.load(path)
    assert plan == planner.plan
    emulator = build(plan, tiny_files, stats)
    assert emulator.ranks == {n: c.rank for n, c in planner.choices.items() if c.rank is not None}
    assert "model.layers.1.mlp.down_proj" not in emulator.ranks


@pytest.mark.parametrize("strategy", ["uniform", "energy"])
def test_a_gb_budget_plans_weights_that_fit_it(spectra, strategy):
    planner = RankPlanner(spectra, strategy=strategy)
    planner.unit.value = "gb"
    dense_gb = 4 * sum(r["d_out"] * r["d_in"] for r in spectra.rows) / 1e9  # float32 weights, all layers dense
    # One rank step of every layer, in GB: the most the allocation can fall short (as in the share test above).
    slack_gb = 4 * sum(r["d_out"] + r["d_in"] for r in spectra.rows) / 1e9
    for share in (0.3, 0.7):
        planner.memory.value = share * dense_gb
        predicted_gb = planner.totals["weights_bytes"] / 1e9  # the planner's own GB figure
        assert share * dense_gb - slack_gb <= predicted_gb <= share * dense_gb
        kept, _ = kept_params(spectra, planner.plan)
        assert predicted_gb == pytest.approx(4 * kept / 1e9)
    planner.memory.value = 0.3 * dense_gb
    planner.dtype.value = 2  # the same GB holds twice as many bfloat16 weights
    assert planner.memory.value == pytest.approx(0.3 * dense_gb)
    assert planner.budget_share == pytest.approx(0.6)
    assert 0.3 * dense_gb - slack_gb / 2 <= planner.totals["weights_bytes"] / 1e9 <= 0.3 * dense_gb


def test_switching_the_budget_unit_keeps_the_plan(spectra):
    planner = RankPlanner(spectra, budget=0.4)
    plan = planner.plan
    planner.unit.value = "gb"
    assert planner.memory.layout.display is None and planner.budget.layout.display == "none"
    assert planner.budget_share == pytest.approx(0.4) and planner.plan == plan
    planner.memory.value = planner.memory.value / 2
    planner.unit.value = "share"
    assert planner.budget.value == pytest.approx(0.2) and planner.budget_share == pytest.approx(0.2)


def test_gb_plan_builds_an_emulator_within_the_budget(spectra, tiny_files, stats):
    memory_gb = 0.5 * 4 * sum(r["d_out"] * r["d_in"] for r in spectra.rows) / 1e9
    planner = RankPlanner(spectra, memory_gb=memory_gb, strategy="energy")
    assert planner.unit.value == "gb"
    emulator = build(planner.plan, tiny_files, stats)
    assert emulator.ranks == {n: c.rank for n, c in planner.choices.items() if c.rank is not None}
    kept = sum(spectra.params_at(r["name"], emulator.ranks.get(r["name"])) for r in spectra.rows)
    assert 4 * kept / 1e9 <= memory_gb
