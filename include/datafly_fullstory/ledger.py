"""The delivery ledger: one small JSON record per chunk, `ledger/<chunk>.json`, written atomically.

The ledger is what makes a delivery re-runnable. FullStory batch jobs are asynchronous, so a task can be
killed between "job accepted" and "job finished"; the job id is recorded before any polling, so the next
try polls that job instead of submitting the chunk again. Airflow clears XCom on every try, so the ledger
lives on the state store.

Life of a record:

    (absent) --submit--> submitted --poll--> processing --> completed   (job ended; outcomes written)
                  \\-- batch refused as a whole (final 4xx) --------> failed (outcomes written)

`completed` and `failed` are terminal: a re-run leaves them alone unless forced. The terminal status is
written only after the chunk's outcomes and dead letters, so a crash in between means "poll again".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from include.datafly_fullstory.state import RunStore

SUBMITTED = "submitted"
PROCESSING = "processing"
COMPLETED = "completed"
FAILED = "failed"
STATUSES = (SUBMITTED, PROCESSING, COMPLETED, FAILED)
TERMINAL = (COMPLETED, FAILED)
IN_FLIGHT = (SUBMITTED, PROCESSING)


class LedgerError(RuntimeError):
    """A ledger record that cannot be read or does not belong to the chunk it is filed under."""


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class ChunkRecord:
    """The delivery state of one payload chunk."""

    chunk: str
    kind: str  # "events" | "users": the chunk kind, as in the manifest
    idempotency_key: str
    status: str = SUBMITTED
    job_id: str | None = None
    job_status: str | None = None  # FullStory's own: PROCESSING | COMPLETED | FAILED
    items: int = 0
    bytes: int = 0
    imports: int = 0  # FullStory's count of imported items (the job's `imports`)
    errors: int = 0  # FullStory's count of failed items (the job's `errors`)
    delivered_items: int = 0  # our per-item reading of the job: these match the outcome files
    rejected_items: int = 0
    delivered_rows: int = 0
    rejected_rows: int = 0
    submissions: int = 0  # POSTs of this chunk, replays under the same key included
    error: str | None = None  # why a refused batch failed (code: message)
    submitted_at: str | None = None
    finished_at: str | None = None
    updated_at: str = field(default_factory=utc_now)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def is_in_flight(self) -> bool:
        return self.status in IN_FLIGHT and self.job_id is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChunkRecord:
        known = {f.name for f in fields(cls)}
        # Unknown keys come from newer writers: keep reading, drop them rather than fail a re-run.
        record = cls(**{k: v for k, v in data.items() if k in known})
        if record.status not in STATUSES:
            raise LedgerError(f"ledger record for {record.chunk} has unknown status {record.status!r}")
        return record


class Ledger:
    """Reads and writes `ledger/<chunk>.json` in one run folder."""

    folder = "ledger"

    def __init__(self, store: RunStore):
        self.store = store

    def _name(self, chunk: str) -> str:
        return f"{chunk}.json"

    def get(self, chunk: str) -> ChunkRecord | None:
        if not self.store.exists(self.folder, self._name(chunk)):
            return None
        try:
            record = ChunkRecord.from_dict(self.store.read_json(self.folder, self._name(chunk)))
        except (ValueError, TypeError) as exc:
            raise LedgerError(
                f"ledger record {self.store.path(self.folder, self._name(chunk))} is unreadable ({exc}); "
                "delete it only if you are sure the chunk's job never started"
            ) from exc
        if record.chunk != chunk:
            raise LedgerError(f"ledger/{self._name(chunk)} holds the record of {record.chunk!r}")
        return record

    def put(self, record: ChunkRecord) -> ChunkRecord:
        """Write a record atomically (readers see the old record or the new one)."""
        record.updated_at = utc_now()
        self.store.write_json(record.as_dict(), self.folder, self._name(record.chunk))
        return record

    def all(self) -> dict[str, ChunkRecord]:
        names = self.store.list(self.folder, suffix=".json")
        records = (self.get(name.removesuffix(".json")) for name in names)
        return {r.chunk: r for r in records if r is not None}
