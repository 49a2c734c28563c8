"""Late identity stitching, exactly once: the DAG's real tasks (sync_driver.py) against the real emulator.

Hour 10 holds anonymous events of a visitor (no user_id, no FullStory session id) who identifies only in
hour 11. Hour 10's run skips them for want of identity; hour 11's run learns the visitor's user, its
look-back reads hour 10's unchanged file again and delivers those rows, stitched to the user, once; hour
12's run delivers nothing more. Killed at a fault point in hour 11's delivery and retried, still once.
Counted in the emulator by `datafly_event_id`.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory.landing import CANONICAL_COLUMNS, TIMESTAMP_COLUMNS
from include.datafly_fullstory.sample import LandingSpec, generate_table, write_landing
from tests.integration.sync_driver import driver_for
from tests.integration.test_exactly_once import assert_no_duplicates, kill_at, ledger_states

H10 = datetime(2026, 11, 20, 10, tzinfo=UTC)
VISITOR, USER = "dfid-visitor-1", "u-visitor-1"
ANONYMOUS = [f"anon-visit-{i}" for i in range(4)]  # hour 10: the visitor's anonymous events


def _row(event_id, type_, ts, *, user=None, traits=None, event=None) -> dict:
    return {
        "event_id": event_id,
        "type": type_,
        "event": event,
        "name": "Home" if type_ == "page" else None,
        "anonymous_id": VISITOR,
        "user_id": user,
        "timestamp": ts,
        "received_at": ts,
        "sent_at": ts,
        "context": orjson.dumps({"page": {"url": "https://shop.example.com/"}}).decode(),
        "properties": "{}",
        "traits": orjson.dumps(traits).decode() if traits else None,
        "source_id": "web-shop",
    }


def visitor_rows() -> pa.Table:
    rows = [
        _row(e, "page" if i % 2 else "track", H10 + timedelta(minutes=5 + i), event="Product Added")
        for i, e in enumerate(ANONYMOUS)
    ]
    rows.append(
        _row(
            "visit-identify",
            "identify",
            H10 + timedelta(hours=1, minutes=20),
            user=USER,
            traits={"email": "v@x"},
        )
    )
    columns = {c: [r[c] for r in rows] for c in CANONICAL_COLUMNS}
    return pa.table(
        {
            c: pa.array(v, pa.timestamp("ns", tz="UTC") if c in TIMESTAMP_COLUMNS else pa.string())
            for c, v in columns.items()
        }
    )


@pytest.fixture(params=["sqlite"])
def driver(request, tmp_path, fullstory_emulator, monkeypatch):
    background = generate_table(
        LandingSpec(rows=240, start=H10, end=H10 + timedelta(hours=3), seed=11, bad_fraction=0.0)
    )
    extra = visitor_rows().cast(background.select(CANONICAL_COLUMNS).schema)
    table = pa.concat_tables([background.select(CANONICAL_COLUMNS), extra]).sort_by("timestamp")
    write_landing(table, tmp_path / "landing")
    # one users chunk and one events chunk per run: the kill below hits the events one
    d = driver_for(request, tmp_path, fullstory_emulator, monkeypatch, max_items=500)
    yield d
    lg.dispose_engines()


def delivered_ids(emulator) -> Counter:
    return Counter(e["properties"]["datafly_event_id"] for e in emulator.events())


def outcomes_of(driver, run) -> dict[str, tuple[str, str]]:
    table = pq.read_table(driver.store(run).path("outcomes.parquet"))
    return {r["event_id"]: (r["outcome"], r["reason"]) for r in table.to_pylist()}


def late_stitching(driver, emulator, monkeypatch, kill: str | None) -> None:
    first = driver.go(driver.new_run("h10", hour=H10))
    assert first.killed_in is None, first.error
    stats1 = first.xcom["summarise"]["stats"]
    assert stats1["identity"]["anonymous_unidentified"] >= len(ANONYMOUS)
    outcomes1 = outcomes_of(driver, first)
    assert all(
        outcomes1[e][0] == "skipped" and "no FullStory identification" in outcomes1[e][1] for e in ANONYMOUS
    )
    assert not set(ANONYMOUS) & set(delivered_ids(emulator))
    assert all(ledger_states(driver)[e] == lg.SKIPPED for e in ANONYMOUS)

    if kill:
        kill_at(monkeypatch, kill, occurrence=2)  # the events chunk, carrying the stitched rows
    second = driver.go(driver.new_run("h11", hour=H10 + timedelta(hours=1)))
    if kill:
        assert second.killed_in and second.killed_in.startswith("deliver_"), (second.killed_in, second.error)
        monkeypatch.undo()  # the fault is gone; the task is retried as Airflow would
        second = driver.retry(second)
    assert second.killed_in is None, second.error
    stats2 = second.xcom["summarise"]["stats"]
    if kill:  # the killed events chunk was sent again under its key, or its job resumed: not re-imported
        assert stats2["delivery"]["reposted"] + stats2["delivery"]["resumed"] == 1
    assert stats2["identity"]["stitched_late"] == len(ANONYMOUS)
    assert stats2["late"]["rows_identified"] == len(ANONYMOUS)  # read again from hour 10's unchanged file
    assert stats2["late"]["rows"] >= len(ANONYMOUS) and stats2["late"]["files_read"] >= 1
    outcomes2 = outcomes_of(driver, second)
    for e in ANONYMOUS:
        outcome, reason = outcomes2[e]
        assert outcome == "delivered"
        assert (
            f"stitched: anonymous_id {VISITOR} -> user {USER} (learned from event visit-identify)" in reason
        )
    held = delivered_ids(emulator)
    assert all(held[e] == 1 for e in ANONYMOUS)
    stitched = [e for e in emulator.events(ident=USER) if e["properties"]["datafly_event_id"] in ANONYMOUS]
    assert len(stitched) == len(ANONYMOUS)
    assert all(ledger_states(driver)[e] == lg.DELIVERED for e in ANONYMOUS)

    third = driver.go(driver.new_run("h12", hour=H10 + timedelta(hours=2)))
    assert third.killed_in is None, third.error
    stats3 = third.xcom["summarise"]["stats"]
    assert stats3["identity"]["stitched_late"] == 0 and stats3["late"]["rows"] == 0
    assert stats3["late"]["files_read"] == 0
    assert all(delivered_ids(emulator)[e] == 1 for e in ANONYMOUS)
    assert_no_duplicates(emulator, driver)


@pytest.mark.parametrize("driver", ["sqlite", "postgres"], indirect=True)
def test_rows_skipped_for_identity_are_delivered_once_when_a_later_run_learns_it(
    driver, fullstory_emulator, monkeypatch
):
    late_stitching(driver, fullstory_emulator, monkeypatch, kill=None)


@pytest.mark.parametrize("kill", ["after_post", "while_polling"])
def test_late_stitching_killed_mid_delivery_and_retried_delivers_once(
    kill, driver, fullstory_emulator, monkeypatch
):
    late_stitching(driver, fullstory_emulator, monkeypatch, kill=kill)
