"""The DAG under a real scheduler: a triggered run with conf, then a three-hour backfill.

Starts api-server, dag-processor and scheduler (LocalExecutor, SQLite) in a throwaway home, delivers
to the real emulator, and stops everything it started. Every wait is bounded.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import orjson
import pyarrow.parquet as pq
import pytest
from airflow_services import AirflowServices

from include.datafly_fullstory.sample import generate_landing
from include.datafly_fullstory.state import RunStore

DAG_ID = "datafly_fullstory_sync"
START = datetime(2026, 11, 20, 10, tzinfo=UTC)

pytestmark = [pytest.mark.scheduler, pytest.mark.timeout(600)]


@pytest.fixture
def airflow_services(tmp_path, fullstory_emulator):
    landing = tmp_path / "landing"
    generate_landing(landing, 1600, START, hours=4, seed=21)
    conn = {
        "conn_type": "http",
        "host": fullstory_emulator.base_url,
        "password": fullstory_emulator.api_key,
        "extra": {"org_id": fullstory_emulator.org_id, "data_region": "na1"},
    }
    services = AirflowServices(
        tmp_path / "airflow-home",
        {
            "AIRFLOW_CONN_FULLSTORY_DEFAULT": json.dumps(conn),
            "AIRFLOW_VAR_DATAFLY_LANDING_URI": str(landing),
            "AIRFLOW_VAR_DATAFLY_FULLSTORY_STATE_URI": str(tmp_path / "state"),
        },
    )
    try:
        services.start()
        services.wait_for_dag(DAG_ID)
        yield services, tmp_path / "state"
    finally:
        services.stop()


def _stats(state_dir, run_id) -> dict:
    store = RunStore(str(state_dir), run_id)
    stats = orjson.loads(store.read_bytes("stats.json"))
    outcomes = pq.read_table(store.path("outcomes.parquet"))
    assert outcomes.num_rows == stats["rows"]["read"] > 0
    assert stats["rows"]["read"] == sum(v for k, v in stats["rows"].items() if k != "read")
    return stats


def test_triggered_run_then_backfill(airflow_services, fullstory_emulator):
    services, state_dir = airflow_services
    services.cli("dags", "unpause", DAG_ID)

    conf = {
        "window_start": (START + timedelta(hours=3)).isoformat(),
        "window_end": (START + timedelta(hours=4)).isoformat(),
    }
    services.cli("dags", "trigger", DAG_ID, "--run-id", "manual_reprocess_13h", "--conf", json.dumps(conf))
    states = services.wait_for_runs(DAG_ID, {"manual_reprocess_13h"}, timeout=240)
    assert states == {"manual_reprocess_13h": "success"}, services.tail("scheduler")
    manual = _stats(state_dir, "manual_reprocess_13h")
    assert manual["window_start"] == conf["window_start"] and manual["events"]["delivered"] > 0
    delivered_once = fullstory_emulator.state()["events"]
    assert delivered_once == manual["events"]["delivered"]

    services.cli(
        "backfill",
        "create",
        "--dag-id",
        DAG_ID,
        "--from-date",
        START.isoformat(),
        "--to-date",
        (START + timedelta(hours=2)).isoformat(),
        "--max-active-runs",
        "1",
    )

    def three_backfill_runs():
        ids = {r for r, t, _ in services.dag_runs(DAG_ID) if t == "backfill"}
        return ids if len(ids) >= 3 else None

    backfill_ids = services.wait_for(three_backfill_runs, 60, "three backfill runs to be created")
    states = services.wait_for_runs(DAG_ID, backfill_ids, timeout=420)
    assert set(states.values()) == {"success"}, states
    windows = sorted(_stats(state_dir, r)["window_start"] for r in backfill_ids)
    assert windows == [(START + timedelta(hours=h)).isoformat() for h in range(3)]
    total = manual["events"]["delivered"] + sum(
        _stats(state_dir, r)["events"]["delivered"] for r in backfill_ids
    )
    assert fullstory_emulator.state()["events"] == total
