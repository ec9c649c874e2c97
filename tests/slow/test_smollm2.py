"""End to end on the real SmolLM2-135M-Instruct and the movie-review task, in small settings.

The run directory is EMLOC_RUN_DIR when set (make test shares it with the notebooks,
which then resume instead of recomputing), else a temporary one.
"""

import math
import os
from pathlib import Path

import pytest

from emloc_nb.config import RunConfig, small_settings
from emloc_nb.eval_settings import SETTINGS
from emloc_nb.run import Run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run_dir = Path(os.environ.get("EMLOC_RUN_DIR") or tmp_path_factory.mktemp("smollm2") / "run")
    run = Run(run_dir, small_settings(RunConfig()))
    run.run_all()  # every stage in its own process, as the CLI does
    return run


def test_emulator_at_rho_08_keeps_perplexity_within_5x(small_run):
    assert small_run.config.emulator.plan["ratio"] == 0.8
    rows = small_run.emulator().spectra.rows
    assert len(rows) == 210 and all(not r["dense"] for r in rows)
    summary = small_run.drift().summary
    assert math.isfinite(summary["ppl_emulator"]) and math.isfinite(summary["ppl_original"])
    assert summary["ppl_emulator"] < 5 * summary["ppl_original"]
    assert 0 < summary["kl"] < 5


def test_every_results_row_is_present_and_finite(small_run):
    rows = {r["setting"]: r for r in small_run.results()}
    assert list(rows) == list(SETTINGS)
    for r in rows.values():
        assert 0 <= r["accuracy"] <= 1 and math.isfinite(r["answer_loss"]) and r["examples"] == 32
        assert r["eval_peak_mb"] > 0
    for trained in ("original+lora", "emulator+lora", "original+corrected"):
        assert rows[trained]["train_peak_mb"] > 0
    # the emulator really is smaller than the model it stands in for
    records = small_run.stage_records()
    assert records["finetune_emulator"]["weights_mb"] < records["finetune_original"]["weights_mb"]
    assert (small_run.adapter_dir("corrected") / "adapter_model.safetensors").is_file()
