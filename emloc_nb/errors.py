"""Bad input: the one exception for it, and the checks that every entry point shares.

`EmlocError` is the one exception for input emloc-nb cannot use; its message is one line that
names the problem and the fix (`capped`: at most MAX_MESSAGE characters, saying how much it left
out). `first_line` quotes another error in one. `check_kind` and `argument_kinds` check what kind
of object an argument is (`Kind`), so a public function given the wrong object says so instead of
failing deep inside. `loads_json` and `load_yaml` refuse a key given twice (`DuplicateKey`),
which both formats would otherwise resolve silently, last one winning.

This module imports nothing of emloc-nb and no torch: a Kind names a third-party type as
"module:attribute", imported when a value is first checked against it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import yaml

MAX_MESSAGE = 1500  # characters: an error is one line a person reads, however large the input it quotes


def capped(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` on one line and at most `limit` characters: its start and its end (the fix), with the count left out."""
    text = " ".join(text.splitlines()) if "\n" in text or "\r" in text else text
    if len(text) <= limit:
        return text
    tail, width = limit // 4, 40  # the marker is padded to a fixed width, so the count it states is exact
    head = limit - tail - width
    marker = f" … [{len(text) - head - tail:,} characters left out] … ".center(width)
    return text[:head] + marker + text[len(text) - tail :]


class EmlocError(ValueError):
    """Raised for input emloc-nb cannot use. The message says what to do instead, on one line (`capped`)."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(capped(message) if isinstance(message, str) else message, *args)


def first_line(error: BaseException, limit: int = 160) -> str:
    """An exception as one short line (its type and the first line of its message), to quote in an EmlocError."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:limit]}" if text else type(error).__name__


def system_error(e: OSError) -> str:
    """An OSError (a full disk, a permission) as one line: the system refused, no bug, so no traceback."""
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror or e}{where}. Check the path, its permissions and free space."


def kind_of(value) -> str:
    """What a value is, for a message: its type and the start of its repr, on one line."""
    if isinstance(value, bool):
        return "a boolean"
    text = " ".join(repr(value).split())
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


# ----------------------------------------------------------------------------- the kinds of arguments


class Kind(NamedTuple):
    """What an argument must be: its types (classes, or "module:attribute" names imported on first use), what to
    call them in a message, an example, and for numbers a least value."""

    types: tuple[type | str, ...]
    what: str  # "a model (a torch.nn.Module)"
    example: str = ""  # "load_model(...)[0]"
    at_least: int | None = None

    def optional(self) -> Kind:
        """This kind, or None."""
        return self._replace(types=(*self.types, type(None)), what=f"{self.what}, or None")


@functools.cache
def _resolve(name: str) -> type:
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


def check_kind(value, kind: Kind, name: str, where: str = ""):
    """`value` when it is of `kind`; otherwise an EmlocError naming the argument, what it should be and what it is.

    A bool is never a number here, and a path is never an empty string.
    """
    types = tuple(_resolve(t) if isinstance(t, str) else t for t in kind.types)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if ok and os.PathLike in types and isinstance(value, str) and not value:
        ok = False
    if ok and kind.at_least is not None and isinstance(value, (int, float)) and value < kind.at_least:
        ok = False
    if ok:
        return value
    shown = f"{value!r}" if kind.at_least is not None and isinstance(value, int) else kind_of(value)
    example = f", e.g. {kind.example}" if kind.example else ""
    raise EmlocError(f"{where}{name} must be {kind.what}, not {shown}. Pass {kind.what}{example}.")


def argument_kinds(**expected: Kind):
    """A decorator for a public function: the arguments named here are checked with `check_kind` before it runs.

    >>> @argument_kinds(model=MODEL, path=PATH)
    ... def load_adapter(model, path): ...
    """

    def wrap(fn):
        signature = inspect.signature(fn)
        unknown = set(expected) - set(signature.parameters)
        if unknown:
            raise TypeError(f"{fn.__qualname__} has no argument(s) {sorted(unknown)}")

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return fn(*args, **kwargs)  # a missing or unknown argument: Python's own error says it best
            for name, kind in expected.items():
                if name in bound.arguments:
                    check_kind(bound.arguments[name], kind, name, f"{fn.__name__}(): ")
            return fn(*args, **kwargs)

        return checked

    return wrap


PATH = Kind((str, os.PathLike), "a path (a str or a pathlib.Path)", "'runs/demo'")
COUNT = Kind((int,), "a whole number ≥ 1", at_least=1)
MODEL = Kind(("torch.nn:Module",), "a model (a torch.nn.Module)", "load_model(...)[0]")
TOKENIZER = Kind(("transformers:PreTrainedTokenizerBase",), "a transformers tokenizer", "load_model(...)[1]")
TENSOR = Kind(("torch:Tensor",), "a torch.Tensor")
DATASET = Kind(("datasets:Dataset",), "a datasets.Dataset of examples", "task.train")
BATCH = Kind((Mapping,), "a batch (a dict of tensors with input_ids)", "one of emloc_nb.batches(tokenizer, data)")
BATCHES = Kind((list, tuple, Iterator), "a list of batches", "emloc_nb.batches(tokenizer, task.train)")


# ----------------------------------------------------------------------------- a key given twice


class DuplicateKey(ValueError):
    """A JSON object or YAML mapping that gives a key twice: the key, and the lines of both (when known)."""

    def __init__(self, key: Any, first: int | None = None, second: int | None = None):
        self.key, self.first, self.second = key, first, second
        super().__init__(f"the key {key!r} appears twice in one mapping{self._lines()}")

    def _lines(self) -> str:
        return f" (lines {self.first} and {self.second})" if self.first and self.second else ""

    def explain(self, what: str) -> str:
        """One sentence for an EmlocError about `what` (a file, a --set value)."""
        return f"{what} sets {self.key!r} twice{self._lines()}, and only the last would count. Remove one of them."


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return d


def _duplicate_lines(text: str, key: str) -> tuple[int, int] | tuple[None, None]:
    """The lines of the first two entries of one JSON object named `key` (`text` is valid JSON)."""
    stack: list[dict | None] = []  # per open container: its keys so far and their lines (an object), None (an array)
    expect_key, line, i, n = False, 1, 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if expect_key and stack and stack[-1] is not None:
                name = json.loads(text[i : j + 1])
                if name == key and name in stack[-1]:
                    return stack[-1][name], line
                stack[-1][name] = line
            expect_key, i = False, j + 1
            continue
        if c == "\n":
            line += 1
        elif c in "{[":
            stack.append({} if c == "{" else None)
            expect_key = c == "{"
        elif c in "]}":
            stack.pop()
        elif c == ",":
            expect_key = bool(stack) and stack[-1] is not None
        i += 1
    return None, None


def loads_json(text: str) -> Any:
    """`json.loads` that refuses an object giving a key twice (DuplicateKey, with both lines); a UTF-8 byte-order
    mark at the start is skipped."""
    text = text.removeprefix("\ufeff")
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except DuplicateKey as e:
        raise DuplicateKey(e.key, *_duplicate_lines(text, e.key)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives a key twice (DuplicateKey, with both lines)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # an unhashable key: the safe loader's own error names it
                    continue
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """The YAML in `text`, read by the safe loader; a mapping that gives a key twice raises DuplicateKey."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
