"""A FullStory connection whose API key holds a line break, through the DAG's real tasks: delivery fails with
a message saying what to fix, and no part of the key reaches the exception, the delivery stop record,
stats.json or the task log."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import pytest

from fullstory_provider.exceptions import FullStoryConfigError
from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory.delivery import stops
from include.datafly_fullstory.sample import LandingSpec, generate_table, write_landing
from tests.integration.sync_driver import SyncDriver

H10 = datetime(2026, 11, 20, 10, tzinfo=UTC)
KEY_PARTS = ("na1.KEYPARTone", "KEYPARTtwo/zz")


def test_a_key_with_a_line_break_fails_delivery_without_leaking(
    tmp_path, fullstory_emulator, monkeypatch, caplog
):
    caplog.set_level(logging.DEBUG)
    table = generate_table(
        LandingSpec(rows=60, start=H10, end=H10 + timedelta(hours=1), seed=3, bad_fraction=0)
    )
    write_landing(table, tmp_path / "landing")
    monkeypatch.delenv("AIRFLOW_CONN_DFFS_LEDGER", raising=False)
    driver = SyncDriver(
        landing=tmp_path / "landing",
        state=tmp_path / "state",
        airflow_home=tmp_path,
        emulator=fullstory_emulator,
    )
    emu = fullstory_emulator
    conn = {
        "conn_type": "http",
        "host": emu.base_url,
        "password": "\n".join(KEY_PARTS),
        "extra": {"org_id": emu.org_id, "data_region": emu.region},
    }
    monkeypatch.setenv("AIRFLOW_CONN_FULLSTORY_DEFAULT", json.dumps(conn))
    try:
        run = driver.go(driver.new_run("h10", hour=H10))
        assert run.error is not None and run.killed_in.startswith("deliver_")
        with pytest.raises(FullStoryConfigError) as info:  # the users task again, as a retry would run it
            driver.execute(run, "deliver_users[0]")
    finally:
        lg.dispose_engines()
    assert "summarise" in run.xcom  # the run finished, reporting the stop
    error = f"{type(info.value).__name__}: {info.value}"
    assert "the API key contains a line break" in error and "re-enter the Server API key" in error
    store = driver.store(run)
    stop_records = stops.read_stops(store)
    assert any("the API key contains a line break" in s for s in stop_records)
    stats = store.read_json("stats.json")
    assert any("the API key contains a line break" in p for p in stats["problems"])
    assert emu.events() == [] and emu.users() == []  # nothing was sent
    texts = {
        "exception": error + repr(info.value.args) + f"{run.error}",
        "stop records": "\n".join(stop_records),
        "stats.json": json.dumps(stats),
        "task log": caplog.text,
    }
    for where, text in texts.items():
        for part in KEY_PARTS:
            assert part not in text, f"{where} shows part of the key"
        assert "KEYPART" not in text, where
