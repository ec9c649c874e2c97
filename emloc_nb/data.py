"""Tasks: the default movie-review sentiment task, user files and datasets; prompts and collators.

Every example is a chat: `messages` (the prompt turns) and `answer` (the assistant's
reply). Tokenisation uses the model's chat template, and the labels mask out the
prompt, so training and scoring see only the answer tokens. Padding is masked out
of everything downstream through `attention_mask` and label -100.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from .artifacts import atomic_path
from .config import check_test_size, check_value
from .errors import EmlocError
from .fetch import pip_download
from .models import cache_dir

log = logging.getLogger(__name__)

MOVIE_SENTIMENT = "movie-sentiment"
IGNORE_INDEX = -100

_VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_MOVIE_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_MOVIE_PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: {text}"


@dataclass
class Task:
    """A downstream task: chat prompts with reference answers, split into train and test."""

    name: str
    train: Dataset
    test: Dataset
    choices: list[str] | None = None  # set for classification: accuracy is a constrained choice
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        kind = f"choices={self.choices}" if self.choices else "generation"
        return f"Task({self.name!r}, train={len(self.train)}, test={len(self.test)}, {kind})"


# ----------------------------------------------------------------------------- default task


def movie_reviews_file() -> Path:
    """The Rotten Tomatoes snippets of VADER's ground truth, fetched once from the vaderSentiment sdist."""
    target = cache_dir() / "data" / "movieReviewSnippets_GroundTruth.txt"
    if target.is_file():
        return target
    log.info("Fetching the movie-review data from the vaderSentiment==3.3.2 source distribution")
    with (
        pip_download(
            "vaderSentiment==3.3.2",
            sdist=True,
            sha256=_VADER_SHA256,
            hint=f"place movieReviewSnippets_GroundTruth.txt at {target} by hand",
        ) as sdist,
        tarfile.open(sdist) as outer,
    ):
        inner_bytes = outer.extractfile(_VADER_INNER).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        text = inner.extractfile(_MOVIE_MEMBER).read()
    with atomic_path(target) as tmp_path:
        tmp_path.write_bytes(text)
    return target


def movie_sentiment(*, test_size: float | int = 1000, threshold: float = 0.5, seed: int = 0) -> Task:
    """Movie-review snippets with |mean human rating| > threshold, labelled positive/negative."""
    rows = []
    for line in movie_reviews_file().read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        rating, text = float(parts[1]), parts[2].strip()
        if abs(rating) > threshold and text:
            rows.append(
                {
                    "messages": [{"role": "user", "content": _MOVIE_PROMPT.format(text=text)}],
                    "answer": "positive" if rating > 0 else "negative",
                    "rating": rating,
                }
            )
    train, test = _split(rows, test_size, seed, MOVIE_SENTIMENT)
    return Task(
        MOVIE_SENTIMENT,
        train,
        test,
        choices=["positive", "negative"],
        meta={
            "source": "vaderSentiment==3.3.2 movieReviewSnippets_GroundTruth.txt",
            "threshold": threshold,
            "seed": seed,
        },
    )


# ----------------------------------------------------------------------------- user data


def _text(value, where: str, name: str) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise EmlocError(
        f"{where}: field {name!r} is {type(value).__name__} {str(value)[:40]!r}, not text. Give it as a string."
    )


def _normalise(record, where: str, prompt_field: str, answer_field: str) -> dict:
    if not isinstance(record, dict):
        raise EmlocError(f"{where} is a JSON {type(record).__name__}, not an object. Write each example as {{...}}.")
    if "messages" in record:
        messages = record["messages"]
        fix = (
            "'messages' must be a list of {'role': ..., 'content': ...} turns ending with the assistant's answer. "
            f"Fix it, or use '{prompt_field}'/'{answer_field}' fields."
        )
        if not isinstance(messages, list) or not messages:
            raise EmlocError(f"{where}: {fix}")
        for turn in messages:
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or "content" not in turn:
                raise EmlocError(f"{where}: turn {str(turn)[:60]!r} is malformed. {fix}")
            turn["content"] = _text(turn["content"], where, "content")
        if messages[-1]["role"] != "assistant":
            raise EmlocError(f"{where}: the last turn is {messages[-1]['role']!r}, not 'assistant'. {fix}")
        if len(messages) < 2:
            raise EmlocError(f"{where}: there is no prompt before the assistant's answer. {fix}")
        return {"messages": [dict(m) for m in messages[:-1]], "answer": messages[-1]["content"]}
    missing = [f for f in (prompt_field, answer_field) if record.get(f) in (None, "")]
    if missing:
        raise EmlocError(
            f"{where}: missing field(s) {missing}; found {sorted(map(str, record))}. "
            f"Each example needs '{prompt_field}' "
            f"and '{answer_field}' (or a 'messages' chat ending with the assistant's answer). Rename the columns, or "
            "pass prompt_field=/answer_field= (--prompt-field/--answer-field)."
        )
    return {
        "messages": [{"role": "user", "content": _text(record[prompt_field], where, prompt_field)}],
        "answer": _text(record[answer_field], where, answer_field),
    }


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise EmlocError(
            f"{path}:{line} is not UTF-8 (byte 0x{data[e.start]:02x}: {e.reason}). Save the file as UTF-8."
        ) from None


