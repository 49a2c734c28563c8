"""The plan task under a multi-worker executor: Airflow's real `[core] executor` setting reaches the
location checks (include/datafly_fullstory/run.py), so a run with local folders and the SQLite ledger fails
at `plan`, before anything is read or sent, naming what to set; with an explicit shared mount it plans."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from include.datafly_fullstory.sample import generate_landing

ROOT = Path(__file__).resolve().parents[2]
START = datetime(2026, 11, 20, 10, tzinfo=UTC)


@pytest.fixture(scope="module")
def dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    dag = bag.dags["datafly_fullstory_sync"]
    for task in dag.tasks:  # a failing task fails its run at once instead of waiting out retry delays
        task.retries = 0
    return dag


@pytest.fixture
def on_celery(tmp_path, monkeypatch, fullstory_emulator):
    """Local landing and state folders, the emulator's connection, and Airflow configured for Celery."""
    generate_landing(tmp_path / "landing", 200, START, hours=1, seed=5)
    conn = {
        "conn_type": "http",
        "host": fullstory_emulator.base_url,
        "password": fullstory_emulator.api_key,
        "extra": {"org_id": fullstory_emulator.org_id, "data_region": "na1"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_FULLSTORY_DEFAULT", json.dumps(conn))
    monkeypatch.setenv("AIRFLOW_VAR_DATAFLY_LANDING_URI", str(tmp_path / "landing"))
    monkeypatch.setenv("AIRFLOW_VAR_DATAFLY_FULLSTORY_STATE_URI", str(tmp_path / "state"))
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
    return tmp_path


def _run(dag):
    conf = {
        **{name: dag.params[name] for name in dag.params},
        "window_start": START.isoformat(),
        "window_end": (START + timedelta(hours=1)).isoformat(),
    }
    dr = dag.test(run_conf=conf)
    return dr, {ti.task_id: ti for ti in dr.get_task_instances()}


def test_local_folders_and_the_sqlite_ledger_fail_a_celery_run_at_plan(
    dag, on_celery, fullstory_emulator, capfd
):
    dr, tis = _run(dag)
    assert dr.state == "failed"
    assert tis["plan"].state == "failed" and tis["plan"].try_number == 1  # a person's fix, not a retry's
    assert tis["extract_and_validate"].state == "upstream_failed"
    assert not (on_celery / "state").exists() and fullstory_emulator.requests()["total"] == 0
    log = capfd.readouterr().out
    assert "the executor is CeleryExecutor, which may run this run's tasks on different machines" in log
    for said in (
        f"the state location {on_celery / 'state'} is a folder on the worker's own disk",
        "Set the Airflow Variable datafly_fullstory_state_uri to an object-store URI",
        f"the landing {on_celery / 'landing'} (datafly_landing_uri) is a folder",
        "Set the Airflow Variable datafly_fullstory_ledger_conn_id to a Postgres connection",
    ):
        assert said in log


def test_a_shared_mount_lets_a_celery_run_plan_with_local_folders(dag, on_celery, monkeypatch):
    monkeypatch.setenv("AIRFLOW_VAR_DATAFLY_FULLSTORY_SHARED_MOUNT", "true")
    monkeypatch.setenv("AIRFLOW_VAR_DATAFLY_FULLSTORY_LEDGER_CONN_ID", "dffs_ledger_not_used_here")
    _, tis = _run(dag)
    assert tis["plan"].state == "success"
