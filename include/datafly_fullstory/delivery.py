"""Delivery of payload chunks as FullStory batch import jobs: submit, poll, read per-item errors, write
outcomes and dead letters. Pure logic: no Airflow imports; talks to FullStory through any object that
satisfies `BatchClient` (the Airflow hook does, a test double could).

One chunk = one batch job = one atomic request with a deterministic Idempotency-Key. The loop is
single-threaded on purpose: FullStory does the work asynchronously, so overlapping jobs (up to
`max_in_flight`) gives the parallelism; our side only sends a POST and a few cheap GETs per chunk, and one
thread keeps the ledger writes and HTTP counters simple and ordered.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa

from include.datafly_fullstory import outcomes
from include.datafly_fullstory.ledger import (
    COMPLETED,
    FAILED,
    PROCESSING,
    ChunkRecord,
    Ledger,
    utc_now,
)
from include.datafly_fullstory.payloads import batch_body
from include.datafly_fullstory.state import RunStore

log = logging.getLogger(__name__)

KINDS = ("users", "events")  # chunk kinds, in delivery order: users before the events that refer to them
OUTCOME_KIND = {"users": "user", "events": "event"}
ERROR_ITEM_FIELD = {"users": "user", "events": "event"}  # where FullStory echoes the original item
JOB_ENDED = ("COMPLETED", "FAILED")  # FAILED includes partial failure: per-item errors tell which
MAX_ERROR_PAGES = 10_000  # a chunk has <= 50,000 items; this only bounds a misbehaving server

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


class DeliveryOrderError(DeliveryError):
    """Events were asked for while users chunks of the same run are not delivered yet."""


class BatchRefused(Exception):  # noqa: N818 - a refusal is an answer, not a bug
    """FullStory refused a batch request as a whole with a final 4xx (bad body, too large).

    The hook's error type inherits from this, so this module can tell a refused chunk (record it as
    failed, reject its items) from an error that stops the task (auth, region, retries exhausted)."""

    status: int = 400
    code: str = ""
    message: str = ""


class BatchClient(Protocol):
    def create_batch(self, kind: str, body: bytes, idempotency_key: str) -> dict[str, Any]:
        """POST /v2/<kind>/batch; returns the job metadata ({"id", "status", ...})."""

    def get_batch_status(self, kind: str, job_id: str) -> dict[str, Any]:
        """GET /v2/<kind>/batch/<job_id>; returns {"imports", "errors", "job": {...}}."""

    def iter_batch_errors(self, kind: str, job_id: str) -> Iterator[dict[str, Any]]:
        """Every per-item error of an ended job, all pages."""

    def http_stats(self) -> dict[str, Any]:
        """{"requests", "retries", "status_counts", ...} for the stats."""


# ---- chunks --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    name: str
    kind: str  # users | events
    idempotency_key: str | None = None  # from the manifest, when the mapping stage put one there
    sha256: str | None = None
    items: int | None = None


def chunk_kind(name: str) -> str:
    kind = name.split("-", 1)[0]
    if kind not in KINDS:
        raise DeliveryError(f"chunk {name!r}: the name must start with users- or events-")
    return kind


def load_chunks(store: RunStore, names: Iterable[str]) -> list[Chunk]:
    """The named chunks, with what payloads/manifest.json says about them (if it exists)."""
    entries: dict[str, Mapping[str, Any]] = {}
    if store.exists("payloads", "manifest.json"):
        entries = {c["name"]: c for c in store.read_json("payloads", "manifest.json").get("chunks", [])}
    chunks = []
    for name in names:
        entry = entries.get(name, {})
        if entries and not entry:
            raise DeliveryError(f"chunk {name!r} is not in {store.path('payloads', 'manifest.json')}")
        kind = entry.get("kind") or chunk_kind(name)
        key = entry.get("idempotency_key")
        chunks.append(Chunk(name, kind, key, entry.get("sha256"), entry.get("items")))
    return chunks


def manifest_chunk_names(store: RunStore) -> list[str]:
    if not store.exists("payloads", "manifest.json"):
        return []
    return [c["name"] for c in store.read_json("payloads", "manifest.json").get("chunks", [])]


def read_lines(store: RunStore, chunk: Chunk) -> tuple[list[bytes], str]:
    """The chunk's lines and the sha256 of its bytes (checked against the manifest)."""
    data = store.read_bytes("payloads", f"{chunk.name}.jsonl")
    digest = hashlib.sha256(data).hexdigest()
    if chunk.sha256 and chunk.sha256 != digest:
        raise DeliveryError(
            f"payloads/{chunk.name}.jsonl changed after mapping (sha256 {digest[:12]}, manifest "
            f"{chunk.sha256[:12]}); re-run the mapping task for this run before delivering"
        )
    return [line for line in data.split(b"\n") if line.strip()], digest


