"""Delivery of payload chunks as FullStory batch import jobs, kept exactly once by the delivery ledger.

Pure logic: no Airflow imports; talks to FullStory through any object that satisfies `BatchClient` (the
Airflow hook does). One chunk = one batch job = one request with the Idempotency-Key the ledger recorded
for it. What happens to a chunk depends on its ledger status, never on what this task remembers:

    claimed     -> compare-and-set to `posting` (first_post_at) -> POST -> job id recorded (`submitted`)
    posting     -> the answer to a POST was lost: POST the same bytes with the same key again while the key
                   is younger than 23 h (FullStory replays its first answer); older: `unknown`, the run fails
    submitted / processing -> poll the recorded job
    completed / failed / unknown -> nothing to send; outcomes are (re)written from the ledger
    abandoned   -> another run took the items over (their claim lease ran out); nothing to send

When a job ends, its per-item errors are matched to rows by `datafly_event_id` (events) or `uid` (users),
never by bytes. If FullStory counts more errors than could be matched, the job's imports decide: items in
neither list are `unknown`, never `delivered`. Item states and the chunk's terminal status are written in
one transaction; the run folder's outcome files and dead letters follow from the ledger.

The loop is single-threaded on purpose: FullStory does the work asynchronously, so overlapping jobs (up to
`max_in_flight`) gives the parallelism; our side sends a POST and a few cheap GETs per chunk.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
import pandas as pd
import pyarrow as pa

from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory import outcomes
from include.datafly_fullstory.payloads import (
    INDEX_SCHEMA,
    batch_body,
    index_uri_of,
    read_index_uri,
    read_uri,
)
from include.datafly_fullstory.state import RunStore

log = logging.getLogger(__name__)

KINDS = ("users", "events")  # chunk kinds, in delivery order: users before the events that refer to them
ITEM_KIND = {"users": "user", "events": "event"}  # outcome kind, and where FullStory echoes an item
JOB_ENDED = ("COMPLETED", "FAILED")  # FAILED includes partial failure: per-item errors tell which
EVENT_ID_PROPERTY = "datafly_event_id"
NOT_ACCEPTED = (401, 403, 404)  # answers to a POST that say FullStory took nothing

DEAD_LETTER_SCHEMA = pa.schema(
    [
        ("chunk", pa.string()),
        ("item_index", pa.int32()),  # line number in the chunk; -1 when the error matched no line
        ("kind", pa.string()),  # event | user
        ("code", pa.string()),
        ("message", pa.string()),
        ("item", pa.string()),  # the item as sent (compact JSON): replayable as is, once fixed
        ("rows", pa.list_(pa.int64())),
        ("event_ids", pa.list_(pa.string())),
        ("job_id", pa.string()),
        ("idempotency_key", pa.string()),
    ]
)


class DeliveryError(RuntimeError):
    """Delivery cannot go on; the message says why and what to do. The ledger stays consistent."""


class DeliveryTimeout(DeliveryError):
    """The delivery ran out of time with jobs still processing; a re-run polls them (no resubmission)."""


class BatchClient(Protocol):
    #: What create_batch raises when FullStory refuses a batch as a whole with a final 4xx (bad body, too
    #: large, a key reused for other bytes). It carries `status`, `code` and `message`; delivery records the
    #: chunk as failed and its items as rejected. Any other exception stops the task.
    refused_error: type[Exception]

    def create_batch(self, kind: str, body: bytes, idempotency_key: str) -> dict[str, Any]:
        """POST /v2/<kind>/batch; returns the job metadata ({"id", "status", ...})."""

    def get_batch_status(self, kind: str, job_id: str) -> dict[str, Any]:
        """GET /v2/<kind>/batch/<job_id>; returns {"imports", "errors", "job": {...}}."""

    def iter_batch_errors(self, kind: str, job_id: str) -> Iterator[dict[str, Any]]:
        """Every per-item error of an ended job, all pages."""

    def iter_batch_imports(self, kind: str, job_id: str) -> Iterator[dict[str, Any]]:
        """Every imported item of an ended job, all pages."""

    def http_stats(self) -> dict[str, Any]:
        """{"requests", "retries", "status_counts", ...} for the stats."""


def fault_point(name: str) -> None:
    """A named step of delivery. Does nothing; the fault-injection tests replace it to stop a task exactly
    there (before the POST, after the POST, while polling, after the job ended)."""


# ---- chunks --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """A manifest entry: a chunk this run delivers (`deliver`), or an earlier run's chunk it resumes
    (`resume`) or replays for `force` (`replay`)."""

    name: str
    kind: str  # users | events
    ledger_chunk_id: int | None
    payload_uri: str | None
    index: str  # this run's index of the chunk (row, event_id per item), relative to the run folder
    sha256: str | None = None
    idempotency_key: str | None = None
    mode: str = "deliver"
    origin_run: str | None = None

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> Chunk:
        name = str(entry["name"])
        return cls(name=name, kind=str(entry["kind"]), ledger_chunk_id=entry.get("ledger_chunk_id"),
                   payload_uri=entry.get("payload_uri"), index=entry.get("index") or f"payloads/{name}.index.parquet",
                   sha256=entry.get("sha256"), idempotency_key=entry.get("idempotency_key"),
                   mode=entry.get("mode", "deliver"), origin_run=entry.get("origin_run"))


def manifest_entries(store: RunStore) -> list[dict[str, Any]]:
    if not store.exists("payloads", "manifest.json"):
        raise DeliveryError(f"{store.path('payloads', 'manifest.json')} is missing: run the mapping task first")
    return list(store.read_json("payloads", "manifest.json").get("chunks", []))


def load_chunks(store: RunStore, names: Iterable[str]) -> list[Chunk]:
    """The named chunks, as `payloads/manifest.json` describes them."""
    entries = {c["name"]: c for c in manifest_entries(store)}
    missing = [n for n in names if n not in entries]
    if missing:
        raise DeliveryError(f"chunk(s) {missing[:5]} are not in {store.path('payloads', 'manifest.json')}")
    return [Chunk.from_entry(entries[n]) for n in names]


def read_lines(chunk: Chunk, expected_sha: str | None) -> list[bytes]:
    """The chunk's lines, checked against the sha256 the ledger recorded when it was made."""
    data = read_uri(chunk.payload_uri)
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha and digest != expected_sha:
        raise DeliveryError(
            f"{chunk.payload_uri} changed after it was recorded (sha256 {digest[:12]}, ledger {expected_sha[:12]}); "
            "its bytes are what FullStory holds under its key, so it cannot be sent. Restore the file"
        )
    return [line for line in data.split(b"\n") if line.strip()]


