"""The Parquet landing: the files of a window, read as bounded record batches in the landing frame.

Layouts: flat folders and hive partitions (`dt=YYYY-MM-DD[/hour=HH]`, `date=` and `hr=` also work),
on local paths or object stores (`s3://`, `gs://`, any fsspec URI; `storage_options` go to fsspec).

Which files a window reads (partition pruning): a partitioned file is read only when its partition
interval overlaps `[start - slack, end + slack)`; `slack` (default one hour) covers clock skew, i.e.
rows whose skew-corrected `timestamp` falls in the window but which landed in a neighbouring hour's
partition. Those neighbours are opened (footer only) and their row groups skipped by the `timestamp`
statistics (predicate push-down), so the cost is small and no such row is lost. Files outside that
range are never opened. Unpartitioned files are always opened and filtered by push-down.

Which rows belong to the window (contracts.md): `timestamp` in `[start, end)`, or `timestamp` null and
`received_at` in the window, or both null and the file's partition starts inside the window (so even
a row without any time lands in exactly one window, where validation quarantines it; in a flat layout
such a row has no window: every run that reads the file logs a warning with their count).

Each file is read with its own schema (files of one landing may differ): timestamps in any unit, with
or without a zone (naive = UTC), as epoch numbers (unit from the magnitude) or ISO-8601 strings; JSON
columns as strings or Arrow struct / map / list columns (serialised to JSON text); optional columns
missing (null); extra columns ignored.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath

import fsspec
import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from include.datafly_fullstory.errors import LandingError, LandingInputError
from include.datafly_fullstory.window import Window

log = logging.getLogger(__name__)

# The landing vocabulary (contracts.md "Landing frame"), defined here only: validation, mapping, the
# sample landing and the benchmarks import it.
STRING_COLUMNS = ("event_id", "type", "event", "name", "anonymous_id", "user_id")
TIMESTAMP_COLUMNS = ("timestamp", "received_at", "sent_at")
JSON_COLUMNS = ("context", "properties", "traits")
CANONICAL_COLUMNS = (*STRING_COLUMNS, *TIMESTAMP_COLUMNS, *JSON_COLUMNS, "source_id")
REQUIRED_COLUMNS = ("event_id", "type", "anonymous_id", "timestamp", "received_at")
FRAME_COLUMNS = (*CANONICAL_COLUMNS, "_row", "_file")
KNOWN_TYPES = ("page", "track", "identify", "group", "screen", "alias")  # Datafly call types (`type`)
EVENT_TYPES = ("page", "track")  # the types that become FullStory events; `identify` updates users

UTC_NS = pa.timestamp("ns", tz="UTC")
FRAME_SCHEMA = pa.schema(
    [(c, UTC_NS if c in TIMESTAMP_COLUMNS else pa.string()) for c in CANONICAL_COLUMNS]
    + [("_row", pa.int64()), ("_file", pa.string())]
)

DEFAULT_BATCH_SIZE = 100_000
DEFAULT_PARTITION_SLACK = timedelta(hours=1)

_DAY_KEY = re.compile(r"^(?:dt|date)=(\d{4})-?(\d{2})-?(\d{2})$")
_HOUR_KEY = re.compile(r"^(?:hour|hr)=(\d{1,2})$")
_UNIT_NS = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}


def _read_error(message: str, exc: BaseException, uri: str) -> LandingError:
    """Corrupt data (ArrowInvalid) or an I/O error on a local file is the file's problem; an I/O error on
    an object store may be the network's."""
    local = "://" not in uri
    return LandingInputError(message) if isinstance(exc, pa.ArrowInvalid) or local else LandingError(message)


@dataclass(frozen=True)
class LandingFile:
    path: str  # on the pyarrow filesystem
    uri: str  # what users see (`_file`, errors)
    partition: tuple[datetime, datetime] | None  # [start, end) from dt=/hour= keys; None when flat
    size: int = -1  # bytes, and modification time (epoch seconds; 0 when the store gives none): together
    mtime: float = 0.0  # they tell the look-back whether a file changed since it was last read


@dataclass(frozen=True)
class _Landing:
    fs: pafs.FileSystem
    root: str
    prefix: str  # "s3://" etc. for URIs, "" for local paths

    def uri(self, path: str) -> str:
        return f"{self.prefix}{path}"


@dataclass(frozen=True)
class _FilePlan:
    """How one file's columns become the landing frame: column -> kind (see `_column_kind`)."""

    file: LandingFile
    dataset: ds.Dataset
    kinds: dict[str, str]
    types: dict[str, pa.DataType]


# -- finding the files ---------------------------------------------------------------------------------


def _open_landing(landing_uri: str, storage_options: dict | None, filesystem) -> _Landing:
    scheme, sep, rest = landing_uri.partition("://")
    remote = bool(sep) and scheme != "file"
    prefix = f"{scheme}://" if remote else ""
    if isinstance(filesystem, pafs.FileSystem):
        return _Landing(filesystem, rest.rstrip("/") if sep else landing_uri, prefix)
    if filesystem is None and not remote:
        return _Landing(pafs.LocalFileSystem(), os.path.abspath(rest if sep else landing_uri), "")
    if filesystem is None:
        filesystem, root = fsspec.core.url_to_fs(landing_uri, **(storage_options or {}))
    else:
        root = filesystem._strip_protocol(landing_uri)
    return _Landing(pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), root.rstrip("/"), prefix)


