"""A run folder and its ledger records as the mapping stage leaves them, for delivery tests.

Written through the format owners (chunks.ChunkWriter for chunk files and the manifest and indexes, the ledger for claims
and chunk records, claims.register_chunks for the manifest entries), never by hand, so a change of format
changes the tests with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import orjson

from include.datafly_fullstory import claims
from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory.chunks import MAX_BATCH_ITEMS, ChunkWriter, idempotency_key, write_manifest
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.window import Window

DESTINATION = "o-LOCAL-na1@na1"
WINDOW = {"start": "2026-03-01T10:00:00+00:00", "end": "2026-03-01T11:00:00+00:00"}


def write_run(
    store: RunStore,
    ledger: lg.Ledger,
    chunks: Mapping[str, Sequence[dict]],
    *,
    destination: str = DESTINATION,
    rows_per_item: int = 1,
    first_row: int = 0,
) -> list[dict]:
    """Write `chunks` ({"users-00000": [item, ...], "events-00000": [...]}) as the run's payloads, claim
    their rows in the ledger, register the chunks and write the manifest. Event items get the
    `datafly_event_id` property the mapping puts there (`ev-<row>` of their first row) unless they have
    one; user items carry the identify rows `ev-<row>`. Returns the manifest entries."""
    entries, row = [], first_row
    for name, items in chunks.items():
        kind, number = name.split("-")
        n = len(items)
        rows = np.arange(row, row + n * rows_per_item, dtype=np.int64)
        event_ids = np.array([f"ev-{r}" for r in rows], dtype=object)
        lines = []
        for i, item in enumerate(items):
            item = dict(item)
            if kind == "events":
                props = dict(item.get("properties") or {})
                props.setdefault("datafly_event_id", event_ids[i * rows_per_item])
                event_ids[i * rows_per_item : (i + 1) * rows_per_item] = props["datafly_event_id"]
                item["properties"] = props
            lines.append(orjson.dumps(item))
        if kind == "events" and rows_per_item > 1:
            raise ValueError("an event line carries one row")
        writer = ChunkWriter(
            store, kind, max_items=MAX_BATCH_ITEMS, max_bytes=8 * 1024 * 1024, first_number=int(number)
        )
        writer.add(lines, np.repeat(np.arange(n), rows_per_item), rows, event_ids)
        writer.flush()
        entry = writer.chunks[0]
        entry["idempotency_key"] = idempotency_key(
            store.run_id, Window.from_dict(WINDOW), kind, entry["name"], entry["sha256"]
        )
        ledger.insert_claims(
            destination,
            store.run_id,
            [lg.NewItem(str(e), "user" if kind == "users" else "event") for e in dict.fromkeys(event_ids)],
            window=(WINDOW["start"], WINDOW["end"]),
        )
        entries.append(entry)
        row += n * rows_per_item
    entries = claims.register_chunks(store, ledger, destination, entries)
    write_manifest(store, entries)
    return entries


def sqlite_ledger(tmp_path) -> lg.Ledger:
    return lg.Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
