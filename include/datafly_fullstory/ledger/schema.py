"""The ledger's schema: item and chunk states, the time limits, its errors, its four tables and the rows
read from them (the package docstring, `__init__.py`, describes them)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import sqlalchemy as sa

# ---- states ---------------------------------------------------------------------------------------------

CLAIMED = "claimed"
DELIVERED, REJECTED, UNKNOWN = "delivered", "rejected", "unknown"
FILTERED, SKIPPED, QUARANTINED, INVALID = "filtered", "skipped", "quarantined", "invalid"
SENT_STATES = (DELIVERED, REJECTED, UNKNOWN)  # the item reached FullStory, or may have
UNSENT_STATES = (FILTERED, SKIPPED, QUARANTINED, INVALID)  # final for a run, re-evaluated by a re-run

C_CLAIMED, C_POSTING, C_SUBMITTED, C_PROCESSING = "claimed", "posting", "submitted", "processing"
C_COMPLETED, C_FAILED, C_UNKNOWN, C_ABANDONED = "completed", "failed", "unknown", "abandoned"
CHUNK_POSTED = (C_POSTING, C_SUBMITTED, C_PROCESSING)  # sent (or about to be), not finished
CHUNK_TERMINAL = (C_COMPLETED, C_FAILED, C_UNKNOWN)

KEY_TTL_S = 24 * 3600.0  # FullStory remembers an Idempotency-Key for 24 hours
KEY_SAFE_AGE_S = KEY_TTL_S - 3600.0  # we re-send under a key only while it is younger (clock skew)
DEFAULT_CLAIM_LEASE_S = 3 * 3600.0  # an unsent claim older than this may be taken over by another run


class LedgerError(RuntimeError):
    """The ledger cannot be used as configured, or holds something it should not."""


class ClaimLost(LedgerError):
    """Items this run mapped were taken over by another run before their chunk was registered; a retry
    re-claims and re-maps the rest."""


# ---- schema ---------------------------------------------------------------------------------------------

metadata = sa.MetaData()

items = sa.Table(
    "dffs_items",
    metadata,
    sa.Column("destination", sa.String(300), primary_key=True),
    sa.Column("event_id", sa.String(512), primary_key=True),
    sa.Column("kind", sa.String(8), nullable=False),  # event | user (an identify call)
    sa.Column("uid", sa.String(512)),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("run_id", sa.String(300), nullable=False),
    sa.Column("chunk_id", sa.BigInteger),
    sa.Column("window_start", sa.String(40)),  # the owning run's window
    sa.Column("window_end", sa.String(40)),
    sa.Column("event_time", sa.Float),  # the row's timestamp (epoch seconds)
    sa.Column("claimed_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("code", sa.String(200)),
    sa.Column("message", sa.Text),
)
sa.Index("dffs_items_chunk", items.c.chunk_id)
sa.Index("dffs_items_state", items.c.destination, items.c.state, items.c.event_time)

chunks = sa.Table(
    "dffs_chunks",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("destination", sa.String(300), nullable=False),
    sa.Column("run_id", sa.String(300), nullable=False),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("kind", sa.String(8), nullable=False),  # events | users
    sa.Column("idempotency_key", sa.String(200), nullable=False),
    sa.Column("payload_uri", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("items", sa.Integer, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("job_id", sa.String(200)),
    sa.Column("job_status", sa.String(20)),
    sa.Column("first_post_at", sa.Float),
    sa.Column("last_post_at", sa.Float),
    sa.Column("submissions", sa.Integer, nullable=False, default=0),
    sa.Column("imports", sa.Integer, nullable=False, default=0),
    sa.Column("errors", sa.Integer, nullable=False, default=0),
    sa.Column("delivered_items", sa.Integer, nullable=False, default=0),
    sa.Column("rejected_items", sa.Integer, nullable=False, default=0),
    sa.Column("unknown_items", sa.Integer, nullable=False, default=0),
    sa.Column("error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.UniqueConstraint("destination", "run_id", "name", name="dffs_chunks_run_name"),
)

runs = sa.Table(
    "dffs_runs",
    metadata,
    sa.Column("destination", sa.String(300), primary_key=True),
    sa.Column("run_id", sa.String(300), primary_key=True),
    sa.Column("window_start", sa.String(40), nullable=False),
    sa.Column("window_end", sa.String(40), nullable=False),
    sa.Column("scan_start", sa.String(40), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("rows_read", sa.Integer),
    sa.Column("delivered", sa.Integer),
    sa.Column("rejected", sa.Integer),
    sa.Column("unknown", sa.Integer),
    sa.Column("quarantined", sa.Integer),
    sa.Column("filtered", sa.Integer),
    sa.Column("skipped", sa.Integer),
    sa.Column("pending", sa.Integer),
    sa.Column("late_rows", sa.Integer),
    sa.Column("problems", sa.Text),
)

scans = sa.Table(
    "dffs_scans",
    metadata,
    sa.Column("destination", sa.String(300), primary_key=True),
    sa.Column("file_uri", sa.String(1000), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("mtime", sa.Float, nullable=False),
    sa.Column("covered_start", sa.Float, nullable=False),  # epoch seconds: the time range read from it
    sa.Column("covered_end", sa.Float, nullable=False),
    sa.Column("run_id", sa.String(300), nullable=False),
    sa.Column("scanned_at", sa.Float, nullable=False),
)


# ---- records --------------------------------------------------------------------------------------------


@dataclass
class ChunkRow:
    """One `dffs_chunks` row."""

    id: int
    destination: str
    run_id: str
    name: str
    kind: str
    idempotency_key: str
    payload_uri: str
    sha256: str
    items: int
    bytes: int
    status: str
    job_id: str | None = None
    job_status: str | None = None
    first_post_at: float | None = None
    last_post_at: float | None = None
    submissions: int = 0
    imports: int = 0
    errors: int = 0
    delivered_items: int = 0
    rejected_items: int = 0
    unknown_items: int = 0
    error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in CHUNK_TERMINAL

    @property
    def is_posted(self) -> bool:
        return self.status in CHUNK_POSTED

    def key_age(self, now: float) -> float | None:
        return None if self.first_post_at is None else now - self.first_post_at


_CHUNK_FIELDS = tuple(f.name for f in fields(ChunkRow))


def _chunk(row) -> ChunkRow:
    return ChunkRow(**{name: row._mapping[name] for name in _CHUNK_FIELDS})


@dataclass(frozen=True)
class ItemRow:
    event_id: str
    kind: str
    state: str
    run_id: str
    chunk_id: int | None
    claimed_at: float
    updated_at: float
    code: str | None
    message: str | None
    chunk_status: str | None = None
    chunk_first_post_at: float | None = None
    chunk_updated_at: float | None = None


@dataclass(frozen=True)
class NewItem:
    event_id: str
    kind: str  # event | user
    uid: str | None = None
    event_time: float | None = None


@dataclass(frozen=True)
class ClaimColumns:
    """Items to claim, column by column (the claim step builds them from a landing frame without a Python
    object per row)."""

    event_id: list[str]
    kind: list[str]
    uid: list[str | None]
    event_time: list[float | None]

    @classmethod
    def of(cls, new: Sequence[NewItem]) -> ClaimColumns:
        return cls(
            [n.event_id for n in new],
            [n.kind for n in new],
            [n.uid for n in new],
            [n.event_time for n in new],
        )

    def __len__(self) -> int:
        return len(self.event_id)

    def rows(self) -> Iterator[tuple]:
        return zip(self.event_id, self.kind, self.uid, self.event_time, strict=True)
