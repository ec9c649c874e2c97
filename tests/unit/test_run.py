"""Run: the one owner of a run directory's layout, with a loader for every artifact."""

import pytest
import torch

from emloc_nb import EmlocError, Run, load_model
from emloc_nb.calibration import CalibrationStats
from emloc_nb.correction_report import CorrectionReport
from emloc_nb.emulator_drift import DriftReport
from emloc_nb.eval_settings import SETTINGS
from emloc_nb.evaluation import EvalResult
from emloc_nb.layout import LAYOUT
from emloc_nb.spectra import SpectrumTable
from emloc_nb.stages import STAGES

from ..conftest import tiny_run_config


def test_every_stage_writes_a_directory_named_for_it(tiny_run):
    assert {p.name for p in tiny_run.dir.iterdir()} == {"run.json", ".lock", "stages", *STAGES}
    assert {p.name for p in tiny_run.path("evaluation:original").parent.iterdir()} == {
        *SETTINGS,
        "results.json",
        "results.md",
    }


def test_a_loader_for_every_artifact(tiny_run):
    assert isinstance(tiny_run.calibration(), CalibrationStats)
    assert tiny_run.calibration("heldout").examples == tiny_run.config.calibration.heldout_examples
    assert isinstance(tiny_run.spectra(), SpectrumTable) and tiny_run.spectra().rows == tiny_run.emulator().spectra.rows
    assert isinstance(tiny_run.drift(), DriftReport) and isinstance(tiny_run.correction(), CorrectionReport)
    assert isinstance(tiny_run.eval_result("original"), EvalResult)
    for which in ("emulator", "original", "corrected"):
        assert (tiny_run.adapter_dir(which) / "adapter_config.json").is_file()
    assert len(tiny_run.history("original")) == tiny_run.config.train.steps
    assert set(tiny_run.stage_records()) >= {"calibrate", "evaluate-original"}
    assert tiny_run.emulator_tokenizer().pad_token_id == tiny_run.original()[1].pad_token_id
    with pytest.raises(EmlocError, match="split"):
        tiny_run.calibration("test")
    with pytest.raises(EmlocError, match="Unknown adapter"):
        tiny_run.adapter_dir("naive")


def test_paths_come_from_the_layout_only(tiny_run):
    assert tiny_run.path("spectra") == tiny_run.dir / LAYOUT["spectra"]
    assert tiny_run.path("calibration:heldout") == tiny_run.dir / "calibrate" / "heldout"
    assert tiny_run.has("correction") and not tiny_run.has("report")
    assert tiny_run.scratch("plan.json").parent.name == "scratch"
    with pytest.raises(EmlocError, match="Unknown run artifact"):
        tiny_run.path("calibration.json")
    with pytest.raises(EmlocError, match="needs a key"):
        tiny_run.path("calibration")
    with pytest.raises(EmlocError, match="takes no key"):
        tiny_run.path("drift:x")


def test_a_directory_that_is_no_run_is_refused(tiny_files, tmp_path):
    _, model, data = tiny_files
    with pytest.raises(EmlocError, match="not a run directory"):
        Run(tmp_path)
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(EmlocError, match="not empty and holds no run"):
        Run(tmp_path, tiny_run_config(model, data))


def test_a_shared_original_in_another_dtype_is_refused(tiny_files, tmp_path):
    # The fingerprint ignores dtype: a float32 original shared with a bf16 run would give float32 results.
    root, model_dir, data = tiny_files
    config = tiny_run_config(model_dir, data)
    config.dtype = "bfloat16"
    run = Run(tmp_path / "bf16", config)
    with pytest.raises(EmlocError, match=r"torch\.float32 on cpu, but this run computes in torch\.bfloat16"):
        run.use_original(*load_model(model_dir))
    model, tok = load_model(model_dir, dtype="bfloat16")
    run.use_original(model, tok)
    assert run.original()[0] is model


def test_only_floating_point_dtypes_are_taken(tiny_files):
    _, model_dir, _ = tiny_files
    for dtype in (torch.int8, torch.complex64, "int8", "bool"):
        with pytest.raises(EmlocError, match="is not a floating-point torch dtype"):
            load_model(model_dir, dtype=dtype)
