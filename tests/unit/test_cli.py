"""The `emloc` command's conventions: --run-dir everywhere, help on every option, --version, --set,
correct --clamp, evaluate --limit, TrainingArguments pass-through, exit codes 0/1/2, progress from stage processes."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import yaml

from emloc_nb import Run, __version__
from emloc_nb.cli import build_parser
from emloc_nb.cli import main as cli
from emloc_nb.config import settings_names

from ..conftest import tiny_run_config


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_takes_run_dir_and_every_option_has_help():
    commands = _subcommands()
    assert set(commands) == {"run", "build-emulator", "finetune", "correct", "evaluate", "report", "ablate"}
    for name, parser in commands.items():
        flags = {flag for a in parser._actions for flag in a.option_strings}
        assert ("--dir" if name == "ablate" else "--run-dir") in flags, name  # an ablation holds many runs
        assert "--output" not in flags or name == "report", name  # report's --output is the HTML file
        for action in parser._actions:
            assert action.help and action.help.strip(), f"emloc {name} {action.option_strings or action.dest}"
    for action in build_parser()._actions:
        assert action.help, action.option_strings


def test_version_and_usage_errors_exit_0_and_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"emloc {__version__}"
    for argv in (["evaluate"], ["run"], ["correct", "--run-dir", "x", "--clamp", "lots"], ["frobnicate"]):
        with pytest.raises(SystemExit) as e:
            cli(argv)
        assert e.value.code == 2, argv
    with pytest.raises(SystemExit) as e:
        cli(["finetune", "--run-dir", "x", "--hf-arg", "logging_steps=2"])  # needs --trainer hf
    assert e.value.code == 2 and "--hf-arg needs --trainer hf" in capsys.readouterr().err


def test_a_tool_error_exits_1_with_one_line(tmp_path, capsys):
    assert cli(["evaluate", "--run-dir", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a run directory" in err


def test_set_changes_any_setting_and_refuses_unknown_ones(tiny_files, tmp_path, capsys):
    root, model, data = tiny_files
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(model, data).to_dict()))
    assert (
        cli(["build-emulator", "--run-dir", str(tmp_path / "bad"), "--config", str(config), "--set", "lora.rank=4"])
        == 1
    )
    err = capsys.readouterr().err
    assert "Unknown setting 'lora.rank'" in err and "lora.r," in err and "train.steps" in err
    assert not (tmp_path / "bad").exists()
    assert cli(["build-emulator", "--run-dir", str(tmp_path / "b"), "--config", str(config), "--set", "x"]) == 1
    assert "KEY=VALUE" in capsys.readouterr().err
    argv = ["build-emulator", "--run-dir", str(tmp_path / "ok"), "--config", str(config), "--in-process"]
    argv += ["--set", "train.steps=2", "--set", "correction.clamp=.inf", "--set", "emulator.plan.ratio=0.6"]
    argv += ["--set", "task.answer_map={'no': negative, 'yes': positive}", "--calibration-examples", "8"]
    assert cli(argv) == 0
    c = Run(tmp_path / "ok").config
    assert (c.train.steps, c.correction.clamp, c.emulator.plan["ratio"], c.calibration.examples) == (
        2,
        float("inf"),
        0.6,
        8,
    )
    assert c.emulator.plan["rules"]  # the config's rules stay: --set changed the ratio only
    assert c.task.answer_map == {"no": "negative", "yes": "positive"}  # quoted: YAML reads bare no/yes as booleans
    assert "task.answer_map" in settings_names() and "model" in settings_names()


@pytest.fixture(scope="module")
def finished_run(tiny_files, tmp_path_factory):
    root, model, data = tiny_files
    run = Run(tmp_path_factory.mktemp("cli") / "run", tiny_run_config(model, data, baseline=False))
    run.run_all(isolate=False)
    return run


def test_correct_clamp_and_evaluate_limit_redo_only_what_they_change(finished_run, capsys):
    run = finished_run
    emulator_made = run.path("emulator").stat().st_mtime_ns
    assert cli(["correct", "--run-dir", str(run.dir), "--clamp", "10", "--in-process"]) == 0
    out = capsys.readouterr().out
    assert "redoing: correct, evaluate" in out and "corrected adapter:" in out and "peft=" in out
    run = Run(run.dir)
    assert run.config.correction.clamp == 10 and run.correction().clamp == 10
    assert not run.has("results")  # the evaluation of the old adapter is gone, not shown as current
    assert cli(["evaluate", "--run-dir", str(run.dir), "--limit", "4", "--in-process"]) == 0
    run = Run(run.dir)
    assert run.config.evaluation.limit == 4 and {r["examples"] for r in run.results()} == {4}
    assert run.path("emulator").stat().st_mtime_ns == emulator_made  # earlier stages untouched
    # A change that reaches back before the command's stage is refused, and nothing changes.
    assert cli(["correct", "--run-dir", str(run.dir), "--set", "train.steps=5"]) == 1
    assert "finetune_emulator" in capsys.readouterr().err
    assert Run(run.dir).config.train.steps == run.config.train.steps and run.has("results")
    # Every stage computes in the run's dtype: changing it reaches back to calibration.
    assert cli(["evaluate", "--run-dir", str(run.dir), "--set", "dtype=bfloat16"]) == 1
    assert "calibrate" in capsys.readouterr().err
    assert Run(run.dir).config.dtype == "float32" and run.has("results")


def test_training_arguments_pass_through_to_the_hf_trainer(tiny_files, tmp_path, capsys):
    root, model, data = tiny_files
    run = Run(tmp_path / "hf", tiny_run_config(model, data, baseline=False))
    run.run_all(isolate=False, until="emulator")
    base = ["finetune", "--run-dir", str(run.dir), "--trainer", "hf"]
    assert cli([*base, "--hf-arg", "max_step=2"]) == 1
    assert "did you mean max_steps" in capsys.readouterr().err
    assert cli([*base, "--hf-arg", "max_steps=2", "--hf-arg", "logging_steps=1"]) == 0
    assert run.config.train.steps == 3 and len(run.history("emulator")) == 2  # the Trainer took max_steps=2


def test_stage_processes_report_progress_through_the_parent(tiny_files, tmp_path):
    """`emloc run` with a piped stdout (as in `make demo | tee`): each long stage prints progress lines."""
    root, model, data = tiny_files
    config = tmp_path / "c.json"
    config.write_text(json.dumps(tiny_run_config(model, data, baseline=False).to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "emloc_nb.cli", "run", str(config), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip().startswith("[progress]")]
    expected = {
        "calibrate · calibration",
        "emulator · emulator",
        "drift · drift",
        "finetune_emulator · finetune",
        "correct · correction",
        *(f"evaluate:{s} · evaluate test" for s in ("original", "emulator", "emulator+lora", "original+corrected")),
    }
    for what in expected:
        reports = [line for line in lines if line.startswith(f"[progress] {what} ")]
        assert reports, f"no progress line for {what}:\n" + "\n".join(lines)
        assert "elapsed" in reports[-1] and ("100%" in reports[-1])
    steps = tiny_run_config(model, data).train.steps
    assert any(f"finetune {steps}/{steps} (100%)" in line for line in lines)
    # After each stage, how long the rest of the run will take (emloc_nb.eta).
    notes = [line for line in done.stdout.splitlines() if line.startswith("[emloc]") and " left: " in line]
    assert notes and notes[0].endswith("(at the pace so far, emloc_nb.eta)")
    assert " left: emulator, drift, " in notes[0] and " left: evaluate (" in notes[-1]