def read_run_index(store: RunStore, chunk: Chunk) -> pd.DataFrame:
    if not store.exists(chunk.index):
        return INDEX_SCHEMA.empty_table().to_pandas()
    return store.read_table(chunk.index, columns=INDEX_SCHEMA.names).to_pandas()


# ---- FullStory's answers -> item states ---------------------------------------------------------------


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
        matched.append(ItemError(index, str(error.get("code") or "unknown"), str(error.get("message") or ""), item))
    return matched


@dataclass
class JobReading:
    states: dict[int, tuple[str, str | None, str | None]]  # line -> (state, code, message) when not delivered
    errors: list[ItemError]
    unmatched_errors: int


def read_job(client: BatchClient, chunk: Chunk, job_id: str, lines: list[bytes], reported_errors: int,
             job_status: str | None) -> JobReading:
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
        imported = {keys[k] for item in client.iter_batch_imports(chunk.kind, job_id)
                    if (k := item_key(item, chunk.kind)) in keys}
        message = (f"FullStory's job {job_id} counted {max(reported_errors, len(errors))} failed item(s) but only "
                   f"{len(states)} could be matched to a line by {EVENT_ID_PROPERTY if chunk.kind == 'events' else 'uid'}, "
                   "and this item is in neither its errors nor its imports. Check FullStory for it before sending it "
                   "again (allow_duplicates)")
        for index in range(len(lines)):
            if index not in states and index not in imported:
                states[index] = (lg.UNKNOWN, "unmatched_error", message)
    return JobReading(states, errors, unmatched)


