"""One batch: `BatchMapper` maps a landing frame to event lines, identify rows and this stage's outcomes.

Per batch of the landing frame (docs/contracts.md "Landing frame"):
1. parse `context` once per row (orjson) and pluck the few fields the rules need;
2. decide every row's fate with vectorised pandas/numpy operations (verdicts.py): Datafly type and event
   name -> blueprint mapping, `event_types` filter, analytics consent (both shapes), identity (FullStory
   session id first, then `user.uid`, `session.use_most_recent` only for events near the run's window end);
3. build and serialise the bodies of the rows that survive in one pass (`EventBuilder`), rejecting rows that
   would break a FullStory limit; the stage appends the lines to event chunks.
`identify` rows are kept aside (a small share) and folded per uid once the whole window is read (`fold_users`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pandas as pd

from include.datafly_fullstory import outcomes
from include.datafly_fullstory.blueprint import Blueprint, normalise_event_name
from include.datafly_fullstory.landing import EVENT_TYPES
from include.datafly_fullstory.mapping.bodies import EventBuilder
from include.datafly_fullstory.mapping.columns import (
    BAD_JSON,
    Distinct,
    ParsedJson,
    _column,
    _isin,
    _json_values,
    _rows_of,
    _text_lengths,
    _timestamps_ns,
    columns_cached,
    gc_paused,
)
from include.datafly_fullstory.mapping.consent import ConsentRules, Revocations
from include.datafly_fullstory.mapping.nesting import JSON_COLUMNS, reject_deep
from include.datafly_fullstory.mapping.properties import PropertyCleaner, Reject
from include.datafly_fullstory.mapping.settings import MappingSettings
from include.datafly_fullstory.mapping.suppression import Suppression, suppress, suppress_stitched
from include.datafly_fullstory.mapping.templates import EventLines
from include.datafly_fullstory.mapping.verdicts import (
    IDENTITY_REASONS,
    Verdict,
    filter_event_types,
    gate_consent,
    identity,
    parse_json_column,
    skip_unmapped,
)

IDENTIFY_COLUMNS = ("row", "event_id", "user_id", "ts", "traits")


@dataclass
class MappedBatch:
    """What one landing batch became: event lines with their rows, identify rows to fold, outcomes."""

    lines: list[bytes]
    rows: np.ndarray
    event_ids: np.ndarray
    identify: pd.DataFrame
    outcomes: pd.DataFrame
    by_name: dict[str, int] = field(default_factory=dict)  # event lines per FullStory event name
    identification: dict[str, int] = field(default_factory=dict)  # event rows per identification mode


class BatchMapper:
    """Maps landing frames with one blueprint, settings and reference time (the run's window end)."""

    def __init__(
        self,
        blueprint: Blueprint,
        settings: MappingSettings,
        reference_time: datetime,
        *,
        largest_line: int | None = None,
        revocations: Revocations | None = None,
        suppression: Suppression | None = None,
        stitcher=None,
    ):
        self.bp, self.settings, self.reference_time = blueprint, settings, reference_time
        self.consent_rules, self.revocations = ConsentRules(blueprint), revocations
        self.suppression = suppression  # people with a deletion request: their rows are filtered first
        self.stitcher = stitcher  # identity stitching (identity.py), or None
        self.cleaner = PropertyCleaner(blueprint)
        self.events = EventBuilder(blueprint, self.cleaner, largest_line or settings.max_bytes)
        self.lines = EventLines(self.events)  # the same bytes, built column-wise
        self._track = blueprint.track_names()
        self._by_type = blueprint.type_mappings()
        self._mapping_index = {id(m): i for i, m in enumerate(blueprint.events)}

    def map_batch(self, df: pd.DataFrame) -> MappedBatch:
        """One landing frame -> event lines, identify rows to fold later, and this stage's outcomes."""
        df = df.reset_index(drop=True)
        with gc_paused(), columns_cached(df):
            return self._map_batch(df)

    def _map_batch(self, df: pd.DataFrame) -> MappedBatch:
        n = len(df)
        verdict = Verdict(n)
        suppress(self.suppression, verdict, df)
        dtype = _column(df, "type")
        mapping_idx, fs_names = self._resolve_names(dtype, _column(df, "event"))
        skip_unmapped(self.bp, verdict, dtype, fs_names)
        filter_event_types(self.settings, verdict, dtype, fs_names, _column(df, "event"))
        texts = {c: Distinct(_json_values(df, c)) for c in JSON_COLUMNS}  # payloads repeat: work per distinct
        reject_deep(verdict, texts)
        ctx = parse_json_column(texts["context"], verdict, "context", pending=verdict.open())
        gate_consent(self.bp, self.settings, verdict, ctx, self.consent_rules)
        if self.revocations is not None:
            self.revocations.mark(verdict, df)
        is_event = _isin(dtype, EVENT_TYPES)
        ident = identity(
            self.bp, self.settings, self.reference_time, df, ctx, verdict, is_event, self.stitcher
        )
        suppress_stitched(self.suppression, verdict, ident["uid"])
        lines, line_rows = self._build_events(
            df, ctx, texts["properties"], verdict, is_event, mapping_idx, fs_names, ident
        )
        identify = self._collect_identify(df, verdict, dtype)
        rows = df["_row"].to_numpy(dtype=np.int64)
        event_ids = _column(df, "event_id")
        return MappedBatch(
            lines=lines,
            rows=rows[line_rows],
            event_ids=event_ids[line_rows],
            identify=identify,
            outcomes=verdict.frame(rows, event_ids, np.where(dtype == "identify", "user", "event")),
            by_name=_counts(fs_names[line_rows]),
            identification=identification_modes(df, ident, line_rows, verdict, is_event),
        )

    def _resolve_names(self, dtype: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row: index of the blueprint mapping (-1 = pass-through track event) and the FullStory name.
        Looked up once per distinct name (factorize), then gathered: no per-row Python."""
        codes, names = pd.factorize(pd.Series(event, dtype=object), use_na_sentinel=True)
        found = [self._track.get(normalise_event_name(str(name))) for name in names]
        name_idx = np.array([self._mapping_index[id(m)] if m else -1 for m in found] + [-1], dtype=np.int64)
        name_fs = np.array(
            [m.fullstory_name if m else name for m, name in zip(found, names, strict=True)] + [None],
            dtype=object,
        )
        mapping_idx = np.where(dtype == "track", name_idx[codes], -1)
        fs_names = np.where(dtype == "track", name_fs[codes], None)
        for datafly_type, mapping in self._by_type.items():
            is_type = dtype == datafly_type
            mapping_idx[is_type] = self._mapping_index[id(mapping)]
            fs_names[is_type] = mapping.fullstory_name
        return mapping_idx, fs_names

    def _build_events(
        self, df, ctx, properties, verdict, is_event, mapping_idx, fs_names, ident
    ) -> tuple[list, np.ndarray]:
        keep = np.flatnonzero(is_event & verdict.open())
        built, is_line = self.lines.build_array(
            mapping_idx[keep],
            fs_names[keep],
            properties.take(keep),
            ctx,
            ctx.codes[keep],
            ident["ts"][keep],
            ident["uid"][keep],
            ident["sid"][keep],
            ident["recent"][keep],
            _column(df, "anonymous_id")[keep],
            _column(df, "event_id")[keep],
            self._row_fills(df, mapping_idx).take(keep),
            df["_row"].to_numpy(dtype=np.int64)[keep],
        )
        rejected = keep[~is_line]
        verdict.set(rejected, "rejected", [r.reason for r in built[~is_line].tolist()])
        return built[is_line].tolist(), keep[is_line]

    def _row_fills(self, df: pd.DataFrame, mapping_idx: np.ndarray) -> Distinct:
        """Per row, the (property, landing column value) pairs its mapping's `from_row` asks for, as the
        distinct pairs (None, last: no fills) and each row's code into them."""
        pairs: list[tuple] = []
        codes = np.full(len(df), -1, dtype=np.int64)
        for i, mapping in enumerate(self.bp.events):
            if not mapping.from_row:
                continue
            at = np.flatnonzero(mapping_idx == i)
            if not len(at):
                continue
            columns = [Distinct(_rows_of(df, column, at)) for column in mapping.from_row.values()]
            key = np.zeros(len(at), dtype=np.int64)
            for column in columns:
                key = key * len(column.values) + column.codes
            _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
            codes[at] = len(pairs) + inverse.reshape(-1)
            pairs += [
                tuple(zip(mapping.from_row, (c.values[c.codes[j]] for c in columns), strict=True))
                for j in first.tolist()
            ]
        fills = Distinct.__new__(Distinct)
        fills.values = np.fromiter([*pairs, None], dtype=object, count=len(pairs) + 1)
        fills.codes = np.where(codes < 0, len(pairs), codes)
        return fills

    def _collect_identify(self, df: pd.DataFrame, verdict: Verdict, dtype: np.ndarray) -> pd.DataFrame:
        is_identify = dtype == "identify"
        uid = _column(df, "user_id")
        no_uid = _text_lengths(df["user_id"]) == 0
        verdict.mark(
            is_identify & no_uid,
            "skipped",
            "identify without a user_id: FullStory users are keyed on "
            "uid and this pipeline never creates an anonymous user per call",
        )
        no_traits = (
            df["traits"].isna().to_numpy(dtype=bool) if "traits" in df.columns else np.ones(len(df), bool)
        )
        verdict.mark(is_identify & no_traits, "skipped", "identify without traits: nothing to update")
        take = np.flatnonzero(is_identify & verdict.open())
        return pd.DataFrame(
            {
                "row": df["_row"].to_numpy(dtype=np.int64)[take],
                "event_id": _column(df, "event_id")[take],
                "user_id": uid[take],
                "ts": _timestamps_ns(df["timestamp"])[take],
                "traits": _rows_of(df, "traits", take),
            }
        )

    # ---- users ---------------------------------------------------------------------------------------

    def fold_users(self, identify: pd.DataFrame) -> tuple[list[bytes], tuple, pd.DataFrame]:
        """Fold every identify call of the window per uid, in timestamp order (latest trait value wins).
        Returns the user lines, their index (line_of, rows, event_ids) and outcomes for rejected updates."""
        with gc_paused():
            ordered = identify.sort_values(["user_id", "ts", "row"], kind="stable").reset_index(drop=True)
            uid = ordered["user_id"].to_numpy(dtype=object, na_value=None)
            starts = (
                np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]]) if len(uid) else np.array([], dtype=np.int64)
            )
            bounds = np.r_[starts, len(uid)]
            traits = ParsedJson(ordered["traits"])  # parsed once per distinct text
            parsed = np.fromiter(traits.values, dtype=object, count=len(traits.values))[traits.codes]
            built = [
                self._user_line(uid[a], parsed[a:b])
                for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
            ]
        group = np.repeat(np.arange(len(starts)), np.diff(bounds))
        is_line = np.fromiter((type(b) is bytes for b in built), dtype=bool, count=len(built))
        line_number = np.cumsum(is_line) - 1
        in_line = is_line[group] if len(group) else np.array([], dtype=bool)
        rows, event_ids = (
            ordered["row"].to_numpy(dtype=np.int64),
            ordered["event_id"].to_numpy(dtype=object, na_value=None),
        )
        reasons = np.array([None if type(b) is bytes else b.reason for b in built], dtype=object)
        rejected = outcomes.frame(
            rows[~in_line],
            event_ids[~in_line],
            "rejected",
            reasons[group[~in_line]] if len(group) else [],
            "user",
        )
        lines = [b for b in built if type(b) is bytes]
        return lines, (line_number[group[in_line]], rows[in_line], event_ids[in_line]), rejected

    def _user_line(self, uid: str, calls: np.ndarray) -> bytes | Reject:
        """The user update of one uid from its identify calls' parsed traits, in order (shared parses:
        merged into a new dict, never changed)."""
        merged: dict = {}
        for traits in calls:
            if traits is BAD_JSON:
                return Reject("traits is not valid JSON in one of this user's identify calls")
            if type(traits) is dict:
                merged.update(traits)
        return self.events.user_body(uid, merged)


