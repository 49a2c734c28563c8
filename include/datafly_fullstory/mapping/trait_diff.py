"""Trait diffing: a user update is sent only when it differs from what was last delivered to the org.

`traits_hash(line)` is the sha256 of the user body as sent (uid, display_name, email, properties, schema),
in canonical JSON (keys sorted), so the same traits in another key order hash the same and a changed
display name, trait or declared type does not. The ledger (ledger/trait_ops.py) keeps the hash of each
user update it registered and marks it delivered when FullStory imported it.

In the mapping stage, `drop_unchanged` removes the user lines whose uid's latest registered update was
delivered with the same hash; their identify rows get outcome `skipped`, naming the run that delivered
them. An update that was rejected, is unknown or still in flight is not "delivered", so the next run sends
it again. After the chunks are registered, `register` records the hashes of the user lines of this run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import orjson
import pandas as pd

from include.datafly_fullstory import chunks as chunk_files
from include.datafly_fullstory import outcomes

# (uids, hashes) -> {uid: run id that delivered the same hash} for the uids whose update is unchanged
UnchangedLookup = Callable[[list[str], list[str]], Mapping[str, str]]


def traits_hash(body: Mapping[str, Any]) -> str:
    """sha256 of a user body in canonical JSON (keys sorted at every level)."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def uid_and_hash(line: bytes) -> tuple[str, str]:
    """The uid of a user line and the hash of its body."""
    body = orjson.loads(line)
    return str(body.get("uid")), traits_hash(body)


def drop_unchanged(
    lines: list[bytes], index: tuple, lookup: UnchangedLookup | None
) -> tuple[list[bytes], tuple, pd.DataFrame, int]:
    """User lines and their index (line_of, rows, event_ids) without the unchanged updates; the outcomes of
    the identify rows folded into those (`skipped`), and how many updates were unchanged."""
    empty = outcomes.frame([], [], "skipped", [], "user")
    if lookup is None or not lines:
        return lines, index, empty, 0
    uids, hashes = zip(*(uid_and_hash(line) for line in lines), strict=True)
    unchanged = lookup(list(uids), list(hashes))
    if not unchanged:
        return lines, index, empty, 0
    keep = np.array([u not in unchanged for u in uids], dtype=bool)
    line_of, rows, event_ids = index
    line_of = np.asarray(line_of, dtype=np.int64)
    kept_row = keep[line_of] if len(line_of) else np.array([], dtype=bool)
    renumber = np.cumsum(keep) - 1
    reasons = [
        f"traits unchanged since delivered by run {unchanged[uids[i]]}: no user update sent"
        for i in line_of[~kept_row]
    ]
    skipped = outcomes.frame(
        np.asarray(rows)[~kept_row],
        np.asarray(event_ids, dtype=object)[~kept_row],
        "skipped",
        reasons,
        "user",
    )
    new_index = (renumber[line_of[kept_row]], np.asarray(rows)[kept_row], np.asarray(event_ids)[kept_row])
    kept_lines = [line for line, k in zip(lines, keep, strict=True) if k]
    return kept_lines, new_index, skipped, int((~keep).sum())


def register(ledger: Any, destination: str, run_id: str, registered: Iterable[Mapping[str, Any]]) -> int:
    """Record the hash of every user line of this run's registered users chunks; returns how many."""
    count = 0
    for entry in registered:
        if entry.get("kind") != "users" or entry.get("ledger_chunk_id") is None:
            continue
        chunk = chunk_files.Chunk.from_entry(entry)
        lines = chunk_files.read_lines(chunk, entry.get("sha256"))
        items = [(i, *uid_and_hash(line)) for i, line in enumerate(lines)]
        ledger.register_traits(destination, run_id, int(entry["ledger_chunk_id"]), items)
        count += len(items)
    return count
