"""What the emulator remembers of events and users: accepted events, users with their uid index, and
the clock (iso() renders its times). Batch jobs are in jobs.py, Idempotency-Key records in
idempotency.py.

None of these classes lock: the application object holds one lock around every mutation.
Events are kept column-wise (interned names, arrays, one orjson blob of properties per batch) so a
run of a million events costs about 100 bytes an event plus its properties, not a dict per event.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import time
from array import array
from datetime import UTC, datetime

import orjson

from include.fullstory_emulator.validation import (
    ID_KIND_NAMES,
    ID_SESSION_ID,
    ID_USER_ID,
    ID_USER_UID,
    MAX_PROPERTIES,
    MOST_RECENT_FLAG,
    ItemError,
)


def iso(epoch: float | None) -> str | None:
    """Epoch seconds -> RFC 3339 in UTC with milliseconds, as FullStory answers."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Clock:
    """Wall clock plus an offset, so tests can jump a day ahead (idempotency expiry, job timing)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset


def pack_events(events: list[tuple], keep_properties: bool) -> tuple:
    """Accepted event tuples -> columns (names, kinds, idents, timestamps, properties as one orjson blob)."""
    if not events:
        return (), b"", (), (), None
    names, kinds, idents, timestamps, props = zip(*events, strict=True)
    return names, bytes(kinds), idents, timestamps, orjson.dumps(props) if keep_properties else None


class EventLog:
    """Accepted events, column-wise. Index = arrival order. Properties are kept as one orjson blob
    per stored chunk (a batch, or a single event) and decoded on demand."""

    def __init__(self, keep_properties: bool = True) -> None:
        self.keep_properties = keep_properties
        self._name_ids: dict[str, int] = {}
        self._names: list[str] = []
        self._name_idx = array("I")
        self._kinds = bytearray()
        self._idents: list[str] = []
        self._timestamps = array("d")
        self._jobs = array("i")
        self._chunk_starts: list[int] = []
        self._chunk_props: list[bytes] = []
        self._decoded: tuple[int, list] = (-1, [])
        self._erased: set[int] = set()  # events of deleted users (DELETE /v2/users): kept out of every view

    def __len__(self) -> int:
        return len(self._kinds)

    def live_count(self) -> int:
        """Events stored and not erased by a user deletion."""
        return len(self._kinds) - len(self._erased)

    def is_erased(self, i: int) -> bool:
        return i in self._erased

    def erase_user(self, uid: str | None, user_id: str) -> int:
        """Erase the events that name this user (by `user.uid` or by `user.id`); returns how many."""
        erased = 0
        for i, ident in enumerate(self._idents):
            kind = self._kinds[i] & ~MOST_RECENT_FLAG
            if i not in self._erased and (
                (kind == ID_USER_UID and uid is not None and ident == uid)
                or (kind == ID_USER_ID and ident == user_id)
            ):
                self._erased.add(i)
                erased += 1
        return erased

    def append_many(self, events: list[tuple], received: float, job_no: int) -> tuple[int, int]:
        """Store accepted events (tuples from validation.check_event); returns their [start, end) range."""
        return self.append_columns(pack_events(events, self.keep_properties), received, job_no)

    def append_columns(self, columns: tuple, received: float, job_no: int) -> tuple[int, int]:
        """Store events packed by `pack_events` (possibly in a worker process)."""
        names, kinds, idents, timestamps, props_blob = columns
        start = len(self._kinds)
        if not names:
            return start, start
        name_ids = self._name_ids
        for name in set(names).difference(name_ids):
            name_ids[name] = len(self._names)
            self._names.append(name)
        self._name_idx.extend(map(name_ids.__getitem__, names))
        self._kinds.extend(kinds)
        self._idents.extend(idents)
        self._timestamps.extend([received if ts is None else ts for ts in timestamps])
        self._jobs.extend(array("i", [job_no]) * len(names))
        if self.keep_properties and props_blob is not None:
            self._chunk_starts.append(start)
            self._chunk_props.append(props_blob)
        return start, len(self._kinds)

    def name_at(self, i: int) -> str:
        return self._names[self._name_idx[i]]

    def properties_at(self, i: int):
        if not self._chunk_starts:
            return None
        chunk = bisect.bisect_right(self._chunk_starts, i) - 1
        if self._decoded[0] != chunk:  # pages walk a chunk in order: keep the last one decoded
            self._decoded = (chunk, orjson.loads(self._chunk_props[chunk]))
        return self._decoded[1][i - self._chunk_starts[chunk]]

    def _identification(self, i: int) -> tuple[int, str]:
        return self._kinds[i] & ~MOST_RECENT_FLAG, self._idents[i]

    def render(self, i: int, job_ids: list[str]) -> dict:
        """One event for the admin API."""
        kind, ident = self._identification(i)
        job_no = self._jobs[i]
        return {
            "seq": i,
            "name": self.name_at(i),
            "identification": ID_KIND_NAMES[kind],
            "ident": ident,
            "use_most_recent": bool(self._kinds[i] & MOST_RECENT_FLAG),
            "timestamp": iso(self._timestamps[i]),
            "job_id": job_ids[job_no] if job_no >= 0 else None,
            "properties": self.properties_at(i),
        }

    def render_import(self, i: int) -> dict:
        """One item of a batch job's /imports page (BatchCreateEventsResponse)."""
        kind, ident = self._identification(i)
        item: dict = {"name": self.name_at(i), "timestamp": iso(self._timestamps[i])}
        if kind == ID_USER_UID:
            item["user"] = {"uid": ident}
        elif kind == ID_USER_ID:
            item["user"] = {"id": ident}
        elif kind == ID_SESSION_ID:
            item["session"] = {"id": ident}
        props = self.properties_at(i)
        if props is not None:
            item["properties"] = props
        return item

    def matches(self, i: int, name: str | None, ident: str | None) -> bool:
        if i in self._erased:
            return False
        return (name is None or self.name_at(i) == name) and (ident is None or self._idents[i] == ident)


