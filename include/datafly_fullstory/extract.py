"""The extract stage: a window's landing -> validated parts, quarantine, validation summary, outcomes.

Writes into the run folder (contracts.md): `validated/part-NNNNN.parquet` (passing rows: landing
columns + `_row` + `_file`), `quarantine.parquet` (failing rows + `failed_expectations` + `reason`),
`validation.json` (the GX summary) and `outcomes/quarantine.parquet` (one `quarantined` outcome per
failing row). A re-run replaces all of them. Memory is bounded by the batch size, not the window.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from include.datafly_fullstory import outcomes, validated
from include.datafly_fullstory.landing import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PARTITION_SLACK,
    FRAME_SCHEMA,
    LandingFile,
    iter_window_batches,
)
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.validation import SeenEventIds, empty_summary, merge_summaries, validate_batch
from include.datafly_fullstory.window import Window

log = logging.getLogger(__name__)

QUARANTINE_SCHEMA = FRAME_SCHEMA.append(pa.field("failed_expectations", pa.list_(pa.string()))).append(
    pa.field("reason", pa.string())
)
_OUTPUTS = (
    (validated.FOLDER,),
    ("quarantine.parquet",),
    ("validation.json",),
    ("outcomes", "quarantine.parquet"),
)


class _ParquetSink:
    """A Parquet file in the run folder written batch by batch (the quarantine can be as large as the
    window), published whole at the end: renamed into place locally, uploaded once on object stores."""

    def __init__(self, store: RunStore, name: str, schema: pa.Schema) -> None:
        self.store, self.name, self.schema = store, name, schema
        if store.is_local:
            store.makedirs()
            self.tmp = store.path(f"{name}.tmp-{uuid.uuid4().hex}")
        else:
            handle, self.tmp = tempfile.mkstemp(suffix=".parquet")
            os.close(handle)
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def __enter__(self) -> _ParquetSink:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.writer.close()
        try:
            if exc_type is None and self.store.is_local:
                os.replace(self.tmp, self.store.path(self.name))
            elif exc_type is None:
                self.store.fs.put_file(self.tmp, self.store.path(self.name))
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def _coalesce(frames: Iterable[pd.DataFrame], batch_size: int) -> Iterator[pd.DataFrame]:
    """Re-cut the reader's frames (Parquet row groups, filtered batches of neighbouring partitions) into
    validation batches of exactly `batch_size` rows (the last may be shorter): GX has a per-run cost,
    and each batch becomes one part file."""
    buffer, buffered = [], 0
    for frame in frames:
        buffer.append(frame)
        buffered += len(frame)
        while buffered >= batch_size:
            joined = pd.concat(buffer) if len(buffer) > 1 else buffer[0]
            yield joined.iloc[:batch_size]
            rest = joined.iloc[batch_size:]
            buffer, buffered = ([rest] if len(rest) else []), len(rest)
    if buffer:
        yield pd.concat(buffer) if len(buffer) > 1 else buffer[0]


def _table(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(df, schema=schema, preserve_index=False)


def quarantine_outcomes(quarantined: pd.DataFrame) -> pd.DataFrame:
    """One `quarantined` outcome per failing row; an identify row's outcome is a user outcome."""
    return outcomes.frame(
        quarantined["_row"].to_numpy(),
        quarantined["event_id"].to_numpy(),
        "quarantined",
        quarantined["reason"].to_numpy(),
        np.where(quarantined["type"].to_numpy() == "identify", "user", "event"),
    )


@dataclass
class LookBack:
    """The look-back of a scheduled run: rows of `window` (the hours before the run's own) that landed
    after their own run read them. `select_files` drops files read before and unchanged since;
    `new_rows` keeps the rows of a frame the delivery ledger has no record of. `before`, when given, runs
    once the window's rows are validated, before the look-back reads (identity learning, stitching.py)."""

    window: Window
    select_files: Callable[[list[LandingFile]], list[LandingFile]]
    new_rows: Callable[[pd.DataFrame], pd.DataFrame]
    before: Callable[[], None] | None = None


