"""The extract stage: a window's landing -> validated parts, quarantine, validation summary, outcomes.

The window is planned into parts (parts.py). Each part is read and validated on its own (`extract_part`,
one task per part, on any worker): it writes `validated/part-KKKKK-NNNNN.parquet` (passing rows: landing
columns + `_row` + `_file`) and, under `extract/part-KKKKK/`, its quarantined rows and the hashes of its
event ids. `seal` then joins the parts in order into the run's outputs (contracts.md): rows whose event id
an earlier part already had are quarantined as duplicates, exactly as one reader of the whole window would
have, then `quarantine.parquet` (failing rows + `failed_expectations` + `reason`), `validation.json` (the
GX summary) and `outcomes/quarantine.parquet` (one `quarantined` outcome per failing row) are written, and
the look-back's late rows (read after the window's, numbered on from them) are added. `run_extract` does
all of it in one process. A re-run replaces all of it. Memory is bounded by the batch size, not the window.
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
import pyarrow.compute as pc
import pyarrow.parquet as pq

from include.datafly_fullstory import outcomes, validated
from include.datafly_fullstory import parts as window_parts
from include.datafly_fullstory.errors import LandingInputError
from include.datafly_fullstory.landing import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PARTITION_SLACK,
    FRAME_SCHEMA,
    LandingFile,
    iter_window_batches,
)
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.validation import (
    _HELPER_RULES,
    RULES,
    SeenEventIds,
    empty_summary,
    merge_summaries,
    validate_batch,
)
from include.datafly_fullstory.window import Window

log = logging.getLogger(__name__)

QUARANTINE_SCHEMA = FRAME_SCHEMA.append(pa.field("failed_expectations", pa.list_(pa.string()))).append(
    pa.field("reason", pa.string())
)
_OUTPUTS = (("quarantine.parquet",), ("validation.json",), ("outcomes", "quarantine.parquet"))
PARTS_FOLDER = "extract"
DUPLICATE_RULE = "event_id_unique_in_window"
# the suite's rule order (validation.build_suite), which orders a row's failed rules and reasons
SUITE_ORDER = (
    "event_id_not_null",
    "type_not_null",
    "type_known",
    "timestamp_not_null",
    "timestamp_in_window",
    "anonymous_id_not_null",
    *_HELPER_RULES,
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


def _part_dir(number: int) -> tuple[str, str]:
    return PARTS_FOLDER, f"part-{number:05d}"


def _hash_ids(event_ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash per row, 0 where the id is null; id present) -- the hashes SeenEventIds keeps."""
    present = event_ids.notna().to_numpy()
    hashes = np.zeros(len(event_ids), dtype=np.uint64)
    if present.any():
        hashes[present] = pd.util.hash_pandas_object(event_ids[present], index=False).to_numpy()
    return hashes, present


def extract_part(
    landing_uri: str,
    window: Window,
    store: RunStore,
    part: window_parts.Part,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    storage_options: dict | None = None,
    partition_slack: timedelta = DEFAULT_PARTITION_SLACK,
    filesystem=None,
) -> dict:
    """Read and validate one part of the window (its files only, rows numbered from `part.first_row`).
    Returns its counts, GX summary and files (small, for XCom); `seal` joins the parts."""
    validated.remove_parts(store, validated.parts_of(store, part.number))
    store.remove(*_part_dir(part.number))
    if store.is_local:
        store.makedirs(*_part_dir(part.number))
    seen, summary, written = SeenEventIds(), None, 0
    counts = {"rows_read": 0, "rows_valid": 0, "rows_quarantined": 0}
    hashes, present, files = [], [], []
    with _ParquetSink(
        store, "/".join((*_part_dir(part.number), "quarantine.parquet")), QUARANTINE_SCHEMA
    ) as sink:
        frames = iter_window_batches(
            landing_uri,
            window,
            batch_size=batch_size,
            partition_slack=partition_slack,
            storage_options=storage_options,
            filesystem=filesystem,
            select_files=part.select,
            first_row=part.first_row,
            files_read=files,
        )
        for frame in _coalesce(frames, batch_size):
            h, p = _hash_ids(frame["event_id"])
            hashes.append(h)
            present.append(p)
            valid, failed, batch_summary = validate_batch(frame, window, seen)
            summary = merge_summaries(summary, batch_summary)
            counts["rows_read"] += len(frame)
            counts["rows_valid"] += len(valid)
            counts["rows_quarantined"] += len(failed)
            if len(valid):
                validated.write_part(store, (part.number, written), _table(valid, FRAME_SCHEMA))
                written += 1
            if len(failed):
                sink.write(_table(failed, QUARANTINE_SCHEMA))
        if counts["rows_read"] != part.rows:
            raise LandingInputError(
                f"part {part.number}: {counts['rows_read']} rows of the window read, {part.rows} counted when "
                "the window was planned into parts: the landing changed in between. Clear the run's "
                "plan_parts task (and what follows) so the window is planned again; nothing was sent."
            )
    ids = pa.array(
        np.concatenate(hashes) if hashes else np.zeros(0, np.uint64),
        mask=~np.concatenate(present) if present else None,
        type=pa.uint64(),
    )
    store.write_table(pa.table({"hash": ids}), *_part_dir(part.number), "ids.parquet")
    log.info(
        "extract part %d (%d file(s)): %d read, %d valid, %d quarantined",
        part.number,
        len(files),
        counts["rows_read"],
        counts["rows_valid"],
        counts["rows_quarantined"],
    )
    return {
        "part": part.number,
        "first_row": part.first_row,
        **counts,
        "validation": summary or empty_summary(),
        "files": [[f.uri, f.size, f.mtime] for f in files],
    }


