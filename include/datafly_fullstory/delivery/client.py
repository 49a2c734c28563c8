"""What delivery needs from a FullStory client: the Airflow hook satisfies it, and so do the tests' fakes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol


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
        """{"requests", "retries", "status_counts", ...} so far, for the stats. The delivery timeline reads
        it before and after each call to count the retries and 429 answers that call cost."""
