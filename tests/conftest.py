"""Shared fixtures: a toy classification task and tiny randomly initialised models of several families."""

from __future__ import annotations

import json
import random

import pytest
import torch
from datasets import Dataset

from emloc_nb.calibration import collect_stats
from emloc_nb.config import LoraSpec, RunConfig, TrainSpec
from emloc_nb.data import load_task
from emloc_nb.emulator import build_emulator
from emloc_nb.run import Run
from emloc_nb.tiny import tiny_model
from emloc_nb.tokens import batches
from emloc_nb.training import finetune

FAMILIES = ["llama", "gpt2", "qwen2", "opt"]
FAST = dict(batch_size=8, lr=1e-2, warmup_steps=1)  # training settings that move a tiny model in a few steps


def toy_rows(n: int = 96, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    good, bad = ["good", "great", "fine", "nice", "lovely"], ["bad", "awful", "poor", "sad", "dull"]
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        word = rng.choice(good if positive else bad)
        rows.append({"prompt": f"The film was {word}.", "answer": "yes" if positive else "no"})
    return rows


@pytest.fixture(scope="session")
def toy_task():
    return load_task(Dataset.from_list(toy_rows()), test_size=0.25)


@pytest.fixture(scope="session", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny(family):
    return tiny_model(family)


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def calibrated(toy_task):
    """A tiny llama, its tokenizer, calibration batches and statistics."""
    model, tokenizer = tiny_model("llama")
    calib = batches(tokenizer, toy_task.train, batch_size=8, limit=48)
    return model, tokenizer, calib, collect_stats(model, calib, progress=False)


def tiny_emulator(task):
    """A tiny llama, its tokenizer, and an emulator at ρ = 0.5 calibrated on 32 training examples."""
    model, tok = tiny_model("llama")
    calib = batches(tok, task.train, batch_size=8, limit=32)
    return model, tok, build_emulator(model, collect_stats(model, calib, progress=False), 0.5, progress=False)


def quick_finetune(model, tok, task, output_dir, lora: LoraSpec, *, steps: int, **kwargs):
    """A few LoRA steps at a high learning rate: batch 8, lr 1e-2, one warm-up step, no periodic checkpoints."""
    config = TrainSpec(steps=steps, checkpoint_every=0, **FAST)
    return finetune(model, tok, task, output_dir, lora=lora, config=config, progress=False, **kwargs)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_run_config(model_dir, data_file, **overrides) -> RunConfig:
    """A full-pipeline config on a tiny local model and a toy JSONL task (seconds, in process)."""
    d = {
        "model": str(model_dir),
        "task": {"source": str(data_file), "test_size": 0.25},
        "calibration": {"examples": 16, "heldout_examples": 8, "batch_size": 8},
        "emulator": {"plan": {"ratio": 0.5, "rules": {r"layers\.1\.mlp\.down_proj": 1.0}}},
        "lora": {"r": 4, "alpha": 8},
        "train": {"steps": 3, "batch_size": 8, "lr": 0.01, "checkpoint_every": 0},
        "evaluation": {"limit": 8},
    }
    d.update(overrides)
    return RunConfig.from_dict(d)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """A saved tiny llama checkpoint and a toy JSONL task on disk."""
    root = tmp_path_factory.mktemp("tiny")
    model, tok = tiny_model("llama")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "toy.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in toy_rows(80)))
    return root, root / "model", data


@pytest.fixture(scope="session")
def tiny_run(tiny_files) -> Run:
    """A complete run directory (every stage done) of the tiny model: what widgets and reports read."""
    root, model, data = tiny_files
    run = Run(root / "run", tiny_run_config(model, data))
    run.run_all(isolate=False)
    return run


@pytest.fixture(scope="session")
def tiny_ablation(tiny_files, tmp_path_factory):
    """A finished ablation of the tiny model (2 seeds, 2 budgets, every method, validation split)."""
    from emloc_nb.ablation import Ablation
    from emloc_nb.ablation_methods import AblationSpec

    root, model, data = tiny_files
    config = tiny_run_config(model, data)
    spec = AblationSpec(seeds=2, budgets=[0.5, 0.8], split="validation")
    directory = tmp_path_factory.mktemp("ablation")
    report = Ablation(directory, config, spec).execute(isolate=False, log=lambda _: None)
    return directory, config, spec, report
