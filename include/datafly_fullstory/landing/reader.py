"""Reading a window: its files planned (footers first), their rows kept when they belong to the window,
and yielded as landing frames of bounded size (`iter_window_batches`).

Which rows belong to the window (contracts.md): `timestamp` in `[start, end)`, or `timestamp` null and
`received_at` in the window, or both null and the file's partition starts inside the window (so even
a row without any time lands in exactly one window, where validation quarantines it; in a flat layout
such a row has no window: every run that reads the file logs a warning with their count).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from include.datafly_fullstory.landing.columns import _convert, _FilePlan, _plan_file, _read_error
from include.datafly_fullstory.landing.files import (
    DEFAULT_PARTITION_SLACK,
    LandingFile,
    _open_landing,
    _window_files,
)
from include.datafly_fullstory.landing.vocabulary import CANONICAL_COLUMNS, FRAME_SCHEMA, UTC_NS
from include.datafly_fullstory.window import Window

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 100_000
_UNIT_NS = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}


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
    if not pc.all(mask).as_py():  # a batch wholly inside the window (the usual case) is not copied
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
    """The file's record batches. No read-ahead and no pre-buffering of whole row groups: the next batch
    is read when the one before it has been taken (measured on 1M rows: a third less peak memory, no
    slower; the columns of a row group still decode in parallel)."""
    scanner = plan.dataset.scanner(
        columns=list(plan.kinds),
        filter=_pushdown_filter(plan, window),
        batch_size=batch_size,
        batch_readahead=0,
        fragment_readahead=0,
        fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=False),
    )
    try:
        yield from scanner.to_batches()
    except (pa.ArrowException, OSError) as exc:
        raise corrupt_file(plan, exc) from exc


def corrupt_file(plan: _FilePlan, exc: BaseException) -> Exception:
    """The error for a file whose pages cannot be read (landing/count.py reads its time columns too)."""
    return _read_error(
        f"cannot read {plan.file.uri} ({exc}): the file is corrupt or truncated. "
        "Re-export it, or move it out of the landing; nothing was sent.",
        exc,
        plan.file.uri,
    )


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
            del batch  # the frame holds its own copy (large strings): not kept while the caller works
            if frame is not None:
                next_row += len(frame)
                yield frame
                del frame  # nor while the next one is read
    log.info(
        "window %s..%s: %d row(s) read",
        window.start.isoformat(),
        window.end.isoformat(),
        next_row - first_row,
    )