def _read_csv(path: Path, text: str) -> list[tuple[str, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    fix = 'Quote a field that holds a comma, quote or line break, and write a quote inside it as "".'
    rows, line = [], 0
    try:
        header = next(reader, None)
        if header is None:
            return []
        line = reader.line_num
        for row in reader:
            start, line = line + 1, reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise EmlocError(f"{path}:{start} has {len(row)} fields, the header {len(header)}. {fix}")
            for value in row:
                swallowed = value.split("\n")[1:]
                if any(part.count(",") >= len(header) - 1 for part in swallowed) and len(header) > 1:
                    raise EmlocError(
                        f"{path}:{start}: a quoted field runs over {len(swallowed)} line break(s) into what look like "
                        f"rows of their own (a stray quote?). {fix}"
                    )
            rows.append((f"{path}:{start}", dict(zip(header, row))))
    except csv.Error as e:
        raise EmlocError(f"{path}:{reader.line_num} is not valid CSV ({e}). {fix}") from None
    return rows


def _read_records(path: Path) -> list[tuple[str, dict]]:
    """(where, record) of every example in a JSONL or CSV file; `where` is FILE:LINE for messages."""
    text = _decode(path)
    if path.suffix == ".jsonl":
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise EmlocError(
                        f"{path}:{i} is not valid JSON ({e}). Write each line as one JSON object."
                    ) from None
                if not isinstance(record, dict):
                    raise EmlocError(
                        f"{path}:{i} is a JSON {type(record).__name__}, not an object. "
                        "Write each line as one JSON object."
                    )
                records.append((f"{path}:{i}", record))
        return records
    if path.suffix == ".csv":
        return _read_csv(path, text)
    raise EmlocError(
        f"{path} is neither .jsonl nor .csv. Convert it to one of those, or load it as a datasets.Dataset."
    )


def _split(examples: list[dict], test_size: float | int, seed: int, name: str):
    try:
        both = Dataset.from_list(examples).train_test_split(test_size=test_size, seed=seed)
    except ValueError as e:
        raise EmlocError(
            f"test_size={test_size!r} does not split the {len(examples)} examples of {name} ({e}). "
            "Use a smaller test_size, or more examples."
        ) from None
    return both["train"], both["test"]


def load_task(
    source: str | Path | Dataset | DatasetDict = MOVIE_SENTIMENT,
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    choices: list[str] | None = None,
    test_size: float | int | None = None,
    seed: int = 0,
) -> Task:
    """A task from the default name, a JSONL/CSV file, or a datasets.Dataset / DatasetDict.

    `choices=None` infers a classification task when the answers take at most 16
    distinct values; pass `choices=[]` to force generation (exact-match) scoring.
    `test_size` (a share or a count) defaults to 1000 examples for the default task, 0.2 otherwise.
    """
    choices = check_value(choices, list[str] | None, "choices", {"unique": True})
    if test_size is not None:
        test_size = check_value(test_size, float | int, "test_size", {"check": check_test_size})
    if isinstance(source, str) and source == MOVIE_SENTIMENT:
        task = movie_sentiment(seed=seed, **({} if test_size is None else {"test_size": test_size}))
        if choices is not None and choices != task.choices:
            raise EmlocError(
                f"The {MOVIE_SENTIMENT} task's choices are {task.choices}, not {choices}. Leave choices unset."
            )
        return task
    test_size = 0.2 if test_size is None else test_size
    if isinstance(source, DatasetDict):
        if "train" not in source:
            raise EmlocError(f"The DatasetDict has splits {list(source)} but no 'train'. Rename a split to 'train'.")
        splits = {
            k: [_normalise(r, f"{k}[{i}]", prompt_field, answer_field) for i, r in enumerate(v)]
            for k, v in source.items()
        }
        name = "dataset"
    else:
        if isinstance(source, Dataset):
            records, name = [(f"dataset example {i}", r) for i, r in enumerate(source)], "dataset"
        else:
            if not isinstance(source, (str, os.PathLike)):
                raise EmlocError(
                    f"A task source is a file path, '{MOVIE_SENTIMENT}' or a datasets.Dataset, "
                    f"not {type(source).__name__}. Pass one of those."
                )
            path = Path(source).expanduser()
            if not path.is_file():
                raise EmlocError(
                    f"Data file {path} does not exist. Pass a .jsonl or .csv file, or '{MOVIE_SENTIMENT}'."
                )
            records, name = _read_records(path), path.stem
        if len(records) < 2:
            raise EmlocError(f"{name} has {len(records)} example(s); a task needs at least 2 (train and test).")
        splits = {"all": [_normalise(r, where, prompt_field, answer_field) for where, r in records]}
    if "all" in splits:
        train, test = _split(splits["all"], test_size, seed, name)
    else:
        test_split = next((k for k in ("test", "validation") if k in splits), None)
        if test_split is None:
            train, test = _split(splits["train"], test_size, seed, name)
        else:
            train, test = Dataset.from_list(splits["train"]), Dataset.from_list(splits[test_split])
    answers = sorted(set(train["answer"]) | set(test["answer"]))
    if choices is None:
        choices = answers if len(answers) <= 16 else []
    stray = [a for a in answers if choices and a not in choices]
    if stray:
        raise EmlocError(
            f"Answers {stray[:5]} are not among the choices {choices}. Add them to the choices, "
            "or pass choices=[] to score by exact match."
        )
    return Task(name, train, test, choices=choices or None, meta={"seed": seed})


# ----------------------------------------------------------------------------- tokenisation


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], answer: str | None) -> tuple[str, str]:
    """The prompt text (ending where the model starts its reply) and the answer text."""
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if answer is None:
            return prompt, ""
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise EmlocError(
                "The tokenizer's chat template renders the prompt differently once an answer follows. "
                "Use a template whose generation prompt is a prefix of the full chat."
            )
        return prompt, full[len(prompt) :]
    prompt = "\n".join(m["content"] for m in messages) + "\n"
    return prompt, "" if answer is None else answer + (tokenizer.eos_token or "")


