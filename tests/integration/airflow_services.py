"""A real Airflow for tests: scheduler, dag-processor and api-server.

By default LocalExecutor with a SQLite metadata DB. With `executor="CeleryExecutor"` it takes a Postgres
metadata DB (`sql_alchemy_conn`) and a Redis broker (`broker_url`) and also starts one `airflow celery
worker` per name in `workers`. Each worker's task processes report its name as their hostname (see
`worker_hostname`), so `task_instance.hostname` tells workers on one machine apart.

Each component runs in its own process group, so stopping the group also ends the scheduler's and the
workers' child processes. Every wait is bounded; `stop()` leaves no process behind. `extra_env` overrides
every setting made here.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).parent / "airflow")
WORKER_NAME_ENV = "DFFS_CELERY_WORKER_NAME"


def worker_hostname() -> str:
    """`[core] hostname_callable` of the test workers: the worker's name (set per worker process in
    DFFS_CELERY_WORKER_NAME), else the machine's name as Airflow's default gives it. Workers on one
    machine would otherwise all record the same hostname."""
    return os.environ.get(WORKER_NAME_ENV) or socket.getfqdn()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AirflowServices:
    def __init__(
        self,
        home: Path,
        extra_env: dict[str, str],
        *,
        executor: str = "LocalExecutor",
        sql_alchemy_conn: str | None = None,
        broker_url: str | None = None,
        workers: Sequence[str] = (),
        worker_concurrency: int = 1,
    ):
        """`sql_alchemy_conn`: the metadata DB (default a SQLite file in `home`); `workers`: the names of
        the Celery workers to start (CeleryExecutor), each running `worker_concurrency` tasks at once."""
        if executor == "CeleryExecutor" and not (broker_url and workers):
            raise ValueError("CeleryExecutor needs a broker_url and at least one worker name")
        self.home = home
        self.port = free_port()
        self.db_path = home / "airflow.db"
        self.sql_alchemy_conn = sql_alchemy_conn or f"sqlite:///{self.db_path}"
        self.broker_url = broker_url
        self.workers = list(workers)
        self.worker_concurrency = worker_concurrency
        self.extra_env = dict(extra_env)
        celery = (
            {
                "AIRFLOW__CELERY__BROKER_URL": broker_url,
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(worker_concurrency),
                # One task reserved per free slot: queued tasks go to whichever worker is idle.
                "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
                "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "3600",
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.integration.airflow_services.worker_hostname",
            }
            if executor == "CeleryExecutor"
            else {}
        )
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_"))},
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
            # Airflow would derive an asyncpg URL for Postgres (not installed); psycopg 3 does async too.
            **(
                {}
                if self.sql_alchemy_conn.startswith("sqlite")
                else {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": self.sql_alchemy_conn}
            ),
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")]),
            **celery,
            **self.extra_env,
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def cli(self, *args: str, timeout: float = 120, attempts: int = 3) -> str:
        """An `airflow` command against the running services. SQLite (the test's metadata DB) has one
        writer at a time: a command that met the scheduler's write lock ("database is locked") is tried
        again, at most `attempts` times; any other failure raises at once."""
        for attempt in range(1, attempts + 1):
            result = subprocess.run(
                [AIRFLOW, *args], env=self.env, capture_output=True, text=True, timeout=timeout
            )
            if result.returncode == 0:
                return result.stdout
            if "database is locked" not in result.stderr or attempt == attempts:
                raise RuntimeError(
                    f"airflow {' '.join(args)} failed ({result.returncode}):\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
                )
            time.sleep(2 * attempt)
        raise AssertionError("unreachable")

    def start(self) -> AirflowServices:
        self.home.mkdir(parents=True, exist_ok=True)
        self.cli("db", "migrate", timeout=180)
        # The pool, connection and variables as a plain-Airflow user applies them (env vars still win).
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "airflow_settings.py")],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        for name in ("api-server", "dag-processor", "scheduler"):
            self._spawn(name, [AIRFLOW, name], self.env)
        for worker in self.workers:
            self._spawn(
                f"worker {worker}",
                [
                    *(AIRFLOW, "celery", "worker", "--celery-hostname", worker, "--queues", "default"),
                    *("--concurrency", str(self.worker_concurrency), "--skip-serve-logs"),
                    *("--without-mingle", "--without-gossip"),
                ],
                # The worker's name for worker_hostname; extra_env still overrides everything.
                {**self.env, WORKER_NAME_ENV: worker, **self.extra_env},
            )
        self.wait_for(self._api_up, 90, "the api-server to listen")
        if self.workers:
            self.wait_for(self._workers_up, 120, f"the Celery workers {self.workers} to answer a ping")
        return self

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        log = self.home / f"{name.replace(' ', '-')}.log"
        self.logs[name] = log
        with log.open("wb") as out:
            self.processes[name] = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _workers_up(self) -> bool:
        """Every worker answers a broadcast ping on the broker (Celery's remote control)."""
        from celery import Celery

        self._check_alive()
        app = Celery(broker=self.broker_url)
        try:
            replies = app.control.ping(timeout=1.0)
        finally:
            app.close()
        answered = {name.split("@", 1)[-1] for reply in replies for name in reply}
        return set(self.workers) <= answered

    def _api_up(self) -> bool:
        self._check_alive()
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"airflow {name} exited with {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, chars: int = 4000) -> str:
        log = self.logs.get(name)
        return log.read_text(errors="replace")[-chars:] if log and log.exists() else ""

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 1.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        logs = "\n".join(f"--- {n} ---\n{self.tail(n, 2500)}" for n in self.processes)
        raise TimeoutError(f"waited {timeout:.0f}s for {what}\n{logs}")

    def query(self, sql: str, *args) -> list[tuple]:
        """Rows from the metadata DB (`?` placeholders; on Postgres no other `%` in the SQL); [] while its
        tables are not there yet."""
        if not self.sql_alchemy_conn.startswith("sqlite"):
            return self._query_server(sql, args)
        if not self.db_path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []  # tables not there yet, or locked for a moment
        finally:
            conn.close()

    def _query_server(self, sql: str, args: tuple) -> list[tuple]:
        import sqlalchemy as sa

        engine = sa.create_engine(self.sql_alchemy_conn, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.exec_driver_sql(sql.replace("?", "%s"), args)]
        except sa.exc.ProgrammingError:
            return []  # tables not there yet
        finally:
            engine.dispose()

    def dag_runs(self, dag_id: str) -> list[tuple[str, str, str]]:
        """(run_id, run_type, state) of every run of the DAG."""
        return self.query("select run_id, run_type, state from dag_run where dag_id = ? order by id", dag_id)

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> None:
        self.wait_for(
            lambda: (self._check_alive(), self.query("select 1 from dag where dag_id = ?", dag_id))[1],
            timeout,
            f"the DAG {dag_id} to be parsed",
        )

    def wait_for_runs(self, dag_id: str, run_ids: set[str], timeout: float) -> dict[str, str]:
        def finished():
            self._check_alive()
            states = {r: s for r, _, s in self.dag_runs(dag_id) if r in run_ids}
            done = len(states) == len(run_ids) and all(s in ("success", "failed") for s in states.values())
            return states if done else None

        return self.wait_for(finished, timeout, f"runs {sorted(run_ids)} to finish", interval=2)

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.processes.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: the scheduler's idle workers too
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
