"""Column helpers of the mapping: landing columns as object arrays, text lengths, timestamps, membership,
and getters that pluck a value out of parsed JSON objects. Vectorised (numpy, pandas, Arrow) except `_dig`
and the getters, which run per row. Their names keep the leading underscore: they are the package's own, shared
by its modules and used nowhere else."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def _column(df: pd.DataFrame, name: str) -> np.ndarray:
    """A landing column as an object array with None for missing (absent columns are all None)."""
    if name not in df.columns:
        return np.full(len(df), None, dtype=object)
    return df[name].to_numpy(dtype=object, na_value=None)


def _text_lengths(values: pd.Series) -> np.ndarray:
    """Characters per value (0 for None), computed by Arrow."""
    lengths = values.astype("str").str.len()
    return lengths.fillna(0).to_numpy(dtype=np.int64)


def _timestamps_ns(column: pd.Series) -> np.ndarray:
    """UTC nanoseconds since the epoch; NaT as int64 min."""
    ts = pd.to_datetime(column, utc=True).dt.as_unit("ns").dt.tz_convert(None)
    return ts.to_numpy().view(np.int64)


def _iso_utc(ts_ns: np.ndarray) -> np.ndarray:
    """ISO-8601 UTC strings (millisecond precision, 'Z'); None where the timestamp is missing."""
    text = np.datetime_as_string(
        ts_ns.view("datetime64[ns]").astype("datetime64[ms]"), unit="ms", timezone="UTC"
    ).astype(object)
    text[ts_ns == np.iinfo(np.int64).min] = None
    return text


def _isin(values: np.ndarray, options) -> np.ndarray:
    """Membership that tolerates None among strings (numpy's isin sorts, and None does not sort)."""
    return pd.Series(values, dtype=object).isin(list(options)).to_numpy(dtype=bool)


def _dig(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if type(obj) is not dict:
            return None
        obj = obj.get(key)
    return obj


def _getter(paths: tuple[tuple[str, ...], ...], want: str = "any"):
    """A function returning the value at the first of `paths` present in a parsed object. `want="text"`:
    strings only (numbers as text); `"scalar"`: no objects or arrays (so the value is hashable)."""

    def get(obj: Any) -> Any:
        for path in paths:
            value = obj
            for key in path:
                value = value.get(key) if type(value) is dict else None
                if value is None:
                    break
            if value is not None:
                return _WANT[want](value)
        return None

    return get


_WANT = {
    "any": lambda v: v,
    "text": lambda v: v if type(v) is str else (str(v) if type(v) in (int, float) else None),
    "scalar": lambda v: None if type(v) in (dict, list) else v,
}
