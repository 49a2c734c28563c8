"""Exactly once across runs: earlier runs' delivered and rejected rows, looked up by event_id."""

from datetime import UTC, datetime, timedelta

import pandas as pd
import pyarrow as pa

from include.datafly_fullstory import outcomes, registry
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.window import Window

H = datetime(2026, 11, 20, 10, tzinfo=UTC)
HOUR = Window(H, H + timedelta(hours=1))


def _validated(store, ids):
    store.write_table(pa.table({"event_id": ids, "_row": list(range(len(ids))), "type": ["track"] * len(ids)}),
                      "validated", "part-00000.parquet")


def _finished_run(tmp_path, run_id, window, rows):
    store = RunStore(str(tmp_path), run_id)
    merged = outcomes.to_table(pd.DataFrame(rows, columns=["row", "event_id", "outcome", "reason"]).assign(
        kind="event", chunk="events-00000"))
    return registry.record(store, window, merged)


def test_rerun_sends_nothing_already_delivered_and_keeps_rejections(tmp_path):
    assert _finished_run(tmp_path, "run1", HOUR, [
        (0, "a", "delivered", None), (1, "b", "rejected", "invalid_property: x"),
        (2, "c", "filtered", "consent"), (3, "d", "quarantined", "dup")]) == 2
    store = RunStore(str(tmp_path), "run2")
    _validated(store, ["a", "b", "c", "e"])
    counts = registry.apply(store, HOUR, force=False, replay_dead_letters=False)
    assert counts == {"already_delivered": 1, "already_rejected": 1, "replayed": 0}
    left = store.read_table("validated", "part-00000.parquet").column("event_id").to_pylist()
    assert left == ["c", "e"]  # filtered / new rows are mapped again
    got = store.read_table("outcomes", "registry.parquet").to_pandas().set_index("event_id")
    assert got.loc["a", "outcome"] == "delivered" and "run1" in got.loc["a", "reason"]
    assert got.loc["b", "outcome"] == "rejected" and "invalid_property: x" in got.loc["b", "reason"]
    assert "replay_dead_letters" in got.loc["b", "reason"]


def test_replay_dead_letters_sends_rejections_again(tmp_path):
    _finished_run(tmp_path, "run1", HOUR, [(0, "a", "delivered", None), (1, "b", "rejected", "bad")])
    store = RunStore(str(tmp_path), "run2")
    _validated(store, ["a", "b"])
    counts = registry.apply(store, HOUR, force=False, replay_dead_letters=True)
    assert counts["replayed"] == 1 and counts["already_delivered"] == 1
    assert store.read_table("validated", "part-00000.parquet").column("event_id").to_pylist() == ["b"]


def test_delivered_wins_and_force_skips_the_lookup(tmp_path):
    _finished_run(tmp_path, "run1", HOUR, [(0, "b", "rejected", "bad")])
    _finished_run(tmp_path, "run2", HOUR, [(0, "b", "delivered", None)])
    _finished_run(tmp_path, "run3", HOUR, [(0, "b", "rejected", "bad again")])
    store = RunStore(str(tmp_path), "run4")
    assert registry.lookup(store, HOUR).set_index("event_id").loc["b", "run_id"] == "run2"
    _validated(store, ["b"])
    assert registry.apply(store, HOUR, force=True, replay_dead_letters=False)["already_delivered"] == 0
    assert store.read_table("validated", "part-00000.parquet").num_rows == 1


def test_only_overlapping_windows_count_and_a_run_ignores_itself(tmp_path):
    _finished_run(tmp_path, "other-hour", Window(H + timedelta(hours=1), H + timedelta(hours=2)),
                  [(0, "a", "delivered", None)])
    _finished_run(tmp_path, "run5", HOUR, [(0, "b", "delivered", None)])
    assert registry.lookup(RunStore(str(tmp_path), "run5"), HOUR).empty
    wide = Window(H, H + timedelta(hours=3))
    assert set(registry.lookup(RunStore(str(tmp_path), "manual"), wide)["event_id"]) == {"a", "b"}
