"""The DAG on a distributed Airflow: CeleryExecutor with two workers, no shared disk between tasks.

Redis is the broker, Postgres the metadata DB and (in its own database) the delivery ledger, landing and
state are on S3 (moto's server), reached only through the standard AWS environment. One window of 150,000
rows maps into enough event chunks for several `deliver_events` tasks; each worker runs one task at a
time and reserves no more, so mapped tasks run on both. Everything is read back from where a deployment
keeps it: task hosts from the metadata DB, stats and outcomes from S3, claims from the Postgres ledger,
events from the emulator. Every wait is bounded; every process is stopped by its process group.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from celery_cluster import CeleryCluster

from include.datafly_fullstory.sample import generate_landing

START = datetime(2026, 11, 20, 10, tzinfo=UTC)
ROWS = 150_000
WORKERS = ("worker-a", "worker-b")

pytestmark = [pytest.mark.scheduler, pytest.mark.celery, pytest.mark.timeout(600)]


@pytest.fixture
def cluster(tmp_path, postgres_server, fullstory_emulator):
    generate_landing(tmp_path / "landing", ROWS, START, hours=1, seed=13, files_per_hour=4)
    with CeleryCluster(
        tmp_path / "cluster", postgres=postgres_server, emulator=fullstory_emulator, workers=WORKERS
    ) as cluster:
        cluster.upload_landing(tmp_path / "landing")
        yield cluster


def _logs(cluster) -> str:
    return "\n".join(f"--- {n} ---\n{cluster.airflow.tail(n, 2500)}" for n in cluster.airflow.processes)


def test_one_window_on_two_celery_workers(cluster, fullstory_emulator):
    # four landing files of ~37,500 rows, parts of at most 40,000 rows: four extract and four map tasks
    result = cluster.run(
        "celery_window_10h", (START, START + timedelta(hours=1)), timeout=420, part_rows=40_000
    )
    assert result.state == "success", (result.task_states, _logs(cluster))
    assert set(result.task_states.values()) == {"success"}, result.task_states

    # Mapped tasks (any map index) ran on both workers, as their task processes reported it.
    assert len(result.mapped_hosts) >= 3, result.mapped_hosts
    assert result.hosts == set(WORKERS), result.mapped_hosts
    assert sum(task == "deliver_events" for task, _ in result.mapped_hosts) >= 2
    # The window's parts were read, validated and mapped as tasks of their own, on both workers.
    for task in ("extract_part", "map_part"):
        assert sum(t == task for t, _ in result.mapped_hosts) == 4, result.mapped_hosts
    part_hosts = {host for (t, _), host in result.mapped_hosts.items() if t in ("extract_part", "map_part")}
    assert part_hosts == set(WORKERS), result.mapped_hosts

    # Every row has one outcome, and the outcomes add up to the rows read.
    rows = result.stats["rows"]
    assert result.outcome_rows == rows["read"] == ROWS
    assert sum(n for name, n in rows.items() if name != "read") == rows["read"]
    assert rows["delivered"] > 0.8 * ROWS and rows["pending"] == rows["unknown"] == 0
    assert result.stats["artifacts"].startswith("s3://datafly/state/runs/")

    # The emulator holds each delivered event once.
    assert result.duplicate_event_ids == {}
    assert result.events_held == result.stats["events"]["delivered"] == fullstory_emulator.state()["events"]

    # The ledger is the Postgres database, and it holds every delivered row of the run.
    ledger = sa.create_engine(cluster.ledger_url, poolclass=sa.pool.NullPool)
    with ledger.connect() as conn:
        delivered = conn.execute(
            sa.text("select count(*) from dffs_items where state = 'delivered' and run_id = :r"),
            {"r": result.run_id},
        ).scalar()
    ledger.dispose()
    assert delivered == rows["delivered"]
    # No worker fell back to a SQLite ledger of its own.
    assert not list((cluster.work / "airflow-home").rglob("*.sqlite"))
