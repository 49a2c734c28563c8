"""Identity stitching in the mapping: an event with neither a FullStory session id nor a user_id, whose
anonymous id a row that carries both has identified, is sent with `user.uid` of that user.

- `collect_pairs(frame, bp, settings)`: the (anonymous_id, user_id, time, event_id) pairs of a landing
  frame: rows that carry both ids (identify, or page/track with a user_id), except rows whose analytics
  consent is denied (or, with `require_explicit_consent`, not granted): a row FullStory may not receive
  does not identify anyone to it.
- `IdentityMap`: anonymous id -> (user, the event that taught it), and the anonymous ids seen with two
  users. `IdentityMap.of_pairs` folds a window's pairs (a dry run, which has no ledger); a real run's map
  comes from the ledger's (`stitching.py`).
- The conflict rule: an anonymous id seen with two different users (a shared device, a mix-up upstream) is
  never stitched, to either user: attributing one person's anonymous events to another is worse than not
  sending them, and a "latest wins" rule would make the same row map to different users from one run to
  the next. Such rows stay `skipped`, saying so, and the stats count them.
- `Stitcher`: used by `verdicts.identity` per batch; records what it did per row and, at the end of the
  stage, writes `identity.parquet` (this module owns the file) and returns the stage's identity figures.

`identity.parquet` in the run folder: one row per event the stitcher looked at (no session id, no user_id):
`row`, `event_id`, `anonymous_id`, `status` (`stitched` | `conflict` | `unidentified`), `user_id`,
`source_event_id` (the event that identified it), `file` (the landing file), `ts` (epoch s), `late` (a
look-back row). Delivery reads the `stitched` rows' notes for their outcome's reason (`stitch_notes`); the map
stage records the `unidentified` rows as waiting for their anonymous id (late stitching).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from include.datafly_fullstory.blueprint import Blueprint
from include.datafly_fullstory.mapping.columns import (
    Distinct,
    ParsedJson,
    _column,
    _json_values,
    _rows_of,
    _text_lengths,
    _timestamps_ns,
)
from include.datafly_fullstory.mapping.consent import ABSENT, GRANTED, ConsentRules
from include.datafly_fullstory.mapping.settings import MappingSettings
from include.datafly_fullstory.state import RunStore

FILE = "identity.parquet"
SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("event_id", pa.string()),
        ("anonymous_id", pa.string()),
        ("status", pa.string()),
        ("user_id", pa.string()),
        ("source_event_id", pa.string()),
        ("file", pa.string()),
        ("ts", pa.float64()),
        ("late", pa.bool_()),
    ]
)
PAIR_COLUMNS = ["anonymous_id", "user_id", "timestamp", "event_id", "context"]
_NAT = np.iinfo(np.int64).min


def collect_pairs(
    frame: pd.DataFrame, bp: Blueprint, settings: MappingSettings, ctx: ParsedJson | None = None
) -> pd.DataFrame:
    """The rows of `frame` that identify an anonymous id: columns anonymous_id, user_id, ts (epoch s, NaN
    when unknown), event_id. Needs the columns of PAIR_COLUMNS; `ctx`: the frame's contexts, if parsed
    already."""
    both = (_text_lengths(frame["anonymous_id"]) > 0) & (_text_lengths(frame["user_id"]) > 0)
    at = np.flatnonzero(both)
    # The consent rules of the mapping (consent.py): only a row FullStory may receive teaches a pair.
    if ctx is None:  # the contexts of these rows, parsed once per distinct text
        state, _ = ConsentRules(bp).states(ParsedJson(Distinct(_json_values(frame, "context")).take(at)))
    else:
        state = ConsentRules(bp).states(ctx)[0][at]
    allowed = state == GRANTED
    if not settings.require_explicit_consent:
        allowed |= state == ABSENT
    at = at[allowed]
    ts = _timestamps_ns(frame["timestamp"])[at]
    return pd.DataFrame(
        {
            "anonymous_id": _rows_of(frame, "anonymous_id", at),
            "user_id": _rows_of(frame, "user_id", at),
            "ts": np.where(ts == _NAT, np.nan, ts / 1e9),
            "event_id": _rows_of(frame, "event_id", at),
        }
    )


def window_pairs(store: RunStore, bp: Blueprint, settings: MappingSettings, parts=None) -> pd.DataFrame:
    """The pairs of the run's validated parts (all, or the named ones), read a few columns at a time."""
    from include.datafly_fullstory import validated

    frames = [
        collect_pairs(validated.read_part(store, name, columns=PAIR_COLUMNS).to_pandas(), bp, settings)
        for name in (validated.parts(store) if parts is None else parts)
    ]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({"anonymous_id": [], "user_id": [], "ts": [], "event_id": []})
    return pd.concat(frames, ignore_index=True)


