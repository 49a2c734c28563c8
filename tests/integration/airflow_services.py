"""A real Airflow for tests: scheduler, dag-processor and api-server (LocalExecutor, SQLite).

Each component runs in its own process group, so stopping the group also ends the scheduler's
worker processes. Every wait is bounded; `stop()` leaves no process behind.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).parent / "airflow")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AirflowServices:
    def __init__(self, home: Path, extra_env: dict[str, str]):
        self.home = home
        self.port = free_port()
        self.db_path = home / "airflow.db"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_"))},
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.db_path}",
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
            **extra_env,
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
            log = self.home / f"{name}.log"
            self.logs[name] = log
            self.processes[name] = subprocess.Popen(
                [AIRFLOW, name],
                env=self.env,
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_for(self._api_up, 90, "the api-server to listen")
        return self

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
        if not self.db_path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []  # tables not there yet, or locked for a moment
        finally:
            conn.close()

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
