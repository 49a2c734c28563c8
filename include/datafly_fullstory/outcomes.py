"""Per-row outcomes: every input row of a window ends with exactly one.

Each stage writes its own partial files under `outcomes/` (quarantine, mapping, delivery-<chunk>);
`merge_outcomes` joins them into `outcomes.parquet` and refuses to produce a file in which a row has
no outcome or two.
"""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from include.datafly_fullstory.errors import OutcomeError
from include.datafly_fullstory.state import RunStore

OUTCOMES = ("delivered", "rejected", "quarantined", "filtered", "skipped", "dry_run", "pending", "unknown")
# `pending`: the row has not reached FullStory yet: this run's delivery stopped part-way (auth error,
# retries exhausted; clearing the failed delivery task resumes it), or another run claimed the row and
# delivers it. `unknown`: the row was sent, the answer was lost and FullStory's key for it expired, or
# FullStory counted an error it did not name: a person checks FullStory (the reason says how).
KINDS = ("event", "user")

SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("event_id", pa.string()),
        ("outcome", pa.string()),
        ("reason", pa.string()),
        ("kind", pa.string()),
        ("chunk", pa.string()),
    ]
)


def frame(row, event_id, outcome, reason, kind=None, chunk=None) -> pd.DataFrame:
    """An outcome frame in SCHEMA's column order: `row` and `event_id` are arrays of equal length; the other
    fields are an array of that length or one value for every row. Every stage builds its outcomes here."""
    return pd.DataFrame(
        {
            "row": row,
            "event_id": event_id,
            "outcome": outcome,
            "reason": reason,
            "kind": kind,
            "chunk": chunk,
        },
        columns=SCHEMA.names,
    )


def to_table(df: pd.DataFrame) -> pa.Table:
    """An outcome frame (columns of SCHEMA; missing optional ones become null) as a typed table."""
    unknown = set(df["outcome"].dropna().unique()) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"unknown outcome(s) {sorted(unknown)}; expected one of {OUTCOMES}")
    if df["outcome"].isna().any():
        raise ValueError("an outcome row has no outcome")
    frame = df.reindex(columns=SCHEMA.names)
    return pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False)


def write_outcomes(store: RunStore, name: str, outcomes: pd.DataFrame | pa.Table) -> None:
    """Write one stage's partial outcomes as `outcomes/<name>.parquet` (atomic, replaces a previous try)."""
    table = outcomes.cast(SCHEMA) if isinstance(outcomes, pa.Table) else to_table(outcomes)
    store.write_table(table, "outcomes", f"{name}.parquet")


def partials(store: RunStore) -> list[str]:
    """The names of the stage files written so far (`quarantine`, `mapping`, `delivery-<chunk>`, ...)."""
    return [n.removesuffix(".parquet") for n in store.list("outcomes", suffix=".parquet")]


def read_partial(store: RunStore, name: str, columns: list[str] | None = None) -> pa.Table | None:
    """One stage's outcomes, or None when that stage wrote none."""
    if not has_partial(store, name):
        return None
    return store.read_table("outcomes", f"{name}.parquet", columns=columns)


def has_partial(store: RunStore, name: str) -> bool:
    return store.exists("outcomes", f"{name}.parquet")


def remove_partial(store: RunStore, name: str) -> None:
    store.remove("outcomes", f"{name}.parquet")


def remove_delivery_outcomes(store: RunStore) -> None:
    """Delivery rewrites its outcome files from the ledger: a new mapping of the run starts without them."""
    for name in partials(store):
        if name.startswith("delivery-"):
            remove_partial(store, name)


def read_partials(store: RunStore) -> pa.Table:
    names = store.list("outcomes", suffix=".parquet")
    if not names:
        return SCHEMA.empty_table()
    return pa.concat_tables([store.read_table("outcomes", n).cast(SCHEMA) for n in names])


def merge_outcomes(store: RunStore, rows_read: int, *, pending_reason: str | None = None) -> pa.Table:
    """Join the partial outcome files into `outcomes.parquet`, checking that rows 0..rows_read-1 each
    have exactly one outcome. With `pending_reason` (delivery stopped part-way), rows still without one
    get outcome `pending` with that reason instead of failing. Returns the merged table."""
    table = read_partials(store)
    rows = table.column("row")
    if table.num_rows:
        counts = pc.value_counts(rows)
        values = counts.field("values")
        dup_mask = pc.greater(counts.field("counts"), 1)
        dups = pc.filter(values, dup_mask).to_pylist()[:10]
        if dups:
            raise OutcomeError(f"rows with more than one outcome (first 10): {dups}")
    if pending_reason is not None and table.num_rows < rows_read:
        table = pa.concat_tables([table, _pending(table, rows_read, pending_reason)])
    present = table.num_rows
    if present != rows_read:
        seen = set(rows.to_pylist()) if present < 5_000_000 else None
        missing = [r for r in range(rows_read) if seen is not None and r not in seen][:10]
        raise OutcomeError(
            f"{rows_read} rows were read but {present} have an outcome; rows without one (first 10): {missing}"
        )
    if table.num_rows:
        if pc.min(rows).as_py() < 0 or pc.max(rows).as_py() >= rows_read:
            raise OutcomeError(f"outcome rows outside 0..{rows_read - 1}")
        table = table.sort_by("row")
    store.write_table(table, "outcomes.parquet")
    return table


def _pending(table: pa.Table, rows_read: int, reason: str) -> pa.Table:
    import numpy as np

    have = np.zeros(rows_read, dtype=bool)
    rows = table.column("row").to_numpy()
    have[rows[(rows >= 0) & (rows < rows_read)]] = True
    missing = np.flatnonzero(~have)
    return pa.table(
        {
            "row": pa.array(missing, pa.int64()),
            "event_id": pa.nulls(len(missing), pa.string()),
            "outcome": pa.array(["pending"] * len(missing), pa.string()),
            "reason": pa.array([reason] * len(missing), pa.string()),
            "kind": pa.nulls(len(missing), pa.string()),
            "chunk": pa.nulls(len(missing), pa.string()),
        },
        schema=SCHEMA,
    )


def iter_merged(store: RunStore, columns: list[str], batch_size: int = 65_536) -> Iterator[pa.RecordBatch]:
    """`outcomes.parquet` as record batches of the given columns, so a reader of a 10M-row run holds one
    batch at a time (the run report's group-bys)."""
    import pyarrow.parquet as pq

    with store.fs.open(store.path("outcomes.parquet"), "rb") as fh:
        yield from pq.ParquetFile(fh).iter_batches(batch_size=batch_size, columns=columns)


def count_by_outcome(table: pa.Table) -> dict[str, int]:
    counts = {name: 0 for name in OUTCOMES}
    if table.num_rows:
        for item in pc.value_counts(table.column("outcome")).to_pylist():
            counts[item["values"]] = item["counts"]
    return counts
