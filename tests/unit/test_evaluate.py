import math

import pytest
from datasets import Dataset

from emloc_nb import evaluate, evaluation
from emloc_nb.evaluation import EvalResult
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


def _varied_task(toy_task, choices):
    """Prompts of very different lengths, out of length order, so that sorted batches reorder them."""
    rows = [
        {"prompt": "The film was " + "very " * k + word + ".", "answer": answer}
        for k, word, answer in [
            (9, "good", "yes"),
            (0, "bad", "no"),
            (5, "dull", "no"),
            (1, "great", "yes"),
            (7, "fine", "yes"),
            (2, "awful", "no"),
            (0, "nice", "yes"),
        ]
    ]
    test = Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]}], **r} for r in rows])
    return type(toy_task)("varied", toy_task.train, toy_task.validation, test, choices=choices)


def test_results_come_back_in_example_order(llama, toy_task):
    model, tok = llama
    task = _varied_task(toy_task, toy_task.choices)
    result = evaluate(model, tok, task, limit=None, batch_size=3, progress=False)
    one_by_one = [choice_logprobs(model, tok, [m], task.choices)[0][0] for m in task.test["messages"]]
    assert result.answers == list(task.test["answer"])
    for got, want in zip(result.scores, one_by_one, strict=True):
        assert got == pytest.approx(want.tolist(), abs=1e-4)
    assert result.predictions == [task.choices[int(s.argmax())] for s in one_by_one]


def test_generation_tasks_use_exact_match(llama, toy_task, monkeypatch):
    model, tok = llama
    task = _varied_task(toy_task, None)
    answers = dict(zip(task.test["prompt"], task.test["answer"]))
    # exact match after strip only: padded replies count, a trailing "!" or another word does not
    reply = {0: lambda a: f" {a} ", 1: lambda a: a, 2: lambda a: "something else", 3: lambda a: a + "!"}
    order = {p: i for i, p in enumerate(task.test["prompt"])}

    def fake_generate(model, tok, prompts, n):
        texts = [m[-1]["content"] for m in prompts]
        return [reply[order[t] % 4](answers[t]) for t in texts]

    monkeypatch.setattr(evaluation, "generate", fake_generate)
    result = evaluate(model, tok, task, limit=None, batch_size=3, progress=False)
    assert result.examples == 7 and math.isfinite(result.answer_loss)
    assert [r["correct"] for r in result.rows] == [i % 4 in (0, 1) for i in range(7)]
    assert result.accuracy == pytest.approx(4 / 7)