class UserRecord:
    __slots__ = ("display_name", "email", "id", "properties", "schema", "uid", "updates")

    def __init__(self, user_id: str, uid: str | None) -> None:
        self.id = user_id
        self.uid = uid
        self.display_name: str | None = None
        self.email: str | None = None
        self.properties: dict = {}
        self.schema: dict = {}
        self.updates = 0

    def as_dict(self) -> dict:
        out: dict = {"id": self.id}
        for field in ("uid", "display_name", "email"):
            value = getattr(self, field)
            if value is not None:
                out[field] = value
        out["properties"] = self.properties
        if self.schema:
            out["schema"] = {"properties": self.schema}
        return out


def deep_merge(target: dict, update: dict) -> None:
    """Latest value wins, nested objects merge (FullStory flattens properties to dotted paths)."""
    for key, value in update.items():
        current = target.get(key)
        if type(value) is dict and type(current) is dict:
            deep_merge(current, value)
        else:
            target[key] = value


def count_leaves(props: dict) -> int:
    return sum(count_leaves(v) if type(v) is dict else 1 for v in props.values())


class UserStore:
    """Users keyed by FullStory id, with the uid index that makes POST /v2/users an upsert."""

    def __init__(self) -> None:
        self.by_id: dict[str, UserRecord] = {}
        self.by_uid: dict[str, str] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self.by_id)

    def _new(self, uid: str | None) -> UserRecord:
        record = UserRecord(str(4_000_000_000 + next(self._ids)), uid)
        self.by_id[record.id] = record
        if uid:
            self.by_uid[uid] = record.id
        return record

    def _existing(self, item: dict) -> UserRecord | None:
        """The user an item updates, or None when it creates one. Checks, changes nothing."""
        uid = item.get("uid") or None
        user_id = item.get("id") or None
        if user_id is None:
            known = self.by_uid.get(uid) if uid else None
            return self.by_id[known] if known else None
        record = self.by_id.get(user_id)
        if record is None:
            raise ItemError("user_not_found", f"id {user_id!r}: user with that ID does not exist")
        if uid and record.uid and record.uid != uid:
            raise ItemError("invalid_argument", f"uid {uid!r} differs from the user's uid: uid is immutable")
        if uid and not record.uid and uid in self.by_uid:
            raise ItemError("invalid_argument", f"uid {uid!r} already belongs to another user")
        return record

    @staticmethod
    def _merged_properties(record: UserRecord | None, update: dict) -> dict:
        merged = copy.deepcopy(record.properties) if record else {}
        deep_merge(merged, update)
        count = count_leaves(merged)
        if count > MAX_PROPERTIES:
            raise ItemError(
                "invalid_argument",
                f"properties: the user would have {count} unique properties, at most {MAX_PROPERTIES}",
            )
        return merged

    def delete(self, record: UserRecord) -> None:
        """Forget a user: its record and its uid (a later upsert with that uid creates a new user)."""
        self.by_id.pop(record.id, None)
        if record.uid and self.by_uid.get(record.uid) == record.id:
            del self.by_uid[record.uid]

    def upsert(self, item: dict) -> UserRecord:
        """Create or update (latest value wins, properties merge); an ItemError leaves no trace."""
        record = self._existing(item)
        merged = self._merged_properties(record, item["properties"]) if item.get("properties") else None
        uid = item.get("uid") or None
        if record is None:
            record = self._new(uid)
        elif uid and not record.uid:
            record.uid = uid
            self.by_uid[uid] = record.id
        if merged is not None:
            record.properties = merged
        if "display_name" in item:
            record.display_name = item["display_name"]
        if "email" in item:
            record.email = item["email"]
        declared = (item.get("schema") or {}).get("properties")
        if declared:
            record.schema.update(declared)
        record.updates += 1
        return record