def fold_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per anonymous id, in anonymous id order: the user of its earliest pair (by time, then event
    id, timeless and id-less pairs last), another user it was seen with (the least other; missing if none:
    None or NaN), the first and last time seen, the teaching event. Deterministic: the same pairs in any
    order fold the same."""
    if not len(pairs):
        return pd.DataFrame(columns=["anonymous_id", "user_id", "other_user_id", "t1", "t2", "event_id"])
    # Sorted codes instead of sorting the texts of every pair: only the distinct ids are sorted.
    anon_code, anon = pd.factorize(pairs["anonymous_id"], sort=True)
    user_code, users = pd.factorize(pairs["user_id"], sort=True)
    ts = pairs["ts"].to_numpy(dtype=np.float64)
    ts_key = np.where(np.isnan(ts), np.inf, ts)
    order = np.lexsort((ts_key, anon_code))  # stable: equal keys keep the input order
    starts = np.flatnonzero(np.r_[True, anon_code[order][1:] != anon_code[order][:-1]])
    head = order[starts]  # each anonymous id's earliest pair, before the event id decides ties
    sorted_ts = ts_key[order]
    ties = np.flatnonzero(
        (starts + 1 < len(order)) & (sorted_ts[np.minimum(starts + 1, len(order) - 1)] == sorted_ts[starts])
    )
    event = pairs["event_id"].to_numpy(dtype=object, na_value=None)
    for g in ties.tolist():
        first = starts[g]
        run = first + 1
        while (
            run < len(order)
            and anon_code[order[run]] == anon_code[order[first]]
            and sorted_ts[run] == sorted_ts[first]
        ):
            run += 1
        candidates = order[first:run].tolist()  # in input order; the least event id wins, missing last
        head[g] = min(candidates, key=lambda i: (event[i] is None, event[i] or ""))
    head_user = user_code[head]
    # another user: the least (in sort order) of the anonymous id's users other than the head's
    other_code = np.where(user_code != head_user[anon_code], user_code, len(users))[order]
    least = np.minimum.reduceat(other_code, starts)
    user_values = np.append(np.asarray(users, dtype=object), None)
    return pd.DataFrame(
        {
            "anonymous_id": np.asarray(anon, dtype=object),
            "user_id": user_values[head_user],
            "other_user_id": user_values[least],
            "t1": np.fmin.reduceat(ts[order], starts),
            "t2": np.fmax.reduceat(ts[order], starts),
            "event_id": event[head],
        }
    )


@dataclass
class IdentityMap:
    """anonymous id -> (user_id, teaching event id); conflicted anonymous ids -> the two users seen."""

    users: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    conflicts: dict[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def of_pairs(cls, pairs: pd.DataFrame) -> IdentityMap:
        """The map a window's own pairs give (no ledger: a dry run)."""
        folded = fold_pairs(pairs)
        anon, user, other, event_id = (
            folded[c].tolist() for c in ("anonymous_id", "user_id", "other_user_id", "event_id")
        )
        conflicted = [isinstance(o, str) for o in other]  # else None (pandas may hold it as NaN)
        events = [e if isinstance(e, str) else None for e in event_id]
        out = cls()
        out.users = {a: (u, e) for a, u, e, c in zip(anon, user, events, conflicted, strict=True) if not c}
        out.conflicts = {a: (u, o) for a, u, o, c in zip(anon, user, other, conflicted, strict=True) if c}
        return out


