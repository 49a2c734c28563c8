"""A delivered chunk's rows -> their outcome and, for rejected items, dead letters; from the ledger."""

from __future__ import annotations

import orjson
import pandas as pd

from include.datafly_fullstory import dead_letters, outcomes
from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory.chunks import Chunk, read_lines, read_run_index
from include.datafly_fullstory.delivery.jobs import ITEM_KIND, ItemError
from include.datafly_fullstory.mapping import identity
from include.datafly_fullstory.state import RunStore


def write_chunk_outcomes(
    store: RunStore,
    ledger: lg.Ledger,
    chunk: Chunk,
    row: lg.ChunkRow,
    *,
    new: bool,
    lines: list[bytes] | None = None,
    errors: list[ItemError] | None = None,
) -> None:
    """This run's rows of the chunk get their outcome from the ledger (`outcomes/delivery-<chunk>`), and its
    rejected items their dead letters. A chunk that ended in an earlier try keeps the files it wrote then."""
    if not new and outcomes.has_partial(store, f"delivery-{chunk.name}"):
        return
    index = read_run_index(store, chunk)
    states = {i.event_id: i for i in ledger.items_of_chunk(row.id)} if len(index) else {}
    outcome, reason = [], []
    for event_id in index["event_id"]:
        out, why = outcome_of(states.get(event_id), chunk, row, store.run_id)
        outcome.append(out)
        reason.append(why)
    reason = identity.annotate(store, index["row"].tolist(), outcome, reason)  # "stitched: ..." notes
    write_outcomes(store, chunk, index, outcome, reason)
    if lines is None and any(o == "rejected" for o in outcome):
        lines = read_lines(chunk, row.sha256)
    dead_letters.write_chunk(
        store, chunk.name, dead_letter_table(chunk, row, lines or [], index, outcome, reason, errors or [])
    )


def write_outcomes(store: RunStore, chunk: Chunk, index: pd.DataFrame, outcome, reason) -> None:
    frame = outcomes.frame(
        index["row"].astype("int64"), index["event_id"], outcome, reason, ITEM_KIND[chunk.kind], chunk.name
    )
    outcomes.write_outcomes(store, f"delivery-{chunk.name}", frame)


def outcome_of(
    item: lg.ItemRow | None, chunk: Chunk, row: lg.ChunkRow, run_id: str
) -> tuple[str, str | None]:
    if row.status == lg.C_ABANDONED:
        return "pending", (
            f"chunk {chunk.name} was taken over by another run after its claim lease ran out; "
            "that run delivers these rows"
        )
    if item is None or item.state not in lg.SENT_STATES:
        return "pending", f"chunk {chunk.name} has not finished"
    if item.state == lg.REJECTED:
        return "rejected", f"{item.code}: {item.message}"
    if item.state == lg.UNKNOWN:
        return "unknown", item.message
    if chunk.mode == "replay":
        return "delivered", (
            f"force: chunk {row.name} of run {row.run_id} replayed under its recorded key "
            "(FullStory answered from its idempotency record; nothing imported twice)"
        )
    if row.run_id != run_id:
        return "delivered", f"delivered by resuming chunk {row.name} of run {row.run_id}"
    return "delivered", None


def dead_letter_table(
    chunk: Chunk,
    row: lg.ChunkRow,
    lines: list[bytes],
    index: pd.DataFrame,
    outcome: list[str],
    reason: list[str | None],
    errors: list[ItemError],
) -> list[dict]:
    """One row per rejected item of this run's rows, plus errors that named no line (item_index -1)."""
    rejected = index[[o == "rejected" for o in outcome]].assign(
        reason=[r for r, o in zip(reason, outcome, strict=True) if o == "rejected"]
    )
    records = []
    for item_index, group in rejected.groupby("item_index", sort=True):
        code, _, message = str(group["reason"].iloc[0]).partition(": ")
        records.append(
            {
                "chunk": chunk.name,
                "item_index": int(item_index),
                "kind": ITEM_KIND[chunk.kind],
                "code": code,
                "message": message,
                "item": lines[int(item_index)].decode() if int(item_index) < len(lines) else None,
                "rows": [int(r) for r in group["row"]],
                "event_ids": [str(e) for e in group["event_id"]],
                "job_id": row.job_id,
                "idempotency_key": row.idempotency_key,
            }
        )
    for e in errors:
        if e.item_index < 0:
            records.append(
                {
                    "chunk": chunk.name,
                    "item_index": -1,
                    "kind": ITEM_KIND[chunk.kind],
                    "code": e.code,
                    "message": e.message,
                    "item": orjson.dumps(e.item).decode(),
                    "rows": [],
                    "event_ids": [],
                    "job_id": row.job_id,
                    "idempotency_key": row.idempotency_key,
                }
            )
    return records
