"""Batch jobs of the org: each job's status (PROCESSING, then COMPLETED or FAILED), the running limit
with its queue, and the in-progress limits that answer 429.

Does not lock: the application object holds one lock around every mutation.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, deque

from include.fullstory_emulator.state import iso


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
