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

Each try also records its timeline (timeline.py: when each job was submitted and finished, its items and
outcome, the retries and 429s each call cost) for the run report; recording never changes what is sent.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory.chunks import (
    Chunk,
    batch_body,
    read_chunk_index,
    read_lines,
    read_run_index,
)
from include.datafly_fullstory.delivery.client import BatchClient
from include.datafly_fullstory.delivery.jobs import (
    ItemError,
    JobReading,
    expired_message,
    key_young,
    read_job,
)
from include.datafly_fullstory.delivery.outcomes import write_chunk_outcomes, write_outcomes
from include.datafly_fullstory.delivery.report import KINDS, DeliveryReport, DeliverySettings
from include.datafly_fullstory.delivery.timeline import Timeline
from include.datafly_fullstory.errors import DeliveryError, DeliveryTimeout
from include.datafly_fullstory.state import RunStore

log = logging.getLogger(__name__)

JOB_ENDED = ("COMPLETED", "FAILED")  # FAILED includes partial failure: per-item errors tell which
NOT_ACCEPTED = (401, 403, 404)  # answers to a POST that say FullStory took nothing


def fault_point(name: str) -> None:
    """A named step of delivery. Does nothing; the fault-injection tests replace it to stop a task exactly
    there (before the POST, after the POST, while polling, after the job ended)."""


@dataclass
class _Flight:
    chunk: Chunk
    job_id: str
    next_poll: float
    interval: float  # grows 1.5x per poll that finds the job still processing; the wait after it
    items: int = 0
    posted: float | None = None  # when this task POSTed it (None: a job resumed from the ledger)
    processing_at: float | None = None  # the last time a poll found it still processing


class PollSchedule:
    """When to poll a job. FullStory runs a batch job asynchronously, in time that grows with its items,
    and every status poll is a request against the org's limits, so the schedule learns how long this
    delivery's jobs take per item and polls a job first when it should have ended:

    - before any job ended, one job (the first posted) is the probe: polled after `poll_interval`, then
      after waits growing 1.5x up to `max_poll_interval`; the jobs posted meanwhile wait for what it
      teaches, polled every `max_poll_interval` until then (a delivery task posts all of its few chunks
      at once, so this is most of what a task polls);
    - once a job ended: a job is polled first after its expected time (its items times the learned seconds
      per item, at least `poll_interval`), the waiting jobs too (at once if that time has passed); if still
      processing, after a tenth of that, growing 1.5x as above;
    - what a job teaches: it ended between the last poll that found it processing and the poll that found
      it ended (the midpoint; the latter when no poll found it processing), averaged with what was learned
      before, so the estimate follows jobs that get faster or slower.

    Waits after a poll are jittered (x0.8-1.2) so that many tasks do not poll in lockstep. Only the timing
    of status requests depends on the schedule; what a job's end means is decided by the ledger.
    """

    def __init__(self, settings: DeliverySettings):
        self.settings = settings
        self.seconds_per_item: float | None = None
        self.probe: _Flight | None = None  # polled on the backoff while nothing is learned
        self.waiting: list[_Flight] = []  # posted while nothing is learned, waiting for the probe

    def flight(self, chunk: Chunk, job_id: str, now: float, items: int, posted: float | None) -> _Flight:
        """A job to poll: a resumed one (`posted` None) at once, a new one after the first wait."""
        s = self.settings
        if posted is None:
            return _Flight(chunk, job_id, now, s.poll_interval, items=items)
        if self.seconds_per_item is None:
            flight = _Flight(
                chunk, job_id, now + s.poll_interval, s.poll_interval, items=items, posted=posted
            )
            if self.probe is None and items > 0:
                self.probe = flight
            elif items > 0:
                flight.next_poll = now + s.max_poll_interval
                flight.interval = s.max_poll_interval / 1.5  # then every max_poll_interval
                self.waiting.append(flight)
            return flight
        first = self.first_wait(items)
        follow = max(s.poll_interval, first / 10) / 1.5  # the first still-processing wait: a tenth
        return _Flight(chunk, job_id, now + first, follow, items=items, posted=posted)

    def first_wait(self, items: int) -> float:
        s = self.settings
        if self.seconds_per_item is None or items <= 0:
            return s.poll_interval
        expected = self.seconds_per_item * items
        return min(max(expected, s.poll_interval), _LONGEST_FIRST_WAIT * s.max_poll_interval)

    def still_processing(self, flight: _Flight, now: float) -> None:
        flight.processing_at = now
        flight.interval = min(flight.interval * 1.5, self.settings.max_poll_interval)
        flight.next_poll = now + flight.interval * random.uniform(0.8, 1.2)

    def ended(self, flight: _Flight, now: float) -> None:
        """Learn from a job this task posted, found ended at `now`; then schedule the waiting jobs."""
        self.waiting = [w for w in self.waiting if w is not flight]
        if flight is self.probe:
            self.probe = None
        if flight.posted is not None and flight.items > 0:
            took = now - flight.posted
            if flight.processing_at is not None:
                took = (took + flight.processing_at - flight.posted) / 2
            observed = took / flight.items
            known = self.seconds_per_item
            self.seconds_per_item = observed if known is None else (known + observed) / 2
        if self.seconds_per_item is not None:
            for waiting in self.waiting:
                expected = self.first_wait(waiting.items)
                waiting.next_poll = max(now, waiting.posted + expected)
                waiting.interval = max(self.settings.poll_interval, expected / 10) / 1.5
            self.waiting = []
        elif self.probe is None and self.waiting:  # the probe taught nothing: the next job probes
            self.probe = self.waiting.pop(0)
            self.probe.next_poll = min(self.probe.next_poll, now + self.settings.poll_interval)
            self.probe.interval = self.settings.poll_interval


