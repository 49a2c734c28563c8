"""The airflow_settings.yaml loader against a real (throwaway) metadata DB."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import airflow_settings  # noqa: E402


def test_committed_file_follows_the_astro_schema():
    settings = airflow_settings.load_settings(ROOT / "airflow_settings.yaml")
    conn = settings["connections"][0]
    assert conn["conn_id"] == "fullstory_default" and conn["conn_type"] == "fullstory"
    assert set(conn["conn_extra"]) == {"org_id", "data_region"}
    assert [p["pool_name"] for p in settings["pools"]] == ["fullstory_api"]
    assert {v["variable_name"] for v in settings["variables"]} == {
        "datafly_landing_uri",
        "datafly_fullstory_state_uri",
    }


def test_bad_files_name_the_entry(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("airflow:\n  pools:\n    - pool_name: p\n      pool_slot: 0\n")
    with pytest.raises(airflow_settings.SettingsError, match=r"airflow.pools\[0\] needs .* pool_slot > 0"):
        airflow_settings.load_settings(bad)


def test_applying_twice_leaves_the_same_state(airflow_db):
    from airflow.models import Connection, Pool, Variable
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    for _ in range(2):
        airflow_settings.apply_settings(ROOT / "airflow_settings.yaml")
    with create_session() as session:
        assert (
            session.scalar(
                select(func.count()).select_from(Connection).where(Connection.conn_id == "fullstory_default")
            )
            == 1
        )
        conn = session.scalar(select(Connection).where(Connection.conn_id == "fullstory_default"))
        assert conn.extra_dejson == {"org_id": "o-LOCAL-na1", "data_region": "na1"}
        assert session.scalar(select(Pool).where(Pool.pool == "fullstory_api")).slots == 4
        assert (
            session.scalar(
                select(func.count()).select_from(Variable).where(Variable.key == "datafly_landing_uri")
            )
            == 1
        )


def test_command_line(airflow_db, tmp_path):
    # Its own copy of the session's metadata DB: an Airflow process of an earlier test (a scheduler's worker
    # ending) may still hold the shared file's lock, which is not what this test is about.
    with (
        sqlite3.connect(airflow_db / "airflow.db") as source,
        sqlite3.connect(tmp_path / "airflow.db") as copy,
    ):
        source.backup(copy)  # a consistent snapshot, WAL included
    env = {**os.environ, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'airflow.db'}"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "airflow_settings.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, f"exit {out.returncode}:\n{out.stderr[-3000:]}"
    assert "1 connections, 1 pools, 2 variables" in out.stdout
