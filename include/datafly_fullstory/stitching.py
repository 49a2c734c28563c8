"""Identity stitching across runs: the stages' side of the ledger's identity map (ledger/identity_ops.py).

- `identity_map` (map stage, before mapping): learns the (anonymous_id, user_id) pairs of the run's
  validated rows into the ledger, then reads back the ledger's map for the anonymous ids the run needs, so
  a later row of the window stitches earlier ones and an earlier run's identify stitches this run's rows.
- `record_waits` (map stage, after mapping): the rows skipped for want of identity wait in the ledger for
  their anonymous id to be identified.
- `LateStitch` (extract stage, the look-back): learns the window's pairs before the look-back reads, then
  names the waiting rows of the look-back whose anonymous id is now identified, and the files that hold
  them: the look-back reads those files again even when they did not change, and lets those rows through
  its anti-join; the claim step then takes them from `skipped` by compare-and-set (claims.py), so exactly
  one run delivers each. docs/exactly-once.md "Late stitching".
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import pyarrow.compute as pc

from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory import validated
from include.datafly_fullstory.blueprint import Blueprint
from include.datafly_fullstory.mapping import identity
from include.datafly_fullstory.mapping.settings import MappingSettings
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.window import Window


def _as_pairs(folded: pd.DataFrame) -> list[lg.IdentityPair]:
    def num(v):
        return None if v is None or v != v else float(v)

    return [
        lg.IdentityPair(
            a, u, o if isinstance(o, str) else None, num(t1), num(t2), e if isinstance(e, str) else None
        )
        for a, u, o, t1, t2, e in zip(
            *(
                folded[c].tolist()
                for c in ("anonymous_id", "user_id", "other_user_id", "t1", "t2", "event_id")
            ),
            strict=True,
        )
    ]


def learn(
    store: RunStore,
    ledger: lg.Ledger,
    destination: str,
    bp: Blueprint,
    settings: MappingSettings,
    parts: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Record the pairs of the run's validated parts (all, or the named ones) in the ledger; returns them
    folded per anonymous id."""
    folded = identity.fold_pairs(identity.window_pairs(store, bp, settings, parts))
    ledger.record_identities(destination, store.run_id, _as_pairs(folded))
    return folded


def identity_map(
    store: RunStore, ledger: lg.Ledger, destination: str, bp: Blueprint, settings: MappingSettings
) -> identity.IdentityMap:
    """The identity map the run's mapping stitches with: the ledger's, for the run's anonymous ids (those
    seen with two users, in this run or before, are its conflicts)."""
    folded = learn(store, ledger, destination, bp, settings)
    wanted = set(folded["anonymous_id"].tolist())
    for name in validated.parts(store):
        table = validated.read_part(store, name, columns=["anonymous_id", "user_id"])
        no_user = pc.or_kleene(pc.is_null(table.column("user_id")), pc.equal(table.column("user_id"), ""))
        wanted.update(table.filter(no_user).column("anonymous_id").drop_null().to_pylist())
    known = ledger.lookup_identities(destination, wanted)
    out = identity.IdentityMap()
    for anon, row in known.items():
        if row.stitchable:
            out.users[anon] = (row.user_id, row.event_id)
        else:
            out.conflicts[anon] = (row.user_id, row.conflict_user_id)
    return out


def record_waits(store: RunStore, ledger: lg.Ledger, destination: str) -> int:
    """The run's rows skipped for want of identity (with an anonymous id and an event id) wait in the
    ledger; returns how many."""
    table = identity.read(store, "unidentified")
    table = table.filter(
        pc.and_(pc.is_valid(table.column("anonymous_id")), pc.is_valid(table.column("event_id")))
    )
    waits = [
        lg.Wait(e, a, f or "", None if t is None or t != t else float(t))
        for e, a, f, t in zip(
            *(table.column(c).to_pylist() for c in ("event_id", "anonymous_id", "file", "ts")), strict=True
        )
    ]
    ledger.record_waits(destination, store.run_id, waits)
    return len(waits)


class LateStitch:
    """The look-back's late stitching (see the module docstring). `before()` runs once the window's rows
    are validated and before the look-back reads; then `files` and `event_ids` name what to read again."""

    def __init__(
        self,
        store: RunStore,
        ledger: lg.Ledger,
        destination: str,
        lookback: Window,
        bp: Blueprint,
        settings: MappingSettings,
    ):
        self.store, self.ledger, self.destination, self.lookback = store, ledger, destination, lookback
        self.bp, self.settings = bp, settings
        self.files: set[str] = set()
        self.event_ids: set[str] = set()
        self.admitted = 0  # waiting rows the look-back read again (`late.rows_identified`)

    def before(self) -> None:
        learn(self.store, self.ledger, self.destination, self.bp, self.settings)
        waiting = self.ledger.stitchable_waits(
            self.destination, since=self.lookback.start.timestamp(), until=self.lookback.end.timestamp()
        )
        self.files, self.event_ids = set(waiting.values()), set(waiting)
