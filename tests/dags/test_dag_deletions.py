"""Deletion requests through real `dag.test()` runs of the sync DAG against the real emulator: the params and
the Variable's file drive the `deletions` task; the deleted person's rows are filtered and never sent."""

# ruff: noqa: F811  (the fixtures dag, env and landing are imported from test_dag_run.py)
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from tests.dags.test_dag_run import (  # noqa: F401  (dag, env, landing are fixtures)
    START,
    artifacts,
    assert_reconciled,
    dag,
    env,
    landing,
    run_window,
)


def _deletes(emulator) -> dict:
    return emulator.requests()["by_path"].get("DELETE /v2/users", {})


def _rows_of(table, hour: int, uid: str) -> set[str]:
    df = table.to_pandas()
    lo = START.timestamp() + hour * 3600
    in_window = (df.timestamp.map(lambda t: t.timestamp()) >= lo) & (
        df.timestamp.map(lambda t: t.timestamp()) < lo + 3600
    )
    return set(df.event_id[in_window & (df.user_id == uid)].dropna())


def test_delete_user_ids_param_deletes_once_and_filters_the_person(
    dag, env, landing, fullstory_emulator, tmp_path, monkeypatch
):
    state_dir, _ = env
    table = landing[1]
    first_hour = table.filter(pc.less(table.column("timestamp"), START.replace(hour=START.hour + 1)))
    uid = first_hour.to_pandas().user_id.value_counts().index[0]
    source = tmp_path / "deletions.csv"
    source.write_text("anonymous_id\nnobody-anon\n")
    monkeypatch.setenv("AIRFLOW_VAR_DATAFLY_FULLSTORY_DELETIONS_URI", str(source))

    dr = run_window(dag, 0, delete_user_ids=[uid])
    assert dr.state == "success"
    stats, outcomes, _ = artifacts(state_dir, dr.run_id)
    assert_reconciled(stats, outcomes, table, 0)
    assert _deletes(fullstory_emulator) == {"200": 1}
    figures = stats["deletions"]
    assert (figures["requested"], figures["deleted"], figures["suppressed_ids"]) == (2, 1, 1)
    theirs = _rows_of(table, 0, uid)
    assert theirs
    fates = outcomes.filter(pc.is_in(outcomes.column("event_id"), value_set=pa.array(list(theirs))))
    assert set(fates.column("outcome").to_pylist()) == {"filtered"}
    assert all(r.startswith("deleted by request") for r in fates.column("reason").to_pylist())
    held = {e["properties"]["datafly_event_id"] for e in fullstory_emulator.events()}
    assert held and not held & theirs
    assert fullstory_emulator.users(uid=uid) == []

    again = run_window(dag, 1, delete_user_ids=[uid])
    assert again.state == "success"
    stats, _, _ = artifacts(state_dir, again.run_id)
    assert _deletes(fullstory_emulator) == {"200": 1}  # never deleted twice
    assert (stats["deletions"]["already_deleted"], stats["deletions"]["deleted"]) == (1, 0)
    held = {e["properties"]["datafly_event_id"] for e in fullstory_emulator.events()}
    assert not held & _rows_of(table, 1, uid)


def test_an_unusable_deletion_file_stops_the_run_before_mapping(
    dag, env, fullstory_emulator, tmp_path, monkeypatch
):
    source = tmp_path / "deletions.csv"
    source.write_text("user_id,email\nu-1,a@example.com\n")
    monkeypatch.setenv("AIRFLOW_VAR_DATAFLY_FULLSTORY_DELETIONS_URI", str(source))
    dr = run_window(dag, 0)
    assert dr.state == "failed"
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert states["deletions"] == "failed" and states["map_payloads"] == "upstream_failed"
    assert fullstory_emulator.requests()["total"] == 0  # nothing sent
