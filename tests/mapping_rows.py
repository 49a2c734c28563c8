"""Landing rows for mapping tests: a row dict, a landing frame from rows, and one batch mapped."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from include.datafly_fullstory.blueprint import load_blueprint
from include.datafly_fullstory.mapping import BatchMapper, MappingSettings

NOW = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
OLD = NOW - timedelta(hours=2)
SID = "5812340000000001:6723450000000002"
BLUEPRINT = load_blueprint()
BLUEPRINT_PATH = Path(BLUEPRINT.source)
# A GA4 purchase: its items[] and value/transaction_id spellings.
GA4_ORDER = {
    "transaction_id": "ORD-1",
    "value": 100.0,
    "currency": "EUR",
    "tax": 20.0,
    "shipping": 4.95,
    "items": [
        {"item_id": "P1", "item_name": "Boot", "item_category": "Shoes", "price": 60, "quantity": 1},
        {"item_id": "2", "item_name": "Hat", "price": 20.0, "quantity": 2},
    ],
}


def row(
    type_="track",
    event=None,
    *,
    properties=None,
    context=None,
    traits=None,
    user_id="user-1",
    ts=OLD,
    anonymous_id="dfid-1",
    name=None,
    event_id=None,
) -> dict:
    return {
        "type": type_,
        "event": event,
        "name": name,
        "anonymous_id": anonymous_id,
        "user_id": user_id,
        "timestamp": ts,
        "context": context,
        "properties": properties,
        "traits": traits,
        "event_id": event_id,
    }


def frame(rows: list[dict]) -> pd.DataFrame:
    """A landing frame (contracts.md) from row dicts; dict JSON fields are serialised."""
    records = []
    for i, r in enumerate(rows):
        rec = dict(r)
        for col in ("context", "properties", "traits"):
            if isinstance(rec[col], dict | list):
                rec[col] = json.dumps(rec[col])
        rec["event_id"] = rec["event_id"] or f"evt-{i}"
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True).dt.as_unit("ns")
    df["received_at"] = df["timestamp"]
    df["sent_at"] = df["timestamp"]
    df["source_id"] = "web-shop"
    df["_row"] = np.arange(len(df), dtype=np.int64)
    df["_file"] = "part-0.parquet"
    return df


def run(rows: list[dict], settings: dict | None = None, now: datetime = NOW, blueprint=BLUEPRINT):
    """Map rows; returns (event bodies by row, outcomes by row, user bodies with their rows)."""
    mapper = BatchMapper(blueprint, MappingSettings.from_dict(settings), now)
    batch = mapper.map_batch(frame(rows))
    bodies = {int(r): orjson.loads(line) for r, line in zip(batch.rows, batch.lines, strict=True)}
    outcomes = {int(r.row): (r.outcome, r.reason) for r in batch.outcomes.itertuples()}
    lines, (line_of, user_rows, _), user_outcomes = mapper.fold_users(batch.identify)
    users = [
        (orjson.loads(line), sorted(int(r) for r in user_rows[line_of == i])) for i, line in enumerate(lines)
    ]
    for r in user_outcomes.itertuples():
        outcomes[int(r.row)] = (r.outcome, r.reason)
    return bodies, outcomes, users


def one(r: dict, **kwargs) -> dict:
    bodies, outcomes, _ = run([r], **kwargs)
    assert 0 in bodies, outcomes
    return bodies[0]


def fate(r: dict, **kwargs) -> tuple[str, str]:
    bodies, outcomes, _ = run([r], **kwargs)
    assert 0 not in bodies, bodies
    return outcomes[0]
