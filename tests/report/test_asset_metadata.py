"""The sync's Asset event carries the whole `stats.json` (README, docs/stats.md).

What Airflow takes as an asset event's extra: `dict[str, JsonValue]` in the Task SDK (OutletEventAccessor)
and the execution API, stored in a JSON column of the metadata database. Checked here on RunStats, and end
to end: a real `dag.test()` run of the DAG against the emulator, whose asset event, read back from
Airflow's database, equals the run's stats.json.
"""

from __future__ import annotations

import json
import math

import orjson
from pydantic import JsonValue, TypeAdapter

from include.datafly_fullstory.stats import ASSET_METADATA_MAX_BYTES, ASSET_METADATA_TRIM_TO, RunStats
from tests.dags.test_dag_run import artifacts, dag, env, landing, run_window  # noqa: F401 - fixtures

EXTRA = TypeAdapter(dict[str, JsonValue])


def full_stats() -> RunStats:
    stats = RunStats(
        dag_run_id="scheduled__2026-11-20T10:00:00+00:00",
        window_start="2026-11-20T10:00:00+00:00",
        window_end="2026-11-20T11:00:00+00:00",
        destination="o-LOCAL-na1@na1",
        duration_s=12.345,
        artifacts="/state/runs/scheduled__2026-11-20T10_00_00+00_00",
        events_by_name={"page_view": 93, "purchase": 25},
        identification={"uid": 54, "stitched": 81},
        validation={"expect_event_id_not_null": {"unexpected": 1, "success": False}, "gx_seconds": 0.4},
        late={"rows": 3, "beyond_lookback": {"files": 1, "examples": ["s3://landing/x.parquet"]}},
        problems=["25 of 293 rows (8.5%) rejected"],
        report={"path": "/state/runs/x/report.html", "error": None},
    )
    stats.add({"http": {"requests": 34, "retries": 2, "status_counts": {"200": 32, "429": 2}}, "batches": 4})
    stats.type_problems = {"values": 2, "events": 1, "users": 1, "fields": {"event:price": 1, "user:age": 1}}
    return stats


def test_the_metadata_is_the_whole_stats_document_as_json():
    stats = full_stats()
    meta = stats.asset_metadata()
    assert meta == json.loads(orjson.dumps(stats.asdict()))  # every key of stats.json, nothing left out
    assert set(meta) == set(stats.asdict())
    assert EXTRA.validate_python(meta) == meta
    json.dumps(meta, allow_nan=False)


def test_values_json_cannot_hold_become_json():
    stats = full_stats()
    stats.duration_s = math.nan
    stats.late = {"window": ("a", "b"), "seconds": math.inf}
    meta = stats.asset_metadata()
    assert meta["duration_s"] is None and meta["late"] == {"window": ["a", "b"], "seconds": None}
    assert EXTRA.validate_python(meta) == meta
    json.dumps(meta, allow_nan=False)


def test_open_ended_maps_are_trimmed_past_the_size_limit_and_say_so():
    stats = full_stats()
    stats.events_by_name = {f"custom event number {i:05d} with a long name": i for i in range(5000)}
    meta = stats.asset_metadata()
    assert len(orjson.dumps(meta)) <= ASSET_METADATA_MAX_BYTES
    assert len(meta["events_by_name"]) == ASSET_METADATA_TRIM_TO
    assert meta["trimmed"] == {"events_by_name": 5000 - ASSET_METADATA_TRIM_TO}
    assert min(meta["events_by_name"].values()) == 5000 - ASSET_METADATA_TRIM_TO  # the largest are kept
    assert meta["rows"] == stats.rows and meta["identification"] == stats.identification
    assert len(stats.asdict()["events_by_name"]) == 5000  # stats.json keeps them all


def test_a_dag_run_records_its_stats_as_the_asset_event(dag, env, fullstory_emulator):  # noqa: F811
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    state_dir, _ = env
    dr = run_window(dag, 0)
    assert dr.state == "success"
    stats, _, store = artifacts(state_dir, dr.run_id)
    with create_session() as session:
        (extra,) = session.scalars(
            select(AssetEvent.extra).where(AssetEvent.source_run_id == dr.run_id)
        ).all()
    assert extra == stats
    assert extra["rows"]["delivered"] > 0 and extra["events_by_name"] and extra["http"]["requests"] > 0
    assert extra["report"] == {"path": store.uri("report.html"), "error": None}
    assert store.exists("report.html")
    assert fullstory_emulator.api_key not in json.dumps(extra)
