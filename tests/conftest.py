"""Shared fixtures: a toy classification task and tiny randomly initialised models of several families."""
from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset

from emloc_nb.calibration import collect_stats
from emloc_nb.data import batches, load_task
from emloc_nb.models import tiny_model

FAMILIES = ["llama", "gpt2", "qwen2", "opt"]


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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
