"""`type_problems.parquet`: the values the mapping did not send because they cannot take their declared
type (mapping/types.py). This module owns the file; the mapping stage writes it, replacing an earlier
try's, and its summary goes to the run's stats (`type_problems`).

One line per value not sent:

| column | what |
|---|---|
| `kind` | `event` or `user` |
| `row`, `event_id` | the event's row; for a user update, its latest identify row (the traits are folded) |
| `uid` | the user, for a user update |
| `field` | the property (trait) name, as FullStory would have received it |
| `value` | the value, as JSON text (cut to 200 characters) |
| `declared_type` | the type the blueprint declares |

The row itself is still delivered, without that property.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from include.datafly_fullstory.state import RunStore

FILE = "type_problems.parquet"
SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("row", pa.int64()),
        ("event_id", pa.string()),
        ("uid", pa.string()),
        ("field", pa.string()),
        ("value", pa.string()),
        ("declared_type", pa.string()),
    ]
)


def table(problems: list[tuple]) -> pa.Table:
    """Problems as `TypeChecker` records them: (kind, row, event_id, uid, field, value, declared_type)."""
    if not problems:
        return SCHEMA.empty_table()
    columns = list(zip(*problems, strict=True))
    return pa.table(
        [pa.array(list(c), type=f.type) for c, f in zip(columns, SCHEMA, strict=True)], schema=SCHEMA
    )


def name_user_rows(problems: pa.Table, identify: pd.DataFrame) -> pa.Table:
    """User problems get their user's latest identify row and event id (identify columns: row, event_id,
    user_id, ts)."""
    if not problems.num_rows:
        return problems
    latest = identify.sort_values(["user_id", "ts", "row"], kind="stable").drop_duplicates(
        "user_id", keep="last"
    )
    by_uid = dict(zip(latest["user_id"], zip(latest["row"], latest["event_id"], strict=True), strict=True))
    found = [by_uid.get(u, (None, None)) for u in problems.column("uid").to_pylist()]
    rows = [None if r is None else int(r) for r, _ in found]
    event_ids = [e for _, e in found]
    problems = problems.set_column(1, "row", pa.array(rows, type=pa.int64()))
    return problems.set_column(2, "event_id", pa.array(event_ids, type=pa.string()))


def write(store: RunStore, parts: list[pa.Table]) -> pa.Table:
    """Write the run's report (an empty run removes an earlier try's file); returns the table."""
    report = pa.concat_tables(parts) if parts else SCHEMA.empty_table()
    if report.num_rows:
        store.write_table(report, FILE)
    elif store.exists(FILE):
        store.remove(FILE)
    return report


def read(store: RunStore) -> pa.Table:
    return store.read_table(FILE) if store.exists(FILE) else SCHEMA.empty_table()


def summary(report: pa.Table) -> dict:
    """For stats.json: values not sent, event rows and users concerned, and values per field."""
    if not report.num_rows:
        return {"values": 0, "events": 0, "users": 0, "fields": {}}
    df = report.to_pandas()
    events = df[df["kind"] == "event"]
    users = df[df["kind"] == "user"]
    fields = df.groupby(df["kind"] + ":" + df["field"]).size()
    return {
        "values": int(len(df)),
        "events": int(events["row"].nunique()),
        "users": int(users["uid"].nunique()),
        "fields": {str(k): int(v) for k, v in fields.items()},
    }


__all__ = ["FILE", "SCHEMA", "name_user_rows", "read", "summary", "table", "write"]