def _key_young(row: lg.ChunkRow, now: float) -> bool:
    """Whether FullStory still remembers the chunk's key (with a margin for clock skew)."""
    age = row.key_age(now)
    return age is not None and age <= lg.KEY_SAFE_AGE_S


def expired_message(chunk: lg.ChunkRow) -> str:
    when = datetime.fromtimestamp(chunk.first_post_at or 0, UTC).isoformat(timespec="seconds")
    return (f"chunk {chunk.name} of run {chunk.run_id} was POSTed at {when} with Idempotency-Key "
            f"{chunk.idempotency_key}, but its answer was lost and FullStory forgets a key after 24 h: sending it "
            f"again could import it twice. Check FullStory for events whose {EVENT_ID_PROPERTY} is this row's "
            "event_id (users: the uid); if they are missing, run the window again with allow_duplicates")


# ---- the delivery loop ---------------------------------------------------------------------------------


@dataclass
class DeliverySettings:
    max_in_flight: int = 4  # batch jobs in progress at once (FullStory queues above 100 per org)
    poll_interval: float = 2.0  # first wait before polling a job; grows by 1.5x per poll
    max_poll_interval: float = 30.0
    timeout: float = 3600.0  # for the whole delivery; jobs left processing are resumed by a re-run
    progress_every: float = 10.0  # seconds between progress log lines


@dataclass
class DeliveryReport:
    chunks: int = 0
    done: int = 0
    already_complete: int = 0
    resumed: int = 0
    submitted: int = 0
    reposted: int = 0
    replayed: int = 0
    refused: int = 0
    abandoned: int = 0
    unknown_items: int = 0
    unmatched_errors: int = 0
    dry_run_rows: int = 0
    batches: int = 0
    bytes_sent: int = 0
    items_this_try: int = 0
    items: dict[str, dict[str, int]] = field(
        default_factory=lambda: {k: {"delivered": 0, "rejected": 0} for k in KINDS}
    )

    def stats(self, http: Mapping[str, Any]) -> dict[str, Any]:
        """Partial stats (stats.py keys). Item counts cover every chunk asked for, including chunks an
        earlier try completed; http, batches and bytes_sent count this try's traffic only."""
        return {
            "events": dict(self.items["events"]),
            "users": dict(self.items["users"]),
            "http": dict(http),
            "batches": self.batches,
            "bytes_sent": self.bytes_sent,
            "delivery": {
                "chunks": self.chunks, "already_complete": self.already_complete, "resumed": self.resumed,
                "submitted": self.submitted, "reposted": self.reposted, "replayed": self.replayed,
                "refused": self.refused, "abandoned": self.abandoned, "unknown_items": self.unknown_items,
                "unmatched_errors": self.unmatched_errors, "dry_run_rows": self.dry_run_rows,
            },
        }


@dataclass
class _Flight:
    chunk: Chunk
    job_id: str
    next_poll: float
    interval: float