IDENTIFICATION_MODES = ("session_id", "uid", "use_most_recent", "stitched", "skipped")


def identification_modes(df: pd.DataFrame, ident: dict, line_rows: np.ndarray, verdict, is_event) -> dict:
    """How the batch's event lines are identified: a FullStory session id; the row's own user_id (with
    `use_most_recent` when its session may still be open); a user stitched from its anonymous id; and the
    events skipped for want of any identification."""
    has_sid = pd.notna(ident["sid"][line_rows])
    own_uid = _text_lengths(df["user_id"])[line_rows] > 0
    recent = ident["recent"][line_rows]
    candidates = np.flatnonzero(is_event & (verdict.outcome == "skipped"))
    reasons = verdict.reason[candidates]
    skipped = np.fromiter(
        (isinstance(r, str) and r.startswith(IDENTITY_REASONS) for r in reasons),
        dtype=bool,
        count=len(reasons),
    )
    return {
        "session_id": int(has_sid.sum()),
        "uid": int((~has_sid & own_uid & ~recent).sum()),
        "use_most_recent": int((~has_sid & own_uid & recent).sum()),
        "stitched": int((~has_sid & ~own_uid).sum()),
        "skipped": int(skipped.sum()),
    }


def _counts(values: np.ndarray) -> dict[str, int]:
    if not len(values):
        return {}
    counts = pd.Series(values, dtype=object).value_counts()
    return {str(k): int(v) for k, v in counts.items()}