def _seen_of(hashes: np.ndarray) -> SeenEventIds:
    """A SeenEventIds holding these (sorted, distinct) hashes: the window's ids, for the look-back."""
    seen = SeenEventIds()
    seen._hashes = hashes
    return seen


def _ordered(rules: list[str]) -> list[str]:
    return sorted(set(rules), key=SUITE_ORDER.index)


def _mark_duplicates(quarantined: pa.Table, moved: list[pa.Table], dup_rows: pa.Array) -> pa.Table:
    """The part's quarantine with its rows of `dup_rows` failing the duplicate rule too, plus the `moved`
    valid rows, which fail only that rule; in row order."""
    hit = pc.is_in(quarantined.column("_row"), value_set=dup_rows)
    tables = [quarantined.filter(pc.invert(hit))]
    again = quarantined.filter(hit)
    if again.num_rows:
        names = [_ordered([*r, DUPLICATE_RULE]) for r in again.column("failed_expectations").to_pylist()]
        again = again.set_column(
            again.schema.get_field_index("failed_expectations"),
            "failed_expectations",
            pa.array(names, pa.list_(pa.string())),
        ).set_column(
            again.schema.get_field_index("reason"),
            "reason",
            pa.array(["; ".join(RULES[n] for n in r) for r in names], pa.string()),
        )
        tables.append(again)
    for table in moved:
        n = table.num_rows
        tables.append(
            table.append_column(
                "failed_expectations", pa.array([[DUPLICATE_RULE]] * n, pa.list_(pa.string()))
            ).append_column("reason", pa.array([RULES[DUPLICATE_RULE]] * n, pa.string()))
        )
    return pa.concat_tables([t.cast(QUARANTINE_SCHEMA) for t in tables]).sort_by("_row")


def _with_duplicates(summary: dict, duplicates: int, newly_failed: int) -> dict:
    if not duplicates:
        return summary
    summary = {**summary, "expectations": {k: dict(v) for k, v in summary["expectations"].items()}}
    rule = summary["expectations"].setdefault(DUPLICATE_RULE, {"unexpected": 0, "success": True})
    rule["unexpected"] += duplicates
    rule["success"] = False
    summary["rows_failed"] += newly_failed
    summary["success"] = False
    return summary


