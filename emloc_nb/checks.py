"""Checking a setting against its type annotation and field metadata, with a message that names it and the fix.

Field metadata the checks read: min/max (inclusive), gt/lt (exclusive), choices, allow_inf (floats are
finite unless this is set), regex (a string that must compile), nonempty (a string or list), unique (a list),
check (a function of the value and its name), hint (what the values mean, for the message).
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import fields

from .errors import EmlocError, kind_of

_NON_FINITE = {"inf": math.inf, "+inf": math.inf, "-inf": -math.inf}  # how run.json wrote them before 0.2


def _matches(value, hint) -> bool:
    """Whether `value` has the (non-union) type `hint`; bool is never an int or a float here."""
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint) or (object,)
        return isinstance(value, list) and all(item is object or _matches(v, item) for v in value)
    return isinstance(value, origin)


_TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", dict: "a mapping"}


def _describe(hint) -> str:
    if typing.get_origin(hint) is dict:
        return "a mapping"
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ')}s"
    return _TYPE_WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def check_value(value, hint, name: str, meta: typing.Mapping = types.MappingProxyType({})):
    """`value` checked against the annotation `hint` and the field's metadata; returns it (inf spelt out restored)."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in members:
            return None
        raise EmlocError(f"{name} is empty (null). Set it to {_describe(members[0])}, or remove it for the default.")
    floats = float in members and meta.get("allow_inf")
    if floats and isinstance(value, str) and value.strip().lower() in _NON_FINITE:
        value = _NON_FINITE[value.strip().lower()]
    hint = next((m for m in members if m is not type(None) and _matches(value, m)), None)
    if hint is None:
        wanted = " or ".join(_describe(m) for m in members if m is not type(None))
        extra = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) and float in members else ""
        raise EmlocError(f"{name} must be {wanted}, not {kind_of(value)}{extra}. Fix it in the config.")
    if hint is float and not math.isfinite(value) and (math.isnan(value) or not meta.get("allow_inf")):
        raise EmlocError(f"{name}={value!r} is not a finite number. Give a finite value.")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, ok, word in (
            ("min", lambda v, b: v >= b, "≥"),
            ("max", lambda v, b: v <= b, "≤"),
            ("gt", lambda v, b: v > b, ">"),
            ("lt", lambda v, b: v < b, "<"),
        ):
            if key in meta and not ok(value, meta[key]):
                hint = f" ({meta['hint']})" if "hint" in meta else ""
                raise EmlocError(f"{name}={value!r} must be {word} {meta[key]}{hint}. Change it in the config.")
    if "choices" in meta and value not in meta["choices"]:
        raise EmlocError(f"{name}={value!r} is not one of {list(meta['choices'])}. Use one of those.")
    if meta.get("nonempty") and isinstance(value, (str, list)) and not value:
        raise EmlocError(f"{name} is empty. Give a value, or remove the setting for the default.")
    if isinstance(value, list) and meta.get("unique") and len(set(value)) != len(value):
        raise EmlocError(f"{name}={value!r} lists a value twice. List each once.")
    if isinstance(value, list) and meta.get("nonempty") and any(not v for v in value):
        raise EmlocError(f"{name}={value!r} holds an empty entry. Remove it.")
    if meta.get("regex") and isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise EmlocError(f"{name}={value!r} is not a valid regular expression ({e}). Fix the pattern.") from None
    if "check" in meta:
        meta["check"](value, name)
    return value


def check_fields(obj, prefix: str) -> None:
    """Check (and normalise) every field of the dataclass `obj` against its type annotation and metadata."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        setattr(obj, f.name, check_value(getattr(obj, f.name), hints[f.name], f"{prefix}.{f.name}", f.metadata))
