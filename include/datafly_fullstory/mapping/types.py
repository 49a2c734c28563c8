"""Declared property types: values coerced to the type the blueprint declares, never changed lossily.

The blueprint declares FullStory schema types (`str int real bool date` and their plurals) for event
properties (`property_types`, every event; an event's own `schema` adds to them) and for user traits
(`trait_types`). FullStory infers a type per value and splits a property whose values change type, so
`revenue: "90.00"` in one event and `90.0` in the next become two properties. Declaring the type in the
body's `schema` and sending every value as that type keeps one property.

`coerce(value, type)` returns the value as the type, or `BAD` when that would lose or invent information:

| type | accepted (-> sent as) | not accepted |
|---|---|---|
| `real` | numbers; numeric text `"90.00"` -> `90.0` | `"12abc"`, `"1,5"`, NaN, infinity, booleans |
| `int` | integers; integral floats `2.0` -> `2`; integer text `"3"` -> `3` | `2.5`, `"2.5"`, `"five"`, booleans |
| `str` | text; integers `1001` -> `"1001"`; floats (integral ones without `.0`); booleans -> `"true"` / `"false"` | objects, arrays |
| `bool` | booleans; `"true"` / `"false"` (any case) | `1`, `"yes"`, anything else |
| `date` | ISO 8601 text (kept as sent) | epoch numbers (seconds or milliseconds?), other text |
| plurals | an array whose every element is accepted | a single value, an array with one element not accepted |

A value that is `BAD` is not sent: `TypeChecker.declare` drops the property from the body and records a
problem (row, event id or uid, field, value, declared type); the row is still delivered with its other
properties. See docs/mapping.md "Typed properties".
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

import orjson

BAD: Any = object()  # a value that cannot take its declared type
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")
_INT64 = 2**63
_VALUE_TEXT = 200  # characters of a bad value kept in the report


def _real(value: Any) -> Any:
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else BAD
    if kind is int:
        return float(value)
    if kind is str and _NUMBER.fullmatch(value):
        number = float(value)
        return number if math.isfinite(number) else BAD
    return BAD


def _int(value: Any) -> Any:
    kind = type(value)
    if kind is int:
        return value if -_INT64 <= value < _INT64 else BAD
    if kind is float:
        return int(value) if math.isfinite(value) and value.is_integer() and abs(value) < _INT64 else BAD
    if kind is str:
        if _INTEGER.fullmatch(value):
            return _int(int(value))
        if _NUMBER.fullmatch(value):
            return _int(float(value))  # "3.0" -> 3; "2.5" stays BAD
    return BAD


def _str(value: Any) -> Any:
    kind = type(value)
    if kind is str:
        return value
    if kind is int:
        return str(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is float:
        if not math.isfinite(value):
            return BAD
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    return BAD


def _bool(value: Any) -> Any:
    if type(value) is bool:
        return value
    if type(value) is str:
        lowered = value.lower()
        if lowered == "true":
            return True
        if lowered == "false":
            return False
    return BAD


def _date(value: Any) -> Any:
    if type(value) is not str or len(value) < 10:
        return BAD
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return BAD
    return value


_SCALAR = {"real": _real, "int": _int, "str": _str, "bool": _bool, "date": _date}


def coerce(value: Any, type_name: str) -> Any:
    """`value` as the FullStory schema type `type_name` (`int`, `reals`, ...), or `BAD`."""
    scalar = _SCALAR.get(type_name)
    if scalar is not None:
        return scalar(value)
    element = _SCALAR[type_name[:-1]]
    if type(value) is not list:
        return BAD
    out = [element(v) for v in value]
    return BAD if any(v is BAD for v in out) else out


def value_text(value: Any) -> str:
    """A bad value as JSON text for the report (cut to 200 characters)."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= _VALUE_TEXT else text[: _VALUE_TEXT - 3] + "..."


class TypeChecker:
    """Applies declared types to cleaned properties and keeps the problems found, until `take_problems`.

    A problem is (kind, row, event_id, uid, field, value as JSON text, declared type); `row` / `event_id`
    are the event's (None for a user update: the stage names the user's rows), `uid` the user's."""

    def __init__(self) -> None:
        self.problems: list[tuple] = []

    def declare(
        self,
        properties: dict,
        declared: dict[str, str],
        *,
        kind: str = "event",
        row: int | None = None,
        event_id: str | None = None,
        uid: str | None = None,
    ) -> tuple[dict[str, str], int]:
        """Coerce the declared top-level properties present in `properties` (in place). Returns the
        `schema` declarations of the properties kept and the number of properties dropped."""
        schema: dict[str, str] = {}
        dropped = 0
        for prop, type_name in declared.items():
            value = properties.get(prop)
            if value is None:
                continue
            coerced = coerce(value, type_name)
            if coerced is BAD:
                del properties[prop]
                dropped += 1
                self.problems.append((kind, row, event_id, uid, prop, value_text(value), type_name))
                continue
            if coerced is not value:
                properties[prop] = coerced
            schema[prop] = type_name
        return schema, dropped

    def take_problems(self) -> list[tuple]:
        problems, self.problems = self.problems, []
        return problems
