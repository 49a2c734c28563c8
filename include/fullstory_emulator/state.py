"""What the emulator remembers: accepted events, users, batch jobs, idempotency keys, request counts.

None of these classes lock: the application object holds one lock around every mutation.
Events are kept column-wise (interned names, arrays, one orjson blob of properties per batch) so a
run of a million events costs about 100 bytes an event plus its properties, not a dict per event.
"""

from __future__ import annotations

import bisect
import copy
import heapq
import itertools
import math
import time
from array import array
from collections import Counter, deque
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

    def __len__(self) -> int:
        return len(self._kinds)

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


class Job:
    __slots__ = (
        "created",
        "failures",
        "finish_at",
        "finished",
        "id",
        "imported",
        "items",
        "kind",
        "no",
        "started",
    )

    def __init__(self, no: int, job_id: str, kind: str, created: float, items: int) -> None:
        self.no = no
        self.id = job_id
        self.kind = kind  # "events" | "users"
        self.created = created
        self.items = items
        self.started: float | None = None
        self.finish_at = math.inf
        self.finished: float | None = None
        # events: (start, end) range in the EventLog; users: list of imported user ids
        self.imported: tuple[int, int] | list[str] = (0, 0)
        # per-item failures: (message, code, original item, shared or None)
        self.failures: list[tuple[str, str, object, object]] = []

    @property
    def imports(self) -> int:
        if isinstance(self.imported, tuple):
            return self.imported[1] - self.imported[0]
        return len(self.imported)

    @property
    def status(self) -> str:
        if self.finished is None:
            return "PROCESSING"
        return "FAILED" if self.failures else "COMPLETED"

    def metadata(self) -> dict:
        meta = {"id": self.id, "status": self.status, "created": iso(self.created)}
        if self.finished is not None:
            meta["finished"] = iso(self.finished)
        return meta

    def status_response(self) -> dict:
        done = self.finished is not None
        return {
            "imports": self.imports if done else 0,
            "errors": len(self.failures) if done else 0,
            "job": self.metadata(),
        }


class TooManyJobs(Exception):
    def __init__(self, retry_after: float):
        super().__init__("too many in-progress batch jobs")
        self.retry_after = retry_after


class JobBoard:
    """Batch jobs of the org. At most `max_running` run at once, the rest queue (still PROCESSING);
    creation is refused at `max_in_progress` jobs or `max_in_progress_items` operations in progress.
    Time advances lazily: every call to `tick(now)` replays what happened since the last one."""

    def __init__(self, max_running=100, max_in_progress=200, max_in_progress_items=500_000) -> None:
        self.max_running = max_running
        self.max_in_progress = max_in_progress
        self.max_in_progress_items = max_in_progress_items
        self.jobs: dict[str, Job] = {}
        self.job_ids: list[str] = []
        self._running: list[tuple[float, int, Job]] = []  # heap by finish time
        self._queued: deque[tuple[Job, float]] = deque()
        self._in_progress_items = 0

    def in_progress(self) -> int:
        return len(self._running) + len(self._queued)

    def tick(self, now: float) -> None:
        while self._running and self._running[0][0] <= now:
            finish_at, _, job = heapq.heappop(self._running)
            job.finished = finish_at
            self._in_progress_items -= job.items
            if self._queued:
                queued, seconds = self._queued.popleft()
                self._start(queued, finish_at, seconds)

    def _start(self, job: Job, at: float, seconds: float) -> None:
        job.started = at
        job.finish_at = at + seconds
        heapq.heappush(self._running, (job.finish_at, job.no, job))

    def admit(self, items: int, now: float) -> None:
        """Raise TooManyJobs when FullStory would answer 429 to a new batch."""
        self.tick(now)
        if (
            self.in_progress() >= self.max_in_progress
            or self._in_progress_items >= self.max_in_progress_items
        ):
            soonest = self._running[0][0] if self._running else now + 1
            raise TooManyJobs(max(1.0, soonest - now))

    def create(self, job_id: str, kind: str, items: int, now: float, seconds: float) -> Job:
        job = Job(len(self.job_ids), job_id, kind, now, items)
        self.jobs[job_id] = job
        self.job_ids.append(job_id)
        self._in_progress_items += items
        if len(self._running) < self.max_running:
            self._start(job, now, seconds)
        else:
            self._queued.append((job, seconds))
        return job

    def get(self, kind: str, job_id: str, now: float) -> Job | None:
        self.tick(now)
        job = self.jobs.get(job_id)
        return job if job is not None and job.kind == kind else None

    def counts(self, now: float) -> dict:
        self.tick(now)
        by_status = Counter(job.status for job in self.jobs.values())
        return {"total": len(self.jobs), "queued": len(self._queued), **by_status}


class IdempotencyStore:
    """Stored answers per (org, route, Idempotency-Key), each with the digest of the body it answered."""

    def __init__(self, ttl_seconds: float = 86_400.0) -> None:
        self.ttl_seconds = ttl_seconds
        self.entries: dict[tuple, tuple[bytes, int, bytes, float]] = {}
        self.in_flight: set[tuple] = set()
        self.replays = 0
        self.mismatches = 0
        self.conflicts = 0
        self._since_prune = 0

    def lookup(self, scope: tuple, digest: bytes, now: float):
        """-> ("replay", status, body) | ("mismatch",) | ("conflict",) | ("new",)."""
        entry = self.entries.get(scope)
        if entry is not None and entry[3] + self.ttl_seconds <= now:
            del self.entries[scope]
            entry = None
        if entry is not None:
            if entry[0] != digest:
                self.mismatches += 1
                return ("mismatch",)
            self.replays += 1
            return ("replay", entry[1], entry[2])
        if scope in self.in_flight:
            self.conflicts += 1
            return ("conflict",)
        self.in_flight.add(scope)
        return ("new",)

    def finish(self, scope: tuple, digest: bytes, status: int, body: bytes, now: float, store: bool) -> None:
        self.in_flight.discard(scope)
        if store:
            self.entries[scope] = (digest, status, body, now)
            self._since_prune += 1
            if self._since_prune >= 1000:
                self._prune(now)

    def _prune(self, now: float) -> None:
        self._since_prune = 0
        cutoff = now - self.ttl_seconds
        for scope in [s for s, e in self.entries.items() if e[3] <= cutoff]:
            del self.entries[scope]

    def summary(self) -> dict:
        return {
            "stored": len(self.entries),
            "replays": self.replays,
            "mismatches": self.mismatches,
            "conflicts": self.conflicts,
        }
