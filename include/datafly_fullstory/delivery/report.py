"""What one delivery task did: its settings and its report (partial run stats, see stats.RunStats.add)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KINDS = ("users", "events")  # chunk kinds, in delivery order: users before the events that refer to them


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
                "chunks": self.chunks,
                "already_complete": self.already_complete,
                "resumed": self.resumed,
                "submitted": self.submitted,
                "reposted": self.reposted,
                "replayed": self.replayed,
                "refused": self.refused,
                "abandoned": self.abandoned,
                "unknown_items": self.unknown_items,
                "unmatched_errors": self.unmatched_errors,
                "dry_run_rows": self.dry_run_rows,
            },
        }
