"""`emloc ablate` on a tiny model: every method runs, the table aggregates over seeds, and it resumes."""

import dataclasses
import json
import math
import shutil

import pytest

from emloc_nb import EmlocError
from emloc_nb.ablation import Ablation
from emloc_nb.ablation_methods import AblationSpec, default_method
from emloc_nb.ablation_report import AblationReport, load_ablation, std_goal_text
from emloc_nb.cli import main as cli
from emloc_nb.config import RunConfig
from emloc_nb.run import Run

from ..conftest import tiny_run_config


@pytest.fixture
def ablation(tiny_ablation):
    return tiny_ablation


def test_every_method_has_a_row_per_seed_and_budget(ablation):
    directory, config, spec, report = ablation
    keys = {(r["method"], r["seed"], r["budget"]) for r in report.rows}
    assert len(keys) == len(report.rows)  # no duplicates
    for seed in (0, 1):
        assert ("zero-shot", seed, None) in keys and ("full", seed, None) in keys
        for budget in (0.5, 0.8):
            assert {("naive", seed, budget), ("L=3", seed, budget), ("L=3+prior", seed, budget)} <= keys
            assert ("energy-naive", seed, budget) in keys
        for method in ("plain-naive", "placebo", "lstsq", "lstsq+prior", "eigen", "shrinkage", "L=1", "L=inf"):
            assert (method, seed, 0.5) in keys and (method, seed, 0.8) not in keys  # the main budget only
    for r in report.rows:
        assert 0 <= r["accuracy"] <= 1 and len(r["correct"]) == r["examples"]
        assert r["accuracy"] == pytest.approx(sum(r["correct"]) / r["examples"])
    zero = [r for r in report.rows if r["method"] == "zero-shot"]
    assert zero[0]["correct"] == zero[1]["correct"]  # the original's answers do not depend on the seed


