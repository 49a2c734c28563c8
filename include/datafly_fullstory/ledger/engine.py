"""The ledger's databases: one engine per URL and process (SQLite's pragmas and locking, Postgres' pool),
and `LedgerBase`, what the ledger's operations stand on: transactions, the dialect's INSERT, and the
temporary batch table `dffs_batch` that makes them set-based (COPY and planner settings on Postgres)."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from include.datafly_fullstory.ledger.schema import LedgerError, metadata

_BATCH = 2000  # ids per IN (...) list: well under every backend's bound-parameter limit


# ---- engines --------------------------------------------------------------------------------------------

_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # Autocommit at the driver level; SQLAlchemy's "begin" event below opens BEGIN IMMEDIATE, so two
    # writers queue on the file lock instead of failing to upgrade a read lock (SQLite's deadlock).
    import sqlite3

    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA busy_timeout=60000")
    # Switching a fresh file to WAL fails at once while another connection writes (SQLite does not call
    # the busy handler for it): wait for the writer, boundedly, as the busy timeout would.
    deadline = time.monotonic() + 60
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA cache_size=-131072")  # 128 MiB of pages: a run's claims stay in memory
    cursor.execute("PRAGMA temp_store=MEMORY")  # the batch table
    cursor.close()


def engine_for(url: str) -> Engine:
    """One engine per URL and process (connection pools are per process)."""
    with _ENGINES_LOCK:
        engine = _ENGINES.get(url)
        if engine is None:
            engine = _make_engine(url)
            _create_tables(engine)
            _ENGINES[url] = engine
        return engine


def _create_tables(engine: Engine) -> None:
    """CREATE TABLE IF NOT EXISTS, once even when several workers open a fresh database at the same time
    (on Postgres two concurrent creators would collide on the catalog: a transaction lock orders them)."""
    with engine.begin() as conn:
        if engine.url.get_backend_name() == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7305170001)"))
        metadata.create_all(conn, checkfirst=True)


def _make_engine(url: str) -> Engine:
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            from pathlib import Path

            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": 60}, pool_pre_ping=False)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    if parsed.get_backend_name() != "postgresql":
        raise LedgerError(f"the ledger runs on SQLite or Postgres, not {parsed.get_backend_name()!r}")
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return sa.create_engine(parsed, pool_pre_ping=True, pool_size=2, max_overflow=4)


def dispose_engines() -> None:
    """Close every pooled connection (tests that stop a database server call this first)."""
    with _ENGINES_LOCK:
        for engine in _ENGINES.values():
            engine.dispose()
        _ENGINES.clear()


def _batches(values: Sequence, size: int = _BATCH) -> Iterator[Sequence]:
    for i in range(0, len(values), size):
        yield values[i : i + size]


# ---- the base of the ledger -----------------------------------------------------------------------------


class LedgerBase:
    """The delivery ledger of one database, without its operations (`Ledger` in `__init__.py` adds them)."""

    def __init__(self, url: str):
        self.url = url
        self.engine = engine_for(url)

    def __repr__(self) -> str:  # the URL may carry a password
        return f"Ledger({self.engine.url.render_as_string(hide_password=True)})"

    @property
    def backend(self) -> str:
        return self.engine.url.get_backend_name()

    @contextmanager
    def _tx(self) -> Generator[Connection, None, None]:
        with self.engine.begin() as conn:
            yield conn

    def _insert(self, table: sa.Table):
        dialect = postgresql if self.backend == "postgresql" else sqlite
        return dialect.insert(table)

    def _now(self) -> float:
        """The ledger's clock: `Ledger` reads the package's `wall_clock` (where tests move it) at each call."""
        raise NotImplementedError

    def _load_batch(self, conn: Connection, rows: Iterable[tuple]) -> None:
        """Put rows (event_id, a, b, c, t) into this connection's temporary table `dffs_batch`, emptied first:
        the ledger's set-based statements join it by `event_id`, so a million items cost a few statements in
        the database instead of a million bound statements (COPY on Postgres, one executemany on SQLite).
        Claims use a=kind, b=uid, t=event_time; settling a=state, b=reason; finishing a=state, b=code,
        c=message."""
        if self.backend == "postgresql":
            conn.exec_driver_sql(
                "CREATE TEMP TABLE IF NOT EXISTS dffs_batch (event_id text, a text, b text, c text, "
                "t double precision)"
            )
            conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS dffs_batch_id ON dffs_batch (event_id)")
            conn.exec_driver_sql("TRUNCATE dffs_batch")
            with (
                conn.connection.driver_connection.cursor() as cursor,
                cursor.copy("COPY dffs_batch (event_id, a, b, c, t) FROM STDIN") as copy,
            ):
                for row in rows:
                    copy.write_row(row)
            conn.exec_driver_sql("ANALYZE dffs_batch")
            # Join the batch to the items by their primary key, whatever the items' statistics say: any other
            # plan walks all of a destination's claimed items once per batch (quadratic in a run's size).
            for setting in ("enable_seqscan", "enable_bitmapscan", "enable_hashjoin", "enable_mergejoin"):
                conn.exec_driver_sql(f"SET LOCAL {setting} = off")  # batch first, items probed by key
            return
        # A new table each time, indexed after it is filled (faster than keeping the index up row by row),
        # filled through the driver's own executemany (no per-row work in SQLAlchemy).
        conn.exec_driver_sql("DROP TABLE IF EXISTS temp.dffs_batch")
        conn.exec_driver_sql("CREATE TEMP TABLE dffs_batch (event_id TEXT, a TEXT, b TEXT, c TEXT, t REAL)")
        cursor = conn.connection.driver_connection.cursor()
        try:
            cursor.executemany("INSERT INTO dffs_batch VALUES (?, ?, ?, ?, ?)", rows)
        finally:
            cursor.close()
        conn.exec_driver_sql("CREATE INDEX temp.dffs_batch_id ON dffs_batch (event_id)")

    def _batch_items(self, where: str) -> str:
        """SQLite: the rowids of dffs_items matching the batch by primary key, batch first (CROSS JOIN fixes
        that order in SQLite), plus `where` on `i`."""
        return (
            f"SELECT i.rowid FROM dffs_batch b CROSS JOIN dffs_items i "
            f"WHERE i.destination = :d AND i.event_id = b.event_id AND {where}"
        )

    def _update_from_batch(self, conn: Connection, set_sql: str, where: str, params: dict) -> int:
        """UPDATE the items matching the batch (see `_batch_items`); `set_sql` may read the batch's row as
        `(SELECT b.<col> FROM dffs_batch b WHERE b.event_id = dffs_items.event_id)`, written `{b.<col>}`."""
        import re

        if self.backend == "postgresql":  # UPDATE .. FROM joins by the primary key (seq scans are off)
            set_sql = re.sub(r"\{b\.(\w+)\}", r"b.\1", set_sql)
            return conn.execute(
                sa.text(
                    f"UPDATE dffs_items AS i SET {set_sql} FROM dffs_batch b WHERE i.destination = :d "
                    f"AND i.event_id = b.event_id AND {where}"
                ),
                params,
            ).rowcount
        set_sql = re.sub(
            r"\{b\.(\w+)\}",
            r"(SELECT b.\1 FROM dffs_batch b WHERE b.event_id = dffs_items.event_id LIMIT 1)",
            set_sql,
        )
        return conn.execute(
            sa.text(f"UPDATE dffs_items SET {set_sql} WHERE rowid IN ({self._batch_items(where)})"), params
        ).rowcount
