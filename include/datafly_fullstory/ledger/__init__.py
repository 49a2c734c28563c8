"""The delivery ledger: one database that says, per FullStory destination, what happened to every item.

FullStory has no content dedupe and forgets an Idempotency-Key after 24 hours, so exactly once is ours
to keep. The ledger is a real database behind SQLAlchemy: a SQLite file by default (one machine), or
Postgres through an Airflow connection (several workers). Its tables (docs/exactly-once.md has example
SQL):

- `dffs_items`: one row per (destination, Datafly `event_id`): its state, the run that owns it, the chunk
  that carries it, FullStory's code and message when it was rejected. A destination is the FullStory org
  and region (`o-1A2B3C-na1@na1`), so a second org is a second, independent set of rows.
- `dffs_chunks`: one row per request chunk: its Idempotency-Key, where its bytes are, when it was first
  POSTed, the batch job, and its status.
- `dffs_runs`: one row per run and destination: the window, the look-back and the outcome counts.
- `dffs_consent`: each person's latest consent state (consent_ops.py), so a revocation stops later runs too.
- `dffs_deletions`: deletion requests per destination and person (user_id or anonymous_id), their status
  (deletion_ops.py); every row there suppresses its person.
- `dffs_scans`: which landing files (by size and modification time) a run has read, so the look-back
  re-reads only files that changed.

Item states: `claimed` (a run owns it and may send it), then `delivered`, `rejected` or `unknown` once its
chunk was sent (these are final: the item reached FullStory, or may have), or one of the states of rows
never sent: `filtered`, `skipped`, `quarantined`, `invalid` (refused by our mapping; outcome `rejected`).

Chunk states: `claimed` -> `posting` (the first POST is about to go out; `first_post_at` is set in the same
atomic step) -> `submitted` (job id known) -> `processing` -> `completed`; `failed` (FullStory refused the
batch as a whole); `unknown` (the answer to a POST was lost and its key expired); `abandoned` (a chunk never
POSTed whose items another run took over).

Every step that decides who sends what is one atomic statement: items are claimed with INSERT .. ON
CONFLICT DO NOTHING, a chunk goes `claimed -> posting` or `claimed -> abandoned` with a compare-and-set
UPDATE, so two runs can never both send the same event, and a chunk is first POSTed once.

Where what is (imports go one way: schema <- engine <- the *_ops modules <- this package):

- `schema.py`: the states and time limits, `LedgerError` / `ClaimLost`, the tables, the rows read
  (`ChunkRow`, `ItemRow`) and written (`NewItem`, `ClaimColumns`).
- `engine.py`: `engine_for` / `dispose_engines` (SQLite and Postgres specifics) and `LedgerBase`: the
  transactions and the temporary batch table `dffs_batch` the set-based statements join.
- `item_ops.py` (claims and items), `chunk_ops.py` (chunks), `run_ops.py` (runs and scans),
  `identity_ops.py` (the identity map and rows waiting for it): the operations, combined into `Ledger` here;
  `trait_ops.py` (`dffs_traits`, the last user update delivered).
- here: `wall_clock`, the ledger's only clock. Tests move it with `monkeypatch.setattr(ledger,
  "wall_clock", ...)`; every operation reads it through `Ledger._now`, at each call.
"""

from __future__ import annotations

import time

from include.datafly_fullstory.ledger.chunk_ops import ChunkOps
from include.datafly_fullstory.ledger.consent_ops import ConsentOps, consent
from include.datafly_fullstory.ledger.deletion_ops import (
    D_DELETED,
    D_DELETING,
    D_FAILED,
    D_PENDING,
    D_SUPPRESSED,
    DeletionOps,
    DeletionRow,
    deletions,
)
from include.datafly_fullstory.ledger.engine import dispose_engines
from include.datafly_fullstory.ledger.identity_ops import IdentityOps, IdentityPair, IdentityRow, Wait
from include.datafly_fullstory.ledger.item_ops import ItemOps
from include.datafly_fullstory.ledger.run_ops import RunOps
from include.datafly_fullstory.ledger.schema import (
    C_ABANDONED,
    C_CLAIMED,
    C_COMPLETED,
    C_FAILED,
    C_POSTING,
    C_PROCESSING,
    C_SUBMITTED,
    C_UNKNOWN,
    CHUNK_POSTED,
    CLAIMED,
    DEFAULT_CLAIM_LEASE_S,
    DELIVERED,
    FILTERED,
    INVALID,
    KEY_SAFE_AGE_S,
    QUARANTINED,
    REJECTED,
    SENT_STATES,
    SKIPPED,
    UNKNOWN,
    UNSENT_STATES,
    ChunkRow,
    ClaimColumns,
    ClaimLost,
    ItemRow,
    LedgerError,
    NewItem,
    chunks,
    runs,
)
from include.datafly_fullstory.ledger.trait_ops import TraitOps, traits

__all__ = [
    "C_ABANDONED",
    "C_CLAIMED",
    "C_COMPLETED",
    "C_FAILED",
    "C_POSTING",
    "C_PROCESSING",
    "C_SUBMITTED",
    "C_UNKNOWN",
    "CHUNK_POSTED",
    "CLAIMED",
    "DEFAULT_CLAIM_LEASE_S",
    "DELIVERED",
    "FILTERED",
    "INVALID",
    "KEY_SAFE_AGE_S",
    "QUARANTINED",
    "REJECTED",
    "SENT_STATES",
    "SKIPPED",
    "UNKNOWN",
    "UNSENT_STATES",
    "ChunkRow",
    "IdentityPair",
    "IdentityRow",
    "Wait",
    "ClaimColumns",
    "ClaimLost",
    "ConsentOps",
    "ItemRow",
    "Ledger",
    "LedgerError",
    "NewItem",
    "chunks",
    "consent",
    "runs",
    "traits",
    "dispose_engines",
    "wall_clock",
    "D_DELETED",
    "D_DELETING",
    "D_FAILED",
    "D_PENDING",
    "D_SUPPRESSED",
    "DeletionRow",
    "deletions",
]


def wall_clock() -> float:
    """Seconds since the epoch. The ledger's only clock: tests move it with FullStory's (the emulator's)."""
    return time.time()


class Ledger(ItemOps, ChunkOps, RunOps, ConsentOps, TraitOps, DeletionOps, IdentityOps):
    """The delivery ledger of one database (see the package docstring)."""

    def _now(self) -> float:
        return wall_clock()  # looked up here at each call: a test's patched clock moves every operation