def test_summary_is_mean_and_std_over_seeds_with_paired_tests(ablation):
    _, _, _, report = ablation
    summary = {(r["method"], r["budget"]): r for r in report.summary()}
    rows = [r for r in report.rows if r["method"] == "L=3" and r["budget"] == 0.5]
    accs = [r["accuracy"] for r in rows]
    s = summary[("L=3", 0.5)]
    assert s["seeds"] == 2 and s["accuracy"] == pytest.approx(sum(accs) / 2)
    assert s["accuracy_std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))
    assert s["low"] <= s["diff"] <= s["high"] and 0 <= s["p_mcnemar"] <= 1
    zero, full = summary[("zero-shot", None)]["accuracy"], summary[("full", None)]["accuracy"]
    if full != zero:
        assert s["recovered"] == pytest.approx((s["accuracy"] - zero) / (full - zero))
    assert "diff" not in summary[("naive", 0.5)]  # naive is what the others are paired against


def test_files_markdown_and_resume(ablation, tiny_files, capsys):
    directory, config, spec, report = ablation
    loaded = load_ablation(directory)  # the ablation's folder finds its only table, validation's
    assert loaded.rows == json.loads(json.dumps(report.rows)) == AblationReport.load(directory / "validation").rows
    text = (directory / "validation" / "ablation.md").read_text()
    assert "| whitened emulator, naive transfer | 0.5 |" in text and "McNemar" in text and "Goals at ρ = 0.5" in text
    stamps = {p: p.stat().st_mtime_ns for p in (directory / "validation" / "transfers").rglob("evaluation.json")}
    again = Ablation(directory, config, spec).execute(isolate=False, log=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # every row reused, nothing recomputed
    assert [r["accuracy"] for r in again.rows] == [r["accuracy"] for r in report.rows]


def test_the_test_table_trains_nothing_the_validation_table_trained(ablation, tmp_path):
    """The runs depend on neither the split nor the base config's correction: one set of LoRAs serves every table."""
    shared, config, spec, report = ablation
    directory = tmp_path / "ablation"
    shutil.copytree(shared, directory)  # the fixture is shared with other tests: add the test table to a copy
    runs = {p: p.stat().st_mtime_ns for p in (directory / "runs").rglob("*.safetensors")}
    other = dataclasses.replace(config, correction=dataclasses.replace(config.correction, clamp=0.0))
    test = dataclasses.replace(
        spec, split="test", seeds=1, budgets=[0.5], methods=["zero-shot", "naive", "naive+labels"]
    )
    table = Ablation(directory, other, test).execute(isolate=False, log=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in runs} == runs and set(directory.rglob("*.safetensors")) >= set(runs)
    assert table.spec["split"] == "test" and load_ablation(directory).spec["split"] == "test"  # test first
    assert load_ablation(directory, "validation").rows == report.rows  # the validation table is untouched
    assert table.goals()["method"] == "naive+labels"  # the goals are about the new base config's correction
    examples = {r["method"]: r["examples"] for r in table.rows}
    assert examples["naive"] == examples["naive+labels"] > 1
    fewer = dataclasses.replace(other, evaluation=dataclasses.replace(other.evaluation, limit=examples["naive"] - 1))
    again = Ablation(directory, fewer, test).execute(isolate=False, log=lambda _: None)
    assert {r["examples"] for r in again.rows} == {examples["naive"] - 1}  # a new limit is evaluated again
    assert {p: p.stat().st_mtime_ns for p in runs} == runs  # and still trains nothing
    with pytest.raises(EmlocError, match="no ablation report for the validation split"):
        load_ablation(directory / "runs", "validation")


def test_cli_ablate_and_bad_specs(tiny_files, tmp_path, capsys):
    root, model, data = tiny_files
    config = tmp_path / "c.json"
    config.write_text(json.dumps(tiny_run_config(model, data).to_dict()))
    args = ["ablate", str(config), "--dir", str(tmp_path / "a"), "--seeds", "1", "--budgets", "0.5", "--in-process"]
    assert cli(args + ["--methods", "zero-shot", "naive", "naive+prior"]) == 0
    out = capsys.readouterr().out
    assert "naive + prior correction" in out and "Runtime" in out
    with pytest.raises(EmlocError, match="Unknown ablation method"):
        AblationSpec(methods=["nope"])
    with pytest.raises(EmlocError, match="budgets in"):
        AblationSpec(budgets=[1.5])


def test_runs_of_a_seed_share_one_calibration(ablation):
    directory, _, _, _ = ablation
    contents = []
    for seed in (0, 1):
        files = sorted((directory / "runs").glob(f"seed{seed}-*/calibrate/train/calibration.safetensors"))
        assert len(files) == 9  # whitened, energy and aligned at two budgets, plain, eigen, shrinkage
        contents.append({f.read_bytes() for f in files})
        assert len(contents[-1]) == 1
        assert len({f.stat().st_ino for f in files}) == 1  # one file on disk, hard-linked into each run
    assert contents[0] != contents[1]  # another seed draws other examples


def test_copy_from_refuses_a_run_that_calibrated_otherwise(ablation):
    directory, config, spec, _ = ablation
    abl = Ablation(directory, config, spec)
    seed0, seed1 = abl.run(0, 0.5, "whitened"), abl.run(1, 0.8, "whitened")
    with pytest.raises(EmlocError, match="differs from .* in seed"):
        seed1.copy_from(seed0, "calibration:train")
    with pytest.raises(EmlocError, match="cannot be shared"):
        seed1.copy_from(seed0, "emulator")


def test_one_seed_cannot_meet_the_beat_naive_by_one_std_goal(ablation):
    _, _, spec, report = ablation
    two = report.goals()
    assert isinstance(two["beats_naive_by_more_than_one_std"], bool)  # two seeds: a spread to beat
    one = dataclasses.replace(
        report,
        spec={**report.spec, "seeds": 1},
        rows=[r for r in report.rows if r["seed"] == 0],
    )
    assert one.goals()["beats_naive_by_more_than_one_std"] is None  # std 0 would make it "met" for free
    assert "more than one std: undetermined (needs 2 or more seeds)" in one.markdown()


def test_the_std_goal_reports_its_margin_and_full_loras_ceiling():
    """The three test seeds of docs/ablation-movie-sentiment.md: not met, and barely in reach of full LoRA itself."""
    correct = {  # answers right of 300, per seed
        "zero-shot": [233, 233, 233],
        "full": [272, 265, 265],
        "naive": [255, 259, 218],
        "naive+labels": [265, 261, 263],
    }
    rows = [
        {
            "method": method,
            "label": method,
            "seed": seed,
            "budget": None if method in ("zero-shot", "full") else 0.8,
            "accuracy": right / 300,
            "correct": [True] * right + [False] * (300 - right),
        }
        for method, per_seed in correct.items()
        for seed, right in enumerate(per_seed)
    ]
    report = AblationReport(spec=dataclasses.asdict(AblationSpec(budgets=[0.8])), config={}, rows=rows)
    goals = report.goals("naive+labels")
    assert goals["margin_over_naive"] == pytest.approx(57 / 900)
    assert goals["std_to_beat"] == pytest.approx(0.0754, abs=1e-4)  # naive's: it collapsed on seed 2
    assert goals["full_lora_margin"] == pytest.approx(70 / 900)
    assert goals["beats_naive_by_more_than_one_std"] is False
    assert std_goal_text(goals) == "not met (+0.063 against a std of 0.075; LoRA trained on the original: +0.078)"
    no_full = dataclasses.replace(report, rows=[r for r in rows if r["method"] != "full"])
    assert no_full.goals("naive+labels")["full_lora_margin"] is None
    assert std_goal_text(no_full.goals("naive+labels")) == "not met (+0.063 against a std of 0.075)"


def test_the_default_prior_target_follows_the_task():
    """auto: the label shares on a task with choices, the emulator's prior on a generation task."""
    config = RunConfig()  # clamp 0, prior on, prior_target auto
    assert default_method(config, [0.0, 3.0], has_choices=True).key == "naive+labels"
    assert default_method(config, [0.0, 3.0], has_choices=False).key == "naive+prior"
    explicit = dataclasses.replace(config, correction=dataclasses.replace(config.correction, prior_target="labels"))
    with pytest.raises(EmlocError, match="needs a task with choices"):
        default_method(explicit, [0.0], has_choices=False)


def test_another_invocation_adds_its_rows_and_keeps_the_earlier_ones(ablation, tmp_path):
    """More seeds, budgets or methods in a second `emloc ablate` extend the table; nothing is recomputed."""
    shared, config, spec, report = ablation
    directory = tmp_path / "ablation"
    shutil.copytree(shared, directory)
    stamps = {p: p.stat().st_mtime_ns for p in (directory / "validation" / "transfers").rglob("evaluation.json")}
    fewer = dataclasses.replace(spec, seeds=1, methods=["zero-shot", "naive"])
    extended = Ablation(directory, config, fewer).execute(isolate=False, log=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    key = lambda r: (r["method"], r["seed"], r["budget"])  # noqa: E731
    assert sorted(map(key, extended.rows), key=str) == sorted(map(key, report.rows), key=str)
    assert extended.spec["budgets"] == [0.5, 0.8] and extended.spec["seeds"] == 2 and extended.spec["methods"] is None
    assert AblationReport.load(directory / "validation").rows == json.loads(json.dumps(extended.rows))
    order = [(r["method"], r["budget"]) for r in extended.summary()]
    assert order.index(("zero-shot", None)) < order.index(("naive", 0.8)) < order.index(("naive", 0.5))
    assert json.dumps(extended.summary()) == json.dumps(report.summary())  # the same table


def test_a_later_table_keeps_the_memory_it_did_not_measure():
    spec = dataclasses.asdict(AblationSpec(seeds=1, budgets=[0.8, 0.5], split="validation"))
    config = RunConfig().to_dict()
    older = {k: v for k, v in config.items() if k != "threads"}  # saved before `threads` existed: the same recipe
    earlier = AblationReport(spec, older, [], 1.0, {"inference": 1250.0, "full": 1300.0, "finetune": {"0.8": 1200.0}})
    later = AblationReport(spec, config, [], 2.0, {"inference": None, "full": None, "finetune": {"0.5": 1000.0}})
    merged = later.merged_with(earlier)
    assert merged.memory == {"inference": 1250.0, "full": 1300.0, "finetune": {"0.8": 1200.0, "0.5": 1000.0}}
    assert merged.seconds == 3.0


def test_a_table_on_another_config_replaces_the_earlier_rows(ablation):
    _, config, spec, report = ablation
    other = dataclasses.replace(config, seed=config.seed + 1)
    fresh = AblationReport(dataclasses.asdict(spec), other.to_dict(), report.rows[:1])
    assert fresh.merged_with(report).rows == report.rows[:1]


def test_the_memory_table_gives_each_budget_against_the_original():
    spec = dataclasses.asdict(AblationSpec(seeds=1, budgets=[0.8, 0.5], split="validation"))
    memory = {"inference": 1250.0, "full": 1300.0, "finetune": {"0.8": 1200.0, "0.5": 1000.0}}
    text = AblationReport(spec, {}, [], 0.0, memory)._memory_lines()
    assert "| LoRA on the original | 1300 | 1.00 | 1.04 |" in text
    assert "| LoRA on the emulator, ρ = 0.8 | 1200 | 0.92 | 0.96 |" in text
    assert "| LoRA on the emulator, ρ = 0.5 | 1000 | 0.77 | 0.80 |" in text
    assert AblationReport(spec, {}, [], 0.0, {})._memory_lines() == []  # in-process stages record no peak


def test_an_ablation_in_processes_records_each_budgets_fine_tuning_peak(tiny_files, tmp_path):
    root, model, data = tiny_files
    spec = AblationSpec(seeds=2, budgets=[0.5], split="validation", methods=["zero-shot", "naive"])
    report = Ablation(tmp_path / "a", tiny_run_config(model, data), spec).execute(log=lambda _: None)
    memory = report.memory
    assert set(memory["finetune"]) == {"0.5"} and memory["inference"] > 0 and memory["full"] is None
    assert memory["finetune"]["0.5"] > 0 and "× the original's inference" in report.markdown()
    peaks = [
        Run(tmp_path / "a" / "runs" / f"seed{s}-rho0.5-whitened").stage_records()["finetune_emulator"]["peak_rss_mb"]
        for s in (0, 1)
    ]
    assert memory["finetune"]["0.5"] == pytest.approx(sum(peaks) / 2)
    # a later invocation with fewer seeds still reports the mean over every seed the table has
    fewer = dataclasses.replace(spec, seeds=1)
    again = Ablation(tmp_path / "a", tiny_run_config(model, data), fewer).execute(log=lambda _: None)
    assert again.memory["finetune"]["0.5"] == pytest.approx(sum(peaks) / 2)


def test_the_summary_of_one_budget_keeps_the_references(ablation):
    _, _, _, report = ablation
    at = report.summary(budget=0.8)
    assert {r["budget"] for r in at} == {None, 0.8} and {"zero-shot", "full", "naive"} <= {r["method"] for r in at}
    everything = {(r["method"], r["budget"]): r for r in report.summary()}
    assert all(r == everything[r["method"], r["budget"]] for r in at)


def test_a_pair_is_the_naive_comparison_for_naive_and_symmetric(ablation):
    _, _, _, report = ablation
    by_naive = {(r["method"], r["budget"]): r for r in report.summary()}[("L=3", 0.5)]
    pair = report.pair("L=3", "naive", 0.5)
    assert pair["seeds"] == 2 and pair["diff"] == pytest.approx(by_naive["diff"])
    assert pair["p_mcnemar"] == pytest.approx(by_naive["p_mcnemar"])
    assert report.pair("naive", "L=3", 0.5)["diff"] == pytest.approx(-pair["diff"])
    with pytest.raises(EmlocError, match="No seed has both"):
        report.pair("L=3", "naive", 0.3)


def test_aligned_rows_use_an_emulator_distilled_toward_the_original(ablation):
    directory, config, spec, report = ablation
    aligned = Run(directory / "runs" / "seed0-rho0.5-aligned")
    whitened = Run(directory / "runs" / "seed0-rho0.5-whitened")
    assert aligned.config.emulator.align_steps == spec.align_steps and whitened.config.emulator.align_steps == 0
    account = aligned.stage_records()["emulator"]["alignment"]
    assert len(account["train_kl"]) == spec.align_steps
    assert aligned.emulator().fingerprint != whitened.emulator().fingerprint  # the same build, then distilled
    assert {r["method"] for r in report.rows} >= {"aligned-emulator", "aligned-naive", "aligned+labels"}
