import json
import subprocess
import sys
from pathlib import Path

import pytest

from emloc_nb import EmlocError, RunConfig
from emloc_nb.config import LoraSpec, TrainSpec, small_settings


def test_config_files_and_small_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: x\ntrain:\n  steps: 7\ncorrection:\n  clamp: .inf\n")
    config = RunConfig.load(path)
    assert config.train.steps == 7 and config.correction.clamp == float("inf")
    assert isinstance(config.train, TrainSpec) and isinstance(config.lora, LoraSpec)
    assert small_settings(config).train.steps < 7
    path.write_text("trian:\n  steps: 7\n")
    with pytest.raises(EmlocError, match="Unknown setting"):
        RunConfig.load(path)
    with pytest.raises(EmlocError, match="Unknown setting"):
        RunConfig.from_dict({"lora": {"rank": 4}})
    with pytest.raises(EmlocError, match="mode"):
        RunConfig.from_dict({"emulator": {"mode": "svd"}})


def test_default_config_file_is_the_default_run():
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


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_reading_a_config_needs_neither_peft_nor_torch():
    loaded = _loaded_after("import emloc_nb.config; emloc_nb.config.RunConfig()")
    assert not loaded & {"peft", "torch", "transformers"}


def test_core_imports_no_notebook_stack():
    loaded = _loaded_after("import emloc_nb, emloc_nb.config, emloc_nb.run, emloc_nb.stages, emloc_nb.cli")
    assert not loaded & {"ipywidgets", "plotly", "IPython", "anywidget"}


def test_device_dtype_and_memory_levers_are_checked_before_anything_runs():
    config = RunConfig.from_dict({"device": "cuda:1", "dtype": "bfloat16", "train": {"micro_batch_size": 2}})
    assert (config.device, config.dtype, config.train.micro_batch_size) == ("cuda:1", "bfloat16", 2)
    for bad, match in [
        ({"device": "tpu"}, "device='tpu'"),
        ({"device": "cpu:0"}, "device='cpu:0'"),
        ({"dtype": "float16"}, "dtype='float16'.*float32, bfloat16"),
        ({"train": {"frozen_dtype": "int8"}}, "train.frozen_dtype='int8'"),
        ({"train": {"micro_batch_size": 3}}, "must divide train.batch_size=8"),
        ({"train": {"micro_batch_size": 0}}, "micro_batch_size=0"),
    ]:
        with pytest.raises(EmlocError, match=match):
            RunConfig.from_dict(bad)


def test_a_missing_cuda_device_is_a_clear_error():
    import torch

    from emloc_nb.models import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(EmlocError, match="no CUDA device.*On a GPU"):
            resolve_device("cuda")


def test_cli_flags_set_device_and_dtype(tmp_path):
    from argparse import Namespace

    from emloc_nb.cli import _new_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n")
    config = _new_config(Namespace(config=path, device="auto", dtype="bfloat16", small=False))
    assert (config.device, config.dtype, config.train.steps) == ("auto", "bfloat16", 7)


def test_the_tight_budget_recipe_is_the_default_at_half_the_parameters_aligned_and_trained_gentler():
    default, tight = (RunConfig.load(f"configs/{name}.yaml").to_dict() for name in ("default", "tight-budget"))
    assert {k for k in default if default[k] != tight[k]} == {"emulator", "train"}
    changed = {k for k in default["emulator"] if default["emulator"][k] != tight["emulator"][k]}
    assert changed == {"plan", "align_steps"}
    assert tight["emulator"]["plan"]["ratio"] == 0.5 and tight["emulator"]["align_steps"] > 0
    assert default["emulator"]["align_steps"] == 0
    assert {k for k in default["train"] if default["train"][k] != tight["train"][k]} == {"lr", "steps"}
    # at half the rate, twice the steps (on validation 0.833 against 0.820 with 60)
    assert tight["train"]["lr"] < default["train"]["lr"] and tight["train"]["steps"] > default["train"]["steps"]


def test_a_section_written_in_part_takes_the_rest_from_the_runs_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n")
    train, default = RunConfig.load(path).train, RunConfig().train
    assert train.lr == 0.001
    # the run's 60 steps and checkpoints every 20, not TrainSpec()'s 150 and 50
    assert (train.steps, train.checkpoint_every) == (default.steps, default.checkpoint_every) == (60, 20)
    assert RunConfig.from_dict({"train": None}).train == default
