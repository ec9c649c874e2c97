"""bench/threads.py's pure parts: the table and the policy choice, from given timings (nothing is timed here)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench(request):
    sys.path.insert(0, str(BENCH))  # the bench imports its _common as a sibling
    request.addfinalizer(lambda: sys.path.remove(str(BENCH)))
    spec = importlib.util.spec_from_file_location("bench_threads", BENCH / "threads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(timings: dict) -> list[dict]:
    """{(threads, wait): {condition: seconds}}, the same for every workload, as the bench's rows."""
    return [
        {"threads": n, "wait": w, "condition": c, "workload": work, "seconds": s}
        for (n, w), by_condition in timings.items()
        for c, s in by_condition.items()
        for work in ("finetune", "calibration", "evaluation")
    ]


# Issue 31's fine-tuning steps on 2 cores (seconds a step): 2 threads are fastest idle, and collapse beside others.
ISSUE = {
    (1, "passive"): {"idle": 5.2, "busy1": 5.4, "busy2": 8.3, "stage": 9.0},
    (1, "active"): {"idle": 5.2, "busy1": 5.5, "busy2": 8.4, "stage": 9.1},
    (2, "passive"): {"idle": 3.5, "busy1": 14.9, "busy2": 21.9, "stage": 20.0},
    (2, "active"): {"idle": 3.4, "busy1": 16.0, "busy2": 23.0, "stage": 22.0},
}


def test_the_issues_timings_choose_one_thread_as_auto_does(bench):
    from emloc_nb.threads import AUTO_THREADS

    choice = bench.choose_policy(rows(ISSUE))
    assert (choice["threads"], choice["wait"]) == (1, "passive") and choice["threads"] == AUTO_THREADS
    assert "no policy both" in choice["why"]  # 1 thread loses 53% idle, but never collapses
    assert choice["collapse"] == pytest.approx(5.4 / 3.4)  # beside a busy process over the fastest idle time


def test_a_policy_within_10_percent_idle_that_never_collapses_beats_the_fastest_idle(bench):
    timings = {
        (1, "passive"): {"idle": 5.2, "busy1": 5.4},
        (2, "passive"): {"idle": 3.8, "busy1": 6.5},  # 9% slower idle, ×1.9 the fastest idle beside a busy process
        (2, "active"): {"idle": 3.5, "busy1": 14.9},  # fastest idle, ×4.3
    }
    choice = bench.choose_policy(rows(timings))
    assert (choice["threads"], choice["wait"]) == (2, "passive") and "at most 10%" in choice["why"]
    timings[(2, "passive")]["idle"] = 4.0  # 14% slower idle: of the two that never collapse, it still loses least
    choice = bench.choose_policy(rows(timings))
    assert (choice["threads"], choice["wait"]) == (2, "passive") and "no policy both" in choice["why"]
    timings[(2, "passive")]["busy1"] = 7.5  # ×2.1: now only 1 thread never collapses
    assert bench.choose_policy(rows(timings))["threads"] == 1


def test_when_every_policy_collapses_the_smallest_worst_case_wins_and_ties_go_to_fewer_threads(bench):
    # Both collapse (×3 and ×5 the fastest idle time beside a busy process). 1 thread: ×1.33 the fastest idle,
    # the fastest beside a busy process; 2 threads: the fastest idle, ×1.67 beside a busy process.
    timings = {(1, "passive"): {"idle": 4.0, "busy1": 9.0}, (2, "passive"): {"idle": 3.0, "busy1": 15.0}}
    choice = bench.choose_policy(rows(timings))
    assert choice["threads"] == 1 and "every policy collapses" in choice["why"]
    assert choice["worst"] == pytest.approx(4 / 3)
    timings = {(2, "active"): {"idle": 3.0, "busy1": 3.0}, (2, "passive"): {"idle": 3.0, "busy1": 3.0}}
    assert bench.choose_policy(rows(timings))["wait"] == "passive"
    timings[(1, "active")] = {"idle": 3.0, "busy1": 3.0}
    assert bench.choose_policy(rows(timings))["threads"] == 1
    with pytest.raises(ValueError, match="idle and beside one busy"):
        bench.choose_policy(rows({(1, "passive"): {"idle": 3.0}}))


def test_the_report_has_a_table_per_workload_and_marks_the_choice(bench):
    measured = rows(ISSUE)
    text = bench.markdown(measured, bench.choose_policy(measured), ["# header", "", "CPU: x"])
    assert text.startswith("# header") and text.count("| threads | wait | idle | beside 1 busy process |") == 3
    assert "| 2 | active | 3.400 | 16.000 | 23.000 | 22.000 |" in text
    assert "| **1** | **passive** | +53% | ×1.59 |" in text
    assert "**Chosen: 1 thread, passive**" in text and "on machines of up to 4 cores" in text
    assert "the same count" in text
