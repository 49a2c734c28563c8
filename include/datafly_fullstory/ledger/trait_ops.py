"""The ledger's user traits: which user update (by the hash of its body) was last delivered to an org
(`dffs_traits`), so an update equal to it is not sent again (mapping/trait_diff.py).

One row per user line of a registered users chunk: destination, uid, `traits_hash`, the run and chunk
that carry it, `registered_at`, and `delivered_at`, set once FullStory imported that line. An update is
unchanged only when the uid's latest registered line was delivered with the same hash: a line that was
rejected, is unknown, or is still in flight (a newer registration than the delivered one) does not count,
so the next run sends the update again. Registrations of a chunk are replaced when the chunk is
re-registered (a map retry).

`mark_traits_delivered(chunk_id)` reads which lines were delivered from the chunk's items (an identify
row's item carries its uid), so it can run at any time after the chunk finished, any number of times:
delivery calls it whenever it accounts for a users chunk. If it never ran (the task died in between),
the update is simply sent again next time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sqlalchemy as sa

from include.datafly_fullstory.ledger.engine import LedgerBase, _batches
from include.datafly_fullstory.ledger.schema import DELIVERED, items, metadata

traits = sa.Table(
    "dffs_traits",
    metadata,
    sa.Column("chunk_id", sa.BigInteger, primary_key=True),
    sa.Column("item_index", sa.Integer, primary_key=True),  # the line of the chunk
    sa.Column("destination", sa.String(300), nullable=False),
    sa.Column("uid", sa.String(512), nullable=False),
    sa.Column("traits_hash", sa.String(64), nullable=False),
    sa.Column("run_id", sa.String(300), nullable=False),
    sa.Column("registered_at", sa.Float, nullable=False),
    sa.Column("delivered_at", sa.Float),
)
sa.Index("dffs_traits_uid", traits.c.destination, traits.c.uid)


class TraitOps(LedgerBase):
    """Operations on `dffs_traits`."""

    def register_traits(
        self, destination: str, run_id: str, chunk_id: int, lines: Sequence[tuple[int, str, str]]
    ) -> None:
        """The user lines (item_index, uid, traits_hash) of a registered users chunk, replacing any
        earlier registration of that chunk."""
        now = self._now()
        with self._tx() as conn:
            conn.execute(traits.delete().where(traits.c.chunk_id == chunk_id))
            if lines:
                conn.execute(
                    traits.insert(),
                    [
                        {
                            "chunk_id": chunk_id,
                            "item_index": i,
                            "destination": destination,
                            "uid": uid,
                            "traits_hash": digest,
                            "run_id": run_id,
                            "registered_at": now,
                        }
                        for i, uid, digest in lines
                    ],
                )

    def mark_traits_delivered(self, chunk_id: int) -> int:
        """The chunk's lines whose identify rows were delivered become each uid's delivered update.
        Idempotent; returns how many were marked now."""
        delivered_uids = (
            sa.select(items.c.uid)
            .where(items.c.chunk_id == chunk_id, items.c.kind == "user", items.c.state == DELIVERED)
            .scalar_subquery()
        )
        with self._tx() as conn:
            return conn.execute(
                traits.update()
                .where(
                    traits.c.chunk_id == chunk_id,
                    traits.c.delivered_at.is_(None),
                    traits.c.uid.in_(delivered_uids),
                )
                .values(delivered_at=self._now())
            ).rowcount

    def unchanged_traits(
        self, destination: str, uids: Sequence[str], hashes: Sequence[str]
    ) -> dict[str, str]:
        """Of the given (uid, hash) pairs, the uids whose latest registered update was delivered with that
        hash, each with the run that delivered it."""
        wanted: Mapping[str, str] = dict(zip(uids, hashes, strict=True))
        latest: dict[str, tuple] = {}
        with self.engine.connect() as conn:
            for part in _batches(sorted(wanted)):
                query = sa.select(
                    traits.c.uid,
                    traits.c.traits_hash,
                    traits.c.run_id,
                    traits.c.delivered_at,
                    traits.c.registered_at,
                    traits.c.chunk_id,
                ).where(traits.c.destination == destination, traits.c.uid.in_(part))
                for row in conn.execute(query):
                    order = (row.registered_at, row.chunk_id)
                    if row.uid not in latest or order > latest[row.uid][0]:
                        latest[row.uid] = (order, row)
        return {
            uid: row.run_id
            for uid, (_, row) in latest.items()
            if row.delivered_at is not None and row.traits_hash == wanted[uid]
        }

    def traits_of(self, destination: str, uid: str) -> list[dict]:
        """Every registration of one user, oldest first (for operators and tests)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(traits)
                .where(traits.c.destination == destination, traits.c.uid == uid)
                .order_by(traits.c.registered_at, traits.c.chunk_id)
            )
            return [dict(r._mapping) for r in rows]