class Delivery:
    """Delivers chunks through a `BatchClient`, keeping the ledger, outcomes and dead letters."""

    def __init__(self, store: RunStore, client: BatchClient | None, ledger: lg.Ledger | None, destination: str | None,
                 settings: DeliverySettings | None = None, *, logger: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.store, self.client, self.ledger, self.destination = store, client, ledger, destination
        self.settings = settings or DeliverySettings()
        self.log = logger or log
        self.clock = clock
        self.report = DeliveryReport()
        self._stop = threading.Event()
        self._started = clock()
        self._last_progress = self._started

    def stop(self) -> None:
        """Ask the loop to stop at its next step (from on_kill / a signal handler)."""
        self._stop.set()

    def run(self, chunks: list[Chunk]) -> DeliveryReport:
        self.report.chunks = len(chunks)
        deadline = self._started + self.settings.timeout
        for kind in KINDS:  # users first: events may refer to them
            phase = [c for c in chunks if c.kind == kind]
            if phase:
                self._run_phase(phase, deadline)
        self._progress(final=True)
        return self.report

    def dry_run(self, chunks: list[Chunk]) -> DeliveryReport:
        self.report.chunks = len(chunks)
        for chunk in chunks:
            index = read_run_index(self.store, chunk)
            self._write_outcomes(chunk, index, "dry_run", ["dry run: nothing was sent"] * len(index))
            self.report.dry_run_rows += len(index)
            self.report.done += 1
        return self.report

    def _run_phase(self, chunks: list[Chunk], deadline: float) -> None:
        pending: deque[Chunk] = deque(chunks)
        flights: list[_Flight] = []
        while pending or flights:
            self._check(deadline, flights)
            while pending and len(flights) < self.settings.max_in_flight:
                flight = self._start(pending.popleft())
                if flight is not None:
                    flights.append(flight)
            now = self.clock()
            for flight in [f for f in flights if f.next_poll <= now]:
                if self._poll(flight):
                    flights.remove(flight)
            if flights and not (pending and len(flights) < self.settings.max_in_flight):
                wake = min(f.next_poll for f in flights)
                self._stop.wait(max(0.0, min(wake, deadline) - self.clock()))

    def _check(self, deadline: float, flights: list[_Flight]) -> None:
        left = ", ".join(f"{f.chunk.name} (job {f.job_id})" for f in flights) or "none"
        if self._stop.is_set():
            raise DeliveryError(f"delivery stopped; jobs in flight, kept in the ledger for a re-run: {left}")
        if self.clock() > deadline:
            raise DeliveryTimeout(
                f"delivery did not finish within {self.settings.timeout:.0f}s; jobs still processing: {left}. "
                "Their job ids are in the ledger: a re-run polls them instead of submitting again"
            )

    # ---- one chunk -------------------------------------------------------------------------------------

    def _start(self, chunk: Chunk) -> _Flight | None:
        """Decide from the ledger what the chunk needs; returns a flight to poll, or None when done."""
        row = self.ledger.chunk(chunk.ledger_chunk_id)
        if row.destination != self.destination:
            raise DeliveryError(f"chunk {chunk.name} belongs to {row.destination} in the ledger, but this delivery "
                                f"talks to {self.destination}; nothing was sent")
        now = lg.wall_clock()
        if chunk.mode == "replay":
            if not _key_young(row, now):
                raise DeliveryError(f"force: {expired_message(row)}")
            return self._post(chunk, row, first=False, replay=True)
        if row.status == lg.C_CLAIMED:
            lines = read_lines(chunk, row.sha256)  # a changed file is refused before anything is recorded
            if self.ledger.begin_post(row.id):
                return self._post(chunk, self.ledger.chunk(row.id), first=True, lines=lines)
            row = self.ledger.chunk(row.id)  # someone changed it between our read and the compare-and-set
        if row.status == lg.C_ABANDONED:
            self.report.abandoned += 1
            self._account(chunk, row, new=False)
            return None
        if row.status == lg.C_POSTING and row.job_id is None:
            if not _key_young(row, now):
                self._expired(chunk, row)
                return None
            return self._post(chunk, row, first=False)
        if row.is_posted:
            self.report.resumed += 1
            self.log.info("chunk %s: resuming job %s (%s)", chunk.name, row.job_id, row.status)
            return _Flight(chunk, row.job_id, self.clock(), self.settings.poll_interval)
        self.report.already_complete += 1
        self.log.info("chunk %s: already %s (job %s), not sent again", chunk.name, row.status, row.job_id)
        self._account(chunk, row, new=False)
        return None

    def _post(self, chunk: Chunk, row: lg.ChunkRow, *, first: bool, replay: bool = False,
              lines: list[bytes] | None = None) -> _Flight | None:
        lines = lines if lines is not None else read_lines(chunk, row.sha256)
        body = batch_body(lines)
        if not first:
            self.ledger.note_post(row.id)
        fault_point("before_post")
        try:
            job = self.client.create_batch(chunk.kind, body, row.idempotency_key)
        except self.client.refused_error as refusal:
            if replay:
                raise DeliveryError(f"force: FullStory refused the replay of {chunk.name}: {refusal}") from refusal
            if not first and (refusal.status == 409 or "idempotency" in (refusal.code or "")):
                # FullStory still runs (409) or holds another answer under this key: the first POST may have
                # been imported, so the rows are not rejected; the chunk stays `posting` for a re-run.
                raise DeliveryError(f"chunk {chunk.name}: re-sent under its recorded key, FullStory answered "
                                    f"{refusal.status} {refusal.code}; kept for a later re-run") from refusal
            self._refused(chunk, row, lines, refusal)
            return None
        except Exception as exc:
            if first and getattr(exc, "status", None) in NOT_ACCEPTED:
                # FullStory answered that it took nothing (bad key, forbidden, wrong region): the chunk is
                # as unsent as before, so a fix of the connection sends it, even after 24 h.
                self.ledger.revert_post(row.id)
            raise
        fault_point("after_post")
        job_id = str(job["id"])
        if not replay:
            self.ledger.update_chunk(row.id, job_id=job_id, job_status=job.get("status"), status=lg.C_SUBMITTED)
        self.report.batches += 1
        self.report.bytes_sent += len(body)
        if replay:
            self.report.replayed += 1
        elif first:
            self.report.submitted += 1
        else:
            self.report.reposted += 1
        self.log.info("chunk %s: %s %d %s (%d bytes) as job %s", chunk.name,
                      "replayed" if replay else "submitted" if first else "re-sent under its recorded key",
                      len(lines), chunk.kind, len(body), job_id)
        interval = self.settings.poll_interval
        return _Flight(chunk, job_id, self.clock() + interval, interval)

    def _poll(self, flight: _Flight) -> bool:
        """Poll one job; True when it ended and its results are recorded."""
        chunk = flight.chunk
        status = self.client.get_batch_status(chunk.kind, flight.job_id)
        fault_point("while_polling")
        job_status = (status.get("job") or {}).get("status")
        row = self.ledger.chunk(chunk.ledger_chunk_id)
        if job_status not in JOB_ENDED:
            if chunk.mode != "replay" and (row.status != lg.C_PROCESSING or row.job_status != job_status):
                self.ledger.update_chunk(row.id, status=lg.C_PROCESSING, job_status=job_status)
            flight.interval = min(flight.interval * 1.5, self.settings.max_poll_interval)
            # Jitter keeps many mapped tasks from polling in lockstep.
            flight.next_poll = self.clock() + flight.interval * random.uniform(0.8, 1.2)
            return False
        if chunk.mode == "replay" or row.is_terminal:  # a replay, or another run recorded it meanwhile
            self._account(chunk, self.ledger.chunk(row.id), new=False)
            return True
        lines = read_lines(chunk, row.sha256)
        reading = read_job(self.client, chunk, flight.job_id, lines, int(status.get("errors") or 0), job_status)
        fault_point("after_job")
        self._record(chunk, row, lines, reading, job_status=job_status, imports=int(status.get("imports") or 0),
                     errors=int(status.get("errors") or 0))
        return True

    def _record(self, chunk: Chunk, row: lg.ChunkRow, lines: list[bytes], reading: JobReading, *, status: str = lg.C_COMPLETED,
                **values: Any) -> None:
        """The chunk's items get their final states and the chunk its terminal status, in one transaction;
        then this run's outcome files and dead letters."""
        exceptions = []
        if reading.states:  # the rows of lines not delivered; every other row of the chunk is
            original = read_index_uri(index_uri_of(chunk.payload_uri)).to_pandas()
            hit = original["item_index"].isin(list(reading.states))
            for index, event_id in zip(original["item_index"][hit], original["event_id"][hit], strict=True):
                exceptions.append((event_id, *reading.states[int(index)]))
        counts = {lg.DELIVERED: len(lines) - len(reading.states), lg.REJECTED: 0, lg.UNKNOWN: 0}
        for state, _, _ in reading.states.values():
            counts[state] += 1
        self.ledger.finish_chunk(row.id, status, exceptions, delivered_items=counts[lg.DELIVERED],
                                 rejected_items=counts[lg.REJECTED], unknown_items=counts[lg.UNKNOWN], **values)
        self.report.unmatched_errors += reading.unmatched_errors
        self.report.items_this_try += len(lines)
        if reading.unmatched_errors:
            self.log.warning("chunk %s: %d error(s) of job %s name no line of the chunk; see dead_letters/%s.parquet "
                             "(item_index -1)", chunk.name, reading.unmatched_errors, row.job_id, chunk.name)
        finished = self.ledger.chunk(row.id)
        self.log.info("chunk %s: job %s %s: %d delivered, %d rejected, %d unknown", chunk.name, finished.job_id,
                      finished.job_status, counts[lg.DELIVERED], counts[lg.REJECTED], counts[lg.UNKNOWN])
        self._account(chunk, finished, new=True, lines=lines, errors=reading.errors)

    def _refused(self, chunk: Chunk, row: lg.ChunkRow, lines: list[bytes], refusal: Exception) -> None:
        """The whole batch was refused (a final 4xx): every item is rejected with FullStory's reason."""
        code = refusal.code or str(refusal.status)
        errors = [ItemError(i, code, refusal.message, None) for i in range(len(lines))]
        reading = JobReading({i: (lg.REJECTED, code, refusal.message) for i in range(len(lines))}, errors, 0)
        self._record(chunk, row, lines, reading, status=lg.C_FAILED,
                     error=f"HTTP {refusal.status} {refusal.code}: {refusal.message}")
        self.report.refused += 1
        self.log.warning("chunk %s: FullStory refused the whole batch (%s); its %d items are dead letters",
                         chunk.name, refusal, len(lines))

    def _expired(self, chunk: Chunk, row: lg.ChunkRow) -> None:
        message = expired_message(row)
        self.log.error("%s", message)
        self.ledger.finish_chunk(row.id, lg.C_UNKNOWN, [], others=lg.UNKNOWN, others_code="key_expired",
                                 others_message=message, unknown_items=row.items)
        self._account(chunk, self.ledger.chunk(row.id), new=True)

    # ---- outcomes from the ledger ------------------------------------------------------------------------

    def _account(self, chunk: Chunk, row: lg.ChunkRow, *, new: bool, lines: list[bytes] | None = None,
                 errors: list[ItemError] | None = None) -> None:
        """This run's rows of the chunk get their outcome from the ledger; counts go to the report."""
        self.report.done += 1
        if chunk.mode != "replay":
            counts = self.report.items[chunk.kind]
            counts["delivered"] += row.delivered_items
            counts["rejected"] += row.rejected_items
            self.report.unknown_items += row.unknown_items
        name = f"delivery-{chunk.name}"
        if not new and self.store.exists("outcomes", f"{name}.parquet"):
            self._progress()
            return
        index = read_run_index(self.store, chunk)
        states = {i.event_id: i for i in self.ledger.items_of_chunk(row.id)} if len(index) else {}
        outcome, reason = [], []
        for event_id in index["event_id"]:
            item = states.get(event_id)
            out, why = _outcome_of(item, chunk, row, self.store.run_id)
            outcome.append(out)
            reason.append(why)
        self._write_outcomes(chunk, index, outcome, reason)
        if lines is None and any(o == "rejected" for o in outcome):
            lines = read_lines(chunk, row.sha256)
        self.store.write_table(_dead_letters(chunk, row, lines or [], index, outcome, reason, errors or []),
                               "dead_letters", f"{chunk.name}.parquet")
        self._progress()

    def _write_outcomes(self, chunk: Chunk, index: pd.DataFrame, outcome, reason) -> None:
        frame = pd.DataFrame({"row": index["row"].astype("int64"), "event_id": index["event_id"],
                              "outcome": outcome, "reason": reason, "kind": ITEM_KIND[chunk.kind],
                              "chunk": chunk.name})
        outcomes.write_outcomes(self.store, f"delivery-{chunk.name}", frame)

    def _progress(self, final: bool = False) -> None:
        now = self.clock()
        if not final and now - self._last_progress < self.settings.progress_every:
            return
        self._last_progress = now
        elapsed = max(now - self._started, 1e-9)
        self.log.info(
            "delivery progress: %d/%d chunks done (%d already complete), %d items sent this try, %.0f items/s",
            self.report.done, self.report.chunks, self.report.already_complete, self.report.items_this_try,
            self.report.items_this_try / elapsed,
        )


def _outcome_of(item: lg.ItemRow | None, chunk: Chunk, row: lg.ChunkRow, run_id: str) -> tuple[str, str | None]:
    if row.status == lg.C_ABANDONED:
        return "pending", (f"chunk {chunk.name} was taken over by another run after its claim lease ran out; "
                           "that run delivers these rows")
    if item is None or item.state not in lg.SENT_STATES:
        return "pending", f"chunk {chunk.name} has not finished"
    if item.state == lg.REJECTED:
        return "rejected", f"{item.code}: {item.message}"
    if item.state == lg.UNKNOWN:
        return "unknown", item.message
    if chunk.mode == "replay":
        return "delivered", (f"force: chunk {row.name} of run {row.run_id} replayed under its recorded key "
                             "(FullStory answered from its idempotency record; nothing imported twice)")
    if row.run_id != run_id:
        return "delivered", f"delivered by resuming chunk {row.name} of run {row.run_id}"
    return "delivered", None


def _dead_letters(chunk: Chunk, row: lg.ChunkRow, lines: list[bytes], index: pd.DataFrame, outcome: list[str],
                  reason: list[str | None], errors: list[ItemError]) -> pa.Table:
    """One row per rejected item of this run's rows, plus errors that named no line (item_index -1)."""
    rejected = index[[o == "rejected" for o in outcome]].assign(reason=[r for r, o in zip(reason, outcome, strict=True)
                                                                         if o == "rejected"])
    records = []
    for item_index, group in rejected.groupby("item_index", sort=True):
        code, _, message = str(group["reason"].iloc[0]).partition(": ")
        records.append({"chunk": chunk.name, "item_index": int(item_index), "kind": ITEM_KIND[chunk.kind],
                        "code": code, "message": message,
                        "item": lines[int(item_index)].decode() if int(item_index) < len(lines) else None,
                        "rows": [int(r) for r in group["row"]], "event_ids": [str(e) for e in group["event_id"]],
                        "job_id": row.job_id, "idempotency_key": row.idempotency_key})
    for e in errors:
        if e.item_index < 0:
            records.append({"chunk": chunk.name, "item_index": -1, "kind": ITEM_KIND[chunk.kind], "code": e.code,
                            "message": e.message, "item": orjson.dumps(e.item).decode(), "rows": [],
                            "event_ids": [], "job_id": row.job_id, "idempotency_key": row.idempotency_key})
    return pa.Table.from_pylist(records, schema=DEAD_LETTER_SCHEMA)


def undelivered_users(store: RunStore, ledger: lg.Ledger, chunks: list[Chunk]) -> list[str]:
    """Users chunks of this run (per the manifest) that are not delivered yet and not part of `chunks`.
    Events refer to users by uid, so user properties should land first."""
    if not any(c.kind == "events" for c in chunks):
        return []
    given = {c.name for c in chunks}
    users = [Chunk.from_entry(e) for e in manifest_entries(store) if e["kind"] == "users" and e["name"] not in given]
    rows = ledger.chunks_by_id(c.ledger_chunk_id for c in users if c.ledger_chunk_id is not None)
    return [c.name for c in users if c.mode != "replay"
            and rows.get(c.ledger_chunk_id) is not None and not rows[c.ledger_chunk_id].is_terminal
            and rows[c.ledger_chunk_id].status != lg.C_ABANDONED]