def key_for(chunk: Chunk, digest: str) -> str:
    """The chunk's Idempotency-Key: the manifest's (payloads.idempotency_key), else a pure function of the
    chunk's content (sha256 hex), so every retry and re-run of the same chunk sends the same key."""
    return chunk.idempotency_key or f"dffs-{chunk.kind}-{digest[:40]}"


def read_index(store: RunStore, chunk: Chunk) -> pd.DataFrame:
    table = store.read_table(
        "payloads", f"{chunk.name}.index.parquet", columns=["item_index", "row", "event_id"]
    )
    return table.to_pandas()


# ---- matching FullStory's per-item errors to chunk lines ----------------------------------------------


def _canonical(value: Any) -> Any:
    """JSON value normalised for comparison: key order and 1 vs 1.0 do not matter."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _fingerprint(value: Any) -> bytes:
    return orjson.dumps(_canonical(value), option=orjson.OPT_SORT_KEYS)


@dataclass
class ItemError:
    item_index: int  # -1: could not be matched to a line
    code: str
    message: str
    item: Any  # what FullStory echoed back

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.message}"


def match_errors(lines: list[bytes], errors: Iterable[Mapping[str, Any]], kind: str) -> list[ItemError]:
    """Attach each error to the chunk line it is about. FullStory identifies a failed item only by
    echoing it back, so lines are matched on content; identical lines are taken in chunk order, so two
    errors for two identical items mark both, never one twice."""
    by_content: dict[bytes, deque[int]] = defaultdict(deque)
    for index, line in enumerate(lines):
        by_content[_fingerprint(orjson.loads(line))].append(index)
    matched = []
    for error in errors:
        item = error.get(ERROR_ITEM_FIELD[kind], error.get("request"))
        slots = by_content.get(_fingerprint(item)) if item is not None else None
        index = slots.popleft() if slots else -1
        code = str(error.get("code") or "unknown")
        matched.append(ItemError(index, code, str(error.get("message") or ""), item))
    return matched


# ---- per-chunk results: outcomes and dead letters ------------------------------------------------------


@dataclass
class ChunkResult:
    delivered_items: int
    rejected_items: int
    delivered_rows: int
    rejected_rows: int
    unmatched_errors: int


def write_results(
    store: RunStore, chunk: Chunk, record: ChunkRecord, lines: list[bytes], errors: list[ItemError]
) -> ChunkResult:
    """Write `outcomes/delivery-<chunk>.parquet` (one row per input row) and `dead_letters/<chunk>.parquet`
    (one row per rejected item; written even when empty, so a forced re-run replaces an older file)."""
    index = read_index(store, chunk)
    first_error = {e.item_index: e for e in reversed(errors) if e.item_index >= 0}
    reason_of = {i: e.reason for i, e in first_error.items()}
    rejected = index["item_index"].isin(list(reason_of))
    frame = pd.DataFrame(
        {
            "row": index["row"].astype("int64"),
            "event_id": index["event_id"],
            "outcome": np.where(rejected.to_numpy(), "rejected", "delivered"),
            "reason": index["item_index"].map(reason_of) if reason_of else None,
            "kind": OUTCOME_KIND[chunk.kind],
            "chunk": chunk.name,
        }
    )
    outcomes.write_outcomes(store, f"delivery-{chunk.name}", frame)
    store.write_table(
        _dead_letters(chunk, record, lines, errors, index), "dead_letters", f"{chunk.name}.parquet"
    )
    rejected_rows = int((frame["outcome"] == "rejected").sum())
    return ChunkResult(
        delivered_items=len(lines) - len(first_error),
        rejected_items=len(first_error),
        delivered_rows=len(frame) - rejected_rows,
        rejected_rows=rejected_rows,
        unmatched_errors=sum(1 for e in errors if e.item_index < 0),
    )


def _dead_letters(
    chunk: Chunk, record: ChunkRecord, lines: list[bytes], errors: list[ItemError], index: pd.DataFrame
) -> pa.Table:
    # Only the failed items' rows: grouping the whole index costs a Python call per item.
    failed = index[index["item_index"].isin([e.item_index for e in errors if e.item_index >= 0])]
    rows_of = failed.groupby("item_index")["row"].agg(list).to_dict() if len(failed) else {}
    ids_of = failed.groupby("item_index")["event_id"].agg(list).to_dict() if len(failed) else {}
    records = [
        {
            "chunk": chunk.name,
            "item_index": e.item_index,
            "kind": OUTCOME_KIND[chunk.kind],
            "code": e.code,
            "message": e.message,
            "item": lines[e.item_index].decode() if e.item_index >= 0 else orjson.dumps(e.item).decode(),
            "rows": [int(r) for r in rows_of.get(e.item_index, [])],
            "event_ids": [None if pd.isna(i) else str(i) for i in ids_of.get(e.item_index, [])],
            "job_id": record.job_id,
            "idempotency_key": record.idempotency_key,
        }
        for e in errors
    ]
    return pa.Table.from_pylist(records, schema=DEAD_LETTER_SCHEMA)


def write_dry_run(store: RunStore, chunk: Chunk) -> int:
    """Outcome `dry_run` for every row of the chunk; nothing is sent and the ledger is not touched (a later
    real run must still deliver the chunk)."""
    index = read_index(store, chunk)
    frame = pd.DataFrame(
        {
            "row": index["row"].astype("int64"),
            "event_id": index["event_id"],
            "outcome": "dry_run",
            "reason": "dry run: nothing was sent",
            "kind": OUTCOME_KIND[chunk.kind],
            "chunk": chunk.name,
        }
    )
    outcomes.write_outcomes(store, f"delivery-{chunk.name}", frame)
    return len(frame)


def undelivered_users(store: RunStore, chunks: list[Chunk]) -> list[str]:
    """Users chunks of this run (per the manifest) that are not delivered yet and not part of `chunks`.
    Events refer to users by uid, so user properties should land first."""
    if not any(c.kind == "events" for c in chunks):
        return []
    given = {c.name for c in chunks}
    ledger = Ledger(store)
    names = [n for n in manifest_chunk_names(store) if chunk_kind(n) == "users" and n not in given]
    return [n for n in names if not ((record := ledger.get(n)) and record.is_terminal)]


# ---- the delivery loop ---------------------------------------------------------------------------------


@dataclass
class DeliverySettings:
    max_in_flight: int = 4  # batch jobs in progress at once (FullStory queues above 100 per org)
    poll_interval: float = 2.0  # first wait before polling a job; grows by 1.5x per poll
    max_poll_interval: float = 30.0
    timeout: float = 3600.0  # for the whole delivery; jobs left processing are resumed by a re-run
    force: bool = False  # re-submit completed chunks (same keys: FullStory replays, no duplicates)
    progress_every: float = 10.0  # seconds between progress log lines


@dataclass
class DeliveryReport:
    chunks: int = 0
    done: int = 0
    already_complete: int = 0
    resumed: int = 0
    submitted: int = 0
    refused: int = 0
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
        earlier try completed, so they agree with the outcome files; http, batches and bytes_sent count
        this try's traffic only."""
        return {
            "events": dict(self.items["events"]),
            "users": dict(self.items["users"]),
            "http": dict(http),
            "batches": self.batches,
            "bytes_sent": self.bytes_sent,
            "delivery": {
                "chunks": self.chunks,
                "already_complete": self.already_complete,
                "resumed": self.resumed,
                "submitted": self.submitted,
                "refused": self.refused,
                "unmatched_errors": self.unmatched_errors,
                "dry_run_rows": self.dry_run_rows,
            },
        }