def encode_example(tokenizer: PreTrainedTokenizerBase, messages: list[dict], answer: str | None = None) -> dict:
    """input_ids for prompt + answer, and labels that are -100 on the prompt."""
    prompt, reply = _render(tokenizer, messages, answer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] if reply else []
    return {"input_ids": prompt_ids + reply_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + reply_ids}


def tokenize(tokenizer: PreTrainedTokenizerBase, dataset: Dataset, *, max_length: int | None = 512) -> Dataset:
    """Add input_ids/labels columns; examples longer than max_length keep their end (the answer)."""

    def one(row):
        enc = encode_example(tokenizer, row["messages"], row["answer"])
        if max_length and len(enc["input_ids"]) > max_length:
            enc = {k: v[-max_length:] for k, v in enc.items()}
        return enc

    return dataset.map(one, remove_columns=dataset.column_names)


@dataclass
class Collator:
    """Pads a list of encoded examples on the left; padding gets attention 0 and label -100.

    Left padding puts every answer at the end of the batch, so scoring can keep only
    the last logits. position_ids count real tokens only, so outputs do not depend on
    padding. Works as an HF Trainer `data_collator`.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            if n:
                ids[i, -n:] = torch.as_tensor(f["input_ids"])
                mask[i, -n:] = 1
                labels[i, -n:] = torch.as_tensor(f.get("labels", f["input_ids"]))
        return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask), "labels": labels}


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def collator_for(tokenizer: PreTrainedTokenizerBase) -> Collator:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise EmlocError("The tokenizer has neither a pad nor an eos token. Set tokenizer.pad_token before use.")
    return Collator(pad)


def batches(
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    max_length: int | None = 512,
) -> list[dict[str, torch.Tensor]]:
    """Padded batches of the first `limit` examples (prompt + answer), e.g. for calibration."""
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    encoded = tokenize(tokenizer, dataset, max_length=max_length)
    collate = collator_for(tokenizer)
    rows = encoded.to_list()
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
