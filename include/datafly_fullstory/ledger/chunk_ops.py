"""The ledger's chunks: registering a chunk with its items, the compare-and-set before its first POST,
its later POSTs, and its end (every item's state and the chunk's terminal status in one transaction)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from include.datafly_fullstory.ledger.engine import LedgerBase, _batches
from include.datafly_fullstory.ledger.schema import (
    _CHUNK_FIELDS,
    C_ABANDONED,
    C_CLAIMED,
    C_POSTING,
    CHUNK_TERMINAL,
    CLAIMED,
    DELIVERED,
    ChunkRow,
    ClaimLost,
    LedgerError,
    _chunk,
    chunks,
    items,
)


class ChunkOps(LedgerBase):
    """Operations on `dffs_chunks` (and the items a chunk carries)."""

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

    def register_chunk(
        self,
        destination: str,
        run_id: str,
        *,
        name: str,
        kind: str,
        idempotency_key: str,
        payload_uri: str,
        sha256: str,
        items_count: int,
        size: int,
        event_ids: Sequence[str],
    ) -> ChunkRow:
        """Record a new chunk of this run and hand it its items, in one transaction. Every item must still
        be claimed by this run; if another run took one over, nothing is written and ClaimLost is raised."""
        now = self._now()
        with self._tx() as conn:
            existing = conn.execute(
                sa.select(chunks).where(
                    chunks.c.destination == destination, chunks.c.run_id == run_id, chunks.c.name == name
                )
            ).first()
            values = {
                "kind": kind,
                "idempotency_key": idempotency_key,
                "payload_uri": payload_uri,
                "sha256": sha256,
                "items": items_count,
                "bytes": size,
                "status": C_CLAIMED,
                "updated_at": now,
            }
            if existing is not None:
                if existing.status != C_CLAIMED and existing.status != C_ABANDONED:
                    raise LedgerError(
                        f"chunk {name} of run {run_id} was sent already ({existing.status}); "
                        "a new chunk needs a new name"
                    )
                conn.execute(chunks.update().where(chunks.c.id == existing.id).values(**values))
                chunk_id = existing.id
                conn.execute(
                    items.update()
                    .where(items.c.chunk_id == chunk_id, items.c.state == CLAIMED)
                    .values(chunk_id=None)
                )
            else:
                chunk_id = conn.execute(
                    chunks.insert().values(
                        destination=destination,
                        run_id=run_id,
                        name=name,
                        created_at=now,
                        submissions=0,
                        imports=0,
                        errors=0,
                        delivered_items=0,
                        rejected_items=0,
                        unknown_items=0,
                        **values,
                    )
                ).inserted_primary_key[0]
            self._load_batch(conn, ((e, None, None, None, None) for e in sorted(set(event_ids))))
            # Only items in no chunk: one the run sent already keeps its chunk (a chunk never re-sends them).
            assigned = self._update_from_batch(
                conn,
                "chunk_id = :c, updated_at = :now",
                "i.run_id = :r AND i.state = :st AND i.chunk_id IS NULL",
                {"c": chunk_id, "now": now, "d": destination, "r": run_id, "st": CLAIMED},
            )
            if assigned != len(set(event_ids)):
                raise ClaimLost(
                    f"chunk {name}: {len(set(event_ids)) - assigned} of its items are no longer "
                    f"claimed by run {run_id} (another run took them over)"
                )
            row = conn.execute(sa.select(chunks).where(chunks.c.id == chunk_id)).one()
        return _chunk(row)

    def abandon_unsent_chunks(self, destination: str, run_id: str) -> list[ChunkRow]:
        """Before a run maps again: its chunks never POSTed are dropped (their items go back to plain
        claims). Returns the run's chunks that were POSTed, which stay as they are."""
        now = self._now()
        with self._tx() as conn:
            unsent = sa.select(chunks.c.id).where(
                chunks.c.destination == destination, chunks.c.run_id == run_id, chunks.c.status == C_CLAIMED
            )
            conn.execute(
                items.update()
                .where(items.c.chunk_id.in_(unsent), items.c.state == CLAIMED)
                .values(chunk_id=None, updated_at=now)
            )
            conn.execute(
                chunks.update()
                .where(
                    chunks.c.destination == destination,
                    chunks.c.run_id == run_id,
                    chunks.c.status == C_CLAIMED,
                )
                .values(status=C_ABANDONED, updated_at=now)
            )
        return [c for c in self.chunks_of_run(destination, run_id) if c.status != C_ABANDONED]

    def begin_post(self, chunk_id: int) -> bool:
        """Compare-and-set `claimed -> posting` with `first_post_at`: True when this caller may POST the
        chunk for the first time. False when it is no longer `claimed` (abandoned, or POSTed already)."""
        now = self._now()
        with self._tx() as conn:
            done = conn.execute(
                chunks.update()
                .where(chunks.c.id == chunk_id, chunks.c.status == C_CLAIMED)
                .values(
                    status=C_POSTING,
                    first_post_at=now,
                    last_post_at=now,
                    submissions=chunks.c.submissions + 1,
                    updated_at=now,
                )
            ).rowcount
        return done == 1

    def revert_post(self, chunk_id: int) -> None:
        """`posting -> claimed` after FullStory answered a first POST saying it took nothing (401, 403, 404)."""
        with self._tx() as conn:
            conn.execute(
                chunks.update()
                .where(
                    chunks.c.id == chunk_id,
                    chunks.c.status == C_POSTING,
                    chunks.c.job_id.is_(None),
                    chunks.c.submissions == 1,
                )
                .values(
                    status=C_CLAIMED,
                    first_post_at=None,
                    last_post_at=None,
                    submissions=0,
                    updated_at=self._now(),
                )
            )

    def note_post(self, chunk_id: int) -> None:
        """A repeated POST of a chunk (same bytes, same key: FullStory replays its first answer)."""
        now = self._now()
        with self._tx() as conn:
            conn.execute(
                chunks.update()
                .where(chunks.c.id == chunk_id)
                .values(last_post_at=now, submissions=chunks.c.submissions + 1, updated_at=now)
            )

    def update_chunk(self, chunk_id: int, **values: Any) -> None:
        unknown = set(values) - set(_CHUNK_FIELDS)
        if unknown:
            raise LedgerError(f"unknown chunk field(s) {sorted(unknown)}")
        with self._tx() as conn:
            conn.execute(
                chunks.update().where(chunks.c.id == chunk_id).values(updated_at=self._now(), **values)
            )

    def finish_chunk(
        self,
        chunk_id: int,
        status: str,
        exceptions: Sequence[tuple[str, str, str | None, str | None]],
        *,
        others: str = DELIVERED,
        others_code: str | None = None,
        others_message: str | None = None,
        **values: Any,
    ) -> None:
        """The chunk ended: its items get state `others` (delivered, unless said otherwise), except those in
        `exceptions` (event_id, state, code, message), and the chunk its terminal status, in one
        transaction."""
        if status not in CHUNK_TERMINAL:
            raise LedgerError(f"{status!r} is not a terminal chunk status")
        now = self._now()
        with self._tx() as conn:
            destination = conn.execute(
                sa.select(chunks.c.destination).where(chunks.c.id == chunk_id)
            ).scalar_one()
            conn.execute(
                items.update()
                .where(items.c.chunk_id == chunk_id, items.c.state == CLAIMED)
                .values(state=others, code=others_code, message=others_message, updated_at=now)
            )
            if exceptions:
                self._load_batch(conn, ((e, st, c, m, None) for e, st, c, m in exceptions))
                self._update_from_batch(
                    conn,
                    "state = {b.a}, code = {b.b}, message = {b.c}, updated_at = :now",
                    "i.chunk_id = :c",
                    {"now": now, "d": destination, "c": chunk_id},
                )
            conn.execute(
                chunks.update()
                .where(chunks.c.id == chunk_id)
                .values(status=status, finished_at=now, updated_at=now, **values)
            )
