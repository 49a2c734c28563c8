"""Real `dag.test()` runs of the sync DAG against the real emulator over HTTP, on a generated landing.

Every run is reconciled: each input row has exactly one outcome, what the emulator holds equals the
delivered outcomes, and the stats add up.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from include.datafly_fullstory.sample import LandingSpec, generate_table, write_landing
from include.datafly_fullstory.state import RunStore

ROOT = Path(__file__).resolve().parents[2]
START = datetime(2026, 11, 20, 10, tzinfo=UTC)
HOURS = 3
ROWS = 2400


@pytest.fixture(scope="module")
def landing(tmp_path_factory):
    table = generate_table(
        LandingSpec(rows=ROWS, start=START, end=START + timedelta(hours=HOURS), seed=31, bad_fraction=0.01)
    )
    folder = tmp_path_factory.mktemp("landing")
    write_landing(table, folder)
    return folder, table


@pytest.fixture(scope="module")
def dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["datafly_fullstory_sync"]
    # dag.test(run_conf=...) writes the conf into the DAG object's params, so every run passes them all.
    dag.default_conf = {name: dag.params[name] for name in dag.params}
    for task in dag.tasks:  # a failing task fails its run at once instead of waiting out retry delays
        task.retries = 0
    return dag


@pytest.fixture
def env(monkeypatch, tmp_path, landing, fullstory_emulator):
    """Connection and variables as users set them, pointing at the emulator and a fresh state store."""

    def configure(api_key=None):
        conn = {
            "conn_type": "http",
            "host": fullstory_emulator.base_url,
            "password": api_key or fullstory_emulator.api_key,
            "extra": {"org_id": fullstory_emulator.org_id, "data_region": "na1"},
        }
        monkeypatch.setenv("AIRFLOW_CONN_FULLSTORY_DEFAULT", json.dumps(conn))

    configure()
    monkeypatch.setenv("AIRFLOW_VAR_DATAFLY_LANDING_URI", str(landing[0]))
    monkeypatch.setenv("AIRFLOW_VAR_DATAFLY_FULLSTORY_STATE_URI", str(tmp_path / "state"))
    return tmp_path / "state", configure


def run_window(dag, hour: int, hours: int = 1, **conf):
    """One dag.test() run of the window [START+hour, START+hour+hours)."""
    if hours == 1 and not conf:  # as scheduled: the data interval is the hour that ended at the logical date
        return dag.test(logical_date=START + timedelta(hours=hour + 1), run_conf=dict(dag.default_conf))
    conf = {
        **dag.default_conf,
        "window_start": (START + timedelta(hours=hour)).isoformat(),
        "window_end": (START + timedelta(hours=hour + hours)).isoformat(),
        **conf,
    }
    return dag.test(run_conf=conf)


def artifacts(state_dir: Path, run_id: str):
    store = RunStore(str(state_dir), run_id)
    stats = orjson.loads(store.read_bytes("stats.json"))
    outcomes = pq.read_table(store.path("outcomes.parquet"))
    return stats, outcomes, store


def rows_in(table, hour: int, hours: int = 1) -> int:
    ts = table.column("timestamp")
    lo, hi = START + timedelta(hours=hour), START + timedelta(hours=hour + hours)
    return pc.sum(pc.and_(pc.greater_equal(ts, lo), pc.less(ts, hi))).as_py()


def delivered_ids(outcomes, kind="event") -> list[str]:
    mask = pc.and_(pc.equal(outcomes.column("outcome"), "delivered"), pc.equal(outcomes.column("kind"), kind))
    return outcomes.filter(mask).column("event_id").to_pylist()


def assert_reconciled(stats, outcomes, landing_table, hour, hours=1):
    # Besides its window, a run reads the look-back's rows skipped earlier for want of identity that its
    # window identified (late stitching).
    late = stats["late"].get("rows_identified", 0)
    assert outcomes.num_rows == stats["rows"]["read"] == rows_in(landing_table, hour, hours) + late
    assert outcomes.column("row").to_pylist() == list(range(outcomes.num_rows))  # one outcome per row
    assert stats["rows"]["read"] == sum(v for k, v in stats["rows"].items() if k != "read")
    assert stats["rows"]["delivered"] == len(delivered_ids(outcomes)) + len(delivered_ids(outcomes, "user"))


def test_hourly_windows_deliver_every_row_once(dag, env, landing, fullstory_emulator):
    state_dir, _ = env
    table = landing[1]
    delivered_events = []
    for hour in range(HOURS):
        dr = run_window(dag, hour)
        assert dr.state == "success"
        stats, outcomes, _ = artifacts(state_dir, dr.run_id)
        assert stats["window_start"] == (START + timedelta(hours=hour)).isoformat()
        assert_reconciled(stats, outcomes, table, hour)
        assert stats["events"]["delivered"] == len(delivered_ids(outcomes)) > 0
        assert stats["rows"]["quarantined"] > 0 and stats["rows"]["skipped"] > 0
        # A duplicated event_id has one outcome per copy: the first goes on, the copy is quarantined.
        ids = outcomes.column("event_id").to_pylist()
        dups = {i for i in ids if i is not None and ids.count(i) > 1}
        for dup in dups:
            fates = outcomes.filter(pc.equal(outcomes.column("event_id"), dup)).column("outcome").to_pylist()
            assert "quarantined" in fates and len(fates) == 2
        delivered_events += delivered_ids(outcomes)
    held = fullstory_emulator.events()
    assert sorted(e["properties"]["datafly_event_id"] for e in held) == sorted(delivered_events)
    assert fullstory_emulator.state()["idempotency"]["replays"] == 0


def test_rerun_sends_nothing_and_force_replays_with_the_same_keys(dag, env, landing, fullstory_emulator):
    state_dir, _ = env
    first = run_window(dag, 0, hours=2)
    assert first.state == "success"
    stats1, outcomes1, _ = artifacts(state_dir, first.run_id)
    assert_reconciled(stats1, outcomes1, landing[1], 0, 2)
    held, posts = fullstory_emulator.state()["events"], fullstory_emulator.requests()["total"]

    again = run_window(dag, 0, hours=2)
    stats2, outcomes2, _ = artifacts(state_dir, again.run_id)
    assert again.state == "success" and fullstory_emulator.requests()["total"] == posts  # nothing sent
    assert stats2["rows"]["delivered"] == stats1["rows"]["delivered"]
    assert stats2["previously"]["already_delivered"] == stats1["rows"]["delivered"]
    reasons = (
        outcomes2.filter(pc.equal(outcomes2.column("outcome"), "delivered")).column("reason").to_pylist()
    )
    assert all(f"delivered earlier by run {first.run_id}" in r for r in reasons)

    forced = run_window(dag, 0, hours=2, force=True)
    stats3, outcomes3, store3 = artifacts(state_dir, forced.run_id)
    assert forced.state == "success" and stats3["batches"] == stats1["batches"] > 0
    replays = fullstory_emulator.state()["idempotency"]["replays"]
    assert replays == stats1["batches"]  # every chunk was a replay ...
    assert fullstory_emulator.state()["events"] == held  # ... and nothing was imported twice
    assert sorted(delivered_ids(outcomes3)) == sorted(delivered_ids(outcomes1))


def test_rejections_wait_in_dead_letters_and_replay_once_fixed(dag, env, landing, fullstory_emulator):
    state_dir, _ = env
    fullstory_emulator.set_faults(reject_event_names=["purchase"], reject_code="invalid_argument")
    failed = run_window(dag, 1, max_rejected_ratio=0.03)
    stats, outcomes, store = artifacts(state_dir, failed.run_id)
    rejected = stats["events"]["rejected"]
    assert rejected > 0 and stats["rows"]["rejected"] == rejected
    # Above the threshold: the run fails and says which threshold; the artifacts are all there.
    assert failed.state == "failed" and rejected / stats["rows"]["read"] > 0.03
    assert any("max_rejected_ratio" in p for p in stats["problems"])
    dead = pq.read_table(store.path("dead_letters.parquet"))
    assert dead.num_rows == rejected and set(dead.column("code").to_pylist()) == {"invalid_argument"}
    assert_reconciled(stats, outcomes, landing[1], 1)

    fullstory_emulator.set_faults(reject_event_names=[])
    replay = run_window(dag, 1, replay_dead_letters=True)
    stats2, outcomes2, _ = artifacts(state_dir, replay.run_id)
    assert replay.state == "success"
    assert (
        stats2["previously"]["replayed_dead_letters"] == rejected
        and stats2["events"]["delivered"] == rejected
    )
    assert stats2["rows"]["rejected"] == 0
    held = {e["properties"]["datafly_event_id"] for e in fullstory_emulator.events(name="purchase")}
    dead_ids = set(dead.column("event_ids").combine_chunks().flatten().to_pylist())
    assert dead_ids and dead_ids <= held  # the dead letters became deliveries
    assert len(fullstory_emulator.events()) == len(
        set(e["properties"]["datafly_event_id"] for e in fullstory_emulator.events())
    )


def test_dry_run_sends_nothing_and_records_every_row(dag, env, landing, fullstory_emulator):
    state_dir, _ = env
    dr = run_window(dag, 2, dry_run=True, event_types=["page", "purchase"])
    stats, outcomes, store = artifacts(state_dir, dr.run_id)
    assert dr.state == "success" and stats["dry_run"] is True
    assert fullstory_emulator.requests()["total"] == 0
    assert_reconciled(stats, outcomes, landing[1], 2)
    assert stats["rows"]["dry_run"] > 0 and stats["rows"]["delivered"] == 0
    names = {
        orjson.loads(line)["name"]
        for c in store.list("payloads", suffix=".jsonl")
        if c.startswith("events")
        for line in store.iter_lines("payloads", c)
    }
    assert names <= {"page_view", "purchase"} and "page_view" in names


def test_a_wrong_key_fails_the_run_once_and_says_why(dag, env, landing, fullstory_emulator):
    state_dir, configure = env
    configure(api_key="na1.revoked-key/0000")
    dr = run_window(dag, 0)
    assert dr.state == "failed"
    assert fullstory_emulator.state()["events"] == 0
    assert fullstory_emulator.requests()["by_status"].get("401", 0) >= 1
    stats, outcomes, store = artifacts(state_dir, dr.run_id)
    # Rows that were on their way have a visible outcome, with the reason and what to do.
    assert stats["rows"]["pending"] > 0 and stats["rows"]["delivered"] == 0
    assert_reconciled(stats, outcomes, landing[1], 0)
    problem = " ".join(stats["problems"])
    assert "Invalid API key: regenerate the Server API key in Settings > API Keys" in problem
    assert "clear the failed delivery task" in problem
    summarise = next(ti for ti in dr.get_task_instances() if ti.task_id == "summarise")
    assert summarise.state == "failed" and summarise.try_number == 1  # a person's problem: no retries
    for path in Path(store.path()).rglob("*"):
        if path.is_file():
            assert b"revoked-key" not in path.read_bytes(), path


def test_an_empty_window_is_a_successful_run_with_zero_rows(dag, env, fullstory_emulator):
    state_dir, _ = env
    dr = run_window(dag, HOURS + 5, lookback_hours=0)  # no data then: both delivery expansions are empty
    assert dr.state == "success"
    stats, outcomes, _ = artifacts(state_dir, dr.run_id)
    assert stats["rows"]["read"] == outcomes.num_rows == 0 and stats["batches"] == 0
    assert stats["problems"] == [] and fullstory_emulator.requests()["total"] == 0


def test_landing_and_state_on_an_object_store(dag, env, landing, fullstory_emulator, monkeypatch):
    """The Kubernetes/Celery set-up: landing and run artifacts on S3 (a local moto server), reached only
    through the standard AWS environment, as a deployed worker would."""
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("datafly")
        fs.put(str(landing[0]) + "/", "datafly/landing/", recursive=True)
        monkeypatch.setenv("AIRFLOW_VAR_DATAFLY_LANDING_URI", "s3://datafly/landing")
        monkeypatch.setenv("AIRFLOW_VAR_DATAFLY_FULLSTORY_STATE_URI", "s3://datafly/state")

        dr = run_window(dag, 0)
        assert dr.state == "success"
        store = RunStore("s3://datafly/state", dr.run_id)
        stats = orjson.loads(store.read_bytes("stats.json"))
        outcomes = store.read_table("outcomes.parquet")
        assert_reconciled(stats, outcomes, landing[1], 0)
        assert stats["artifacts"].startswith("s3://datafly/state/runs/")
        assert fullstory_emulator.state()["events"] == stats["events"]["delivered"] > 0
        # The SQLite ledger default cannot live on S3: it is under AIRFLOW_HOME, and holds every delivery.
        import sqlalchemy as sa

        ledger = Path(os.environ["AIRFLOW_HOME"]) / "datafly_fullstory" / "ledger.sqlite"
        with sa.create_engine(f"sqlite:///{ledger}").connect() as conn:
            held = conn.execute(
                sa.text("select count(*) from dffs_items where state = 'delivered' and run_id = :r"),
                {"r": dr.run_id},
            ).scalar()
        assert held == stats["rows"]["delivered"]
    finally:
        server.stop()


def test_a_corrupt_landing_file_fails_at_once_naming_the_file(
    dag, env, landing, fullstory_emulator, tmp_path, monkeypatch
):
    import shutil

    broken = tmp_path / "broken-landing"
    shutil.copytree(landing[0], broken)
    bad = next(broken.glob("dt=*/hour=11/*.parquet"))
    data = bytearray(bad.read_bytes())
    data[200:600] = b"x" * 400  # corrupt pages inside an otherwise valid file
    bad.write_bytes(bytes(data))
    monkeypatch.setenv("AIRFLOW_VAR_DATAFLY_LANDING_URI", str(broken))
    dr = run_window(dag, 1)
    assert dr.state == "failed" and fullstory_emulator.requests()["total"] == 0
    failed = [ti for ti in dr.get_task_instances() if ti.state == "failed" and ti.task_id != "summarise"]
    # the part planning reads the time columns (or a part reads the rest) and stops at the corrupt file;
    # a retry cannot fix it
    assert [(ti.task_id, ti.try_number) for ti in failed] in ([("plan_parts", 1)], [("extract_part", 1)])
    extract = next(ti for ti in dr.get_task_instances() if ti.task_id == "extract_and_validate")
    assert extract.state == "upstream_failed"
    summarise = next(ti for ti in dr.get_task_instances() if ti.task_id == "summarise")
    assert summarise.state == "failed" and summarise.try_number == 1
