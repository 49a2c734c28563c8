"""Trait diffing end to end: the DAG's real tasks (sync_driver.py), real HTTP to the emulator, the SQLite
ledger. A user whose traits are unchanged since the update last delivered to the org gets no update (its
identify row is `skipped`, naming that run, and counted in `users.unchanged`); a changed trait is sent; an
update FullStory rejected is sent again by the next run, after which it is current. Typed traits arrive
typed, with their `schema` declaration."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory.sample import write_landing
from tests.integration.sync_driver import SyncDriver

H10 = datetime(2026, 11, 20, 10, tzinfo=UTC)
SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("type", pa.string()),
        ("event", pa.string()),
        ("name", pa.string()),
        ("anonymous_id", pa.string()),
        ("user_id", pa.string()),
        ("timestamp", pa.timestamp("ns", tz="UTC")),
        ("received_at", pa.timestamp("ns", tz="UTC")),
        ("sent_at", pa.timestamp("ns", tz="UTC")),
        ("context", pa.string()),
        ("properties", pa.string()),
        ("traits", pa.string()),
        ("source_id", pa.string()),
    ]
)
# per window (hour after H10): uid -> traits of its identify call
TRAITS = [
    {
        "u-same": {"plan": "pro", "seats": 5},
        "u-changed": {"plan": "free", "seats": 1},
        "u-rejected": {"plan": "pro", "seats": 2},
    },
    {
        "u-same": {"seats": "5", "plan": "pro"},  # same once typed, other key order: unchanged
        "u-changed": {"plan": "pro", "seats": 1},
        "u-rejected": {"plan": "pro", "seats": 2},  # rejected last time: sent again
    },
    {
        "u-same": {"plan": "pro", "seats": 5},
        "u-changed": {"plan": "pro", "seats": 1},
        "u-rejected": {"plan": "pro", "seats": 2},  # delivered by the second run: unchanged now
    },
]


def landing_rows() -> pa.Table:
    rows = []
    for hour, users in enumerate(TRAITS):
        for k, (uid, traits) in enumerate(users.items()):
            ts = H10 + timedelta(hours=hour, minutes=10 + k)
            common = {
                "anonymous_id": f"dfid-{uid}",
                "user_id": uid,
                "timestamp": ts,
                "received_at": ts,
                "sent_at": ts,
                "context": json.dumps({"ip": "203.0.113.9"}),
                "source_id": "web-shop",
                "name": None,
            }
            rows.append(
                {**common, "event_id": f"id-{hour}-{uid}", "type": "identify", "event": None}
                | {"properties": None, "traits": json.dumps(traits)}
            )
            rows.append(
                {**common, "event_id": f"ev-{hour}-{uid}", "type": "track", "event": "Order Completed"}
                | {"properties": json.dumps({"order_id": 1000 + hour, "revenue": "90.00"}), "traits": None}
            )
    return pa.Table.from_pylist(rows, schema=SCHEMA)


@pytest.fixture
def driver(tmp_path, fullstory_emulator, monkeypatch):
    write_landing(landing_rows(), tmp_path / "landing")
    for name in ("AIRFLOW_CONN_FULLSTORY_DEFAULT", "AIRFLOW_CONN_DFFS_LEDGER"):
        monkeypatch.delenv(name, raising=False)
    yield SyncDriver(
        landing=tmp_path / "landing",
        state=tmp_path / "state",
        airflow_home=tmp_path,
        emulator=fullstory_emulator,
    )
    lg.dispose_engines()


def outcomes_of(driver: SyncDriver, run) -> dict[str, tuple[str, str]]:
    table = driver.store(run).read_table("outcomes.parquet").to_pylist()
    return {r["event_id"]: (r["outcome"], r["reason"]) for r in table}


def updates(emulator) -> dict[str, int]:
    return {u["uid"]: u["updates"] for u in emulator.users()}


def test_unchanged_traits_are_not_sent_changed_and_rejected_ones_are(driver, fullstory_emulator):
    fullstory_emulator.set_faults(reject_user_uids=["u-rejected"])
    first = driver.go(driver.new_run("h10", hour=H10))
    stats = first.xcom["summarise"]["stats"]
    assert stats["users"] == {"mapped": 3, "delivered": 2, "rejected": 1, "unchanged": 0}
    assert updates(fullstory_emulator) == {"u-same": 1, "u-changed": 1}
    same = next(u for u in fullstory_emulator.users() if u["uid"] == "u-same")
    assert same["properties"]["seats"] == 5 and same["schema"]["properties"]["seats"] == "int"

    fullstory_emulator.set_faults(reject_user_uids=[])
    second = driver.go(driver.new_run("h11", hour=H10 + timedelta(hours=1)))
    stats = second.xcom["summarise"]["stats"]
    assert not second.error and not stats["problems"]
    assert stats["users"] == {"mapped": 2, "delivered": 2, "rejected": 0, "unchanged": 1}
    assert updates(fullstory_emulator) == {"u-same": 1, "u-changed": 2, "u-rejected": 1}
    outcome = outcomes_of(driver, second)
    assert outcome["id-1-u-same"] == (
        "skipped",
        "traits unchanged since delivered by run h10: no user update sent",
    )
    assert outcome["id-1-u-changed"][0] == "delivered" and outcome["id-1-u-rejected"][0] == "delivered"
    assert outcome["ev-1-u-same"][0] == "delivered"  # the user's events are sent as always
    assert stats["rows"]["skipped"] == 1

    third = driver.go(driver.new_run("h12", hour=H10 + timedelta(hours=2)))
    stats = third.xcom["summarise"]["stats"]
    assert stats["users"]["unchanged"] == 3 and stats["users"]["mapped"] == 0
    assert updates(fullstory_emulator) == {"u-same": 1, "u-changed": 2, "u-rejected": 1}
    reasons = {e: r for e, (o, r) in outcomes_of(driver, third).items() if e.startswith("id-")}
    assert reasons == {
        "id-2-u-same": "traits unchanged since delivered by run h10: no user update sent",
        "id-2-u-changed": "traits unchanged since delivered by run h11: no user update sent",
        "id-2-u-rejected": "traits unchanged since delivered by run h11: no user update sent",
    }
    # typed event properties reached FullStory typed
    orders = [e for e in fullstory_emulator.events() if e["name"] == "purchase"]
    assert orders and all(e["properties"]["revenue"] == 90.0 for e in orders)
    assert all(isinstance(e["properties"]["order_id"], str) for e in orders)


def test_a_user_update_whose_delivery_failed_is_sent_again(driver, fullstory_emulator, monkeypatch):
    """The first run's delivery dies before its POST (and the run is not retried): its user updates were
    registered but never delivered, so the next window's identical traits are sent."""
    from include.datafly_fullstory.delivery import loop

    def die_before_post(name: str) -> None:
        if name == "before_post":
            raise RuntimeError("the worker died before the POST")

    monkeypatch.setattr(loop, "fault_point", die_before_post)
    first = driver.go(driver.new_run("h10", hour=H10))
    assert first.error is not None and updates(fullstory_emulator) == {}
    monkeypatch.setattr(loop, "fault_point", lambda name: None)
    second = driver.go(driver.new_run("h11", hour=H10 + timedelta(hours=1)))
    stats = second.xcom["summarise"]["stats"]
    assert stats["users"] == {"mapped": 3, "delivered": 3, "rejected": 0, "unchanged": 0}
    assert updates(fullstory_emulator) == {"u-same": 1, "u-changed": 1, "u-rejected": 1}
    # now delivered: the third window's identical traits are not sent
    third = driver.go(driver.new_run("h12", hour=H10 + timedelta(hours=2)))
    assert third.xcom["summarise"]["stats"]["users"]["unchanged"] == 3
