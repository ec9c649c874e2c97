"""Evaluation: task accuracy and answer loss of any model (+ adapter), as an EvalResult.

Accuracy is a constrained choice for classification tasks (the choice whose answer
tokens have the highest log-likelihood) and exact match of greedy generation
otherwise; both come from emloc_nb.scoring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .checks import check_value
from .errors import EmlocError
from .measure import phase
from .progress import progress as progress_bar
from .reports import Report
from .scoring import answer_nll, choice_logprobs, generate
from .stats import auc, balanced_accuracy
from .tasks import SPLITS, Task
from .tokens import collator_for, encode_example


@dataclass
class EvalResult(Report):
    """Accuracy and mean answer-token loss on `examples` examples of a split; one row per example.

    For a choice task `scores` holds each example's log-probability of every choice, from
    which the bias-free views come: the balanced accuracy, the AUC of the scores and the
    count of each prediction. A constant push toward one answer lowers the accuracy but
    not the AUC, so the two together tell a shifted prior from lost task signal.
    """

    kind = "evaluation"

    accuracy: float
    answer_loss: float
    examples: int
    predictions: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # the reference answers, in the same order
    choices: list[str] | None = None
    scores: list[list[float]] | None = None  # per example, per choice: summed answer log-probability
    split: str = "test"

    @property
    def correct(self) -> list[bool]:
        return [p.strip() == a.strip() for p, a in zip(self.predictions, self.answers)]

    @property
    def rows(self) -> list[dict]:
        rows = [
            {"example": i, "answer": a, "prediction": p, "correct": ok}
            for i, (a, p, ok) in enumerate(zip(self.answers, self.predictions, self.correct))
        ]
        for row, scores in zip(rows, self.scores or []):
            row.update({f"score:{c}": v for c, v in zip(self.choices, scores)})
            if len(scores) == 2:
                row["margin"] = scores[0] - scores[1]
        return rows

    def prediction_counts(self) -> dict[str, int]:
        """How often each answer was predicted (choices in order, for a choice task)."""
        keys = self.choices or sorted(set(self.predictions))
        return {k: self.predictions.count(k) for k in keys}

    @property
    def balanced_accuracy(self) -> float | None:
        if not self.choices:
            return None
        index = {c: i for i, c in enumerate(self.choices)}
        return balanced_accuracy([index[p] for p in self.predictions], [index[a] for a in self.answers])

    @property
    def auc(self) -> float | None:
        if not self.scores:
            return None
        return auc(self.scores, [self.choices.index(a) for a in self.answers])

    @property
    def mean_margin(self) -> float | None:
        """Mean of score[0] − score[1] (two choices only): the constant push toward the first choice."""
        if not self.scores or len(self.choices) != 2:
            return None
        return sum(s[0] - s[1] for s in self.scores) / len(self.scores)

    def summary(self) -> dict:
        """The numbers of a results-table row."""
        return {
            "accuracy": self.accuracy,
            "answer_loss": self.answer_loss,
            "examples": self.examples,
            "balanced_accuracy": self.balanced_accuracy,
            "auc": self.auc,
            "mean_margin": self.mean_margin,
            "predicted": self.prediction_counts() if self.choices else None,
        }

    def _metadata(self) -> dict:
        return asdict(self)

    @classmethod
    def _from_saved(cls, meta: dict, tensors: dict) -> EvalResult:
        fields_ = ("accuracy", "answer_loss", "examples", "predictions", "answers", "choices", "scores", "split")
        return cls(**{k: meta[k] for k in fields_})


def _finite(values: torch.Tensor, what: str) -> None:
    if not torch.isfinite(values).all():
        raise EmlocError(
            f"The model's {what} are not finite (NaN/Inf), so no accuracy can be scored. Check the model and "
            "adapter weights (load the model in float32; retrain an adapter that diverged)."
        )


@torch.no_grad()
@phase("evaluation")
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
    split = check_value(split, str, "evaluation.split", {"choices": SPLITS})
    limit = check_value(limit, int | None, "evaluation.limit", {"min": 1})
    batch_size = check_value(batch_size, int, "evaluation.batch_size", {"min": 1})
    data = task.split(split)
    data = data.select(range(min(len(data) if limit is None else limit, len(data))))
    if len(data) == 0:
        raise EmlocError(f"The {split} split of {task.name} is empty. Use a task with held-out examples.")
    model.eval()
    # Batches of similar length pad less (a quarter fewer tokens on the default task); results go back in order.
    lengths = [len(encode_example(tokenizer, m)["input_ids"]) for m in data["messages"]]  # one read of the column
    order = sorted(range(len(data)), key=lengths.__getitem__)
    correct, nll_sum, tokens = 0, 0.0, 0
    predictions: list = [None] * len(data)
    all_scores: list = [None] * len(data)
    collate = collator_for(tokenizer)
    for start in progress_bar(range(0, len(data), batch_size), desc=f"evaluate {split}", enabled=progress):
        indices = order[start : start + batch_size]
        rows = data.select(indices)
        prompts, answers = list(rows["messages"]), list(rows["answer"])
        if task.choices:
            scores, counts = choice_logprobs(model, tokenizer, prompts, task.choices)
            _finite(scores, "choice scores")
            for i, row in zip(indices, scores.tolist(), strict=True):
                all_scores[i] = row
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
        for i, p in zip(indices, picked, strict=True):
            predictions[i] = p
    return EvalResult(
        correct / len(data),
        nll_sum / max(tokens, 1),
        len(data),
        predictions,
        list(data["answer"]),
        task.choices,
        all_scores if task.choices else None,
        split,
    )
