import json
import subprocess
import sys

import pytest

from emloc_nb import EmlocError, Run, RunConfig
from emloc_nb.cli import main as cli
from emloc_nb.pipeline import SETTINGS, small_settings

from ..conftest import tiny_run_config


@pytest.fixture(scope="module")
def tiny_setup(tiny_files):
    return tiny_files


_config = tiny_run_config


def test_whole_pipeline_in_process_then_resume(tiny_setup):
    root, model, data = tiny_setup
    run = Run(root / "run", _config(model, data))
    run.run_all(isolate=False)
    rows = run.results()
    assert [r["setting"] for r in rows] == list(SETTINGS)
    assert all(0 <= r["accuracy"] <= 1 and r["answer_loss"] > 0 for r in rows)
    assert "| original + corrected LoRA |" in (run.dir / "results.md").read_text()
    assert run.correction().layers and run.drift().layers and run.history("emulator")
    # the stages leave the shared in-process models as loaded: no LoRA layers
    assert not any("lora" in n for n, _ in run.original()[0].named_modules())
    stamp = (run.dir / "emulator" / "emulator.json").stat().st_mtime_ns
    again = Run(root / "run", _config(model, data))
    again.run_all(isolate=False)  # everything is done: nothing is recomputed
    assert (run.dir / "emulator" / "emulator.json").stat().st_mtime_ns == stamp
    with pytest.raises(EmlocError, match="different run"):
        Run(root / "run", _config(model, data, clamp=1.0))


def test_isolated_stage_records_its_peak_memory(tiny_setup):
    root, model, data = tiny_setup
    run = Run(root / "iso", _config(model, data, baseline=False))
    run.run_stage("calibrate")
    record = run.stage_records()["calibrate"]
    assert record["isolated"] and record["peak_rss_mb"] > record["baseline_rss_mb"] > 0
    assert run.calibration().examples == 16


def test_bad_plans_and_models_write_nothing(tiny_setup, capsys):
    root, model, data = tiny_setup
    assert cli(["build-emulator", "--model", str(model), "--data", str(data), "--ratio", "1.5", "--output", str(root / "a")]) == 2
    assert "outside (0, 1]" in capsys.readouterr().err
    plan = root / "plan.json"
    plan.write_text(json.dumps({"ratio": 0.5, "rules": {"layers\\.42\\.": 1.0}}))
    assert cli(["build-emulator", "--model", str(model), "--data", str(data), "--plan", str(plan), "--output", str(root / "b")]) == 2
    assert "match no layer" in capsys.readouterr().err
    assert cli(["build-emulator", "--model", str(root / "missing"), "--output", str(root / "c")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for name in "abc":
        assert not (root / name).exists()


def test_cli_build_emulator_and_overwrite(tiny_setup, capsys):
    root, model, data = tiny_setup
    args = ["build-emulator", "--model", str(model), "--data", str(data), "--calibration-examples", "8",
            "--output", str(root / "cli"), "--in-process"]
    assert cli(args + ["--ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "block linears compressed" in out and "KL" in out
    assert cli(args + ["--ratio", "0.4"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli(args + ["--ratio", "0.4", "--overwrite"]) == 0
    assert Run(root / "cli").config.emulator.plan["ratio"] == 0.4


def test_config_files_and_small_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: x\ntrain:\n  steps: 7\nclamp: .inf\n")
    config = RunConfig.load(path)
    assert config.train.steps == 7 and config.clamp == float("inf")
    assert small_settings(config).train.steps < 7
    path.write_text("trian:\n  steps: 7\n")
    with pytest.raises(EmlocError, match="Unknown setting"):
        RunConfig.load(path)


def test_ddp_finetune_with_two_cpu_processes(tiny_setup):
    root, model, data = tiny_setup
    run = Run(root / "ddp", _config(model, data, baseline=False))
    run.run_all(isolate=False, until="emulator")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "emloc_nb.cli", "finetune", "--run-dir", str(run.dir), "--trainer", "hf"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = run.dir / "finetune_emulator" / "adapter"
    meta = json.loads((adapter / "emloc.json").read_text())
    assert meta["world_size"] == 2 and meta["trainer"] == "hf"
    assert (adapter / "adapter_model.safetensors").is_file()
    run.run_stage("correct", isolate=False)  # the DDP adapter is a normal adapter
    assert (run.dir / "corrected" / "adapter_model.safetensors").is_file()


def test_core_imports_no_notebook_stack():
    code = ("import sys, emloc_nb, emloc_nb.pipeline, emloc_nb.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ipywidgets', 'plotly', 'IPython', 'anywidget')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_default_config_file_is_the_default_run():
    from pathlib import Path
    assert RunConfig.load(Path(__file__).parents[2] / "configs" / "default.yaml").to_dict() == RunConfig().to_dict()


def test_a_plan_file_is_read_relative_to_its_config_and_stored_whole(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "plan.json").write_text(json.dumps({"ratio": 0.6, "rules": {"down_proj": 1.0}}))
    (tmp_path / "configs" / "run.json").write_text(json.dumps({"emulator": {"plan": "plan.json"}}))
    monkeypatch.chdir(tmp_path)  # not the config's folder
    config = RunConfig.load("configs/run.json")
    assert config.emulator.plan == {"ratio": 0.6, "rules": {"down_proj": 1.0}, "ranks": {}}
    (tmp_path / "configs" / "plan.json").write_text(json.dumps({"ratio": 0.3}))  # a later edit does not change the run
    assert RunConfig.from_dict(config.to_dict()).emulator.plan["ratio"] == 0.6