@dataclass
class _Flight:
    chunk: Chunk
    record: ChunkRecord
    next_poll: float
    interval: float


class Delivery:
    """Delivers chunks through a `BatchClient`, keeping the ledger, outcomes and dead letters."""

    def __init__(
        self,
        store: RunStore,
        client: BatchClient,
        settings: DeliverySettings | None = None,
        *,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.client = client
        self.settings = settings or DeliverySettings()
        self.log = logger or log
        self.clock = clock
        self.ledger = Ledger(store)
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
            self.report.dry_run_rows += write_dry_run(self.store, chunk)
            self.report.done += 1
        return self.report

    def _run_phase(self, chunks: list[Chunk], deadline: float) -> None:
        pending, flights = self._triage(chunks)
        while pending or flights:
            self._check(deadline, flights)
            while pending and len(flights) < self.settings.max_in_flight:
                flight = self._submit(pending.popleft())
                if flight is not None:
                    flights.append(flight)
            now = self.clock()
            for flight in [f for f in flights if f.next_poll <= now]:
                if self._poll(flight):
                    flights.remove(flight)
            if flights and not (pending and len(flights) < self.settings.max_in_flight):
                wake = min(f.next_poll for f in flights)
                self._stop.wait(max(0.0, min(wake, deadline) - self.clock()))

    def _triage(self, chunks: list[Chunk]) -> tuple[deque[Chunk], list[_Flight]]:
        pending: deque[Chunk] = deque()
        flights: list[_Flight] = []
        for chunk in chunks:
            record = self._current_record(chunk)
            if record is not None and record.is_terminal and not self.settings.force:
                self.report.already_complete += 1
                self._account(record)
                self.log.info(
                    "chunk %s: already %s (job %s), not sent again", chunk.name, record.status, record.job_id
                )
            elif record is not None and record.is_in_flight:
                # Resume: the job was accepted by an earlier try; poll it, never submit the chunk again.
                self.report.resumed += 1
                flights.append(_Flight(chunk, record, self.clock(), self.settings.poll_interval))
                self.log.info("chunk %s: resuming job %s (%s)", chunk.name, record.job_id, record.status)
            else:
                pending.append(chunk)
        return pending, flights

    def _current_record(self, chunk: Chunk) -> ChunkRecord | None:
        """The chunk's ledger record, unless it was made for different content (mapping re-ran with other
        data): then FullStory holds the old content, and sending the new one may import events twice, so
        that takes `force`."""
        record = self.ledger.get(chunk.name)
        expected = key_for(chunk, chunk.sha256) if chunk.idempotency_key or chunk.sha256 else None
        if record is None or expected is None or record.idempotency_key == expected:
            return record
        if not self.settings.force:
            raise DeliveryError(
                f"payloads/{chunk.name}.jsonl changed since it was sent as job {record.job_id} "
                f"({record.status}); FullStory holds the earlier content and re-sending may duplicate "
                "events. Restore the earlier payloads, or re-run with force=True to send the new content"
            )
        self.log.warning(
            "chunk %s: content changed since job %s; force: sending the new content",
            chunk.name,
            record.job_id,
        )
        return None

    def _check(self, deadline: float, flights: list[_Flight]) -> None:
        left = ", ".join(f"{f.chunk.name} (job {f.record.job_id})" for f in flights) or "none"
        if self._stop.is_set():
            raise DeliveryError(f"delivery stopped; jobs in flight, kept in the ledger for a re-run: {left}")
        if self.clock() > deadline:
            raise DeliveryTimeout(
                f"delivery did not finish within {self.settings.timeout:.0f}s; jobs still processing: {left}. "
                "Their job ids are in the ledger: a re-run polls them instead of submitting again"
            )

    def _submit(self, chunk: Chunk) -> _Flight | None:
        lines, digest = read_lines(self.store, chunk)
        key = key_for(chunk, digest)
        previous = self.ledger.get(chunk.name)
        if previous is not None and previous.idempotency_key != key:
            self.log.warning(
                "chunk %s: content changed since job %s (new Idempotency-Key); FullStory sees a new request",
                chunk.name,
                previous.job_id,
            )
        body = batch_body(lines)
        record = ChunkRecord(
            chunk=chunk.name,
            kind=chunk.kind,
            idempotency_key=key,
            items=len(lines),
            bytes=len(body),
            submissions=(previous.submissions if previous else 0) + 1,
        )
        if not lines:
            self._complete(chunk, record, lines, [], {"imports": 0, "errors": 0, "job": {}})
            return None
        try:
            job = self.client.create_batch(chunk.kind, body, key)
        except BatchRefused as refusal:
            self._refused(chunk, record, lines, refusal)
            return None
        record.job_id, record.job_status = str(job["id"]), job.get("status")
        record.submitted_at = utc_now()
        self.ledger.put(record)  # the job id is durable before the first poll: a re-run resumes it
        self.report.submitted += 1
        self.report.batches += 1
        self.report.bytes_sent += len(body)
        self.log.info(
            "chunk %s: submitted %d %s (%d bytes) as job %s",
            chunk.name,
            len(lines),
            chunk.kind,
            len(body),
            job["id"],
        )
        interval = self.settings.poll_interval
        return _Flight(chunk, record, self.clock() + interval, interval)

    def _poll(self, flight: _Flight) -> bool:
        """Poll one job; True when it ended and its results are written."""
        record = flight.record
        status = self.client.get_batch_status(flight.chunk.kind, record.job_id)
        job_status = (status.get("job") or {}).get("status")
        if job_status in JOB_ENDED:
            lines, _ = read_lines(self.store, flight.chunk)
            errors: list[ItemError] = []
            if job_status == "FAILED" or int(status.get("errors") or 0) > 0:
                found = self.client.iter_batch_errors(flight.chunk.kind, record.job_id)
                errors = match_errors(lines, found, flight.chunk.kind)
            self._complete(flight.chunk, record, lines, errors, status)
            return True
        if record.status != PROCESSING or record.job_status != job_status:
            record.status, record.job_status = PROCESSING, job_status
            self.ledger.put(record)
        flight.interval = min(flight.interval * 1.5, self.settings.max_poll_interval)
        # Jitter keeps many mapped tasks from polling in lockstep.
        flight.next_poll = self.clock() + flight.interval * random.uniform(0.8, 1.2)
        return False

    def _complete(
        self, chunk: Chunk, record: ChunkRecord, lines: list[bytes], errors: list[ItemError], status: Mapping
    ) -> None:
        result = write_results(self.store, chunk, record, lines, errors)
        # Terminal status last: if we die before this write, a re-run polls the ended job and rewrites the
        # same outcomes, which is harmless.
        record.status = COMPLETED
        record.job_status = (status.get("job") or {}).get("status") or record.job_status
        record.imports = int(status.get("imports") or 0)
        record.errors = int(status.get("errors") or 0)
        self._finish(record, result)
        if result.unmatched_errors:
            self.log.warning(
                "chunk %s: %d error(s) from job %s matched no line of the chunk; their rows count as delivered, "
                "see dead_letters/%s.parquet (item_index -1)",
                chunk.name,
                result.unmatched_errors,
                record.job_id,
                chunk.name,
            )
        if len(errors) != record.errors:
            self.log.warning(
                "chunk %s: job %s reports %d error(s) but %d were listed",
                chunk.name,
                record.job_id,
                record.errors,
                len(errors),
            )
        self.log.info(
            "chunk %s: job %s %s: %d delivered, %d rejected",
            chunk.name,
            record.job_id,
            record.job_status,
            result.delivered_items,
            result.rejected_items,
        )

    def _refused(self, chunk: Chunk, record: ChunkRecord, lines: list[bytes], refusal: BatchRefused) -> None:
        """The whole batch was refused (a final 4xx): every item is rejected with FullStory's reason."""
        errors = [
            ItemError(i, refusal.code or str(refusal.status), refusal.message, None)
            for i in range(len(lines))
        ]
        result = write_results(self.store, chunk, record, lines, errors)
        record.status = FAILED
        record.error = f"HTTP {refusal.status} {refusal.code}: {refusal.message}"
        self._finish(record, result)
        self.report.refused += 1
        self.log.warning(
            "chunk %s: FullStory refused the whole batch (%s); its %d items are dead letters",
            chunk.name,
            record.error,
            len(lines),
        )

    def _finish(self, record: ChunkRecord, result: ChunkResult) -> None:
        record.delivered_items, record.rejected_items = result.delivered_items, result.rejected_items
        record.delivered_rows, record.rejected_rows = result.delivered_rows, result.rejected_rows
        record.finished_at = utc_now()
        self.ledger.put(record)
        self.report.unmatched_errors += result.unmatched_errors
        self.report.items_this_try += record.items
        self._account(record)
        self._progress()

    def _account(self, record: ChunkRecord) -> None:
        counts = self.report.items[record.kind]
        counts["delivered"] += record.delivered_items
        counts["rejected"] += record.rejected_items
        self.report.done += 1

    def _progress(self, final: bool = False) -> None:
        now = self.clock()
        if not final and now - self._last_progress < self.settings.progress_every:
            return
        self._last_progress = now
        elapsed = max(now - self._started, 1e-9)
        self.log.info(
            "delivery progress: %d/%d chunks done (%d already complete), %d items sent this try, %.0f items/s",
            self.report.done,
            self.report.chunks,
            self.report.already_complete,
            self.report.items_this_try,
            self.report.items_this_try / elapsed,
        )