_LONGEST_FIRST_WAIT = 10  # x max_poll_interval: a first wait never exceeds this, whatever was learned


class Delivery:
    """Delivers chunks through a `BatchClient`, keeping the ledger, outcomes and dead letters."""

    def __init__(
        self,
        store: RunStore,
        client: BatchClient | None,
        ledger: lg.Ledger | None,
        destination: str | None,
        settings: DeliverySettings | None = None,
        *,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.store, self.client, self.ledger, self.destination = store, client, ledger, destination
        self.settings = settings or DeliverySettings()
        self.log = logger or log
        self.clock = clock
        self.wall = wall  # the timeline's clock (times of day, for the run report)
        self.report = DeliveryReport()
        self.timeline: Timeline | None = None
        self._stop = threading.Event()
        self._started = clock()
        self._last_progress = self._started
        self.polls = PollSchedule(self.settings)  # when to poll the jobs

    def stop(self) -> None:
        """Ask the loop to stop at its next step (from on_kill / a signal handler)."""
        self._stop.set()

    def run(self, chunks: list[Chunk]) -> DeliveryReport:
        self.report.chunks = len(chunks)
        self.timeline = Timeline(
            self.store, self.client, [c.name for c in chunks], wall=self.wall, logger=self.log
        )
        deadline = self._started + self.settings.timeout
        try:
            for kind in KINDS:  # users first: events may refer to them
                phase = [c for c in chunks if c.kind == kind]
                if phase:
                    self._run_phase(phase, deadline)
        except BaseException as exc:
            self.timeline.end(exc)
            self.timeline.save()
            raise
        self.timeline.end()
        self.timeline.save()
        self._progress(final=True)
        return self.report

    def dry_run(self, chunks: list[Chunk]) -> DeliveryReport:
        self.report.chunks = len(chunks)
        for chunk in chunks:
            index = read_run_index(self.store, chunk)
            write_outcomes(self.store, chunk, index, "dry_run", ["dry run: nothing was sent"] * len(index))
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
                with self.timeline.call(flight.chunk.name, flight.chunk.kind, flight.chunk.mode, "poll"):
                    done = self._poll(flight)
                if done:
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
            raise DeliveryError(
                f"chunk {chunk.name} belongs to {row.destination} in the ledger, but this delivery "
                f"talks to {self.destination}; nothing was sent"
            )
        now = lg.wall_clock()
        if chunk.mode == "replay":
            if not key_young(row, now):
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
            if not key_young(row, now):
                self._expired(chunk, row)
                return None
            return self._post(chunk, row, first=False)
        if row.is_posted:
            self.report.resumed += 1
            self.timeline.resumed(chunk.name, chunk.kind, row.job_id)
            self.log.info("chunk %s: resuming job %s (%s)", chunk.name, row.job_id, row.status)
            return self.polls.flight(chunk, row.job_id, self.clock(), row.items, posted=None)
        self.report.already_complete += 1
        self.log.info("chunk %s: already %s (job %s), not sent again", chunk.name, row.status, row.job_id)
        self._account(chunk, row, new=False)
        return None

    def _post(
        self,
        chunk: Chunk,
        row: lg.ChunkRow,
        *,
        first: bool,
        replay: bool = False,
        lines: list[bytes] | None = None,
    ) -> _Flight | None:
        lines = lines if lines is not None else read_lines(chunk, row.sha256)
        body = batch_body(lines)
        if not first:
            self.ledger.note_post(row.id)
        fault_point("before_post")
        mode = "replay" if replay else "deliver" if first else "repost"
        try:
            with self.timeline.call(chunk.name, chunk.kind, mode, "post"):
                job = self.client.create_batch(chunk.kind, body, row.idempotency_key)
        except self.client.refused_error as refusal:
            if replay:
                raise DeliveryError(
                    f"force: FullStory refused the replay of {chunk.name}: {refusal}"
                ) from refusal
            if not first and (refusal.status == 409 or "idempotency" in (refusal.code or "")):
                # FullStory still runs (409) or holds another answer under this key: the first POST may have
                # been imported, so the rows are not rejected; the chunk stays `posting` for a re-run.
                raise DeliveryError(
                    f"chunk {chunk.name}: re-sent under its recorded key, FullStory answered "
                    f"{refusal.status} {refusal.code}; kept for a later re-run"
                ) from refusal
            self._refused(chunk, row, lines, refusal)
            return None
        except Exception as exc:
            self.timeline.finished(chunk.name, chunk.kind, mode, "post_failed", items=len(lines))
            if first and getattr(exc, "status", None) in NOT_ACCEPTED:
                # FullStory answered that it took nothing (bad key, forbidden, wrong region): the chunk is
                # as unsent as before, so a fix of the connection sends it, even after 24 h.
                self.ledger.revert_post(row.id)
            raise
        fault_point("after_post")
        job_id = str(job["id"])
        self.timeline.submitted(chunk.name, chunk.kind, mode, job_id, len(lines), len(body))
        if not replay:
            self.ledger.update_chunk(
                row.id, job_id=job_id, job_status=job.get("status"), status=lg.C_SUBMITTED
            )
        self.report.batches += 1
        self.report.bytes_sent += len(body)
        if replay:
            self.report.replayed += 1
        elif first:
            self.report.submitted += 1
        else:
            self.report.reposted += 1
        self.log.info(
            "chunk %s: %s %d %s (%d bytes) as job %s",
            chunk.name,
            "replayed" if replay else "submitted" if first else "re-sent under its recorded key",
            len(lines),
            chunk.kind,
            len(body),
            job_id,
        )
        now = self.clock()
        return self.polls.flight(chunk, job_id, now, len(lines), posted=now)

    def _poll(self, flight: _Flight) -> bool:
        """Poll one job; True when it ended and its results are recorded."""
        chunk = flight.chunk
        status = self.client.get_batch_status(chunk.kind, flight.job_id)
        self.timeline.polled(chunk.name, chunk.kind, chunk.mode)
        fault_point("while_polling")
        job_status = (status.get("job") or {}).get("status")
        row = self.ledger.chunk(chunk.ledger_chunk_id)
        if job_status not in JOB_ENDED:
            if chunk.mode != "replay" and (row.status != lg.C_PROCESSING or row.job_status != job_status):
                self.ledger.update_chunk(row.id, status=lg.C_PROCESSING, job_status=job_status)
            self.polls.still_processing(flight, self.clock())
            return False
        self.polls.ended(flight, self.clock())
        if chunk.mode == "replay" or row.is_terminal:  # a replay, or another run recorded it meanwhile
            ended = "replayed" if chunk.mode == "replay" else "recorded_elsewhere"
            self.timeline.finished(chunk.name, chunk.kind, chunk.mode, ended)
            self._account(chunk, self.ledger.chunk(row.id), new=False)
            return True
        lines = read_lines(chunk, row.sha256)
        reading = read_job(
            self.client, chunk, flight.job_id, lines, int(status.get("errors") or 0), job_status
        )
        fault_point("after_job")
        self._record(
            chunk,
            row,
            lines,
            reading,
            job_status=job_status,
            imports=int(status.get("imports") or 0),
            errors=int(status.get("errors") or 0),
        )
        return True

    def _record(
        self,
        chunk: Chunk,
        row: lg.ChunkRow,
        lines: list[bytes],
        reading: JobReading,
        *,
        status: str = lg.C_COMPLETED,
        **values: Any,
    ) -> None:
        """The chunk's items get their final states and the chunk its terminal status, in one transaction;
        then this run's outcome files and dead letters."""
        exceptions = []
        if reading.states:  # the rows of lines not delivered; every other row of the chunk is
            original = read_chunk_index(chunk)
            hit = original["item_index"].isin(list(reading.states))
            for index, event_id in zip(original["item_index"][hit], original["event_id"][hit], strict=True):
                exceptions.append((event_id, *reading.states[int(index)]))
        counts = {lg.DELIVERED: len(lines) - len(reading.states), lg.REJECTED: 0, lg.UNKNOWN: 0}
        for state, _, _ in reading.states.values():
            counts[state] += 1
        self.ledger.finish_chunk(
            row.id,
            status,
            exceptions,
            delivered_items=counts[lg.DELIVERED],
            rejected_items=counts[lg.REJECTED],
            unknown_items=counts[lg.UNKNOWN],
            **values,
        )
        self.report.unmatched_errors += reading.unmatched_errors
        self.report.items_this_try += len(lines)
        self.timeline.finished(
            chunk.name,
            chunk.kind,
            chunk.mode,
            "refused" if status == lg.C_FAILED else str(values.get("job_status") or "completed").lower(),
            items=len(lines),
            delivered=counts[lg.DELIVERED],
            rejected=counts[lg.REJECTED],
            unknown=counts[lg.UNKNOWN],
        )
        if reading.unmatched_errors:
            self.log.warning(
                "chunk %s: %d error(s) of job %s name no line of the chunk; see dead_letters/%s.parquet "
                "(item_index -1)",
                chunk.name,
                reading.unmatched_errors,
                row.job_id,
                chunk.name,
            )
        finished = self.ledger.chunk(row.id)
        self.log.info(
            "chunk %s: job %s %s: %d delivered, %d rejected, %d unknown",
            chunk.name,
            finished.job_id,
            finished.job_status,
            counts[lg.DELIVERED],
            counts[lg.REJECTED],
            counts[lg.UNKNOWN],
        )
        self._account(chunk, finished, new=True, lines=lines, errors=reading.errors)

    def _refused(self, chunk: Chunk, row: lg.ChunkRow, lines: list[bytes], refusal: Exception) -> None:
        """The whole batch was refused (a final 4xx): every item is rejected with FullStory's reason."""
        code = refusal.code or str(refusal.status)
        errors = [ItemError(i, code, refusal.message, None) for i in range(len(lines))]
        reading = JobReading({i: (lg.REJECTED, code, refusal.message) for i in range(len(lines))}, errors, 0)
        self._record(
            chunk,
            row,
            lines,
            reading,
            status=lg.C_FAILED,
            error=f"HTTP {refusal.status} {refusal.code}: {refusal.message}",
        )
        self.report.refused += 1
        self.log.warning(
            "chunk %s: FullStory refused the whole batch (%s); its %d items are dead letters",
            chunk.name,
            refusal,
            len(lines),
        )

    def _expired(self, chunk: Chunk, row: lg.ChunkRow) -> None:
        message = expired_message(row)
        self.log.error("%s", message)
        self.ledger.finish_chunk(
            row.id,
            lg.C_UNKNOWN,
            [],
            others=lg.UNKNOWN,
            others_code="key_expired",
            others_message=message,
            unknown_items=row.items,
        )
        self._account(chunk, self.ledger.chunk(row.id), new=True)

    # ---- outcomes from the ledger ------------------------------------------------------------------------

    def _account(
        self,
        chunk: Chunk,
        row: lg.ChunkRow,
        *,
        new: bool,
        lines: list[bytes] | None = None,
        errors: list[ItemError] | None = None,
    ) -> None:
        """This run's rows of the chunk get their outcome from the ledger; counts go to the report."""
        self.report.done += 1
        if chunk.mode != "replay":
            counts = self.report.items[chunk.kind]
            counts["delivered"] += row.delivered_items
            counts["rejected"] += row.rejected_items
            self.report.unknown_items += row.unknown_items
        if chunk.kind == "users" and chunk.mode != "replay" and row.is_terminal:
            self.ledger.mark_traits_delivered(row.id)  # trait diffing: the uids' delivered updates
        write_chunk_outcomes(self.store, self.ledger, chunk, row, new=new, lines=lines, errors=errors)
        self._progress()

    def _progress(self, final: bool = False) -> None:
        now = self.clock()
        if not final and now - self._last_progress < self.settings.progress_every:
            return
        self._last_progress = now
        if not final and self.timeline is not None:
            self.timeline.save()  # so a try killed outright leaves most of its timeline
        elapsed = max(now - self._started, 1e-9)
        self.log.info(
            "delivery progress: %d/%d chunks done (%d already complete), %d items sent this try, %.0f items/s",
            self.report.done,
            self.report.chunks,
            self.report.already_complete,
            self.report.items_this_try,
            self.report.items_this_try / elapsed,
        )
