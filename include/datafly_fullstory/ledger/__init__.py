"""The delivery ledger: one database that says, per FullStory destination, what happened to every item.

FullStory has no content dedupe and forgets an Idempotency-Key after 24 hours, so exactly once is ours
to keep. The ledger is a real database behind SQLAlchemy: a SQLite file by default (one machine), or
Postgres through an Airflow connection (several workers). Its tables (docs/exactly-once.md has example
SQL):

- `dffs_items`: one row per (destination, Datafly `event_id`): its state, the run that owns it, the chunk
  that carries it, FullStory's code and message when it was rejected. A destination is the FullStory org
  and region (`o-1A2B3C-na1@na1`), so a second org is a second, independent set of rows.
- `dffs_chunks`: one row per request chunk: its Idempotency-Key, where its bytes are, when it was first
  POSTed, the batch job, and its status.
- `dffs_runs`: one row per run and destination: the window, the look-back and the outcome counts.
- `dffs_scans`: which landing files (by size and modification time) a run has read, so the look-back
  re-reads only files that changed.

Item states: `claimed` (a run owns it and may send it), then `delivered`, `rejected` or `unknown` once its
chunk was sent (these are final: the item reached FullStory, or may have), or one of the states of rows
never sent: `filtered`, `skipped`, `quarantined`, `invalid` (refused by our mapping; outcome `rejected`).

Chunk states: `claimed` -> `posting` (the first POST is about to go out; `first_post_at` is set in the same
atomic step) -> `submitted` (job id known) -> `processing` -> `completed`; `failed` (FullStory refused the
batch as a whole); `unknown` (the answer to a POST was lost and its key expired); `abandoned` (a chunk never
POSTed whose items another run took over).

Every step that decides who sends what is one atomic statement: items are claimed with INSERT .. ON
CONFLICT DO NOTHING, a chunk goes `claimed -> posting` or `claimed -> abandoned` with a compare-and-set
UPDATE, so two runs can never both send the same event, and a chunk is first POSTed once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

# ---- states ---------------------------------------------------------------------------------------------

CLAIMED = "claimed"
DELIVERED, REJECTED, UNKNOWN = "delivered", "rejected", "unknown"
FILTERED, SKIPPED, QUARANTINED, INVALID = "filtered", "skipped", "quarantined", "invalid"
SENT_STATES = (DELIVERED, REJECTED, UNKNOWN)  # the item reached FullStory, or may have
UNSENT_STATES = (FILTERED, SKIPPED, QUARANTINED, INVALID)  # final for a run, re-evaluated by a re-run

C_CLAIMED, C_POSTING, C_SUBMITTED, C_PROCESSING = "claimed", "posting", "submitted", "processing"
C_COMPLETED, C_FAILED, C_UNKNOWN, C_ABANDONED = "completed", "failed", "unknown", "abandoned"
CHUNK_POSTED = (C_POSTING, C_SUBMITTED, C_PROCESSING)  # sent (or about to be), not finished
CHUNK_TERMINAL = (C_COMPLETED, C_FAILED, C_UNKNOWN)

KEY_TTL_S = 24 * 3600.0  # FullStory remembers an Idempotency-Key for 24 hours
KEY_SAFE_AGE_S = KEY_TTL_S - 3600.0  # we re-send under a key only while it is younger (clock skew)
DEFAULT_CLAIM_LEASE_S = 3 * 3600.0  # an unsent claim older than this may be taken over by another run
_BATCH = 2000  # ids per IN (...) list: well under every backend's bound-parameter limit


def wall_clock() -> float:
    """Seconds since the epoch. The ledger's only clock: tests move it with FullStory's (the emulator's)."""
    return time.time()


class LedgerError(RuntimeError):
    """The ledger cannot be used as configured, or holds something it should not."""


class ClaimLost(LedgerError):
    """Items this run mapped were taken over by another run before their chunk was registered; a retry
    re-claims and re-maps the rest."""


# ---- schema ---------------------------------------------------------------------------------------------

metadata = sa.MetaData()

items = sa.Table(
    "dffs_items", metadata,
    sa.Column("destination", sa.String(300), primary_key=True),
    sa.Column("event_id", sa.String(512), primary_key=True),
    sa.Column("kind", sa.String(8), nullable=False),  # event | user (an identify call)
    sa.Column("uid", sa.String(512)),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("run_id", sa.String(300), nullable=False),
    sa.Column("chunk_id", sa.BigInteger),
    sa.Column("window_start", sa.String(40)),  # the owning run's window
    sa.Column("window_end", sa.String(40)),
    sa.Column("event_time", sa.Float),  # the row's timestamp (epoch seconds)
    sa.Column("claimed_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("code", sa.String(200)),
    sa.Column("message", sa.Text),
)
sa.Index("dffs_items_chunk", items.c.chunk_id)
sa.Index("dffs_items_state", items.c.destination, items.c.state, items.c.event_time)

chunks = sa.Table(
    "dffs_chunks", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("destination", sa.String(300), nullable=False),
    sa.Column("run_id", sa.String(300), nullable=False),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("kind", sa.String(8), nullable=False),  # events | users
    sa.Column("idempotency_key", sa.String(200), nullable=False),
    sa.Column("payload_uri", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("items", sa.Integer, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("job_id", sa.String(200)),
    sa.Column("job_status", sa.String(20)),
    sa.Column("first_post_at", sa.Float),
    sa.Column("last_post_at", sa.Float),
    sa.Column("submissions", sa.Integer, nullable=False, default=0),
    sa.Column("imports", sa.Integer, nullable=False, default=0),
    sa.Column("errors", sa.Integer, nullable=False, default=0),
    sa.Column("delivered_items", sa.Integer, nullable=False, default=0),
    sa.Column("rejected_items", sa.Integer, nullable=False, default=0),
    sa.Column("unknown_items", sa.Integer, nullable=False, default=0),
    sa.Column("error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.UniqueConstraint("destination", "run_id", "name", name="dffs_chunks_run_name"),
)

runs = sa.Table(
    "dffs_runs", metadata,
    sa.Column("destination", sa.String(300), primary_key=True),
    sa.Column("run_id", sa.String(300), primary_key=True),
    sa.Column("window_start", sa.String(40), nullable=False),
    sa.Column("window_end", sa.String(40), nullable=False),
    sa.Column("scan_start", sa.String(40), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("rows_read", sa.Integer),
    sa.Column("delivered", sa.Integer), sa.Column("rejected", sa.Integer),
    sa.Column("unknown", sa.Integer), sa.Column("quarantined", sa.Integer),
    sa.Column("filtered", sa.Integer), sa.Column("skipped", sa.Integer),
    sa.Column("pending", sa.Integer), sa.Column("late_rows", sa.Integer),
    sa.Column("problems", sa.Text),
)

scans = sa.Table(
    "dffs_scans", metadata,
    sa.Column("destination", sa.String(300), primary_key=True),
    sa.Column("file_uri", sa.String(1000), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("mtime", sa.Float, nullable=False),
    sa.Column("covered_start", sa.Float, nullable=False),  # epoch seconds: the time range read from it
    sa.Column("covered_end", sa.Float, nullable=False),
    sa.Column("run_id", sa.String(300), nullable=False),
    sa.Column("scanned_at", sa.Float, nullable=False),
)


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
        yield values[i:i + size]


# ---- records --------------------------------------------------------------------------------------------


@dataclass
class ChunkRow:
    """One `dffs_chunks` row."""

    id: int
    destination: str
    run_id: str
    name: str
    kind: str
    idempotency_key: str
    payload_uri: str
    sha256: str
    items: int
    bytes: int
    status: str
    job_id: str | None = None
    job_status: str | None = None
    first_post_at: float | None = None
    last_post_at: float | None = None
    submissions: int = 0
    imports: int = 0
    errors: int = 0
    delivered_items: int = 0
    rejected_items: int = 0
    unknown_items: int = 0
    error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in CHUNK_TERMINAL

    @property
    def is_posted(self) -> bool:
        return self.status in CHUNK_POSTED

    def key_age(self, now: float) -> float | None:
        return None if self.first_post_at is None else now - self.first_post_at

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_CHUNK_FIELDS = tuple(f.name for f in fields(ChunkRow))


def _chunk(row) -> ChunkRow:
    return ChunkRow(**{name: row._mapping[name] for name in _CHUNK_FIELDS})


@dataclass(frozen=True)
class ItemRow:
    event_id: str
    kind: str
    state: str
    run_id: str
    chunk_id: int | None
    claimed_at: float
    updated_at: float
    code: str | None
    message: str | None
    chunk_status: str | None = None
    chunk_first_post_at: float | None = None
    chunk_updated_at: float | None = None


@dataclass(frozen=True)
class NewItem:
    event_id: str
    kind: str  # event | user
    uid: str | None = None
    event_time: float | None = None


@dataclass(frozen=True)
class ClaimColumns:
    """Items to claim, column by column (the claim step builds them from a landing frame without a Python
    object per row)."""

    event_id: list[str]
    kind: list[str]
    uid: list[str | None]
    event_time: list[float | None]

    @classmethod
    def of(cls, new: Sequence[NewItem]) -> ClaimColumns:
        return cls([n.event_id for n in new], [n.kind for n in new], [n.uid for n in new],
                   [n.event_time for n in new])

    def __len__(self) -> int:
        return len(self.event_id)

    def rows(self) -> Iterator[tuple]:
        return zip(self.event_id, self.kind, self.uid, self.event_time, strict=True)


# ---- the ledger -----------------------------------------------------------------------------------------


class Ledger:
    """The delivery ledger of one database (see the module docstring)."""

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

    # ---- items ------------------------------------------------------------------------------------------

    def lookup(self, destination: str, event_ids: Sequence[str]) -> dict[str, ItemRow]:
        """The ledger rows of these event ids (with their chunk's status), by event id."""
        if not event_ids:
            return {}
        with self._tx() as conn:
            self._load_batch(conn, ((e, None, None, None, None) for e in sorted(set(event_ids))))
            rows = conn.execute(sa.text(
                "SELECT i.event_id, i.kind, i.state, i.run_id, i.chunk_id, i.claimed_at, i.updated_at, i.code, "
                "i.message, c.status, c.first_post_at, c.updated_at FROM dffs_batch b CROSS JOIN dffs_items i "
                "LEFT JOIN dffs_chunks c ON c.id = i.chunk_id WHERE i.destination = :d AND i.event_id = b.event_id"),
                {"d": destination}).all()
        return {row[0]: ItemRow(*row) for row in rows}

    def known(self, destination: str, event_ids: Sequence[str]) -> set[str]:
        """Which of these event ids the ledger has any record of, for this destination."""
        if not event_ids:
            return set()
        with self._tx() as conn:
            self._load_batch(conn, ((e, None, None, None, None) for e in sorted(set(event_ids))))
            return set(conn.execute(sa.text(
                "SELECT i.event_id FROM dffs_batch b CROSS JOIN dffs_items i WHERE i.destination = :d "
                "AND i.event_id = b.event_id"), {"d": destination}).scalars())

    def _load_batch(self, conn: Connection, rows: Iterable[tuple]) -> None:
        """Put rows (event_id, a, b, c, t) into this connection's temporary table `dffs_batch`, emptied first:
        the set-based statements below join it by `event_id`, so a million items cost a few statements in
        the database instead of a million bound statements (COPY on Postgres, one executemany on SQLite).
        Claims use a=kind, b=uid, t=event_time; settling a=state, b=reason; finishing a=state, b=code,
        c=message."""
        if self.backend == "postgresql":
            conn.exec_driver_sql("CREATE TEMP TABLE IF NOT EXISTS dffs_batch (event_id text, a text, b text, c text, "
                                 "t double precision)")
            conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS dffs_batch_id ON dffs_batch (event_id)")
            conn.exec_driver_sql("TRUNCATE dffs_batch")
            with conn.connection.driver_connection.cursor() as cursor, cursor.copy(
                    "COPY dffs_batch (event_id, a, b, c, t) FROM STDIN") as copy:
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
        return (f"SELECT i.rowid FROM dffs_batch b CROSS JOIN dffs_items i "
                f"WHERE i.destination = :d AND i.event_id = b.event_id AND {where}")

    def _update_from_batch(self, conn: Connection, set_sql: str, where: str, params: dict) -> int:
        """UPDATE the items matching the batch (see `_batch_items`); `set_sql` may read the batch's row as
        `(SELECT b.<col> FROM dffs_batch b WHERE b.event_id = dffs_items.event_id)`, written `{b.<col>}`."""
        import re

        if self.backend == "postgresql":  # UPDATE .. FROM joins by the primary key (seq scans are off)
            set_sql = re.sub(r"\{b\.(\w+)\}", r"b.\1", set_sql)
            return conn.execute(sa.text(
                f"UPDATE dffs_items AS i SET {set_sql} FROM dffs_batch b WHERE i.destination = :d "
                f"AND i.event_id = b.event_id AND {where}"), params).rowcount
        set_sql = re.sub(r"\{b\.(\w+)\}", r"(SELECT b.\1 FROM dffs_batch b WHERE b.event_id = dffs_items.event_id LIMIT 1)",
                         set_sql)
        return conn.execute(sa.text(f"UPDATE dffs_items SET {set_sql} WHERE rowid IN ({self._batch_items(where)})"),
                            params).rowcount

    def insert_claims(self, destination: str, run_id: str, new: Sequence[NewItem] | ClaimColumns, *,
                      window: tuple[str, str], state: str = CLAIMED) -> int:
        """Claim items nobody has a record of; existing rows are left alone. Returns how many were claimed
        now: when that is all of them, no other run had any, and the caller need not read them back."""
        columns = new if isinstance(new, ClaimColumns) else ClaimColumns.of(new)
        if not len(columns):
            return 0
        now = wall_clock()
        with self._tx() as conn:
            self._load_batch(conn, ((e, k, u, None, t) for e, k, u, t in columns.rows()))
            # In event_id order: two runs claiming overlapping ids lock rows in the same order and never
            # deadlock (Postgres would otherwise abort one of them).
            claimed = conn.execute(sa.text(
                "INSERT INTO dffs_items (destination, event_id, kind, uid, state, run_id, chunk_id, window_start, "
                "window_end, event_time, claimed_at, updated_at) "
                "SELECT :d, event_id, a, b, :st, :r, NULL, :ws, :we, t, :now, :now FROM dffs_batch "
                "WHERE true ORDER BY event_id ON CONFLICT DO NOTHING"),
                {"d": destination, "st": state, "r": run_id, "ws": window[0], "we": window[1], "now": now}).rowcount
        if self.backend == "postgresql" and claimed >= 10_000:
            # Fresh statistics after a big claim: without them the planner takes the table for a few rows
            # and walks every claimed item once per chunk it registers (quadratic in the run's size).
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("ANALYZE dffs_items")
        return claimed

    def take_over(self, destination: str, run_id: str, event_ids: Sequence[str], *, from_states: Sequence[str],
                  from_run: str | None = None, unsent_chunk_only: bool = False,
                  claimed_before: float | None = None, window: tuple[str, str]) -> set[str]:
        """Compare-and-set: claim these items for `run_id` if they are still in one of `from_states` (and
        owned by `from_run`, claimed before `claimed_before`, in no chunk or an unsent one, when given).
        Returns the event ids this run now owns."""
        now = wall_clock()
        owned: set[str] = set()
        with self._tx() as conn:
            for part in _batches(sorted(set(event_ids))):
                cond = [items.c.destination == destination, items.c.event_id.in_(part),
                        items.c.state.in_(list(from_states))]
                if from_run is not None:
                    cond.append(items.c.run_id == from_run)
                if claimed_before is not None:
                    cond.append(items.c.claimed_at < claimed_before)
                if unsent_chunk_only:  # in no chunk, or in one that can never be POSTed any more
                    dead = sa.select(chunks.c.id).where(chunks.c.status == C_ABANDONED)
                    cond.append(sa.or_(items.c.chunk_id.is_(None), items.c.chunk_id.in_(dead)))
                conn.execute(items.update().where(*cond).values(
                    state=CLAIMED, run_id=run_id, chunk_id=None, claimed_at=now, updated_at=now, code=None,
                    message=None, window_start=window[0], window_end=window[1]))
                query = sa.select(items.c.event_id).where(
                    items.c.destination == destination, items.c.event_id.in_(part), items.c.run_id == run_id,
                    items.c.state == CLAIMED, items.c.claimed_at == now)
                owned.update(conn.execute(query).scalars())
        return owned

    def abandon_stale_chunks(self, chunk_ids: Iterable[int], *, updated_before: float) -> set[int]:
        """Compare-and-set `claimed -> abandoned` for chunks never POSTed and idle since `updated_before`;
        their owner can then never POST them. Returns the chunk ids abandoned now or before."""
        ids = sorted(set(chunk_ids))
        if not ids:
            return set()
        now = wall_clock()
        with self._tx() as conn:
            conn.execute(chunks.update().where(chunks.c.id.in_(ids), chunks.c.status == C_CLAIMED,
                                               chunks.c.updated_at < updated_before)
                         .values(status=C_ABANDONED, updated_at=now))
            query = sa.select(chunks.c.id).where(chunks.c.id.in_(ids), chunks.c.status == C_ABANDONED)
            return set(conn.execute(query).scalars())

    def settle_unsent(self, destination: str, run_id: str, states: Iterable[tuple[str, str, str | None]]) -> None:
        """Record the final state of claimed rows this run does not send: (event_id, state, reason)."""
        rows = []
        for event_id, state, reason in states:
            if state not in UNSENT_STATES:
                raise LedgerError(f"{state!r} is not a state of an unsent item")
            rows.append((event_id, state, (reason or "")[:2000], None, None))
        if not rows:
            return
        with self._tx() as conn:
            self._load_batch(conn, rows)
            self._update_from_batch(conn, "state = {b.a}, message = {b.b}, chunk_id = NULL, updated_at = :now",
                                    "i.run_id = :r AND i.state = :claimed",
                                    {"now": wall_clock(), "d": destination, "r": run_id, "claimed": CLAIMED})

    def record_unclaimed(self, destination: str, run_id: str, new: Sequence[NewItem] | ClaimColumns, state: str,
                         *, window: tuple[str, str]) -> None:
        """Rows that never reach a claim (quarantined) are recorded once, so the look-back knows them."""
        if state not in UNSENT_STATES:
            raise LedgerError(f"{state!r} is not a state of an unsent item")
        self.insert_claims(destination, run_id, new, window=window, state=state)

    def stale_claims(self, destination: str, *, since: float, claimed_before: float) -> int:
        """How many claims with an event time from `since` on have gone unsent since `claimed_before`
        (their run died before sending them): the look-back re-reads the landing to take them over."""
        unsent = sa.select(chunks.c.id).where(chunks.c.status.in_([C_CLAIMED, C_ABANDONED]))
        query = sa.select(sa.func.count()).select_from(items).where(
            items.c.destination == destination, items.c.state == CLAIMED, items.c.event_time >= since,
            items.c.claimed_at < claimed_before,
            sa.or_(items.c.chunk_id.is_(None), items.c.chunk_id.in_(unsent)))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def orphaned_chunks(self, destination: str, *, since: float, idle_before: float) -> list[ChunkRow]:
        """Chunks POSTed but not finished, idle since `idle_before`, carrying items with an event time from
        `since` on: their run stopped mid-delivery; any later run may resume them (same bytes, same key)."""
        with_items = sa.select(items.c.chunk_id).where(
            items.c.destination == destination, items.c.event_time >= since, items.c.chunk_id.is_not(None))
        query = sa.select(chunks).where(chunks.c.destination == destination,
                                        chunks.c.status.in_(list(CHUNK_POSTED)),
                                        chunks.c.updated_at < idle_before, chunks.c.id.in_(with_items))
        with self.engine.connect() as conn:
            return [_chunk(r) for r in conn.execute(query)]

    def items_of_chunk(self, chunk_id: int) -> list[ItemRow]:
        query = sa.select(items.c.event_id, items.c.kind, items.c.state, items.c.run_id, items.c.chunk_id,
                          items.c.claimed_at, items.c.updated_at, items.c.code,
                          items.c.message).where(items.c.chunk_id == chunk_id)
        with self.engine.connect() as conn:
            return [ItemRow(*r) for r in conn.execute(query)]

    # ---- chunks -----------------------------------------------------------------------------------------

    def chunks_of_run(self, destination: str, run_id: str) -> list[ChunkRow]:
        query = sa.select(chunks).where(chunks.c.destination == destination, chunks.c.run_id == run_id)
        with self.engine.connect() as conn:
            return [_chunk(r) for r in conn.execute(query.order_by(chunks.c.id))]

    def chunk(self, chunk_id: int) -> ChunkRow:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(chunks).where(chunks.c.id == chunk_id)).first()
        if row is None:
            raise LedgerError(f"chunk {chunk_id} is not in the ledger")
        return _chunk(row)

    def chunks_by_id(self, chunk_ids: Iterable[int]) -> dict[int, ChunkRow]:
        ids = sorted(set(chunk_ids))
        out: dict[int, ChunkRow] = {}
        with self.engine.connect() as conn:
            for part in _batches(ids):
                for row in conn.execute(sa.select(chunks).where(chunks.c.id.in_(list(part)))):
                    out[row.id] = _chunk(row)
        return out

    def register_chunk(self, destination: str, run_id: str, *, name: str, kind: str, idempotency_key: str,
                       payload_uri: str, sha256: str, items_count: int, size: int,
                       event_ids: Sequence[str]) -> ChunkRow:
        """Record a new chunk of this run and hand it its items, in one transaction. Every item must still
        be claimed by this run; if another run took one over, nothing is written and ClaimLost is raised."""
        now = wall_clock()
        with self._tx() as conn:
            existing = conn.execute(sa.select(chunks).where(
                chunks.c.destination == destination, chunks.c.run_id == run_id, chunks.c.name == name)).first()
            values = {"kind": kind, "idempotency_key": idempotency_key, "payload_uri": payload_uri,
                      "sha256": sha256, "items": items_count, "bytes": size, "status": C_CLAIMED,
                      "updated_at": now}
            if existing is not None:
                if existing.status != C_CLAIMED and existing.status != C_ABANDONED:
                    raise LedgerError(f"chunk {name} of run {run_id} was sent already ({existing.status}); "
                                      "a new chunk needs a new name")
                conn.execute(chunks.update().where(chunks.c.id == existing.id).values(**values))
                chunk_id = existing.id
                conn.execute(items.update().where(items.c.chunk_id == chunk_id, items.c.state == CLAIMED)
                             .values(chunk_id=None))
            else:
                chunk_id = conn.execute(chunks.insert().values(
                    destination=destination, run_id=run_id, name=name, created_at=now, submissions=0,
                    imports=0, errors=0, delivered_items=0, rejected_items=0, unknown_items=0,
                    **values)).inserted_primary_key[0]
            self._load_batch(conn, ((e, None, None, None, None) for e in sorted(set(event_ids))))
            # Only items in no chunk: one the run sent already keeps its chunk (a chunk never re-sends them).
            assigned = self._update_from_batch(
                conn, "chunk_id = :c, updated_at = :now", "i.run_id = :r AND i.state = :st AND i.chunk_id IS NULL",
                {"c": chunk_id, "now": now, "d": destination, "r": run_id, "st": CLAIMED})
            if assigned != len(set(event_ids)):
                raise ClaimLost(f"chunk {name}: {len(set(event_ids)) - assigned} of its items are no longer "
                                f"claimed by run {run_id} (another run took them over)")
            row = conn.execute(sa.select(chunks).where(chunks.c.id == chunk_id)).one()
        return _chunk(row)

    def abandon_unsent_chunks(self, destination: str, run_id: str) -> list[ChunkRow]:
        """Before a run maps again: its chunks never POSTed are dropped (their items go back to plain
        claims). Returns the run's chunks that were POSTed, which stay as they are."""
        now = wall_clock()
        with self._tx() as conn:
            unsent = sa.select(chunks.c.id).where(chunks.c.destination == destination,
                                                  chunks.c.run_id == run_id, chunks.c.status == C_CLAIMED)
            conn.execute(items.update().where(items.c.chunk_id.in_(unsent), items.c.state == CLAIMED)
                         .values(chunk_id=None, updated_at=now))
            conn.execute(chunks.update().where(chunks.c.destination == destination, chunks.c.run_id == run_id,
                                               chunks.c.status == C_CLAIMED)
                         .values(status=C_ABANDONED, updated_at=now))
        return [c for c in self.chunks_of_run(destination, run_id) if c.status != C_ABANDONED]

    def begin_post(self, chunk_id: int) -> bool:
        """Compare-and-set `claimed -> posting` with `first_post_at`: True when this caller may POST the
        chunk for the first time. False when it is no longer `claimed` (abandoned, or POSTed already)."""
        now = wall_clock()
        with self._tx() as conn:
            done = conn.execute(chunks.update().where(chunks.c.id == chunk_id, chunks.c.status == C_CLAIMED)
                                .values(status=C_POSTING, first_post_at=now, last_post_at=now,
                                        submissions=chunks.c.submissions + 1, updated_at=now)).rowcount
        return done == 1

    def revert_post(self, chunk_id: int) -> None:
        """`posting -> claimed` after FullStory answered a first POST saying it took nothing (401, 403, 404)."""
        with self._tx() as conn:
            conn.execute(chunks.update().where(chunks.c.id == chunk_id, chunks.c.status == C_POSTING,
                                               chunks.c.job_id.is_(None), chunks.c.submissions == 1)
                         .values(status=C_CLAIMED, first_post_at=None, last_post_at=None, submissions=0,
                                 updated_at=wall_clock()))

    def note_post(self, chunk_id: int) -> None:
        """A repeated POST of a chunk (same bytes, same key: FullStory replays its first answer)."""
        now = wall_clock()
        with self._tx() as conn:
            conn.execute(chunks.update().where(chunks.c.id == chunk_id).values(
                last_post_at=now, submissions=chunks.c.submissions + 1, updated_at=now))

    def update_chunk(self, chunk_id: int, **values: Any) -> None:
        unknown = set(values) - set(_CHUNK_FIELDS)
        if unknown:
            raise LedgerError(f"unknown chunk field(s) {sorted(unknown)}")
        with self._tx() as conn:
            conn.execute(chunks.update().where(chunks.c.id == chunk_id).values(updated_at=wall_clock(),
                                                                                 **values))

    def finish_chunk(self, chunk_id: int, status: str, exceptions: Sequence[tuple[str, str, str | None, str | None]],
                     *, others: str = DELIVERED, others_code: str | None = None, others_message: str | None = None,
                     **values: Any) -> None:
        """The chunk ended: its items get state `others` (delivered, unless said otherwise), except those in
        `exceptions` (event_id, state, code, message), and the chunk its terminal status, in one
        transaction."""
        if status not in CHUNK_TERMINAL:
            raise LedgerError(f"{status!r} is not a terminal chunk status")
        now = wall_clock()
        with self._tx() as conn:
            destination = conn.execute(sa.select(chunks.c.destination).where(chunks.c.id == chunk_id)).scalar_one()
            conn.execute(items.update().where(items.c.chunk_id == chunk_id, items.c.state == CLAIMED).values(
                state=others, code=others_code, message=others_message, updated_at=now))
            if exceptions:
                self._load_batch(conn, ((e, st, c, m, None) for e, st, c, m in exceptions))
                self._update_from_batch(conn, "state = {b.a}, code = {b.b}, message = {b.c}, updated_at = :now",
                                        "i.chunk_id = :c", {"now": now, "d": destination, "c": chunk_id})
            conn.execute(chunks.update().where(chunks.c.id == chunk_id).values(
                status=status, finished_at=now, updated_at=now, **values))

    # ---- runs and scans ---------------------------------------------------------------------------------

    def start_run(self, destination: str, run_id: str, *, window: tuple[str, str], scan_start: str) -> None:
        now = wall_clock()
        stmt = self._insert(runs).values(destination=destination, run_id=run_id, window_start=window[0],
                                         window_end=window[1], scan_start=scan_start, started_at=now)
        with self._tx() as conn:
            conn.execute(stmt.on_conflict_do_update(
                index_elements=[runs.c.destination, runs.c.run_id],
                set_={"window_start": window[0], "window_end": window[1], "scan_start": scan_start}))

    def finish_run(self, destination: str, run_id: str, *, counts: dict[str, int], late_rows: int,
                   problems: Sequence[str]) -> None:
        values = {k: int(counts.get(k, 0)) for k in ("delivered", "rejected", "unknown", "quarantined",
                                                      "filtered", "skipped", "pending")}
        with self._tx() as conn:
            conn.execute(runs.update().where(runs.c.destination == destination, runs.c.run_id == run_id).values(
                finished_at=wall_clock(), rows_read=int(counts.get("read", 0)), late_rows=late_rows,
                problems="; ".join(problems) or None, **values))

    def last_run_started(self, destination: str, *, before_run: str) -> float | None:
        query = sa.select(sa.func.max(runs.c.started_at)).where(runs.c.destination == destination,
                                                                 runs.c.run_id != before_run)
        with self.engine.connect() as conn:
            return conn.execute(query).scalar()

    def scans(self, destination: str, uris: Sequence[str]) -> dict[str, Any]:
        out = {}
        with self.engine.connect() as conn:
            for part in _batches(list(uris)):
                query = sa.select(scans).where(scans.c.destination == destination, scans.c.file_uri.in_(part))
                out.update({r.file_uri: r for r in conn.execute(query)})
        return out

    def record_scans(self, destination: str, run_id: str, files: Sequence[tuple[str, int, float]],
                     covered: tuple[float, float]) -> None:
        """Files (uri, size, mtime) read over the time range `covered`: an unchanged file whose range was
        read before is not read again by the look-back."""
        now = wall_clock()
        known = self.scans(destination, [f[0] for f in files])
        with self._tx() as conn:
            for uri, size, mtime in files:
                old = known.get(uri)
                start, end = covered
                if old is not None and old.size == size and old.mtime == mtime \
                        and old.covered_start <= end and old.covered_end >= start:
                    start, end = min(start, old.covered_start), max(end, old.covered_end)
                stmt = self._insert(scans).values(destination=destination, file_uri=uri, size=size, mtime=mtime,
                                                  covered_start=start, covered_end=end, run_id=run_id,
                                                  scanned_at=now)
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=[scans.c.destination, scans.c.file_uri],
                    set_={"size": size, "mtime": mtime, "covered_start": start, "covered_end": end,
                          "run_id": run_id, "scanned_at": now}))
