"""The `threads` setting: checked, resolved, given to each stage, and never part of a stage's results."""

import json

import pytest
import torch

from emloc_nb import EmlocError, Run, RunConfig
from emloc_nb.stages import STAGES, reconfigure, stale_stages
from emloc_nb.threads import AUTO_THREADS, SMALL_MACHINE, resolve_threads, thread_env

from ..conftest import tiny_run_config


def test_threads_is_auto_or_a_count_of_at_least_one():
    assert RunConfig().threads == "auto" and RunConfig(threads=3).threads == 3
    assert RunConfig.from_dict({"threads": 2}).to_dict()["threads"] == 2
    for bad in (0, -1, "two", "", 1.5, True, None):
        with pytest.raises(EmlocError, match="threads"):
            RunConfig(threads=bad)


def test_auto_is_the_callers_omp_num_threads_else_one_thread_on_a_small_machine():
    assert resolve_threads(3, environ={"OMP_NUM_THREADS": "1"}) == 3  # a number is taken as it is
    assert resolve_threads("auto", environ={"OMP_NUM_THREADS": "6"}, cores=2) == 6
    for unset in ({}, {"OMP_NUM_THREADS": ""}, {"OMP_NUM_THREADS": "0"}, {"OMP_NUM_THREADS": "x"}):
        assert resolve_threads("auto", environ=unset, cores=2) == AUTO_THREADS == 1
        assert resolve_threads("auto", environ=unset, cores=SMALL_MACHINE) == 1
        assert resolve_threads("auto", environ=unset, cores=SMALL_MACHINE + 1) is None  # torch's default
    assert thread_env(2) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def test_no_stage_records_threads_so_changing_it_makes_nothing_stale():
    assert all("threads" not in s.settings for s in STAGES.values())
    assert stale_stages({"threads"}) == []


@pytest.fixture
def calibrated_run(tiny_files, tmp_path):
    _, model, data = tiny_files
    run = Run(tmp_path / "run", tiny_run_config(model, data, threads=1))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run.run_stage("calibrate", isolate=False)
        yield run, model, data, torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_in_process_a_stage_runs_on_its_threads_and_the_callers_count_comes_back(calibrated_run):
    run, _, _, after = calibrated_run
    assert run.stage_records()["calibrate"]["threads"] == 1
    assert after == 2


def test_a_run_resumed_on_another_thread_count_keeps_its_results(calibrated_run):
    run, model, data, _ = calibrated_run
    stamp = run.path("calibration:train").stat().st_mtime_ns
    again = Run(run.dir, tiny_run_config(model, data, threads=2))  # `emloc run` with --set threads=2
    assert again.config.threads == 2 and json.loads(run.path("config").read_text())["threads"] == 2
    assert STAGES["calibrate"].done(again) and run.path("calibration:train").stat().st_mtime_ns == stamp
    assert reconfigure(again, [("threads", "auto")], command_stage="finetune_emulator") == []
    assert again.config.threads == "auto" and STAGES["calibrate"].done(Run(run.dir))
    with pytest.raises(EmlocError, match="different run"):  # anything else that differs is still another run
        Run(run.dir, tiny_run_config(model, data, threads=2, seed=1))
