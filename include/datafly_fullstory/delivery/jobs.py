"""FullStory's answers about a batch job -> the state of each line of its chunk.

Per-item errors are matched to lines by the item's id (`datafly_event_id` for events, `uid` for users),
never by bytes or position. If FullStory counts more errors than could be matched, the job's imports decide:
a line in neither list is `unknown`, never `delivered`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory.chunks import Chunk

ITEM_KIND = {"users": "user", "events": "event"}  # outcome kind, and where FullStory echoes an item
EVENT_ID_PROPERTY = "datafly_event_id"


def item_key(item: Any, kind: str) -> str | None:
    """What identifies an echoed item: its `datafly_event_id` property (events), its `uid` (users)."""
    if not isinstance(item, Mapping):
        return None
    if kind == "events":
        props = item.get("properties")
        value = props.get(EVENT_ID_PROPERTY) if isinstance(props, Mapping) else None
    else:
        user = item.get("user") if isinstance(item.get("user"), Mapping) else item
        value = user.get("uid")
    return str(value) if value is not None else None


def line_keys(lines: list[bytes], kind: str) -> dict[str, int]:
    """Item key -> line number in the chunk."""
    return {key: i for i, line in enumerate(lines) if (key := item_key(orjson.loads(line), kind)) is not None}


@dataclass
class ItemError:
    item_index: int  # -1: could not be matched to a line
    code: str
    message: str
    item: Any  # what FullStory echoed back

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.message}"


def match_errors(keys: Mapping[str, int], errors: Iterable[Mapping[str, Any]], kind: str) -> list[ItemError]:
    """Attach each error to its line by the item's id (see `item_key`); -1 when it names no line."""
    matched = []
    for error in errors:
        item = error.get(ITEM_KIND[kind], error.get("request"))
        index = keys.get(item_key(item, kind), -1)
        matched.append(
            ItemError(index, str(error.get("code") or "unknown"), str(error.get("message") or ""), item)
        )
    return matched


@dataclass
class JobReading:
    states: dict[int, tuple[str, str | None, str | None]]  # line -> (state, code, message) when not delivered
    errors: list[ItemError]
    unmatched_errors: int


def read_job(
    client, chunk: Chunk, job_id: str, lines: list[bytes], reported_errors: int, job_status: str | None
) -> JobReading:
    """Which lines FullStory rejected, and which it may not have imported."""
    if job_status != "FAILED" and reported_errors <= 0:
        return JobReading({}, [], 0)
    keys = line_keys(lines, chunk.kind)
    errors = match_errors(keys, client.iter_batch_errors(chunk.kind, job_id), chunk.kind)
    states: dict[int, tuple[str, str | None, str | None]] = {}
    for e in errors:
        if e.item_index >= 0 and e.item_index not in states:
            states[e.item_index] = (lg.REJECTED, e.code, e.message)
    unmatched = sum(1 for e in errors if e.item_index < 0)
    if max(reported_errors, len(errors)) > len(states):
        imported = {
            keys[k]
            for item in client.iter_batch_imports(chunk.kind, job_id)
            if (k := item_key(item, chunk.kind)) in keys
        }
        message = (
            f"FullStory's job {job_id} counted {max(reported_errors, len(errors))} failed item(s) but only "
            f"{len(states)} could be matched to a line by {EVENT_ID_PROPERTY if chunk.kind == 'events' else 'uid'}, "
            "and this item is in neither its errors nor its imports. Check FullStory for it before sending it "
            "again (allow_duplicates)"
        )
        for index in range(len(lines)):
            if index not in states and index not in imported:
                states[index] = (lg.UNKNOWN, "unmatched_error", message)
    return JobReading(states, errors, unmatched)


def key_young(row: lg.ChunkRow, now: float) -> bool:
    """Whether FullStory still remembers the chunk's key (with a margin for clock skew)."""
    age = row.key_age(now)
    return age is not None and age <= lg.KEY_SAFE_AGE_S


def expired_message(chunk: lg.ChunkRow) -> str:
    when = datetime.fromtimestamp(chunk.first_post_at or 0, UTC).isoformat(timespec="seconds")
    return (
        f"chunk {chunk.name} of run {chunk.run_id} was POSTed at {when} with Idempotency-Key "
        f"{chunk.idempotency_key}, but its answer was lost and FullStory forgets a key after 24 h: sending it "
        f"again could import it twice. Check FullStory for events whose {EVENT_ID_PROPERTY} is this row's "
        "event_id (users: the uid); if they are missing, run the window again with allow_duplicates"
    )
