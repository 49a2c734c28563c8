"""The delivery registry: which events were delivered or rejected, by any earlier run of a window.

FullStory has no content dedupe and keeps idempotency keys for 24 hours only, so exactly-once across
runs is ours to keep. After each run, the summarise step records every row that reached FullStory
(delivered or rejected) under `registry/<window>/<run_id>.parquet`. Before mapping, a new run of an
overlapping window looks its rows up by `event_id`:

- delivered earlier -> outcome `delivered` (reason names the run), not sent again;
- rejected earlier -> outcome `rejected` with the earlier reason, unless `replay_dead_letters`, in which
  case the row is mapped and sent again (in new chunks, so under new idempotency keys);
- `force` skips the lookup: the window is re-sent as it is, with its original idempotency keys, so
  FullStory replays its stored answers instead of creating duplicates.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from include.datafly_fullstory import outcomes
from include.datafly_fullstory.state import RunStore, safe_run_id
from include.datafly_fullstory.window import Window

SCHEMA = pa.schema([("event_id", pa.string()), ("outcome", pa.string()), ("reason", pa.string()),
                    ("kind", pa.string()), ("run_id", pa.string()), ("recorded_at", pa.float64())])
_STAMP = "%Y%m%dT%H%M%S"


def _folder(window: Window) -> str:
    return f"{window.start:{_STAMP}}Z_{window.end:{_STAMP}}Z"


def _parse_folder(name: str) -> Window | None:
    try:
        start, end = name.split("_")
        return Window(datetime.strptime(start, _STAMP + "Z").replace(tzinfo=UTC),
                      datetime.strptime(end, _STAMP + "Z").replace(tzinfo=UTC))
    except ValueError:
        return None


def _area(store: RunStore, folder: str = "") -> RunStore:
    return RunStore(store.state_uri, folder, area="registry")


def record(store: RunStore, window: Window, merged_outcomes: pa.Table) -> int:
    """Record the rows of a finished run that reached FullStory. Returns how many were recorded."""
    reached = merged_outcomes.filter(pc.is_in(merged_outcomes.column("outcome"),
                                              pa.array(["delivered", "rejected"])))
    reached = reached.filter(pc.is_valid(reached.column("event_id")))
    table = pa.table({
        "event_id": reached.column("event_id"),
        "outcome": reached.column("outcome"),
        "reason": reached.column("reason"),
        "kind": reached.column("kind"),
        "run_id": pa.array([store.run_id] * reached.num_rows, pa.string()),
        "recorded_at": pa.array([time.time()] * reached.num_rows, pa.float64()),
    }, schema=SCHEMA)
    _area(store, _folder(window)).write_table(table, f"{safe_run_id(store.run_id)}.parquet")
    return table.num_rows


def lookup(store: RunStore, window: Window) -> pd.DataFrame:
    """The latest recorded outcome of every event_id recorded by another run of an overlapping window;
    `delivered` wins over a later `rejected` (it reached FullStory once already)."""
    root, mine = _area(store), f"{safe_run_id(store.run_id)}.parquet"
    tables = []
    for folder in root.list():
        other = _parse_folder(folder)
        if other is None or other.end <= window.start or other.start >= window.end:
            continue
        area = _area(store, folder)
        tables += [area.read_table(name).cast(SCHEMA) for name in area.list(suffix=".parquet") if name != mine]
    if not tables:
        return pd.DataFrame(columns=SCHEMA.names)
    df = pa.concat_tables(tables).to_pandas()
    df["_delivered"] = df["outcome"].eq("delivered")
    df = df.sort_values(["event_id", "_delivered", "recorded_at"])
    return df.drop_duplicates("event_id", keep="last").drop(columns="_delivered")


def apply(store: RunStore, window: Window, *, force: bool, replay_dead_letters: bool) -> dict[str, int]:
    """Take rows that reached FullStory in an earlier run out of `validated/`, giving them their outcome
    in `outcomes/registry.parquet`. Runs right after the extract stage rewrote `validated/`, so it can
    start from scratch each time. Returns counts for the log."""
    counts = {"already_delivered": 0, "already_rejected": 0, "replayed": 0}
    store.remove("outcomes", "registry.parquet")
    if force:
        return counts
    earlier = lookup(store, window)
    if earlier.empty:
        return counts
    earlier = earlier.set_index("event_id")
    taken = []
    for part in store.list("validated", suffix=".parquet"):
        table = store.read_table("validated", part)
        ids = table.column("event_id")
        hit = pc.is_in(ids, value_set=pa.array(earlier.index.to_numpy(dtype=object), pa.string()))
        if not pc.any(hit).as_py():
            continue
        rows = table.filter(hit).select(["_row", "event_id"]).to_pandas()
        prior = earlier.loc[rows["event_id"]].reset_index()
        rows = rows.assign(outcome=prior["outcome"].to_numpy(), prior_reason=prior["reason"].to_numpy(),
                           kind=prior["kind"].to_numpy(), prior_run=prior["run_id"].to_numpy())
        replay = rows["outcome"].eq("rejected") & replay_dead_letters
        counts["replayed"] += int(replay.sum())
        keep = hit if not replay.any() else _mark_replayed(hit, rows, replay)
        store.write_table(table.filter(pc.invert(keep)), "validated", part)
        taken.append(rows[~replay])
    if taken:
        rows = pd.concat(taken, ignore_index=True)
        counts["already_delivered"] = int(rows["outcome"].eq("delivered").sum())
        counts["already_rejected"] = int(rows["outcome"].eq("rejected").sum())
        reason = pd.Series(
            "delivered earlier by run " + rows["prior_run"].astype(str) + " (set force to re-send)",
            index=rows.index)
        rejected = rows["outcome"].eq("rejected")
        reason[rejected] = ("rejected earlier by run " + rows["prior_run"].astype(str) + ": "
                            + rows["prior_reason"].fillna("").astype(str)
                            + " (fix the cause, then set replay_dead_letters)")[rejected]
        outcomes.write_outcomes(store, "registry", pd.DataFrame({
            "row": rows["_row"], "event_id": rows["event_id"], "outcome": rows["outcome"], "reason": reason,
            "kind": rows["kind"], "chunk": None}))
    return counts


def _mark_replayed(hit: pa.ChunkedArray, rows: pd.DataFrame, replay: pd.Series) -> pa.Array:
    """The hit mask without the rows to replay (they stay in validated/ and are mapped again)."""
    import numpy as np

    mask = hit.to_numpy(zero_copy_only=False).copy()
    positions = np.flatnonzero(mask)
    mask[positions[replay.to_numpy()]] = False
    return pa.array(mask)