def run_extract(
    landing_uri: str,
    window: Window,
    store: RunStore,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    storage_options: dict | None = None,
    partition_slack: timedelta = DEFAULT_PARTITION_SLACK,
    filesystem=None,
    lookback: LookBack | None = None,
) -> dict:
    """Read and validate the window (and, with `lookback`, the late rows before it); returns
    `{"rows_read", "rows_valid", "rows_quarantined", "parts", "validation", "files", "late"}` (small and
    JSON-serialisable, for XCom). Rows of the window come first (`_row` 0..), late rows after them.
    Raises `LandingError` on a corrupt file or a bad schema, before any part of the run is sent."""
    for output in _OUTPUTS:
        store.remove(*output)
    seen, summary, parts, outcome_frames = SeenEventIds(), None, [], []
    counts = {"rows_read": 0, "rows_valid": 0, "rows_quarantined": 0}
    files: list[LandingFile] = []
    late_files: list[LandingFile] = []
    late = {"rows": 0, "rows_known": 0, "files_read": 0, "files_skipped": 0, "seconds": 0.0}
    with _ParquetSink(store, "quarantine.parquet", QUARANTINE_SCHEMA) as quarantine:

        def take(frames: Iterable[pd.DataFrame], frames_window: Window) -> None:
            nonlocal summary
            for frame in _coalesce(frames, batch_size):
                valid, failed, batch_summary = validate_batch(frame, frames_window, seen)
                summary = merge_summaries(summary, batch_summary)
                counts["rows_read"] += len(frame)
                counts["rows_valid"] += len(valid)
                counts["rows_quarantined"] += len(failed)
                if len(valid):
                    parts.append(validated.write_part(store, len(parts), _table(valid, FRAME_SCHEMA)))
                if len(failed):
                    quarantine.write(_table(failed, QUARANTINE_SCHEMA))
                    outcome_frames.append(quarantine_outcomes(failed))

        take(
            iter_window_batches(
                landing_uri,
                window,
                batch_size=batch_size,
                partition_slack=partition_slack,
                storage_options=storage_options,
                filesystem=filesystem,
                files_read=files,
            ),
            window,
        )
        if lookback is not None:
            began = time.monotonic()
            if lookback.before is not None:
                lookback.before()

            def select(candidates: list[LandingFile]) -> list[LandingFile]:
                chosen = lookback.select_files(candidates)
                late["files_skipped"] = len(candidates) - len(chosen)
                return chosen

            frames = iter_window_batches(
                landing_uri,
                lookback.window,
                batch_size=batch_size,
                partition_slack=partition_slack,
                storage_options=storage_options,
                filesystem=filesystem,
                select_files=select,
                files_read=late_files,
            )
            take(_renumbered(frames, lookback.new_rows, counts, late), lookback.window)
            late["files_read"] = len(late_files)
            late["seconds"] = round(time.monotonic() - began, 3)
    empty = outcomes.frame([], [], [], [])
    outcomes.write_outcomes(store, "quarantine", pd.concat(outcome_frames) if outcome_frames else empty)
    summary = {**(summary or empty_summary()), "window": window.as_dict()}
    store.write_json(summary, "validation.json")
    log.info(
        "extract %s..%s: %d read (%d late), %d valid, %d quarantined in %d part(s)",
        window.start.isoformat(),
        window.end.isoformat(),
        counts["rows_read"],
        late["rows"],
        counts["rows_valid"],
        counts["rows_quarantined"],
        len(parts),
    )
    return {
        **counts,
        "parts": parts,
        "validation": summary,
        "late": late,
        "files": [[f.uri, f.size, f.mtime] for f in files],
        "late_files": [[f.uri, f.size, f.mtime] for f in late_files],
    }


def _renumbered(
    frames: Iterable[pd.DataFrame], new_rows: Callable[[pd.DataFrame], pd.DataFrame], counts: dict, late: dict
) -> Iterator[pd.DataFrame]:
    """Late rows the ledger does not know, numbered on from the window's rows (`_row` stays 0..n-1)."""
    next_row = None
    for frame in frames:
        kept = new_rows(frame)
        late["rows_known"] += len(frame) - len(kept)
        if not len(kept):
            continue
        if next_row is None:
            next_row = counts["rows_read"]
        rows = np.arange(next_row, next_row + len(kept), dtype=np.int64)
        kept = kept.copy()
        kept["_row"] = rows
        kept.index = pd.Index(rows)
        next_row += len(kept)
        late["rows"] += len(kept)
        yield kept
