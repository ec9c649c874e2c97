"""What a task is: chat prompts with reference answers, split into train, validation and test.

Every example is a chat: `messages` (the prompt turns) and `answer` (the assistant's reply).
Settings are chosen on validation, and test is only for the final table. This module imports
no `datasets` or torch: a run's settings name tasks through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import EmlocError

if TYPE_CHECKING:
    from datasets import Dataset

MOVIE_SENTIMENT = "movie-sentiment"
WORD_ANALOGIES = "word-analogies"
BUILT_IN_TASKS = (MOVIE_SENTIMENT, WORD_ANALOGIES)  # emloc_nb.builtin_tasks builds them
HF_PREFIX = "hf:"  # task.source: hf:NAME (a datasets dataset) or hf:path/to/dir


@dataclass
class Task:
    """A downstream task: chat prompts with reference answers, split into train, validation and test."""

    name: str
    train: Dataset
    validation: Dataset
    test: Dataset
    choices: list[str] | None = None  # set for classification: accuracy is a constrained choice
    meta: dict = field(default_factory=dict)

    def split(self, name: str) -> Dataset:
        if name not in SPLITS:
            raise EmlocError(f"Unknown split {name!r}. Splits: {', '.join(SPLITS)}.")
        return getattr(self, name)

    def choice_shares(self) -> dict[str, float]:
        """Each choice's share of the training answers (the class prior a fine-tuned model should keep)."""
        if not self.choices:
            raise EmlocError(f"Task {self.name!r} is scored by generation and has no classes to take shares of.")
        answers = [a.strip() for a in self.train["answer"]]
        shares = {c: answers.count(c.strip()) / max(len(answers), 1) for c in self.choices}
        missing = [c for c, v in shares.items() if v == 0]
        if missing:
            raise EmlocError(
                f"The choice(s) {missing} never occur among the training answers, so a label prior would rule them "
                "out. Set correction.prior_target: emulator."
            )
        return shares

    def check_count(self, split: str, count: int | None, name: str) -> None:
        """A count of examples drawn from `split` (a limit, a batch size) that the split can give: more would
        silently be fewer."""
        n = len(self.split(split))
        if count is not None and count > n:
            raise EmlocError(
                f"{name}={count} asks for more examples than the {split} split of {self.name} holds ({n}), so it would "
                f"quietly use {n}. Set {name} to at most {n}, or give the task more examples."
            )

    def __repr__(self) -> str:
        kind = f"choices={self.choices}" if self.choices else "generation"
        sizes = ", ".join(f"{s}={len(getattr(self, s))}" for s in SPLITS)
        return f"Task({self.name!r}, {sizes}, {kind})"


SPLITS = ("train", "validation", "test")


def three_way_split(
    data: Dataset, *, test_size: float | int, validation_size: float | int, seed: int
) -> tuple[Dataset, Dataset, Dataset]:
    """(train, validation, test): test first, then validation from the rest.

    A size is a count, or a share of all the examples (at least one example).
    """
    n = len(data)
    n_test, n_val = (
        size if isinstance(size, int) else max(1, round(size * n)) for size in (test_size, validation_size)
    )
    if n_test < 1 or n_val < 1 or n_test + n_val >= n:
        raise EmlocError(
            f"{n} examples cannot give {n_test} test and {n_val} validation examples and still leave some to train on. "
            "Lower test_size/validation_size, or add examples."
        )
    rest = data.train_test_split(test_size=n_test, seed=seed)
    train = rest["train"].train_test_split(test_size=n_val, seed=seed)
    return train["train"], train["test"], rest["test"]
