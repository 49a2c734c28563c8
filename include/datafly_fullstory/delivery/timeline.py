"""The delivery timeline: `delivery/timeline-<first chunk>.json` in the run folder. This module writes and
reads it; the run report (report/) draws it.

One file per delivery task (named after the first chunk of its group, so a retry of the task finds its
own file), holding one entry per try of the task:

    {"format": 1, "tries": [{
        "started_at": <unix s>, "ended_at": <unix s> | null, "ended": "finished" | "<Error type>",
        "chunks": [<chunk name>, ...],
        "jobs": [{"chunk", "kind", "mode", "job_id", "items", "bytes", "submitted_at", "finished_at",
                  "outcome", "delivered", "rejected", "unknown", "polls", "retries", "throttled"}, ...],
        "calls": [{"at": <unix s>, "chunk", "call": "post" | "poll", "retries", "throttled"}, ...],
        "http": {"requests", "retries", "throttled"}}]}

A job is one batch job this try worked on: submitted now (`mode` deliver, repost or replay: `submitted_at`
is when FullStory answered the POST), or submitted by an earlier try and polled now (`resume`:
`submitted_at` is null). `finished_at` is when its results were recorded (null: still running when the
try ended). `outcome` is the job's end: `completed` / `failed` (FullStory's job status), `refused` (a final
4xx to the POST: every item rejected), `replayed` (a forced replay: FullStory answered from its record),
`recorded_elsewhere` (another run recorded the results first) or `running`. `calls` lists the client
calls that needed retries or were answered 429 (`throttled`), with when they ended; the counts come from
the client's own `http_stats()` before and after the call (no request, header or key is recorded).

Only numbers, chunk names, job ids and times: nothing the API key could be in. Writing never fails
delivery: an error is logged and delivery goes on. The file is rewritten at most every
`DeliverySettings.progress_every` seconds and when the try ends (a try killed outright loses at most that
much of its timeline; its traffic is still in the ledger).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from include.datafly_fullstory.state import RunStore

FOLDER = "delivery"
FORMAT = 1
MAX_TRIES = 20  # tries kept per file (a task retried forever would otherwise grow it without bound)
MAX_CALLS = 2000  # retry/429 records kept per try; past that they are only counted in `http`

log = logging.getLogger(__name__)


def file_name(chunk_names: list[str]) -> str:
    return f"timeline-{chunk_names[0] if chunk_names else 'none'}.json"


@dataclass
class Job:
    chunk: str
    kind: str
    mode: str
    job_id: str | None = None
    items: int = 0
    bytes: int = 0
    submitted_at: float | None = None
    finished_at: float | None = None
    outcome: str = "running"
    delivered: int = 0
    rejected: int = 0
    unknown: int = 0
    polls: int = 0
    retries: int = 0
    throttled: int = 0


@dataclass
class Try:
    started_at: float
    chunks: list[str]
    ended_at: float | None = None
    ended: str | None = None
    jobs: list[Job] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    http: dict[str, int] = field(default_factory=lambda: {"requests": 0, "retries": 0, "throttled": 0})


def _client_counts(client: Any) -> tuple[int, int, int]:
    """(requests, retries, 429 answers) so far, from the client's own counters; zeros if it has none."""
    try:
        stats = client.http_stats() or {}
        statuses = stats.get("status_counts") or {}
        return int(stats.get("requests", 0)), int(stats.get("retries", 0)), int(statuses.get("429", 0))
    except Exception:  # a client without counters: the timeline simply has no retries
        return 0, 0, 0


