"""The corrected adapter is a standard peft adapter: lm-eval's `--model hf --model_args pretrained=...,peft=...`
evaluates it. Runs only where lm-eval is installed (it is no dependency of emloc-nb)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from emloc_nb.model_sources import pretrained_args

TASK = """task: emloc_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}\\nAnswer:"
doc_to_choice: ["yes", "no"]
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_lm_eval_scores_the_corrected_adapter(tiny_run, tmp_path):
    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": r["messages"][0]["content"], "answer": r["answer"]})
                              for r in tiny_run.task().test))  # fmt: skip
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "emloc_toy.yaml").write_text(TASK.format(data=data))
    adapter = tiny_run.adapter_dir("corrected").resolve()
    model_args = f"{pretrained_args(tiny_run.config.model)},peft={adapter}"  # what `emloc correct` prints
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", "emloc_toy"]
    cmd += [
        "--include_path",
        str(tasks),
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--output_path",
        str(tmp_path / "out"),
    ]
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results_*.json")]
    assert results, done.stdout[-2000:]
    acc = results[0]["results"]["emloc_toy"]["acc,none"]
    assert 0 <= acc <= 1
    assert results[0]["config"]["model_args"]["peft"] == str(adapter)  # lm-eval loaded the adapter onto the model
