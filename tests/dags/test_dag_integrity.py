"""DAG policy over a real DagBag: no import errors, tags, retries, and parsing that touches nothing."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"


def _dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


@pytest.fixture(scope="module")
def dagbag():
    return _dagbag()


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}, "\n".join(f"{k}: {v}" for k, v in dagbag.import_errors.items())
    assert "datafly_fullstory_sync" in dagbag.dags


@pytest.mark.parametrize("dag_id", ["datafly_fullstory_sync"])
def test_tags_retries_and_docs(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.tags, f"{dag_id} has no tags"
    assert dag.doc_md and "FullStory" in dag.doc_md
    for t in dag.tasks:
        assert t.retries >= 2, f"{dag_id}.{t.task_id} has retries={t.retries}; the policy is >= 2"


def test_hourly_data_interval_timetable_utc(dagbag):
    from airflow.timetables.interval import CronDataIntervalTimetable

    dag = dagbag.dags["datafly_fullstory_sync"]
    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.timetable.summary in ("@hourly", "0 * * * *")
    assert str(dag.timezone) in ("UTC", "Timezone('UTC')")
    assert dag.catchup is False
    assert dag.max_active_runs >= 1


def test_params_are_typed_with_titles(dagbag):
    dag = dagbag.dags["datafly_fullstory_sync"]
    for name in ("window_start", "window_end", "dry_run", "event_types", "replay_dead_letters", "force",
                 "fullstory_conn_id"):
        param = dag.params.get_param(name)
        assert param.schema.get("type"), f"param {name} has no type"
        assert param.schema.get("title") and param.description, f"param {name} needs a title and a description"


def test_parsing_does_no_io(monkeypatch):
    """Parse with no connection and no variable set, with network and non-code file access recorded."""
    for key in list(os.environ):
        if key.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_")):
            monkeypatch.delenv(key)
    import airflow.dag_processing.dagbag  # noqa: F401  (import cost outside the audited window)
    import airflow.sdk  # noqa: F401

    seen: list[str] = []
    code_suffixes = (".py", ".pyc", ".so", ".pth", ".json", ".yaml", ".yml", ".cfg", ".txt", ".typed")

    def audit(event, args):
        if event == "socket.connect":
            seen.append(f"socket.connect {args[1]!r}")
        elif event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            path = os.fsdecode(args[0])
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
            if any(c in mode for c in "wax+"):
                seen.append(f"write {path}")
            elif not path.endswith(code_suffixes) and not os.path.isdir(path) and "/proc/" not in path:
                seen.append(f"read {path}")

    active = [True]
    sys.addaudithook(lambda e, a: audit(e, a) if active[0] else None)
    original_connect = socket.socket.connect
    try:
        bag = _dagbag()
    finally:
        active[0] = False
    assert socket.socket.connect is original_connect
    assert bag.import_errors == {}
    assert "datafly_fullstory_sync" in bag.dags
    assert [s for s in seen if "socket" in s or s.startswith("write")] == []
    assert [s for s in seen if str(ROOT) not in s and "site-packages" not in s and "/usr/" not in s] == []
