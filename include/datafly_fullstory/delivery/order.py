"""Users before events: events refer to users by uid, so a run's user properties land first."""

from __future__ import annotations

from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory.chunks import Chunk, manifest_entries
from include.datafly_fullstory.state import RunStore


def undelivered_users(store: RunStore, ledger: lg.Ledger, chunks: list[Chunk]) -> list[str]:
    """Users chunks of this run (per the manifest) that are not delivered yet and not part of `chunks`.
    Events refer to users by uid, so user properties should land first."""
    if not any(c.kind == "events" for c in chunks):
        return []
    given = {c.name for c in chunks}
    users = [
        Chunk.from_entry(e)
        for e in manifest_entries(store)
        if e["kind"] == "users" and e["name"] not in given
    ]
    rows = ledger.chunks_by_id(c.ledger_chunk_id for c in users if c.ledger_chunk_id is not None)
    return [
        c.name
        for c in users
        if c.mode != "replay"
        and rows.get(c.ledger_chunk_id) is not None
        and not rows[c.ledger_chunk_id].is_terminal
        and rows[c.ledger_chunk_id].status != lg.C_ABANDONED
    ]
