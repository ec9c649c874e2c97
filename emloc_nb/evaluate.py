"""Evaluation: task accuracy and answer loss of any model (+ adapter), as an EvalResult.

Accuracy is a constrained choice for classification tasks (the choice whose answer
tokens have the highest log-likelihood) and exact match of greedy generation
otherwise; both come from emloc_nb.scoring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .config import check_value
from .data import Task, collator_for, encode_example
from .errors import EmlocError
from .reports import Report
from .scoring import answer_nll, choice_logprobs, generate


@dataclass
class EvalResult(Report):
    """Accuracy and mean answer-token loss on `examples` test examples; one row per example.

    Per-example fields are parallel lists (`answers`, `predictions`), so more of them
    (e.g. each choice's score) can be added without changing the rows' shape.
    """

    kind = "evaluation"

    accuracy: float
    answer_loss: float
    examples: int
    predictions: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # the reference answers, in the same order

    @property
    def rows(self) -> list[dict]:
        return [
            {"example": i, "answer": a, "prediction": p, "correct": p.strip() == a.strip()}
            for i, (a, p) in enumerate(zip(self.answers, self.predictions))
        ]

    def _metadata(self) -> dict:
        return asdict(self)

    @classmethod
    def _from_saved(cls, meta: dict, tensors: dict) -> EvalResult:
        return cls(meta["accuracy"], meta["answer_loss"], meta["examples"], meta["predictions"], meta["answers"])


def _finite(values: torch.Tensor, what: str) -> None:
    if not torch.isfinite(values).all():
        raise EmlocError(
            f"The model's {what} are not finite (NaN/Inf), so no accuracy can be scored. Check the model and "
            "adapter weights (load the model in float32; retrain an adapter that diverged)."
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    split: str = "test",
    limit: int | None = 300,
    batch_size: int = 16,
    progress: bool = True,
) -> EvalResult:
    """Accuracy and mean answer-token loss on the first `limit` examples of a split."""
    if split not in ("train", "test"):
        raise EmlocError(f"Split {split!r}: use 'train' or 'test'.")
    limit = check_value(limit, int | None, "evaluation.limit", {"min": 1})
    batch_size = check_value(batch_size, int, "evaluation.batch_size", {"min": 1})
    data = getattr(task, split)
    data = data.select(range(min(len(data) if limit is None else limit, len(data))))
    if len(data) == 0:
        raise EmlocError(f"The {split} split of {task.name} is empty. Use a task with held-out examples.")
    model.eval()
    correct, nll_sum, tokens, predictions = 0, 0.0, 0, []
    collate = collator_for(tokenizer)
    for start in tqdm(range(0, len(data), batch_size), desc=f"evaluate {split}", disable=not progress):
        rows = data.select(range(start, min(start + batch_size, len(data))))
        prompts, answers = list(rows["messages"]), list(rows["answer"])
        if task.choices:
            scores, counts = choice_logprobs(model, tokenizer, prompts, task.choices)
            _finite(scores, "choice scores")
            picked = [task.choices[i] for i in scores.argmax(1).tolist()]
            gold = torch.tensor([task.choices.index(a) for a in answers])
            nll_sum -= float(scores.gather(1, gold[:, None]).sum())
            tokens += int(counts.gather(1, gold[:, None]).sum())
        else:
            enc = collate([encode_example(tokenizer, m, a) for m, a in zip(prompts, answers)])
            nll, mask = answer_nll(model, enc)
            _finite(nll[mask], "answer losses")
            nll_sum += float(nll[mask].sum())
            tokens += int(mask.sum())
            longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
            picked = [p.strip() for p in generate(model, tokenizer, prompts, longest + 4)]
        correct += sum(p.strip() == a.strip() for p, a in zip(picked, answers))
        predictions.extend(picked)
    return EvalResult(correct / len(data), nll_sum / max(tokens, 1), len(data), predictions, list(data["answer"]))
