"""User data: records from JSONL and CSV files (or any mapping) made into examples, with errors that name the line."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import EmlocError


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
        missing = [f for f in needed if f not in record]
        empty = [f for f in needed if f in record and record[f] in (None, "")]
        if empty and not missing:
            shown = ", ".join(f"{f!r} is {'null' if record[f] is None else 'an empty string'}" for f in empty)
            raise EmlocError(
                f"{where}: field {shown}, so this example has no {' and no '.join(empty)}. Give it one, or remove "
                "the example."
            )
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
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # a byte-order mark (some editors write one)
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


def read_records(path: Path) -> list[tuple[str, dict]]:
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
