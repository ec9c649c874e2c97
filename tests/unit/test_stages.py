import json
import subprocess
import sys

import pytest

from emloc_nb import EmlocError, Run
from emloc_nb.cli import main as cli
from emloc_nb.eval_settings import SETTINGS, settings
from emloc_nb.layout import LAYOUT
from emloc_nb.stages import STAGES

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
    assert "| original + corrected LoRA |" in run.path("results_markdown").read_text()
    assert run.correction().rows and run.drift().rows and run.history("emulator")
    assert [run.eval_result(s).accuracy for s in SETTINGS] == [r["accuracy"] for r in rows]
    # the stages leave the shared in-process models as loaded: no LoRA layers
    assert not any("lora" in n for n, _ in run.original()[0].named_modules())
    stamp = run.path("emulator").stat().st_mtime_ns
    again = Run(root / "run", _config(model, data))
    again.run_all(isolate=False)  # everything is done: nothing is recomputed
    assert run.path("emulator").stat().st_mtime_ns == stamp
    with pytest.raises(EmlocError, match="different run"):
        Run(root / "run", _config(model, data, correction={"clamp": 1.0}))


def test_isolated_stage_records_its_peak_memory(tiny_setup):
    root, model, data = tiny_setup
    run = Run(root / "iso", _config(model, data, baseline=False))
    run.run_stage("calibrate")
    record = run.stage_records()["calibrate"]
    assert record["isolated"] and record["peak_rss_mb"] > record["baseline_rss_mb"] > 0
    assert run.calibration().examples == 16


def _build(model, data, output, *flags) -> int:
    """`emloc build-emulator` on the tiny model and task."""
    return cli(["build-emulator", "--model", str(model), "--data", str(data), "--run-dir", str(output), *flags])


def test_bad_plans_and_models_write_nothing(tiny_setup, capsys):
    root, model, data = tiny_setup
    assert _build(model, data, root / "a", "--ratio", "1.5") == 1
    assert "outside (0, 1]" in capsys.readouterr().err
    plan = root / "plan.json"
    plan.write_text(json.dumps({"ratio": 0.5, "rules": {"layers\\.42\\.": 1.0}}))
    assert _build(model, data, root / "b", "--plan", str(plan)) == 1
    assert "match no layer" in capsys.readouterr().err
    assert cli(["build-emulator", "--model", str(root / "missing"), "--run-dir", str(root / "c")]) == 1
    assert "does not exist" in capsys.readouterr().err
    for name in "abc":
        assert not (root / name).exists()


def test_cli_build_emulator_and_overwrite(tiny_setup, capsys):
    root, model, data = tiny_setup
    args = ["--calibration-examples", "8", "--in-process"]
    assert _build(model, data, root / "cli", *args, "--ratio", "0.5") == 0
    out = capsys.readouterr().out
    assert "block linears compressed" in out and "KL" in out
    assert _build(model, data, root / "cli", *args, "--ratio", "0.4") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert _build(model, data, root / "cli", *args, "--ratio", "0.4", "--overwrite") == 0
    assert Run(root / "cli").config.emulator.plan["ratio"] == 0.4


def test_ddp_finetune_with_two_cpu_processes(tiny_setup):
    root, model, data = tiny_setup
    run = Run(root / "ddp", _config(model, data, baseline=False))
    run.run_all(isolate=False, until="emulator")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "emloc_nb.cli",
        "finetune",
        "--run-dir",
        str(run.dir),
        "--trainer",
        "hf",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = run.adapter_dir("emulator")
    meta = json.loads((adapter / "emloc.json").read_text())
    assert meta["world_size"] == 2 and meta["trainer"] == "hf"
    assert (adapter / "adapter_model.safetensors").is_file()
    run.run_stage("correct", isolate=False)  # the DDP adapter is a normal adapter
    assert (run.adapter_dir("corrected") / "adapter_model.safetensors").is_file()


def test_the_registry_names_each_stage_once_with_artifacts_of_the_layout():
    assert list(STAGES) == [
        "calibrate",
        "emulator",
        "drift",
        "finetune_emulator",
        "finetune_original",
        "correct",
        "evaluate",
    ]
    for stage in STAGES.values():
        for artifact in (*stage.reads, *stage.writes, stage.part_writes):
            if artifact:
                assert artifact.partition(":")[0] in LAYOUT, (stage.name, artifact)
        assert stage.model in ("original", "emulator", None)
    written = [a for s in STAGES.values() for a in s.writes]
    assert len(written) == len(set(written))  # one owner for each artifact
    for stage in STAGES.values():  # every stage reads only what an earlier stage writes
        earlier = {a for s in list(STAGES.values())[: list(STAGES).index(stage.name)] for a in s.writes}
        assert set(stage.reads) <= earlier, stage.name


def test_settings_follow_the_baseline_switch(tiny_setup):
    root, model, data = tiny_setup
    assert settings(_config(model, data)) == list(SETTINGS)
    assert settings(_config(model, data, baseline=False)) == [s for s in SETTINGS if s != "original+lora"]
    assert STAGES["finetune_original"].done(Run(root / "nobase", _config(model, data, baseline=False)))


def test_a_stage_whose_inputs_are_missing_names_the_stage_that_writes_them(tiny_setup):
    root, model, data = tiny_setup
    run = Run(root / "early", _config(model, data))
    with pytest.raises(EmlocError, match="needs calibration:train.*calibrate"):
        run.run_stage("emulator", isolate=False)
    with pytest.raises(EmlocError, match="Unknown stage"):
        run.run_stage("compress")


def test_a_whole_tiny_pipeline_in_bf16_runs_and_its_adapters_load(tiny_setup):
    import torch
    from safetensors.torch import load_file

    from emloc_nb import load_adapter, load_model

    root, model, data = tiny_setup
    run = Run(root / "bf16", _config(model, data, dtype="bfloat16"))
    run.run_all(isolate=False)
    assert all(0 <= r["accuracy"] <= 1 for r in run.results())
    emulator = run.emulator()
    assert {p.dtype for p in emulator.model.parameters()} == {torch.bfloat16}
    for which, base in [
        ("emulator", emulator.model),
        ("corrected", run.original()[0]),
        ("original", run.original()[0]),
    ]:
        load_adapter(base, run.adapter_dir(which)).unload()
    # LoRA weights stay float32 over bf16 models: trained, and corrected (a bf16 copy would round them)
    for which in ("emulator", "corrected"):
        stored = load_file(str(run.adapter_dir(which) / "adapter_model.safetensors"))
        assert {t.dtype for t in stored.values()} == {torch.float32}, which
    # the same adapters fit the float32 models: a fingerprint does not depend on the dtype
    load_adapter(run.emulator(dtype="float32").model, run.adapter_dir("emulator")).unload()
    load_adapter(load_model(model)[0], run.adapter_dir("corrected")).unload()
    finetune = run.stage_records()["finetune_emulator"]
    assert finetune["phases"]["train_steps"]["peak_rss_mb"] > 0


def test_bf16_frozen_weights_in_a_float32_run(tiny_setup):
    root, model, data = tiny_setup
    config = _config(model, data, baseline=False)
    config.train.frozen_dtype = "bfloat16"
    config.train.micro_batch_size = 4
    run = Run(root / "frozen-bf16", config)
    run.run_all(isolate=False)  # the correction takes the LoRA trained on the bf16 emulator onto the float32 models
    assert run.correction().rows and {r["setting"] for r in run.results()} == set(settings(config))
