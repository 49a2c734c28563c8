"""Column helpers of the mapping: landing columns as object arrays, text lengths, timestamps, membership,
getters that pluck a value out of parsed JSON objects, and `ParsedJson`, a JSON column parsed once per
distinct value. Vectorised (numpy, pandas, Arrow) except `_dig` and the getters, which run per value. The
underscored names are the package's own, shared by its modules and used nowhere else."""

from __future__ import annotations

import gc
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any

import numpy as np
import orjson
import pandas as pd


def _column(df: pd.DataFrame, name: str) -> np.ndarray:
    """A landing column as an object array with None for missing (absent columns are all None). Inside
    `columns_cached(df)` each column is converted once and shared: read-only."""
    memo = _cached.get(id(df))
    if memo is None or memo[0] is not df:
        return _object_column(df, name)
    found = memo[1].get(name)
    if found is None:
        found = memo[1][name] = _object_column(df, name)
        found.flags.writeable = False
    return found


def _rows_of(df: pd.DataFrame, name: str, at: np.ndarray):
    """The values of a column at positions `at`, for a new frame: Arrow text stays Arrow text (no Python
    strings made), anything else as an object array (which a new frame infers as text, as before)."""
    if name in df.columns and str(df[name].dtype) == "str":
        return df[name].iloc[at].reset_index(drop=True)
    return _column(df, name)[at]


def _object_column(df: pd.DataFrame, name: str) -> np.ndarray:
    if name not in df.columns:
        return np.full(len(df), None, dtype=object)
    return df[name].to_numpy(dtype=object, na_value=None)


_cached: dict[int, tuple[pd.DataFrame, dict[str, np.ndarray]]] = {}


@contextmanager
def columns_cached(df: pd.DataFrame) -> Generator[None, None, None]:
    """While mapping one batch: `_column(df, name)` converts each column once (the rules read some columns
    several times; converting Arrow text to Python objects costs about 20 ms per 100,000 values)."""
    _cached[id(df)] = (df, {})
    try:
        yield
    finally:
        _cached.pop(id(df), None)


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


# ---- JSON columns parsed once per distinct value ------------------------------------------------------------

BAD_JSON: Any = object()  # the parse of a text that is not JSON at all


@contextmanager
def gc_paused() -> Generator[None, None, None]:
    """Parsing allocates hundreds of thousands of dicts with no reference cycles; the cyclic collector
    would walk them over and over (measured: 4-5x slower parsing). Reference counting frees them."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _factorize(values) -> tuple[np.ndarray, np.ndarray]:
    """(codes, distinct values as an object array with None appended): a null's code points at the None."""
    if isinstance(values, Distinct):
        return values.codes, values.values
    codes, distinct = pd.factorize(
        values if isinstance(values, pd.Series) else pd.Series(values, dtype=object)
    )
    distinct = np.append(np.asarray(distinct, dtype=object), None)
    codes = np.asarray(codes, dtype=np.int64)
    return np.where(codes < 0, len(distinct) - 1, codes), distinct


class Distinct:
    """A column as its distinct values (`values`, None last, for nulls) and each row's code into them."""

    def __init__(self, values) -> None:
        self.codes, self.values = _factorize(values)

    def __len__(self) -> int:
        return len(self.codes)

    def take(self, rows: np.ndarray) -> Distinct:
        """The rows at `rows` only, with only the distinct values they use (None still last)."""
        codes = self.codes[rows]
        null = len(self.values) - 1
        used = np.unique(codes)
        used = used[used != null]
        remap = np.full(len(self.values), len(used), dtype=np.int64)  # null -> the new last slot
        remap[used] = np.arange(len(used))
        out = Distinct.__new__(Distinct)
        out.codes = remap[codes]
        out.values = np.append(self.values[used], np.array([None], dtype=object))
        return out


class ParsedJson:
    """A JSON text column parsed once per distinct text: landing payloads repeat the same few contexts and
    property sets many times, and parsing is most of the mapping's cost. `codes[i]` is row i's distinct
    value; `values` the parses (`BAD_JSON` where the text is not JSON, None for null), `objects` the same
    with None for anything that is not a JSON object. Parsed values are shared between rows: read them,
    never change them."""

    def __init__(self, values) -> None:
        self.codes, self.texts = _factorize(values)  # values: text, or a `Distinct` of text
        with gc_paused():
            parsed = _PARSED.parse(self.texts[:-1].tolist())
        parsed.append(None)
        self.values = parsed
        self.objects = [p if type(p) is dict else None for p in parsed]

    def __len__(self) -> int:
        return len(self.codes)

    def bad(self) -> np.ndarray:
        """Per row: the text is not a JSON object (broken JSON, an array, a scalar); null is not bad."""
        per_value = np.fromiter(
            (p is not None and type(p) is not dict for p in self.values), dtype=bool, count=len(self.values)
        )
        return per_value[self.codes]

    def each(self, fn: Callable[[Any], Any]) -> np.ndarray:
        """`fn` of every distinct object (None for a non-object) as an object array, per distinct value."""
        return np.fromiter((fn(o) for o in self.objects), dtype=object, count=len(self.objects))

    def per_row(self, fn: Callable[[Any], Any]) -> np.ndarray:
        """`fn` of each row's object, computed once per distinct value."""
        return self.each(fn)[self.codes]

    def rows(self) -> list:
        """Each row's object (None for null or a non-object), as a list."""
        objects = np.fromiter(self.objects, dtype=object, count=len(self.objects))
        return objects[self.codes].tolist()


class _ParseMemo:
    """The parses of the JSON texts seen lately, shared by every `ParsedJson` of the process: the consent
    scan, the identity pairs and the mapping read the same contexts of a window, and a window's batches
    repeat the same payloads. Bounded: forgotten all at once when the texts pass `budget` characters."""

    def __init__(self, budget: int) -> None:
        self.budget, self.size, self.parsed = budget, 0, {}

    def parse(self, texts: list) -> list:
        known = self.parsed
        out, new = [], []
        for text in texts:
            try:
                found = known.get(text, _UNSEEN)
            except TypeError:  # not text (unhashable): parsed, not kept
                found = _loads_or_bad(text)
            if found is _UNSEEN:
                new.append(len(out))
            out.append(found)
        if new:
            fresh = [texts[i] for i in new]
            try:
                values = [orjson.loads(t) for t in fresh]
            except (orjson.JSONDecodeError, TypeError):  # TypeError: not text at all
                values = [_loads_or_bad(t) for t in fresh]
            size = sum(len(t) for t in fresh if type(t) is str)
            if self.size + size > self.budget:
                known.clear()
                self.size = 0
            for i, text, value in zip(new, fresh, values, strict=True):
                out[i] = value
                if type(text) is str:
                    known[text] = value
            self.size += size
        return out


_UNSEEN = object()
_PARSED = _ParseMemo(budget=16 * 1024 * 1024)  # of text; the parses take a few times that


def forget_parses() -> None:
    """Empty the memo of parsed texts (benchmarks start each timed run cold)."""
    _PARSED.parsed.clear()
    _PARSED.size = 0


def _loads_or_bad(text: Any) -> Any:
    try:
        return orjson.loads(text)
    except (orjson.JSONDecodeError, TypeError):
        return BAD_JSON


def _json_values(df: pd.DataFrame, name: str):
    """A JSON column as `ParsedJson` takes it (the Series itself: factorizing Arrow strings is fastest)."""
    return df[name] if name in df.columns else np.full(len(df), None, dtype=object)