def seal(store: RunStore, results: list[dict], sink, outcome_frames: list, counts: dict) -> tuple:
    """Join the parts' outputs in part order (see the module docstring). Adds to `counts`, writes the
    quarantine to `sink` and its outcomes to `outcome_frames`; returns (GX summary, the window's event id
    hashes sorted and distinct, files read)."""
    results = sorted(results, key=lambda r: r["part"])
    numbers = {r["part"] for r in results}
    validated.reset_claims(store)
    validated.remove_parts(store, [n for n in validated.parts(store) if not _part_file_of(n, numbers)])
    seen, summary, files = np.zeros(0, np.uint64), None, []
    for result in results:
        number = result["part"]
        ids = store.read_table(*_part_dir(number), "ids.parquet").column("hash").combine_chunks()
        present = ids.is_valid().to_numpy(zero_copy_only=False)
        hashes = ids.fill_null(0).to_numpy()
        if len(seen):
            pos = np.searchsorted(seen, hashes).clip(max=len(seen) - 1)
            earlier = present & (seen[pos] == hashes)
        else:
            earlier = np.zeros(len(hashes), dtype=bool)
        quarantined = store.read_table(*_part_dir(number), "quarantine.parquet")
        moved: list[pa.Table] = []
        if earlier.any():
            dup_rows = pa.array(result["first_row"] + np.flatnonzero(earlier), pa.int64())
            for name in validated.parts_of(store, number):
                table = validated.read_extracted(store, name)
                hit = pc.is_in(table.column("_row"), value_set=dup_rows)
                if pc.any(hit).as_py():
                    moved.append(table.filter(hit))
                    validated.replace_part(store, name, table.filter(pc.invert(hit)))
            quarantined = _mark_duplicates(quarantined, moved, dup_rows)
        n_moved = sum(t.num_rows for t in moved)
        counts["rows_read"] += result["rows_read"]
        counts["rows_valid"] += result["rows_valid"] - n_moved
        counts["rows_quarantined"] += result["rows_quarantined"] + n_moved
        if result["rows_read"]:  # an empty part's summary has no rule details to add
            summary = merge_summaries(
                summary, _with_duplicates(result["validation"], int(earlier.sum()), n_moved)
            )
        if quarantined.num_rows:
            sink.write(quarantined)
            outcome_frames.append(quarantine_outcomes(quarantined.to_pandas()))
        seen = np.union1d(seen, hashes[present])
        files.extend(result["files"])
    return summary, seen, files


def clear(store: RunStore) -> None:
    """Remove every output of an earlier extract of the run (a new plan of its parts starts afresh)."""
    for output in (*_OUTPUTS, (PARTS_FOLDER,)):
        store.remove(*output)
    validated.clear(store)


def _part_file_of(name: str, numbers: set[int]) -> bool:
    return name.count("-") == 2 and validated.window_part_of(name) in numbers


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
    part_results: list[dict] | None = None,
    part_rows: int = window_parts.DEFAULT_PART_ROWS,
) -> dict:
    """Read and validate the window (and, with `lookback`, the late rows before it); returns
    `{"rows_read", "rows_valid", "rows_quarantined", "parts", "validation", "files", "late"}` (small and
    JSON-serialisable, for XCom). Rows of the window come first (`_row` 0..), late rows after them.
    `part_results`: what the parts' extract tasks returned (the window's parts were read already); without
    it the window is planned into parts of `part_rows` rows and each is read here, in turn.
    Raises `LandingError` on a corrupt file or a bad schema, before any part of the run is sent."""
    source = {
        "storage_options": storage_options,
        "partition_slack": partition_slack,
        "filesystem": filesystem,
    }
    if part_results is None:
        clear(store)
        planned = window_parts.plan_parts(landing_uri, window, store, max_rows=part_rows, **source)
        part_results = [
            extract_part(landing_uri, window, store, part, batch_size=batch_size, **source)
            for part in planned
        ]
    for output in _OUTPUTS:
        store.remove(*output)
    outcome_frames: list[pd.DataFrame] = []
    counts = {"rows_read": 0, "rows_valid": 0, "rows_quarantined": 0}
    late_files: list[LandingFile] = []
    late = {"rows": 0, "rows_known": 0, "files_read": 0, "files_skipped": 0, "seconds": 0.0}
    with _ParquetSink(store, "quarantine.parquet", QUARANTINE_SCHEMA) as quarantine:
        summary, seen, files = seal(store, part_results, quarantine, outcome_frames, counts)
        if lookback is not None:
            late_part = 1 + max((r["part"] for r in part_results), default=-1)
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
                select_files=select,
                files_read=late_files,
                **source,
            )
            late_seen, written = _seen_of(seen), 0
            for frame in _coalesce(_renumbered(frames, lookback.new_rows, counts, late), batch_size):
                valid, failed, batch_summary = validate_batch(frame, lookback.window, late_seen)
                summary = merge_summaries(summary, batch_summary)
                counts["rows_read"] += len(frame)
                counts["rows_valid"] += len(valid)
                counts["rows_quarantined"] += len(failed)
                if len(valid):
                    validated.write_part(store, (late_part, written), _table(valid, FRAME_SCHEMA))
                    written += 1
                if len(failed):
                    quarantine.write(_table(failed, QUARANTINE_SCHEMA))
                    outcome_frames.append(quarantine_outcomes(failed))
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
        len(part_results),
    )
    return {
        **counts,
        "parts": [f"{validated.FOLDER}/{n}" for n in validated.parts(store)],
        "window_parts": sorted({validated.window_part_of(n) for n in validated.parts(store)}),
        "validation": summary,
        "late": late,
        "files": files,
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