class Timeline:
    """What one delivery try did, job by job. Every method is safe to call: none raises."""

    def __init__(
        self,
        store: RunStore,
        client: Any,
        chunk_names: list[str],
        *,
        wall: Callable[[], float] = time.time,
        logger: logging.Logger | None = None,
    ):
        self.store, self.client, self.wall = store, client, wall
        self.log = logger or log
        self.name = file_name(chunk_names)
        self.current = Try(started_at=self._now(), chunks=list(chunk_names))
        self._jobs: dict[str, Job] = {}  # chunk name -> its job in this try

    def _now(self) -> float:
        return round(self.wall(), 3)

    # ---- recording ---------------------------------------------------------------------------------------

    def job(self, chunk: str, kind: str, mode: str) -> Job:
        job = self._jobs.get(chunk)
        if job is None:
            job = self._jobs[chunk] = Job(chunk=chunk, kind=kind, mode=mode)
            self.current.jobs.append(job)
        return job

    @contextmanager
    def call(self, chunk: str, kind: str, mode: str, what: str) -> Generator[None]:
        """Around one delivery step that talks to FullStory: the retries and 429s it cost go to the chunk's
        job and, when there were any, to `calls` with the time the step ended."""
        before = _client_counts(self.client)
        try:
            yield
        finally:
            try:
                after = _client_counts(self.client)
                requests, retries, throttled = (max(0, a - b) for a, b in zip(after, before, strict=True))
                job = self.job(chunk, kind, mode)
                job.retries += retries
                job.throttled += throttled
                http = self.current.http
                http["requests"] += requests
                http["retries"] += retries
                http["throttled"] += throttled
                if (retries or throttled) and len(self.current.calls) < MAX_CALLS:
                    self.current.calls.append(
                        {
                            "at": self._now(),
                            "chunk": chunk,
                            "call": what,
                            "retries": retries,
                            "throttled": throttled,
                        }
                    )
            except Exception as exc:  # never let bookkeeping break delivery
                self.log.warning("delivery timeline: could not count a call: %s", type(exc).__name__)

    def submitted(self, chunk: str, kind: str, mode: str, job_id: str, items: int, body_bytes: int) -> None:
        job = self.job(chunk, kind, mode)
        job.mode, job.job_id, job.items, job.bytes = mode, job_id, items, body_bytes
        job.submitted_at = self._now()

    def resumed(self, chunk: str, kind: str, job_id: str) -> None:
        job = self.job(chunk, kind, "resume")
        job.job_id = job_id

    def polled(self, chunk: str, kind: str, mode: str) -> None:
        self.job(chunk, kind, mode).polls += 1

    def finished(
        self,
        chunk: str,
        kind: str,
        mode: str,
        outcome: str,
        *,
        items: int | None = None,
        delivered: int = 0,
        rejected: int = 0,
        unknown: int = 0,
    ) -> None:
        job = self.job(chunk, kind, mode)
        job.finished_at = self._now()
        job.outcome = outcome
        if items is not None:
            job.items = items
        job.delivered, job.rejected, job.unknown = delivered, rejected, unknown

    def end(self, error: BaseException | None = None) -> None:
        self.current.ended_at = self._now()
        self.current.ended = "finished" if error is None else type(error).__name__

    # ---- the file ----------------------------------------------------------------------------------------

    def save(self) -> None:
        """Write this try into the task's file (after the earlier tries it holds); errors are logged."""
        try:
            tries = [
                t
                for t in _read_tries(self.store, self.name)
                if t.get("started_at") != self.current.started_at
            ]
            tries.append(asdict(self.current))
            self.store.write_json({"format": FORMAT, "tries": tries[-MAX_TRIES:]}, FOLDER, self.name)
        except Exception as exc:
            self.log.warning(
                "delivery timeline: could not write %s/%s (%s); delivery goes on",
                FOLDER,
                self.name,
                type(exc).__name__,
            )


def _read_tries(store: RunStore, name: str) -> list[dict[str, Any]]:
    if not store.exists(FOLDER, name):
        return []
    try:
        data = store.read_json(FOLDER, name)
    except Exception:  # a torn or foreign file: start it again rather than stop delivery
        return []
    tries = data.get("tries") if isinstance(data, Mapping) else None
    return [t for t in tries if isinstance(t, dict)] if isinstance(tries, list) else []


# ---- reading (the run report) --------------------------------------------------------------------------


@dataclass
class TimelineFiles:
    tries: list[dict[str, Any]]
    unreadable: list[str]  # file names that could not be read, with why


def read_timelines(store: RunStore) -> TimelineFiles:
    """Every try of every delivery task of the run, oldest first; files that cannot be read are named."""
    tries, unreadable = [], []
    for name in store.list(FOLDER, suffix=".json"):
        if not name.startswith("timeline-"):
            continue
        try:
            data = store.read_json(FOLDER, name)
            if not isinstance(data, Mapping) or not isinstance(data.get("tries"), list):
                raise ValueError("no list of tries")
            for entry in data["tries"]:
                if not isinstance(entry, Mapping) or not isinstance(entry.get("jobs", []), list):
                    raise ValueError("a try without a list of jobs")
                tries.append({**entry, "file": name})
        except Exception as exc:
            unreadable.append(f"{name}: {type(exc).__name__}")
    tries.sort(key=lambda t: (_number(t.get("started_at")), t["file"]))
    return TimelineFiles(tries, unreadable)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