def _partition_span(relative: str) -> tuple[datetime, datetime] | None:
    day = hour = None
    for part in PurePosixPath(relative).parts[:-1]:
        if m := _DAY_KEY.match(part):
            day = datetime(int(m[1]), int(m[2]), int(m[3]), tzinfo=UTC)
        elif m := _HOUR_KEY.match(part):
            hour = int(m[1])
    if day is None:
        return None
    if hour is None:
        return day, day + timedelta(days=1)
    start = day + timedelta(hours=hour)
    return start, start + timedelta(hours=1)


def _hidden(relative: str) -> bool:
    # pyarrow's convention: _SUCCESS, _metadata, .crc and the like are not data files
    return any(part.startswith((".", "_")) for part in PurePosixPath(relative).parts)


def list_landing_files(
    landing_uri: str, *, storage_options: dict | None = None, filesystem=None
) -> list[LandingFile]:
    """Every data file under the landing, sorted by path (this order defines `_row`)."""
    landing = _open_landing(landing_uri, storage_options, filesystem)
    info = landing.fs.get_file_info(landing.root)
    if info.type == pafs.FileType.NotFound:
        raise LandingInputError(
            f"landing {landing_uri} does not exist: check the Airflow Variable "
            "datafly_landing_uri (and the credentials in storage_options)"
        )
    if info.type == pafs.FileType.File:
        return [LandingFile(landing.root, landing.uri(landing.root), None, *_size_mtime(info))]
    infos = landing.fs.get_file_info(pafs.FileSelector(landing.root, recursive=True))
    files = []
    for item in infos:
        relative = item.path[len(landing.root) :].lstrip("/")
        if item.type == pafs.FileType.File and not _hidden(relative):
            files.append(
                LandingFile(item.path, landing.uri(item.path), _partition_span(relative), *_size_mtime(item))
            )
    return sorted(files, key=lambda f: f.path)


def _size_mtime(info: pafs.FileInfo) -> tuple[int, float]:
    mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
    return (info.size if info.size is not None else -1), mtime


def _window_files(landing_uri: str, window: Window, slack: timedelta, storage_options, filesystem):
    low, high = window.start - slack, window.end + slack
    files = list_landing_files(landing_uri, storage_options=storage_options, filesystem=filesystem)
    return [f for f in files if f.partition is None or (f.partition[0] < high and f.partition[1] > low)]


def list_window_files(
    landing_uri: str,
    window: Window,
    *,
    partition_slack: timedelta = DEFAULT_PARTITION_SLACK,
    storage_options: dict | None = None,
    filesystem=None,
) -> list[str]:
    """The URIs of the files a window reads, after partition pruning, in `_row` order."""
    return [f.uri for f in _window_files(landing_uri, window, partition_slack, storage_options, filesystem)]


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


# -- window membership --------------------------------------------------------------------------------


