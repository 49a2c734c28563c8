"""Consent that fails closed, revocation and a too-deep row, through the DAG's real tasks (sync_driver):
real Parquet landing, real extract/map stages, the real ledger (SQLite and Postgres), real HTTP to the
emulator. What the emulator holds is the proof: nothing whose consent is not granted, or was revoked,
reaches it; every other row of the hour does."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory import outcomes
from include.datafly_fullstory.sample import LandingSpec, generate_table, write_landing
from tests.integration.sync_driver import SyncDriver

H10 = datetime(2026, 11, 20, 10, tzinfo=UTC)


def _row(template: dict, event_id: str, ts: datetime, *, user: str, anon: str, consent=None, **cols) -> dict:
    ctx = json.loads(template["context"])
    ctx.pop("consent", None)
    ctx.pop("fullstory", None)
    if consent is not None:
        ctx["consent"] = consent
    return {
        **template,
        "event_id": event_id,
        "type": "track",
        "event": "Consent Probe",
        "name": None,
        "user_id": user,
        "anonymous_id": anon,
        "timestamp": pd.Timestamp(ts),
        "received_at": pd.Timestamp(ts),
        "sent_at": pd.Timestamp(ts),
        "context": json.dumps(ctx),
        "properties": json.dumps({"probe": event_id}),
        "traits": None,
        **cols,
    }


DEEP = "[" * 300 + "]" * 300


@pytest.fixture
def landing(tmp_path):
    base = generate_table(
        LandingSpec(rows=240, start=H10, end=H10 + timedelta(hours=2), seed=11, bad_fraction=0)
    ).to_pandas()
    template = base.iloc[0].to_dict()
    m = lambda minutes: H10 + timedelta(minutes=minutes)  # noqa: E731
    probes = [
        # values that used to pass: all filtered now
        _row(template, "denied-cap", m(1), user="c1", anon="ac1", consent={"analytics": "Denied"}),
        _row(
            template, "false-cap", m(2), user="c2", anon="ac2", consent={"canonical": {"analytics": "FALSE"}}
        ),
        _row(template, "zero-text", m(3), user="c3", anon="ac3", consent={"analytics": "0"}),
        _row(template, "no-cap", m(4), user="c4", anon="ac4", consent={"analytics": "No"}),
        _row(template, "maybe", m(5), user="c5", anon="ac5", consent={"analytics": "maybe"}),
        _row(
            template, "cmp-targeting", m(6), user="c6", anon="ac6", consent={"categories": ["C0001", "C0004"]}
        ),
        # granted in odd spellings: sent
        _row(template, "yes-cap", m(7), user="g1", anon="ag1", consent={"analytics": "YES"}),
        _row(template, "cmp-perf", m(8), user="g2", anon="ag2", consent={"categories": ["C0001", "C0002"]}),
        # revoked within the window: r1's events before its denial at 10:40 stop; the one after is sent
        _row(template, "r1-a", m(10), user="r1", anon="ar1"),
        _row(template, "r1-b", m(20), user=None, anon="ar1"),  # same browser, before login
        _row(template, "r1-deny", m(40), user="r1", anon="ar1", consent={"analytics": False}),
        _row(template, "r1-after", m(50), user="r1", anon="ar1"),
        # a row nested 300 levels deep: rejected, the rest of the hour is mapped
        _row(template, "deep", m(30), user="d1", anon="ad1", properties=json.dumps({"x": json.loads(DEEP)})),
        # revoked in the next window (11:20), recorded in the ledger by hour 11's run
        _row(
            template, "r2-deny", m(80), user="r2", anon="ar2", consent={"canonical": {"analytics": "denied"}}
        ),
    ]
    table = pd.concat([base, pd.DataFrame(probes)], ignore_index=True)
    out = tmp_path / "landing"
    write_landing(pa.Table.from_pandas(table, schema=pa.Schema.from_pandas(base), preserve_index=False), out)
    late = pd.DataFrame([_row(template, "r2-late", m(15), user="r2", anon="ar2")])
    return out, pa.Table.from_pandas(late, schema=pa.Schema.from_pandas(base), preserve_index=False)


@pytest.fixture(params=["sqlite", "postgres"])
def driver(request, tmp_path, landing, fullstory_emulator, monkeypatch):
    for name in ("AIRFLOW_CONN_FULLSTORY_DEFAULT", "AIRFLOW_CONN_DFFS_LEDGER"):
        monkeypatch.delenv(name, raising=False)
    postgres_url = None
    if request.param == "postgres":
        postgres_url = request.getfixturevalue("postgres_server").new_database(f"cs_{uuid.uuid4().hex[:12]}")
    d = SyncDriver(
        landing=landing[0],
        state=tmp_path / "state",
        airflow_home=tmp_path,
        emulator=fullstory_emulator,
        postgres_url=postgres_url,
    )
    yield d
    lg.dispose_engines()


def _fates(driver, run) -> dict[str, tuple[str, str, str]]:
    table = outcomes.merge_outcomes(driver.store(run), run.xcom["extract"]["rows_read"]).to_pylist()
    return {t["event_id"]: (t["outcome"], t["reason"], t["kind"]) for t in table if t["event_id"]}


def test_consent_fails_closed_revocations_stop_rows_and_a_deep_row_is_rejected(
    driver, landing, fullstory_emulator
):
    h10 = driver.go(driver.new_run("h10", hour=H10))
    assert h10.error is None and "summarise" in h10.xcom, h10.error
    fates = _fates(driver, h10)
    for event_id in ("denied-cap", "false-cap", "zero-text", "no-cap", "maybe", "cmp-targeting"):
        assert fates[event_id][0] == "filtered", (event_id, fates[event_id])
    assert "'maybe'" in fates["maybe"][1] and "neither granted nor denied" in fates["maybe"][1]
    for event_id in ("r1-a", "r1-b"):
        assert (
            fates[event_id][0] == "filtered"
            and "consent revoked at 2026-11-20T10:40:00.000Z (row r1-deny)" in (fates[event_id][1])
        )
    outcome, reason, _ = fates["deep"]
    assert outcome == "rejected" and "properties is nested deeper than 64 levels" in reason
    held = {e["properties"]["datafly_event_id"] for e in fullstory_emulator.events()}
    assert {"yes-cap", "cmp-perf", "r1-after"} <= held
    never = {
        "denied-cap",
        "false-cap",
        "zero-text",
        "no-cap",
        "maybe",
        "cmp-targeting",
        "r1-a",
        "r1-b",
        "deep",
    }
    assert not never & held
    delivered = {e for e, (o, _, kind) in fates.items() if o == "delivered" and kind == "event"}
    assert delivered and delivered <= held  # every other row of the hour was mapped and sent

    h11 = driver.go(driver.new_run("h11", hour=H10 + timedelta(hours=1)))
    assert h11.error is None
    assert _fates(driver, h11)["r2-deny"][0] == "filtered"
    # r2's 10:15 event lands late, after hour 11's run recorded the denial at 11:20: the next run's look-back
    # reads it, and the ledger's consent table stops it.
    late_file = landing[0] / "dt=2026-11-20" / "hour=10" / "part-late.parquet"
    pq.write_table(landing[1], late_file)
    h12 = driver.go(driver.new_run("h12", hour=H10 + timedelta(hours=2)))
    assert h12.error is None
    assert h12.xcom["summarise"]["stats"]["late"]["rows"] == 1
    outcome, reason, _ = _fates(driver, h12)["r2-late"]
    assert outcome == "filtered" and "consent revoked at 2026-11-20T11:20:00.000Z (row r2-deny)" in reason
    held = {e["properties"]["datafly_event_id"] for e in fullstory_emulator.events()}
    assert "r2-late" not in held and not never & held
