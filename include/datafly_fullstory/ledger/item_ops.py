"""The ledger's items: claiming rows (INSERT .. ON CONFLICT DO NOTHING), reading claims back, taking over
dead runs' claims by compare-and-set, and the final state of rows never sent."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import sqlalchemy as sa

from include.datafly_fullstory.ledger.engine import LedgerBase, _batches
from include.datafly_fullstory.ledger.schema import (
    C_ABANDONED,
    C_CLAIMED,
    CHUNK_POSTED,
    CLAIMED,
    UNSENT_STATES,
    ChunkRow,
    ClaimColumns,
    ItemRow,
    LedgerError,
    NewItem,
    _chunk,
    chunks,
    items,
)


class ItemOps(LedgerBase):
    """Operations on `dffs_items` (and the chunks a take-over must check)."""

    def lookup(self, destination: str, event_ids: Sequence[str]) -> dict[str, ItemRow]:
        """The ledger rows of these event ids (with their chunk's status), by event id."""
        if not event_ids:
            return {}
        with self._tx() as conn:
            self._load_batch(conn, ((e, None, None, None, None) for e in sorted(set(event_ids))))
            rows = conn.execute(
                sa.text(
                    "SELECT i.event_id, i.kind, i.state, i.run_id, i.chunk_id, i.claimed_at, i.updated_at, i.code, "
                    "i.message, c.status, c.first_post_at, c.updated_at FROM dffs_batch b CROSS JOIN dffs_items i "
                    "LEFT JOIN dffs_chunks c ON c.id = i.chunk_id WHERE i.destination = :d AND i.event_id = b.event_id"
                ),
                {"d": destination},
            ).all()
        return {row[0]: ItemRow(*row) for row in rows}

    def known(self, destination: str, event_ids: Sequence[str]) -> set[str]:
        """Which of these event ids the ledger has any record of, for this destination."""
        if not event_ids:
            return set()
        with self._tx() as conn:
            self._load_batch(conn, ((e, None, None, None, None) for e in sorted(set(event_ids))))
            return set(
                conn.execute(
                    sa.text(
                        "SELECT i.event_id FROM dffs_batch b CROSS JOIN dffs_items i WHERE i.destination = :d "
                        "AND i.event_id = b.event_id"
                    ),
                    {"d": destination},
                ).scalars()
            )

    def insert_claims(
        self,
        destination: str,
        run_id: str,
        new: Sequence[NewItem] | ClaimColumns,
        *,
        window: tuple[str, str],
        state: str = CLAIMED,
    ) -> int:
        """Claim items nobody has a record of; existing rows are left alone. Returns how many were claimed
        now: when that is all of them, no other run had any, and the caller need not read them back."""
        columns = new if isinstance(new, ClaimColumns) else ClaimColumns.of(new)
        if not len(columns):
            return 0
        now = self._now()
        with self._tx() as conn:
            self._load_batch(conn, ((e, k, u, None, t) for e, k, u, t in columns.rows()))
            # In event_id order: two runs claiming overlapping ids lock rows in the same order and never
            # deadlock (Postgres would otherwise abort one of them).
            claimed = conn.execute(
                sa.text(
                    "INSERT INTO dffs_items (destination, event_id, kind, uid, state, run_id, chunk_id, window_start, "
                    "window_end, event_time, claimed_at, updated_at) "
                    "SELECT :d, event_id, a, b, :st, :r, NULL, :ws, :we, t, :now, :now FROM dffs_batch "
                    "WHERE true ORDER BY event_id ON CONFLICT DO NOTHING"
                ),
                {"d": destination, "st": state, "r": run_id, "ws": window[0], "we": window[1], "now": now},
            ).rowcount
        if self.backend == "postgresql" and claimed >= 10_000:
            # Fresh statistics after a big claim: without them the planner takes the table for a few rows
            # and walks every claimed item once per chunk it registers (quadratic in the run's size).
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("ANALYZE dffs_items")
        return claimed

    def take_over(
        self,
        destination: str,
        run_id: str,
        event_ids: Sequence[str],
        *,
        from_states: Sequence[str],
        from_run: str | None = None,
        unsent_chunk_only: bool = False,
        claimed_before: float | None = None,
        window: tuple[str, str],
    ) -> set[str]:
        """Compare-and-set: claim these items for `run_id` if they are still in one of `from_states` (and
        owned by `from_run`, claimed before `claimed_before`, in no chunk or an unsent one, when given).
        Returns the event ids this run now owns."""
        now = self._now()
        owned: set[str] = set()
        with self._tx() as conn:
            for part in _batches(sorted(set(event_ids))):
                cond = [
                    items.c.destination == destination,
                    items.c.event_id.in_(part),
                    items.c.state.in_(list(from_states)),
                ]
                if from_run is not None:
                    cond.append(items.c.run_id == from_run)
                if claimed_before is not None:
                    cond.append(items.c.claimed_at < claimed_before)
                if unsent_chunk_only:  # in no chunk, or in one that can never be POSTed any more
                    dead = sa.select(chunks.c.id).where(chunks.c.status == C_ABANDONED)
                    cond.append(sa.or_(items.c.chunk_id.is_(None), items.c.chunk_id.in_(dead)))
                conn.execute(
                    items.update()
                    .where(*cond)
                    .values(
                        state=CLAIMED,
                        run_id=run_id,
                        chunk_id=None,
                        claimed_at=now,
                        updated_at=now,
                        code=None,
                        message=None,
                        window_start=window[0],
                        window_end=window[1],
                    )
                )
                query = sa.select(items.c.event_id).where(
                    items.c.destination == destination,
                    items.c.event_id.in_(part),
                    items.c.run_id == run_id,
                    items.c.state == CLAIMED,
                    items.c.claimed_at == now,
                )
                owned.update(conn.execute(query).scalars())
        return owned

    def abandon_stale_chunks(self, chunk_ids: Iterable[int], *, updated_before: float) -> set[int]:
        """Compare-and-set `claimed -> abandoned` for chunks never POSTed and idle since `updated_before`;
        their owner can then never POST them. Returns the chunk ids abandoned now or before."""
        ids = sorted(set(chunk_ids))
        if not ids:
            return set()
        now = self._now()
        with self._tx() as conn:
            conn.execute(
                chunks.update()
                .where(
                    chunks.c.id.in_(ids), chunks.c.status == C_CLAIMED, chunks.c.updated_at < updated_before
                )
                .values(status=C_ABANDONED, updated_at=now)
            )
            query = sa.select(chunks.c.id).where(chunks.c.id.in_(ids), chunks.c.status == C_ABANDONED)
            return set(conn.execute(query).scalars())

    def settle_unsent(
        self, destination: str, run_id: str, states: Iterable[tuple[str, str, str | None]]
    ) -> None:
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
            self._update_from_batch(
                conn,
                "state = {b.a}, message = {b.b}, chunk_id = NULL, updated_at = :now",
                "i.run_id = :r AND i.state = :claimed",
                {"now": self._now(), "d": destination, "r": run_id, "claimed": CLAIMED},
            )

    def record_unclaimed(
        self,
        destination: str,
        run_id: str,
        new: Sequence[NewItem] | ClaimColumns,
        state: str,
        *,
        window: tuple[str, str],
    ) -> None:
        """Rows that never reach a claim (quarantined) are recorded once, so the look-back knows them."""
        if state not in UNSENT_STATES:
            raise LedgerError(f"{state!r} is not a state of an unsent item")
        self.insert_claims(destination, run_id, new, window=window, state=state)

    def stale_claims(self, destination: str, *, since: float, claimed_before: float) -> int:
        """How many claims with an event time from `since` on have gone unsent since `claimed_before`
        (their run died before sending them): the look-back re-reads the landing to take them over."""
        unsent = sa.select(chunks.c.id).where(chunks.c.status.in_([C_CLAIMED, C_ABANDONED]))
        query = (
            sa.select(sa.func.count())
            .select_from(items)
            .where(
                items.c.destination == destination,
                items.c.state == CLAIMED,
                items.c.event_time >= since,
                items.c.claimed_at < claimed_before,
                sa.or_(items.c.chunk_id.is_(None), items.c.chunk_id.in_(unsent)),
            )
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def orphaned_chunks(self, destination: str, *, since: float, idle_before: float) -> list[ChunkRow]:
        """Chunks POSTed but not finished, idle since `idle_before`, carrying items with an event time from
        `since` on: their run stopped mid-delivery; any later run may resume them (same bytes, same key)."""
        with_items = sa.select(items.c.chunk_id).where(
            items.c.destination == destination, items.c.event_time >= since, items.c.chunk_id.is_not(None)
        )
        query = sa.select(chunks).where(
            chunks.c.destination == destination,
            chunks.c.status.in_(list(CHUNK_POSTED)),
            chunks.c.updated_at < idle_before,
            chunks.c.id.in_(with_items),
        )
        with self.engine.connect() as conn:
            return [_chunk(r) for r in conn.execute(query)]

    def items_of_chunk(self, chunk_id: int) -> list[ItemRow]:
        query = sa.select(
            items.c.event_id,
            items.c.kind,
            items.c.state,
            items.c.run_id,
            items.c.chunk_id,
            items.c.claimed_at,
            items.c.updated_at,
            items.c.code,
            items.c.message,
        ).where(items.c.chunk_id == chunk_id)
        with self.engine.connect() as conn:
            return [ItemRow(*r) for r in conn.execute(query)]