class Stitcher:
    """Stitches one stage's events (see the module docstring); rows numbered from `late_from` on are the
    look-back's."""

    def __init__(self, identities: IdentityMap | None, late_from: int | None = None):
        self.map = identities or IdentityMap()
        self.late_from = late_from
        self._records: list[pa.Table] = []
        self._index = None  # the map's anonymous ids, indexed at the first lookup

    def _lookup(self, anon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per anonymous id: its position in the map's users (-1: none), and whether it is conflicted.
        The map is indexed once (hash tables in C); empty ids are never looked up."""
        if self._index is None:
            users = self.map.users
            self._index = pd.Index(list(users), dtype=object)
            self._conflicted = pd.Index(list(self.map.conflicts), dtype=object)
            self._users = np.array([u for u, _ in users.values()] + [None], dtype=object)
            self._sources = np.array([e for _, e in users.values()] + [None], dtype=object)
            self._lengths = np.array([len(u) for u, _ in users.values()] + [0], dtype=np.int64)
        given = np.fromiter((bool(a) for a in anon), dtype=bool, count=len(anon))
        found = np.full(len(anon), -1, dtype=np.int64)
        if len(self._index):
            found = np.where(given, self._index.get_indexer(anon), -1)
        conflicted = np.zeros(len(anon), dtype=bool)
        if len(self._conflicted):
            conflicted = given & (self._conflicted.get_indexer(anon) >= 0)
        return found, conflicted

    def apply(self, df: pd.DataFrame, verdict, candidates: np.ndarray, uid: np.ndarray, uid_len: np.ndarray):
        """For the candidate rows (events still open with no session id and no user_id): a known anonymous
        id gives the row its user; a conflicted one skips it, naming both users. Returns (uid, uid_len)."""
        pos = np.flatnonzero(candidates)
        if not len(pos):
            return uid, uid_len
        anon = Distinct(_column(df, "anonymous_id")[pos])  # looked up once per distinct anonymous id
        conflicts = self.map.conflicts
        found, conflicted = self._lookup(anon.values)
        stitched = (found >= 0)[anon.codes]
        conflicted = conflicted[anon.codes]
        at = found[anon.codes]
        uid, uid_len = uid.copy(), uid_len.copy()
        user = np.where(stitched, self._users[at], None)
        source = np.where(stitched, self._sources[at], None)
        uid[pos[stitched]] = user[stitched]
        uid_len[pos[stitched]] = self._lengths[at[stitched]]
        anon = anon.values[anon.codes]
        if conflicted.any():
            verdict.set(
                pos[conflicted],
                "skipped",
                [
                    f"anonymous_id {a} is identified as two users ({conflicts[a][0]}, {conflicts[a][1]}): "
                    "not stitched to either (identity conflict rule, docs/mapping.md); the event has no "
                    "user_id and no FullStory session id"
                    for a in anon[conflicted]
                ],
            )
        status = np.where(stitched, "stitched", np.where(conflicted, "conflict", "unidentified"))
        rows = df["_row"].to_numpy(dtype=np.int64)[pos]
        ts = _timestamps_ns(df["timestamp"])[pos]
        late = rows >= self.late_from if self.late_from is not None else np.zeros(len(pos), dtype=bool)
        columns = {
            "row": rows,
            "event_id": _column(df, "event_id")[pos],
            "anonymous_id": anon,
            "status": status,
            "user_id": user,
            "source_event_id": source,
            "file": _rows_of(df, "_file", pos),
            "ts": np.where(ts == _NAT, np.nan, ts / 1e9),
            "late": late,
        }
        self._records.append(  # straight to Arrow (this module's file format): no pandas inference
            pa.table(
                [pa.array(columns[f.name], type=f.type, from_pandas=True) for f in SCHEMA], schema=SCHEMA
            )
        )
        return uid, uid_len

    def records(self) -> pa.Table:
        """The stitching records so far (one part's, for mapping/context.py)."""
        if not self._records:
            return SCHEMA.empty_table()
        return pa.concat_tables(self._records)

    def add_records(self, table: pa.Table) -> None:
        """Records of another part (the finish step gathers every part's)."""
        if table.num_rows:
            self._records.append(table.select(SCHEMA.names).cast(SCHEMA))

    def finish(self, store: RunStore, mapping_outcomes: pa.Table) -> dict[str, int]:
        """Write `identity.parquet` and return the figures. A stitched row the mapping did not send after
        all (rejected: a user id over the uid limit, a limit of its body) is recorded as not stitched."""
        table = self.records()
        decided = pc.is_in(table.column("row"), value_set=mapping_outcomes.column("row"))
        unsent = pc.and_(pc.equal(table.column("status"), "stitched"), decided)
        table = table.set_column(
            table.schema.get_field_index("status"),
            "status",
            pc.if_else(unsent, "unsent", table.column("status")),
        )
        store.write_table(table, FILE)
        status, late = table.column("status"), pc.fill_null(table.column("late"), False)
        stitched, conflict = pc.equal(status, "stitched"), pc.equal(status, "conflict")

        def count(mask) -> int:
            return int(pc.sum(mask).as_py() or 0)

        return {
            "stitched": count(pc.and_(stitched, pc.invert(late))),
            "stitched_late": count(pc.and_(stitched, late)),
            "conflicts": len(self.map.conflicts),
            "conflicted_rows": count(conflict),
            "anonymous_unidentified": count(pc.equal(status, "unidentified")) + count(conflict),
        }


def read(store: RunStore, status: str | None = None) -> pa.Table:
    """The run's `identity.parquet` (empty when the mapping wrote none), optionally of one status."""
    if not store.exists(FILE):
        return SCHEMA.empty_table()
    table = store.read_table(FILE)
    return table if status is None else table.filter(pc.equal(table.column("status"), status))


def stitch_notes(store: RunStore, rows) -> dict[int, str]:
    """row -> "stitched: anonymous_id <a> -> user <u> (learned from event <e>)" for the stitched rows among
    `rows` (delivery adds it to a delivered row's reason)."""
    table = read(store, "stitched")
    if not table.num_rows:
        return {}
    table = table.filter(pc.is_in(table.column("row"), value_set=pa.array(list(rows), pa.int64())))
    return {
        r: f"stitched: anonymous_id {a} -> user {u} (learned from event {e})"
        for r, a, u, e in zip(
            *(table.column(c).to_pylist() for c in ("row", "anonymous_id", "user_id", "source_event_id")),
            strict=True,
        )
    }


def annotate(store: RunStore, rows, outcome: list[str], reason: list[str | None]) -> list[str | None]:
    """`reason` with the stitch note added to each delivered stitched row's (see `stitch_notes`)."""
    notes = stitch_notes(store, rows)
    if not notes:
        return reason
    return [
        (f"{why}; {notes[r]}" if why else notes[r]) if out == "delivered" and r in notes else why
        for r, out, why in zip(rows, outcome, reason, strict=True)
    ]
