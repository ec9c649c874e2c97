import math
import sys

import pytest
import torch

from emloc_nb import RankPlan, build_emulator, drift, evaluate
from emloc_nb.data import IGNORE_INDEX, batches, encode_example
from emloc_nb.evaluate import answer_nll, choice_logprobs
from emloc_nb.models import block_linears, linear_weight, model_inputs


def _naive_choice_logprob(model, tok, messages, choice):
    enc = encode_example(tok, messages, choice)
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]
    labels = torch.tensor(enc["labels"])
    positions = (labels != IGNORE_INDEX).nonzero().flatten()
    return float(sum(logp[p - 1, labels[p]] for p in positions))


def test_cached_choice_scoring_equals_full_sequences(tiny, toy_task):
    model, tok = tiny
    prompts = list(toy_task.test["messages"][:5])
    choices = ["yes", "no", "maybe not"]
    scores, counts = choice_logprobs(model, tok, prompts, choices)
    for i, messages in enumerate(prompts):
        for j, choice in enumerate(choices):
            assert scores[i, j].item() == pytest.approx(_naive_choice_logprob(model, tok, messages, choice), abs=2e-4)


def test_answer_nll_only_counts_answer_tokens(llama, toy_task):
    model, tok = llama
    batch = batches(tok, toy_task.test, batch_size=4, limit=4)[0]
    nll, mask = answer_nll(model, batch)
    assert int(mask.sum()) == int((batch["labels"] != IGNORE_INDEX).sum())
    with torch.no_grad():
        loss = model(**model_inputs(model, batch), labels=batch["labels"]).loss
    assert float(nll[mask].mean()) == pytest.approx(float(loss), rel=1e-4)


def test_evaluate_reports_accuracy_and_loss(llama, toy_task):
    model, tok = llama
    result = evaluate(model, tok, toy_task, limit=8, batch_size=3, progress=False)
    rows = toy_task.test.select(range(8))
    scores, _ = choice_logprobs(model, tok, list(rows["messages"]), toy_task.choices)
    picked = [toy_task.choices[i] for i in scores.argmax(1).tolist()]
    assert result["examples"] == 8 and result["predictions"] == picked
    assert result["accuracy"] == pytest.approx(sum(p == a for p, a in zip(picked, rows["answer"])) / 8)
    assert result["answer_loss"] > 0


def test_generation_tasks_use_exact_match(llama, toy_task, monkeypatch):
    model, tok = llama
    task = type(toy_task)("gen", toy_task.train, toy_task.test, choices=None)
    answers = list(task.test.select(range(4))["answer"])
    replies = [f" {answers[0]} ", answers[1], "something else", answers[3] + "!"]  # exact match after strip only
    module = sys.modules["emloc_nb.evaluate"]  # the package's `evaluate` attribute is the function
    monkeypatch.setattr(module, "_generate", lambda model, tok, prompts, n: replies[:len(prompts)])
    result = evaluate(model, tok, task, limit=4, batch_size=4, progress=False)
    assert result["examples"] == 4 and math.isfinite(result["answer_loss"])
    assert result["accuracy"] == pytest.approx(2 / 4)


def test_drift_of_a_full_rank_emulator_is_nil(calibrated, toy_task):
    model, tok, calib, stats = calibrated
    full = RankPlan(ranks={n: min(linear_weight(m).shape) for n, m in block_linears(model).items()})
    held = batches(tok, toy_task.test, batch_size=8)
    report = drift(model, build_emulator(model, stats, full, progress=False), held, tokenizer=tok, progress=False)
    assert max(r["measured_error"] for r in report.layers) < 1e-4
    assert report.summary["kl"] < 1e-6 and report.summary["ppl_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert all(b["cosine"] > 0.9999 for b in report.blocks)
    compressed = drift(model, build_emulator(model, stats, 0.3, progress=False), held, tokenizer=tok, progress=False)
    assert compressed.summary["kl"] > report.summary["kl"] and len(compressed.tokens) == 4
    assert len(compressed.tokens[0]["tokens"]) == len(compressed.tokens[0]["kl"])
