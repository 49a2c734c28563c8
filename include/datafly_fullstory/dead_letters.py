"""Dead letters: the items FullStory rejected, as sent, with its reason; this module writes and reads them.

Delivery writes one file per chunk (`dead_letters/<chunk>.parquet`: one row per rejected item of this
run's rows, plus errors that named no line, `item_index` -1); the summarise step joins them into the run
folder's `dead_letters.parquet`. An item is kept as sent (compact JSON), so it can be replayed once fixed.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from include.datafly_fullstory.state import RunStore

FOLDER = "dead_letters"
SCHEMA = pa.schema(
    [
        ("chunk", pa.string()),
        ("item_index", pa.int32()),  # line number in the chunk; -1 when the error matched no line
        ("kind", pa.string()),  # event | user
        ("code", pa.string()),
        ("message", pa.string()),
        ("item", pa.string()),  # the item as sent (compact JSON): replayable as is, once fixed
        ("rows", pa.list_(pa.int64())),
        ("event_ids", pa.list_(pa.string())),
        ("job_id", pa.string()),
        ("idempotency_key", pa.string()),
    ]
)


def write_chunk(store: RunStore, chunk_name: str, records: list[dict[str, Any]]) -> None:
    """One chunk's dead letters (records with SCHEMA's fields); replaces an earlier try's file."""
    store.write_table(pa.Table.from_pylist(records, schema=SCHEMA), FOLDER, f"{chunk_name}.parquet")


def read_chunk(store: RunStore, chunk_name: str) -> pa.Table:
    return store.read_table(FOLDER, f"{chunk_name}.parquet").cast(SCHEMA)


def clear(store: RunStore) -> None:
    """Remove the run's dead letters (the mapping stage starts them afresh)."""
    store.remove(FOLDER)


def merge(store: RunStore) -> int:
    """Join the per-chunk dead letters into `dead_letters.parquet`; returns how many there are."""
    names = store.list(FOLDER, suffix=".parquet")
    if not names:
        store.remove("dead_letters.parquet")
        return 0
    table = pa.concat_tables([store.read_table(FOLDER, n) for n in names], promote_options="default")
    store.write_table(table, "dead_letters.parquet")
    return table.num_rows


def read(store: RunStore) -> pa.Table:
    """The run's merged dead letters (empty when there are none)."""
    if not store.exists("dead_letters.parquet"):
        return SCHEMA.empty_table()
    return store.read_table("dead_letters.parquet").cast(SCHEMA)
