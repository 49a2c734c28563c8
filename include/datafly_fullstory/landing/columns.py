"""One file's columns: its footer checked against the landing (`_plan_file`), each column's kind,
and its conversion to the landing frame's type.

Each file is read with its own schema (files of one landing may differ): timestamps in any unit, with
or without a zone (naive = UTC), as epoch numbers (unit from the magnitude) or ISO-8601 strings; JSON
columns as strings or Arrow struct / map / list columns (serialised to JSON text); optional columns
missing (null); extra columns ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from include.datafly_fullstory.errors import LandingError, LandingInputError
from include.datafly_fullstory.landing.files import LandingFile
from include.datafly_fullstory.landing.vocabulary import (
    CANONICAL_COLUMNS,
    FRAME_SCHEMA,
    JSON_COLUMNS,
    REQUIRED_COLUMNS,
    TIMESTAMP_COLUMNS,
    UTC_NS,
)


def _read_error(message: str, exc: BaseException, uri: str) -> LandingError:
    """Corrupt data (ArrowInvalid) or an I/O error on a local file is the file's problem; an I/O error on
    an object store may be the network's."""
    local = "://" not in uri
    return LandingInputError(message) if isinstance(exc, pa.ArrowInvalid) or local else LandingError(message)


@dataclass(frozen=True)
class _FilePlan:
    """How one file's columns become the landing frame: column -> kind (see `_column_kind`)."""

    file: LandingFile
    dataset: ds.Dataset
    kinds: dict[str, str]
    types: dict[str, pa.DataType]


# -- one file's schema ---------------------------------------------------------------------------------


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_text(t.value_type)
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
    )


def _column_kind(column: str, t: pa.DataType) -> str | None:
    """How a column of this Arrow type becomes its landing-frame type; None when it cannot."""
    if pa.types.is_null(t):
        return "null"
    if column in TIMESTAMP_COLUMNS:
        if pa.types.is_timestamp(t):
            return "timestamp"
        if pa.types.is_date(t):
            return "date"
        if pa.types.is_integer(t) or pa.types.is_floating(t):
            return "epoch"
        return "iso" if _is_text(t) else None
    if column in JSON_COLUMNS:
        if _is_text(t):
            return "text"
        nested = (
            pa.types.is_struct(t) or pa.types.is_map(t) or pa.types.is_list(t) or pa.types.is_large_list(t)
        )
        return "nested" if nested else None
    return "text" if _is_text(t) or pa.types.is_integer(t) else None


def _plan_file(file: LandingFile, fs: pafs.FileSystem) -> _FilePlan:
    """Open a file's footer and check it can give the landing frame (table-level validation)."""
    try:
        dataset = ds.dataset(file.path, filesystem=fs, format="parquet")
        schema = dataset.schema
    except (pa.ArrowException, OSError) as exc:
        raise _read_error(
            f"cannot open {file.uri} as Parquet ({exc}). Re-export the file, or move it out "
            "of the landing; the run stops before anything is sent.",
            exc,
            file.uri,
        ) from exc
    types = {name: schema.field(name).type for name in schema.names if name in CANONICAL_COLUMNS}
    missing = [c for c in REQUIRED_COLUMNS if c not in types]
    kinds = {c: _column_kind(c, t) for c, t in types.items()}
    unusable = [f"{c} ({types[c]})" for c, k in kinds.items() if k is None]
    if missing or unusable:
        problems = []
        if missing:
            problems.append(f"required column(s) missing: {', '.join(missing)}")
        if unusable:
            problems.append(f"column(s) of a type the landing cannot use: {', '.join(unusable)}")
        raise LandingInputError(
            f"{file.uri}: {'; '.join(problems)}. Found columns: {', '.join(schema.names)}. "
            "Fix the export (see docs/landing.md for the columns and types) and re-run."
        )
    return _FilePlan(file, dataset, kinds, types)


# -- converting columns ---------------------------------------------------------------------------------


def _epoch_to_utc(arr: pa.Array) -> pa.Array:
    """Epoch numbers in s / ms / us / ns, the unit read from each value's magnitude (1973..5138 AD for
    seconds); values that do not fit datetime64[ns] become null (validation reports them)."""
    is_int = pa.types.is_integer(arr.type)
    values = pc.fill_null(arr.cast(pa.int64() if is_int else pa.float64()), 0).to_numpy()
    magnitude = np.abs(values)
    scale = np.select([magnitude < 1e11, magnitude < 1e14, magnitude < 1e17], [10**9, 10**6, 10**3], 1)
    fits = magnitude <= np.iinfo(np.int64).max // scale
    with np.errstate(over="ignore", invalid="ignore"):
        ns = np.where(fits, values * scale, 0).astype(np.int64)
    return pa.array(ns, type=UTC_NS, mask=np.asarray(pc.is_null(arr)) | ~fits)


def _iso_to_utc(arr: pa.Array) -> pa.Array:
    text = pd.Series(arr.cast(pa.string()).to_pandas())
    parsed = pd.to_datetime(text, utc=True, format="ISO8601", errors="coerce")
    return pa.array(parsed.astype("datetime64[ns, UTC]"), type=UTC_NS)


def _to_utc(arr: pa.Array, kind: str) -> pa.Array:
    if kind == "epoch":
        return _epoch_to_utc(arr)
    if kind == "iso":
        return _iso_to_utc(arr)
    # naive timestamps are UTC (datafly-events.md); a zone-aware cast keeps the instant
    return arr.cast(UTC_NS)


def _json_text(arr: pa.Array) -> pa.Array:
    """Struct / map / list values as compact JSON text. Per-value Python, but only for exports that use
    nested columns; string JSON columns (the usual case) pass through untouched."""
    dumps, option = orjson.dumps, orjson.OPT_NON_STR_KEYS
    values = arr.to_pylist(maps_as_pydicts="lossy")
    try:
        texts = [None if v is None else dumps(v, default=str, option=option).decode() for v in values]
    except TypeError:  # a value nested deeper than orjson writes (254 levels): one row must not stop the file
        texts = [None if v is None else _deep_json_text(v) for v in values]
    return pa.array(texts, type=pa.string())


def _deep_json_text(value) -> str:
    """JSON text of a value orjson refuses for its depth (the mapping rejects it, naming the column); past
    Python's own recursion limit, a JSON string saying so (validation quarantines it: not an object)."""
    import json

    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        pass
    try:
        return json.dumps(value, default=str, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        return json.dumps("value nested too deep to convert to JSON text")


def _to_text(arr: pa.Array, column: str, file: LandingFile) -> pa.Array:
    try:
        return arr.cast(pa.string())
    except pa.ArrowInvalid as exc:
        raise LandingInputError(
            f"{file.uri}: column {column} is not valid UTF-8 text ({exc}); re-export it as a string column"
        ) from exc


def _convert(batch: pa.RecordBatch, plan: _FilePlan, column: str, kind: str | None) -> pa.Array:
    n = batch.num_rows
    target = FRAME_SCHEMA.field(column).type
    if kind is None or kind == "null":
        return pa.nulls(n, type=target)
    arr = batch.column(column)
    if column in TIMESTAMP_COLUMNS:
        return _to_utc(arr, kind)
    if kind == "nested":
        return _json_text(arr)
    return _to_text(arr, column, plan.file)
