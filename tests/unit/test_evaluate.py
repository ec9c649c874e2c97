import math
import sys

import pytest

from emloc_nb import evaluate
from emloc_nb.evaluate import EvalResult
from emloc_nb.scoring import choice_logprobs


def test_evaluate_reports_accuracy_and_loss(llama, toy_task):
    model, tok = llama
    result = evaluate(model, tok, toy_task, limit=8, batch_size=3, progress=False)
    rows = toy_task.test.select(range(8))
    scores, _ = choice_logprobs(model, tok, list(rows["messages"]), toy_task.choices)
    picked = [toy_task.choices[i] for i in scores.argmax(1).tolist()]
    assert isinstance(result, EvalResult)
    assert result.examples == 8 and result.predictions == picked and result.answers == list(rows["answer"])
    assert result.accuracy == pytest.approx(sum(p == a for p, a in zip(picked, rows["answer"])) / 8)
    assert result.accuracy == sum(r["correct"] for r in result.rows) / 8
    assert result.answer_loss > 0


def test_generation_tasks_use_exact_match(llama, toy_task, monkeypatch):
    model, tok = llama
    task = type(toy_task)("gen", toy_task.train, toy_task.validation, toy_task.test, choices=None)
    answers = list(task.test.select(range(4))["answer"])
    replies = [f" {answers[0]} ", answers[1], "something else", answers[3] + "!"]  # exact match after strip only
    module = sys.modules["emloc_nb.evaluate"]  # the package's `evaluate` attribute is the function
    monkeypatch.setattr(module, "generate", lambda model, tok, prompts, n: replies[: len(prompts)])
    result = evaluate(model, tok, task, limit=4, batch_size=4, progress=False)
    assert result.examples == 4 and math.isfinite(result.answer_loss)
    assert result.accuracy == pytest.approx(2 / 4)
