"""How deep a row's JSON columns nest. A value nested deeper than `MAX_DEPTH` levels is rejected before any
body is built: JSON that deep is valid and passes validation, but orjson refuses to serialise more than 254
levels (`TypeError: Recursion limit reached`) and the property cleaner recurses once per level, so without
this check one such row would stop the mapping of its whole window.

Vectorised first: Arrow counts the brackets of every value, and only values with more than `MAX_DEPTH`
brackets (a handful, if any) are measured exactly, per row, outside their strings."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from include.datafly_fullstory.mapping.columns import Distinct

MAX_DEPTH = 64  # FullStory properties are flat or a few objects deep; 64 leaves room for any real payload
JSON_COLUMNS = ("context", "properties", "traits")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON text (brackets inside strings do not count)."""
    deepest = level = 0
    for bracket in _BRACKETS.findall(_STRING.sub("", text)):
        if bracket in "[{":
            level += 1
            deepest = max(deepest, level)
        else:
            level -= 1
    return deepest


def too_deep(values, limit: int = MAX_DEPTH) -> np.ndarray:
    """Per value (JSON text or None; an array, a Series or a `Distinct`): nested deeper than `limit`
    levels. A `Distinct` column is measured once per distinct value."""
    if isinstance(values, Distinct):
        return too_deep(values.values, limit)[values.codes]
    out = np.zeros(len(values), dtype=bool)
    if not len(values):
        return out
    text = _text(values)
    brackets = pc.add(pc.count_substring(text, "["), pc.count_substring(text, "{"))
    suspects = np.flatnonzero(pc.fill_null(pc.greater(brackets, limit), False).to_numpy(zero_copy_only=False))
    for i in suspects:
        out[i] = depth(text[int(i)].as_py()) > limit
    return out


def _text(values) -> pa.Array:
    """The values as an Arrow string array: a Series of Arrow strings as it is, anything else converted."""
    if isinstance(values, pd.Series):
        try:
            return (
                pa.array(values.array) if str(values.dtype) == "str" else _text(values.to_numpy(dtype=object))
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return _text(values.to_numpy(dtype=object))
    return pa.array(values, type=pa.large_string(), from_pandas=True)


def reject_deep(verdict, columns: dict[str, np.ndarray], limit: int = MAX_DEPTH) -> None:
    """Reject the open rows whose context, properties or traits nest deeper than `limit` levels."""
    for name, values in columns.items():
        verdict.mark(
            too_deep(values, limit),
            "rejected",
            f"{name} is nested deeper than {limit} levels (arrays or objects inside each other); "
            "the mapping does not follow JSON that deep",
        )
