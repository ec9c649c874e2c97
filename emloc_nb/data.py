"""One entry point for tasks: `load_task`, from a built-in name, a JSONL/CSV file, `hf:` sources or a Dataset."""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Dataset, DatasetDict

from .builtin_tasks import BUILT_IN
from .checks import check_value
from .config import check_test_size
from .errors import EmlocError, first_line
from .hf_data import hf_dataset
from .records import RecordFormat, read_records
from .tasks import HF_PREFIX, MOVIE_SENTIMENT, Task, three_way_split


def load_task(
    source: str | Path | Dataset | DatasetDict = MOVIE_SENTIMENT,
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    choices: list[str] | None = None,
    test_size: float | int | None = None,
    validation_size: float | int | None = None,
    seed: int = 0,
    split: str | None = None,
    prompt_template: str | None = None,
    answer_map: dict | None = None,
) -> Task:
    """A task from a built-in name, a JSONL/CSV file, `hf:NAME` / `hf:DIR`, or a datasets.Dataset / DatasetDict.

    `prompt_template` (str.format over a record's columns) builds the prompt, and `answer_map` (answer column
    value -> answer text) the answer, for data such as `text` plus an integer `label`. `split` reads one split
    of an `hf:` dataset, which is then cut three ways; without it, a dataset's own splits are used.
    `choices=None` infers a classification task (the answer_map's answers, or the answers when they take at
    most 16 distinct values); pass `choices=[]` to force generation (exact-match) scoring.
    `test_size` and `validation_size` (a share or a count) default to 1000 and 500
    examples for the built-in tasks, 0.2 and 0.1 otherwise; a DatasetDict's own
    "test" and "validation" splits are used as they are. `seed` fixes the split.
    """
    choices = check_value(choices, list[str] | None, "choices", {"unique": True})
    sizes = {
        k: check_value(v, float | int, k, {"check": check_test_size})
        for k, v in [("test_size", test_size), ("validation_size", validation_size)]
        if v is not None
    }
    test_size, validation_size = sizes.get("test_size"), sizes.get("validation_size")
    split = check_value(split, str | None, "split", {"nonempty": True})
    prompt_template = check_value(prompt_template, str | None, "prompt_template", {"nonempty": True})
    answer_map = check_value(answer_map, dict | None, "answer_map")
    if answer_map is not None and not answer_map:
        raise EmlocError("answer_map={} is empty. Map each label value to its answer text, e.g. {0: negative}.")
    if isinstance(source, str) and source in BUILT_IN:
        task = BUILT_IN[source](seed=seed, **sizes)
        if choices is not None and choices != task.choices:
            raise EmlocError(f"The {source} task's choices are {task.choices}, not {choices}. Leave choices unset.")
        return task
    test_size = 0.2 if test_size is None else test_size
    validation_size = 0.1 if validation_size is None else validation_size
    answer_map = None if answer_map is None else {str(k): str(v) for k, v in answer_map.items()}
    fmt = RecordFormat(prompt_field, answer_field, prompt_template, answer_map)
    name = "dataset"
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        name = Path(source.removeprefix(HF_PREFIX)).name
        source = hf_dataset(source, split)
    if isinstance(source, DatasetDict):
        if "train" not in source:
            raise EmlocError(f"The DatasetDict has splits {list(source)} but no 'train'. Rename a split to 'train'.")
        splits = {
            k: Dataset.from_list([fmt.example(r, f"{k}[{i}]") for i, r in enumerate(v)]) for k, v in source.items()
        }
    else:
        if isinstance(source, Dataset):
            records = [(f"dataset example {i}", r) for i, r in enumerate(source)]
        else:
            if not isinstance(source, (str, os.PathLike)):
                raise EmlocError(
                    f"A task source is a file path, hf:NAME, a built-in task ({', '.join(BUILT_IN)}) or a "
                    f"datasets.Dataset, not {type(source).__name__}. Pass one of those."
                )
            path = Path(source).expanduser()
            if path.is_dir():
                raise EmlocError(
                    f"Data path {path} is a directory, not a file. Pass a .jsonl or .csv file in it, or hf:{path} "
                    "for a folder of dataset files (parquet, CSV, JSON) or a datasets save_to_disk folder."
                )
            if not path.is_file():
                known = ", ".join(BUILT_IN)
                raise EmlocError(
                    f"Data file {path} does not exist. Pass a .jsonl or .csv file, hf:NAME or hf:DIR, "
                    f"or one of: {known}."
                )
            records, name = read_records(path), path.stem
        rows = [fmt.example(r, where) for where, r in records]  # a malformed record is named first
        if len(rows) < 3:
            raise EmlocError(
                f"{name} has {len(rows)} example(s); a task needs at least 3 (train, validation, test). Add examples."
            )
        splits = {"train": Dataset.from_list(rows)}
    train, validation, test = splits["train"], splits.get("validation"), splits.get("test")
    if test is None and validation is None:
        train, validation, test = three_way_split(
            train, test_size=test_size, validation_size=validation_size, seed=seed
        )
    elif test is None or validation is None:  # carve the missing one out of train
        size = test_size if test is None else validation_size
        try:
            held = train.train_test_split(test_size=size, seed=seed)
        except ValueError as e:
            raise EmlocError(
                f"{'test_size' if test is None else 'validation_size'}={size!r} does not split the {len(train)} "
                f"training examples of {name} ({first_line(e)}). Use a smaller size, or more examples."
            ) from None
        train, carved = held["train"], held["test"]
        test, validation = (carved, validation) if test is None else (test, carved)
    answers = sorted(set(train["answer"]) | set(validation["answer"]) | set(test["answer"]))
    if choices is None and answer_map:
        choices = list(dict.fromkeys(answer_map.values()))
    elif choices is None:
        choices = answers if len(answers) <= 16 else []
    stray = [a for a in answers if choices and a not in choices]
    if stray:
        raise EmlocError(
            f"Answers {stray[:5]} are not among the choices {choices}. Add them to the choices, "
            "or pass choices=[] to score by exact match."
        )
    return Task(name, train, validation, test, choices=choices or None, meta={"seed": seed})
