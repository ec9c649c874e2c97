"""The time left: on each progress line (items left × recent pace), and for the whole run (emloc_nb.eta)."""

import io
from types import SimpleNamespace

import pytest

from emloc_nb import RunConfig, progress
from emloc_nb.eta import Pace, examples_scored, rough, seconds_left, stage_work
from emloc_nb.progress import duration, progress_line, recent_pace
from emloc_nb.stages import STAGES


def test_durations_read_as_seconds_minutes_or_hours():
    assert [duration(s) for s in (4.24, 83, 3600 + 5 * 60 + 59)] == ["4.2s", "1m23s", "1h05m"]


def test_a_progress_line_gives_the_items_left_times_the_recent_pace(monkeypatch):
    monkeypatch.setattr(progress, "stage", "finetune_emulator")
    line = progress_line("finetune", 12, 60, 0, 83.0, recent=6.9)
    assert line == ("[progress] finetune_emulator · finetune 12/60 (20%) · 1m23s elapsed · 6.92 s/it · 5m31s left")
    assert "left" not in progress_line("finetune", 60, 60, 0, 400.0, recent=6.9)  # done
    assert "left" not in progress_line("finetune", 3, None, 0, 4.0, recent=1.0)  # no total
    assert "left" not in progress_line("finetune", 0, 60, 0, 0.0)  # nothing done yet


def test_the_recent_pace_is_seconds_per_item_over_the_marks_kept():
    assert recent_pace([(10.0, 0)]) is None and recent_pace([]) is None
    assert recent_pace([(10.0, 2), (16.0, 5)]) == 2.0
    assert recent_pace([(10.0, 5), (11.0, 5)]) is None


def test_a_loop_in_a_pipe_reports_the_time_left_until_it_ends(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setenv("EMLOC_PROGRESS_SECONDS", "0")
    assert list(progress.progress(range(4), desc="loop")) == [0, 1, 2, 3]
    lines = err.getvalue().splitlines()
    assert len(lines) == 5 and all("left" in line for line in lines[1:-1])
    assert "4/4 (100%)" in lines[-1] and "left" not in lines[-1]


def test_each_stages_work_follows_the_configs_sizes():
    work = stage_work(RunConfig())
    assert work["calibrate"] == 128 and work["emulator"] == 64 and work["drift"] == work["correct"] == 128
    assert work["finetune_emulator"] == work["finetune_original"] == 2 * 60 * 8
    assert work["evaluate"] == pytest.approx(0.6 * 300 * 6)
    assert set(work) == set(STAGES)
    lean = stage_work(RunConfig.from_dict({"baseline": False, "train": {"steps": 10, "gradient_checkpointing": True}}))
    assert lean["finetune_original"] == 0 and lean["finetune_emulator"] == 2 * 10 * 8 * 1.5
    assert lean["evaluate"] == pytest.approx(0.6 * 300 * 5)
    assert examples_scored(RunConfig.from_dict({"evaluation": {"limit": None}})) == 1000
    assert examples_scored(RunConfig.from_dict({"evaluation": {"limit": 50}, "task": {"test_size": 20}})) == 20


def test_the_time_left_is_the_work_left_at_the_pace_so_far():
    work = {"a": 100.0, "b": 50.0, "c": 400.0, "off": 0.0}
    assert seconds_left(work, {}, {"c": 1.0}) is None
    assert seconds_left(work, {"off": 3.0}, {"c": 1.0}) is None  # a stage without work sets no pace
    assert seconds_left(work, {"a": 20.0}, {"b": 1.0, "c": 0.5}) == pytest.approx(0.2 * 250)
    assert seconds_left(work, {"a": 20.0, "b": 40.0}, {"c": 1.0}) == pytest.approx(60 / 150 * 400)
    assert [rough(s) for s in (20, 100, 719, 3600 * 2 + 300)] == [
        "under a minute",
        "about 2 min",
        "about 12 min",
        "about 2 h 05 min",
    ]


def test_the_note_counts_only_what_is_still_to_write():
    config = RunConfig(baseline=False)
    written = {"calibration:train", "calibration:heldout", "evaluation:original", "evaluation:emulator"}
    run = SimpleNamespace(config=config, has=lambda artifact: artifact in written)
    pace = Pace(config)
    assert pace.note(run, ["emulator"]) is None  # nothing measured yet
    pace.ran("calibrate", 128 * 0.25)  # 0.25 s per unit of work
    work = stage_work(config)
    evaluate_left = 4 / 6  # results and 3 of the 5 settings' evaluations are missing
    expected = 0.25 * (work["emulator"] + work["drift"] + 2 * 0 + work["evaluate"] * evaluate_left)
    note = pace.note(run, ["emulator", "drift", "finetune_original", "evaluate"])
    assert note == f"{rough(expected)} left: emulator, drift, evaluate (at the pace so far, emloc_nb.eta)"
    assert pace.note(run, ["calibrate"]) is None  # all written
