"""The ledger's deletion requests (`dffs_deletions`): people whose data FullStory must delete and whom no run
may send anything about again, per destination.

One row per (destination, person kind, person key). The kind is `user_id` (a uid FullStory knows: a
`DELETE /v2/users?uid=` is sent for it) or `anonymous_id` (FullStory has no anonymous users to delete: the
id is only suppressed). A request is recorded once (INSERT .. ON CONFLICT DO NOTHING), so a deletion list
read again, or by two runs at once, never duplicates a row. Statuses:

- `pending` (recorded, not sent yet), `deleting` (a run sent or is sending the DELETE; taken by a
  compare-and-set, so two runs do not both send it), `deleted` (FullStory answered 200: final, never sent
  again), `failed` (the last try failed; the next run tries again);
- `suppressed`: an anonymous id (nothing to delete).

Every row suppresses its person from the moment it is recorded, whatever its status: mapping filters their
rows (mapping/suppression.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa

from include.datafly_fullstory.ledger.engine import LedgerBase
from include.datafly_fullstory.ledger.schema import metadata

D_PENDING, D_DELETING, D_DELETED, D_FAILED, D_SUPPRESSED = (
    "pending",
    "deleting",
    "deleted",
    "failed",
    "suppressed",
)
PERSON_KINDS = ("user_id", "anonymous_id")
DELETING_LEASE_S = 3600.0  # a `deleting` row older than this (its run died) may be taken again

deletions = sa.Table(
    "dffs_deletions",
    metadata,
    sa.Column("destination", sa.String(300), primary_key=True),
    sa.Column("person_kind", sa.String(16), primary_key=True),  # user_id | anonymous_id
    sa.Column("person_key", sa.String(512), primary_key=True),
    sa.Column("source", sa.Text, nullable=False),  # where the request came from (file URI or "param")
    sa.Column("requested_at", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_error", sa.Text),
    sa.Column("run_id", sa.String(300)),  # the run that last tried it
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("deleted_at", sa.Float),
)
sa.Index("dffs_deletions_status", deletions.c.destination, deletions.c.status)


@dataclass(frozen=True)
class DeletionRow:
    person_kind: str
    person_key: str
    source: str
    status: str
    attempts: int
    last_error: str | None
    deleted_at: float | None


class DeletionOps(LedgerBase):
    """Operations on `dffs_deletions`."""

    def request_deletions(self, destination: str, requests: Iterable[tuple[str, str, str]]) -> int:
        """Record (person_kind, person_key, source) requests; ones already recorded are left alone.
        Returns how many are new."""
        now = self._now()
        rows = []
        for kind, key, source in dict.fromkeys(requests):
            if kind not in PERSON_KINDS:
                raise ValueError(f"person kind must be one of {PERSON_KINDS}, not {kind!r}")
            status = D_PENDING if kind == "user_id" else D_SUPPRESSED
            rows.append(
                {
                    "destination": destination,
                    "person_kind": kind,
                    "person_key": key,
                    "source": source,
                    "requested_at": now,
                    "status": status,
                    "attempts": 0,
                    "updated_at": now,
                }
            )
        if not rows:
            return 0
        rows.sort(key=lambda r: (r["person_kind"], r["person_key"]))  # same lock order in every run
        new = 0
        with self._tx() as conn:
            for start in range(0, len(rows), 1000):
                stmt = (
                    self._insert(deletions)
                    .on_conflict_do_nothing(
                        index_elements=[
                            deletions.c.destination,
                            deletions.c.person_kind,
                            deletions.c.person_key,
                        ]
                    )
                    .returning(deletions.c.person_key)
                )
                new += len(conn.execute(stmt, rows[start : start + 1000]).all())
        return new

    def deletions_due(self, destination: str) -> list[str]:
        """The uids whose DELETE is still to send: pending, failed, or `deleting` by a run that died."""
        stale = self._now() - DELETING_LEASE_S
        query = (
            sa.select(deletions.c.person_key)
            .where(
                deletions.c.destination == destination,
                deletions.c.person_kind == "user_id",
                sa.or_(
                    deletions.c.status.in_((D_PENDING, D_FAILED)),
                    sa.and_(deletions.c.status == D_DELETING, deletions.c.updated_at < stale),
                ),
            )
            .order_by(deletions.c.person_key)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def start_deletion(self, destination: str, uid: str, run_id: str) -> bool:
        """Take a due uid for this run (compare-and-set): False when another run has it or it is done."""
        now = self._now()
        stale = now - DELETING_LEASE_S
        with self._tx() as conn:
            taken = conn.execute(
                deletions.update()
                .where(
                    deletions.c.destination == destination,
                    deletions.c.person_kind == "user_id",
                    deletions.c.person_key == uid,
                    sa.or_(
                        deletions.c.status.in_((D_PENDING, D_FAILED)),
                        sa.and_(deletions.c.status == D_DELETING, deletions.c.updated_at < stale),
                    ),
                )
                .values(status=D_DELETING, attempts=deletions.c.attempts + 1, run_id=run_id, updated_at=now)
            ).rowcount
        return taken == 1

    def finish_deletion(self, destination: str, uid: str, *, error: str | None = None) -> None:
        """FullStory answered: `deleted` (final), or `failed` with the error (the next run tries again)."""
        now = self._now()
        values = (
            {"status": D_DELETED, "deleted_at": now, "last_error": None}
            if error is None
            else {"status": D_FAILED, "last_error": error[:2000]}
        )
        with self._tx() as conn:
            conn.execute(
                deletions.update()
                .where(
                    deletions.c.destination == destination,
                    deletions.c.person_kind == "user_id",
                    deletions.c.person_key == uid,
                    deletions.c.status == D_DELETING,
                )
                .values(updated_at=now, **values)
            )

    def suppressed_people(self, destination: str) -> tuple[frozenset[str], frozenset[str]]:
        """Every user_id and anonymous_id with a deletion request for this destination (any status)."""
        query = sa.select(deletions.c.person_kind, deletions.c.person_key).where(
            deletions.c.destination == destination
        )
        found: dict[str, set[str]] = {kind: set() for kind in PERSON_KINDS}
        with self.engine.connect() as conn:
            for kind, key in conn.execute(query):
                found[kind].add(key)
        return frozenset(found["user_id"]), frozenset(found["anonymous_id"])

    def deletion_rows(self, destination: str) -> list[DeletionRow]:
        """All requests of a destination (reports and tests)."""
        query = (
            sa.select(
                deletions.c.person_kind,
                deletions.c.person_key,
                deletions.c.source,
                deletions.c.status,
                deletions.c.attempts,
                deletions.c.last_error,
                deletions.c.deleted_at,
            )
            .where(deletions.c.destination == destination)
            .order_by(deletions.c.person_kind, deletions.c.person_key)
        )
        with self.engine.connect() as conn:
            return [DeletionRow(*row) for row in conn.execute(query)]
