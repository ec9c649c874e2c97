"""bench/gpu_check.py, the one command a lent GPU machine runs, checked here on the CPU so that it cannot rot."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_every_stage_and_records_each_phase(tmp_path):
    done = subprocess.run(
        [sys.executable, "gpu_check.py", "--device", "cpu", "--size", "tiny", "--steps", "2", "--results", tmp_path],
        cwd=ROOT / "bench",
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = ["load", "calibration", "factoring", "inference", "correction"]
    for which in ("emulator", "original"):
        stages += [f"{which}: train_first_step", f"{which}: train_steps"]
    assert set(stages) <= set(result["phases"]), sorted(result["phases"])
    assert all(result["peaks_mb"][s] > 0 for s in stages)
    assert all(math.isfinite(loss) for loss in result["losses"].values())
    assert "| factoring |" in (tmp_path / "gpu_check.md").read_text()