def _bound(instant: datetime, t: pa.TimestampType) -> pa.Scalar:
    """`instant` in a file's timestamp type, rounded up: for integer ticks `x >= ceil(b)` is `x >= b`
    and `x < ceil(b)` is `x < b`, so the push-down filter is exact in any unit."""
    ns = int(instant.timestamp()) * 10**9 + instant.microsecond * 1000
    unit = _UNIT_NS[t.unit]
    return pa.scalar(-(-ns // unit), pa.int64()).cast(t)


def _pushdown_filter(plan: _FilePlan, window: Window) -> ds.Expression | None:
    """The window as a dataset filter, so row groups are skipped by their statistics; only for files
    whose time columns are real timestamps (strings and epochs are filtered after conversion)."""
    if plan.kinds.get("timestamp") != "timestamp" or plan.kinds.get("received_at") != "timestamp":
        return None

    def inside(column: str) -> ds.Expression:
        t = plan.types[column]
        return (ds.field(column) >= _bound(window.start, t)) & (ds.field(column) < _bound(window.end, t))

    ts_null = ds.field("timestamp").is_null()
    # rows with no time at all pass too: `_frame` keeps or counts them
    return inside("timestamp") | (ts_null & (inside("received_at") | ds.field("received_at").is_null()))


def _in_window(ts: pa.Array, received: pa.Array, window: Window) -> tuple[pa.Array, pa.Array]:
    """(rows in the window by their times, rows with no time at all)."""
    start, end = pa.scalar(window.start, UTC_NS), pa.scalar(window.end, UTC_NS)

    def inside(a: pa.Array) -> pa.Array:
        return pc.fill_null(pc.and_(pc.greater_equal(a, start), pc.less(a, end)), False)

    ts_null = pc.is_null(ts)
    return pc.or_(inside(ts), pc.and_(ts_null, inside(received))), pc.and_(ts_null, pc.is_null(received))


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
    return pa.array(
        [None if v is None else dumps(v, default=str, option=option).decode() for v in values],
        type=pa.string(),
    )


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


# -- reading -----------------------------------------------------------------------------------------


def _frame(
    batch: pa.RecordBatch, plan: _FilePlan, window: Window, orphans_here: bool, first_row: int
) -> pd.DataFrame | None:
    ts = _convert(batch, plan, "timestamp", plan.kinds.get("timestamp"))
    received = _convert(batch, plan, "received_at", plan.kinds.get("received_at"))
    mask, timeless = _in_window(ts, received, window)
    if orphans_here:
        mask = pc.or_(mask, timeless)
    elif plan.file.partition is None and (lost := pc.sum(timeless).as_py()):
        log.warning(
            "%s: %d row(s) have neither timestamp nor received_at and belong to no window; "
            "fix the export (received_at is required)",
            plan.file.uri,
            lost,
        )
    if not pc.any(mask).as_py():
        return None
    batch, ts, received = batch.filter(mask), ts.filter(mask), received.filter(mask)
    n = batch.num_rows
    converted = {"timestamp": ts, "received_at": received}
    arrays = [
        converted[c] if c in converted else _convert(batch, plan, c, plan.kinds.get(c))
        for c in CANONICAL_COLUMNS
    ]
    rows = np.arange(first_row, first_row + n, dtype=np.int64)
    arrays += [pa.array(rows), pa.repeat(pa.scalar(plan.file.uri), n).cast(pa.string())]
    frame = pa.Table.from_arrays(arrays, schema=FRAME_SCHEMA).to_pandas()
    frame.index = pd.Index(rows)  # index label == _row: unique in the window, what validation keys on
    return frame


def _scan(plan: _FilePlan, window: Window, batch_size: int) -> Iterator[pa.RecordBatch]:
    scanner = plan.dataset.scanner(
        columns=list(plan.kinds),
        filter=_pushdown_filter(plan, window),
        batch_size=batch_size,
        batch_readahead=1,
        fragment_readahead=1,
    )
    try:
        yield from scanner.to_batches()
    except (pa.ArrowException, OSError) as exc:
        raise _read_error(
            f"cannot read {plan.file.uri} ({exc}): the file is corrupt or truncated. "
            "Re-export it, or move it out of the landing; nothing was sent.",
            exc,
            plan.file.uri,
        ) from exc


def _orphans_here(file: LandingFile, window: Window) -> bool:
    """Rows with neither timestamp nor received_at belong to the window holding their partition start."""
    return file.partition is not None and window.start <= file.partition[0] < window.end


def plan_window(
    landing_uri: str,
    window: Window,
    *,
    partition_slack: timedelta = DEFAULT_PARTITION_SLACK,
    storage_options: dict | None = None,
    filesystem=None,
    select_files: Callable[[list[LandingFile]], list[LandingFile]] | None = None,
) -> list[_FilePlan]:
    """Open every file of the window (footers only) before any row is read, so a corrupt file or a bad
    schema stops the run before anything else happens. `select_files` may drop files from the list
    (the look-back skips files it has read before)."""
    landing = _open_landing(landing_uri, storage_options, filesystem)
    files = _window_files(landing_uri, window, partition_slack, storage_options, filesystem)
    if select_files is not None:
        files = select_files(files)
    log.info(
        "window %s..%s reads %d file(s) under %s%s",
        window.start.isoformat(),
        window.end.isoformat(),
        len(files),
        landing_uri,
        "".join(f"\n  {f.uri}" for f in files[:20]),
    )
    return [_plan_file(f, landing.fs) for f in files]


def iter_window_batches(
    landing_uri: str,
    window: Window,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    partition_slack: timedelta = DEFAULT_PARTITION_SLACK,
    storage_options: dict | None = None,
    filesystem=None,
    select_files: Callable[[list[LandingFile]], list[LandingFile]] | None = None,
    first_row: int = 0,
    files_read: list[LandingFile] | None = None,
) -> Iterator[pd.DataFrame]:
    """The window's rows as landing frames (contracts.md "Landing frame") of at most `batch_size` rows.

    Memory is bounded by the batch size (plus one Parquet row group), not by the window. `_row` counts
    the window's rows across files in path order, from `first_row`; the frame index equals `_row`. The
    files read are appended to `files_read` when given.
    """
    plans = plan_window(
        landing_uri,
        window,
        partition_slack=partition_slack,
        storage_options=storage_options,
        filesystem=filesystem,
        select_files=select_files,
    )
    if files_read is not None:
        files_read.extend(plan.file for plan in plans)
    next_row = first_row
    for plan in plans:
        orphans_here = _orphans_here(plan.file, window)
        for batch in _scan(plan, window, batch_size):
            frame = _frame(batch, plan, window, orphans_here, next_row)
            if frame is not None:
                next_row += len(frame)
                yield frame
    log.info(
        "window %s..%s: %d row(s) read",
        window.start.isoformat(),
        window.end.isoformat(),
        next_row - first_row,
    )
