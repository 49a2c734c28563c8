"""The ledger's identity map: which user each anonymous id belongs to, learned from rows that carry both,
across runs; and which skipped rows wait for their anonymous id to be identified (late stitching).

Two tables, owned here (docs/exactly-once.md "Late stitching", docs/mapping.md "Identity stitching"):

- `dffs_identities`, key (destination, anonymous_id): the `user_id` first learned for it, with the event
  that taught it (`event_id`, `run_id`), the event times it was first and last seen with a user
  (`first_seen_at`, `last_seen_at`), and `conflict_user_id`: a second user seen with the same anonymous id.
  A conflicted anonymous id is never stitched (see `stitchable`); recording pairs again is idempotent (a
  retried run learns nothing twice, and a conflict stays recorded once).
- `dffs_identity_waits`, key (destination, event_id): rows skipped for want of identity, with their
  anonymous id, the landing file they came from and their event time. The look-back reads back the files
  of waiting rows whose anonymous id has since been identified, and lets those rows through again.

Every write is set-based (one temporary table per call, joined by primary key), on SQLite and Postgres.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from include.datafly_fullstory.ledger.engine import LedgerBase
from include.datafly_fullstory.ledger.schema import SKIPPED, metadata

identities = sa.Table(
    "dffs_identities",
    metadata,
    sa.Column("destination", sa.String(300), primary_key=True),
    sa.Column("anonymous_id", sa.String(512), primary_key=True),
    sa.Column("user_id", sa.String(512), nullable=False),
    sa.Column("conflict_user_id", sa.String(512)),  # a second user seen with this anonymous id
    sa.Column("first_seen_at", sa.Float),  # event times (epoch s) of the pairs seen
    sa.Column("last_seen_at", sa.Float),
    sa.Column("event_id", sa.String(512)),  # the event that taught `user_id`
    sa.Column("run_id", sa.String(300), nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

identity_waits = sa.Table(
    "dffs_identity_waits",
    metadata,
    sa.Column("destination", sa.String(300), primary_key=True),
    sa.Column("event_id", sa.String(512), primary_key=True),
    sa.Column("anonymous_id", sa.String(512), nullable=False),
    sa.Column("file_uri", sa.String(1000), nullable=False),
    sa.Column("event_time", sa.Float),
    sa.Column("run_id", sa.String(300), nullable=False),
    sa.Column("recorded_at", sa.Float, nullable=False),
)
sa.Index("dffs_identity_waits_anon", identity_waits.c.destination, identity_waits.c.anonymous_id)


@dataclass(frozen=True)
class IdentityRow:
    """One `dffs_identities` row."""

    anonymous_id: str
    user_id: str
    conflict_user_id: str | None
    first_seen_at: float | None
    last_seen_at: float | None
    event_id: str | None
    run_id: str

    @property
    def stitchable(self) -> bool:
        """The conflict rule: an anonymous id seen with two users is never stitched to either."""
        return self.conflict_user_id is None


@dataclass(frozen=True)
class IdentityPair:
    """What a window taught about one anonymous id (already folded per anonymous id by the caller):
    the user of its earliest pair, another user when the window saw two, the times and the teaching event."""

    anonymous_id: str
    user_id: str
    other_user_id: str | None
    first_seen_at: float | None
    last_seen_at: float | None
    event_id: str | None


@dataclass(frozen=True)
class Wait:
    """A row skipped for want of identity: it waits for its anonymous id to be identified."""

    event_id: str
    anonymous_id: str
    file_uri: str
    event_time: float | None


_COLUMNS = (
    "anonymous_id text, user_id text, other text, event_id text, t1 double precision, t2 double precision"
)


class IdentityOps(LedgerBase):
    """Operations on `dffs_identities` and `dffs_identity_waits`."""

    def _load_pairs(self, conn: Connection, rows: Iterable[tuple]) -> None:
        """Rows (key, a, b, c, t1, t2) into this connection's temporary table `dffs_id_batch`, emptied first
        (COPY on Postgres, one executemany on SQLite: the pattern of `LedgerBase._load_batch`)."""
        if self.backend == "postgresql":
            conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS dffs_id_batch ({_COLUMNS})")
            conn.exec_driver_sql("TRUNCATE dffs_id_batch")
            with (
                conn.connection.driver_connection.cursor() as cursor,
                cursor.copy("COPY dffs_id_batch FROM STDIN") as copy,
            ):
                for row in rows:
                    copy.write_row(row)
            conn.exec_driver_sql("ANALYZE dffs_id_batch")
            return
        conn.exec_driver_sql("DROP TABLE IF EXISTS temp.dffs_id_batch")
        conn.exec_driver_sql(
            f"CREATE TEMP TABLE dffs_id_batch ({_COLUMNS.replace('double precision', 'REAL')})"
        )
        cursor = conn.connection.driver_connection.cursor()
        try:
            cursor.executemany("INSERT INTO dffs_id_batch VALUES (?, ?, ?, ?, ?, ?)", rows)
        finally:
            cursor.close()
        conn.exec_driver_sql("CREATE INDEX temp.dffs_id_batch_key ON dffs_id_batch (anonymous_id)")

    def record_identities(self, destination: str, run_id: str, pairs: Sequence[IdentityPair]) -> int:
        """Learn anonymous id -> user pairs (one per anonymous id). A new anonymous id is inserted; a known
        one widens its seen times, and a different user than the recorded one is recorded once as its
        conflict. Idempotent. Returns how many anonymous ids were new."""
        if not pairs:
            return 0
        now = self._now()
        params = {"d": destination, "r": run_id, "now": now}
        rows = sorted(
            (p.anonymous_id, p.user_id, p.other_user_id, p.event_id, p.first_seen_at, p.last_seen_at)
            for p in pairs
        )
        with self._tx() as conn:
            self._load_pairs(conn, rows)
            # In anonymous_id order: two runs learning overlapping ids lock rows in the same order.
            added = conn.execute(
                sa.text(
                    "INSERT INTO dffs_identities (destination, anonymous_id, user_id, conflict_user_id, "
                    "first_seen_at, last_seen_at, event_id, run_id, updated_at) "
                    "SELECT :d, anonymous_id, user_id, other, t1, t2, event_id, :r, :now FROM dffs_id_batch "
                    "WHERE true ORDER BY anonymous_id ON CONFLICT DO NOTHING"
                ),
                params,
            ).rowcount
            if added == len(rows):
                return added
            # The others were known: seen times widen; a user other than the recorded one is a conflict
            # (the first one recorded stays). Only rows that change are written.
            conflict = (
                "COALESCE(i.conflict_user_id, CASE WHEN b.user_id <> i.user_id THEN b.user_id "
                "WHEN b.other IS NOT NULL AND b.other <> i.user_id THEN b.other END)"
            )
            conn.execute(
                sa.text(
                    f"UPDATE dffs_identities AS i SET conflict_user_id = {conflict}, "
                    "first_seen_at = CASE WHEN b.t1 < i.first_seen_at OR i.first_seen_at IS NULL THEN b.t1 "
                    "ELSE i.first_seen_at END, "
                    "last_seen_at = CASE WHEN b.t2 > i.last_seen_at OR i.last_seen_at IS NULL THEN b.t2 "
                    "ELSE i.last_seen_at END, updated_at = :now "
                    "FROM dffs_id_batch AS b WHERE i.destination = :d AND i.anonymous_id = b.anonymous_id "
                    f"AND ((i.conflict_user_id IS NULL AND {conflict} IS NOT NULL) "
                    "OR b.t1 < i.first_seen_at OR b.t2 > i.last_seen_at "
                    "OR (i.first_seen_at IS NULL AND b.t1 IS NOT NULL) "
                    "OR (i.last_seen_at IS NULL AND b.t2 IS NOT NULL))"
                ),
                params,
            )
        return added

    def lookup_identities(self, destination: str, anonymous_ids: Iterable[str]) -> dict[str, IdentityRow]:
        """The identity map's rows for these anonymous ids (unknown ones are absent), by anonymous id."""
        wanted = sorted({a for a in anonymous_ids if a})
        if not wanted:
            return {}
        with self._tx() as conn:
            self._load_pairs(conn, ((a, None, None, None, None, None) for a in wanted))
            rows = conn.execute(
                sa.text(
                    "SELECT i.anonymous_id, i.user_id, i.conflict_user_id, i.first_seen_at, i.last_seen_at, "
                    "i.event_id, i.run_id FROM dffs_id_batch b JOIN dffs_identities i "
                    "ON i.destination = :d AND i.anonymous_id = b.anonymous_id"
                ),
                {"d": destination},
            ).all()
        return {row[0]: IdentityRow(*row) for row in rows}

    def record_waits(self, destination: str, run_id: str, waits: Sequence[Wait]) -> None:
        """Record rows skipped for want of identity (a row already waiting keeps its record)."""
        if not waits:
            return
        rows = sorted((w.event_id, w.anonymous_id, w.file_uri, None, w.event_time, None) for w in waits)
        with self._tx() as conn:
            self._load_pairs(conn, rows)
            conn.execute(
                sa.text(
                    "INSERT INTO dffs_identity_waits (destination, event_id, anonymous_id, file_uri, event_time, "
                    "run_id, recorded_at) SELECT :d, anonymous_id, user_id, other, t1, :r, :now "
                    "FROM dffs_id_batch WHERE true ORDER BY anonymous_id ON CONFLICT DO NOTHING"
                ),
                {"d": destination, "r": run_id, "now": self._now()},
            )

    def stitchable_waits(self, destination: str, *, since: float, until: float) -> dict[str, str]:
        """Rows with an event time in [since, until) that are still `skipped` for want of identity and whose
        anonymous id has since been identified (without conflict): event_id -> the file that holds it."""
        query = sa.text(
            "SELECT w.event_id, w.file_uri FROM dffs_identity_waits w "
            "JOIN dffs_identities i ON i.destination = w.destination AND i.anonymous_id = w.anonymous_id "
            "JOIN dffs_items it ON it.destination = w.destination AND it.event_id = w.event_id "
            "WHERE w.destination = :d AND w.event_time >= :since AND w.event_time < :until "
            "AND i.conflict_user_id IS NULL AND it.state = :skipped"
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query, {"d": destination, "since": since, "until": until, "skipped": SKIPPED})
            return dict(rows.all())
