"""The mapping stage: validated Datafly rows -> FullStory events and user updates, as request chunks.

Per batch of the landing frame (docs/contracts.md "Landing frame"):
1. parse `context` once per row (orjson) and pluck the few fields the rules need;
2. decide every row's fate with vectorised pandas/numpy operations: Datafly type and event name ->
   blueprint mapping, `event_types` filter, analytics consent (both shapes), identity (FullStory session id
   first, then `user.uid`, `session.use_most_recent` only for events near the run's window end);
3. build and serialise the bodies of the rows that survive in one pass (`EventBuilder`), rejecting rows that
   would break a FullStory limit, and append the lines to event chunks.
`identify` rows are kept aside (a small share) and folded per uid once the whole window is read.
Rows that end here get a row in `outcomes/mapping.parquet`; rows written to chunks get theirs at delivery.
"""

from __future__ import annotations

import gc
import math
import re
import unicodedata
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from include.datafly_fullstory import outcomes
from include.datafly_fullstory.blueprint import (
    Blueprint,
    EventMapping,
    ItemField,
    load_blueprint,
    normalise_event_name,
)
from include.datafly_fullstory.landing import EVENT_TYPES
from include.datafly_fullstory.payloads import PAYLOADS, ChunkWriter, idempotency_key
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.window import Window

SESSION_ID = re.compile(r"[^:\s]+:[^:\s]+")
NO_IDENTITY = ("no FullStory identification: the event has no user_id and no FullStory session id, and "
               "FullStory's server API has no anonymous-id field (an event without user or session is refused). "
               "Fix: pass the browser's FS('getSession', {format: 'id'}) into Signal as "
               "context.fullstory.session_id, or identify the user")


@dataclass(frozen=True)
class MappingSettings:
    """Mapping options; arrives as a plain dict through Airflow params / XCom (`from_dict`)."""

    require_explicit_consent: bool = False
    event_types: tuple[str, ...] | None = None
    max_items: int = 50_000
    max_bytes: int = 8 * 1024 * 1024
    recent_session_minutes: int = 30
    batch_rows: int = 100_000

    def __post_init__(self) -> None:
        if self.event_types is not None:
            object.__setattr__(self, "event_types", tuple(self.event_types) or None)
        if not 0 < self.max_items <= 50_000:
            raise ValueError(f"max_items={self.max_items}: FullStory batches hold 1..50000 items")
        if self.max_bytes < 64 * 1024:
            raise ValueError(f"max_bytes={self.max_bytes}: give at least 65536 bytes per request")

    @classmethod
    def from_dict(cls, data: dict | MappingSettings | None) -> MappingSettings:
        if isinstance(data, MappingSettings):
            return data
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown mapping setting(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if v is not None or k == "event_types"})

    def as_dict(self) -> dict:
        out = asdict(self)
        out["event_types"] = list(self.event_types) if self.event_types else None
        return out


@dataclass
class MappedBatch:
    """What one landing batch became: event lines with their rows, identify rows to fold, outcomes."""

    lines: list[bytes]
    rows: np.ndarray
    event_ids: np.ndarray
    identify: pd.DataFrame
    outcomes: pd.DataFrame


# ---- stage entry point -----------------------------------------------------------------------------


def run_mapping(store: RunStore, blueprint: Blueprint | str | Path | None, settings: MappingSettings | dict | None,
                *, reference_time: datetime | str, window: Window | dict | None = None,
                keep: Iterable[str] = (), first_number: int = 0) -> dict:
    """Map `validated/part-*.parquet` into `payloads/` chunks, `outcomes/mapping.parquet` and, last,
    `payloads/manifest.json`. Returns the manifest's summary.

    A pure function of the rows, the blueprint, the settings and `reference_time` (the run's window end,
    fixed when the run was planned): the same rows map to the same bytes whenever they are mapped.
    Re-running replaces `payloads/`, except the chunks named in `keep` (chunks an earlier try sent, whose
    bytes the ledger points at); new chunks are numbered from `first_number`. With the run's `window`, each
    chunk entry carries its `idempotency_key` (see payloads.idempotency_key)."""
    bp = blueprint if isinstance(blueprint, Blueprint) else load_blueprint(blueprint or "retail")
    settings = MappingSettings.from_dict(settings)
    reference_time = _as_utc(reference_time)
    _clear_payloads(store, set(keep))
    events = ChunkWriter(store, "events", max_items=settings.max_items, max_bytes=settings.max_bytes,
                         first_number=first_number)
    mapper = BatchMapper(bp, settings, reference_time, largest_line=events.largest_line())
    outcome_tables, identify_parts, rows_read = [], [], 0
    for frame in iter_validated(store, settings.batch_rows):
        rows_read += len(frame)
        batch = mapper.map_batch(frame)
        events.add(batch.lines, np.arange(len(batch.lines)), batch.rows, batch.event_ids)
        identify_parts.append(batch.identify)
        outcome_tables.append(outcomes.to_table(batch.outcomes))
    events.flush()
    users = ChunkWriter(store, "users", max_items=settings.max_items, max_bytes=settings.max_bytes,
                        first_number=first_number)
    user_lines, user_index, user_outcomes = mapper.fold_users(_concat(identify_parts, IDENTIFY_COLUMNS))
    users.add(user_lines, *user_index)
    users.flush()
    outcome_tables.append(outcomes.to_table(user_outcomes))
    mapping_outcomes = pa.concat_tables(outcome_tables) if outcome_tables else outcomes.SCHEMA.empty_table()
    store.write_table(mapping_outcomes, "outcomes", "mapping.parquet")
    chunks = users.chunks + events.chunks
    if window is not None:
        chunks = [{**c, "idempotency_key": idempotency_key(store.run_id, window, c["kind"], c["name"], c["sha256"])}
                  for c in chunks]
    summary = {
        "chunks": chunks,
        "events_mapped": sum(c["items"] for c in events.chunks),
        "users_mapped": len(user_lines),
        "rows": {"read": rows_read, **_count_outcomes(mapping_outcomes)},
    }
    store.write_json({**summary, "blueprint": {"name": bp.name, "variant": bp.variant, "version": bp.version},
                      "settings": settings.as_dict(), "reference_time": reference_time.isoformat()},
                     PAYLOADS, "manifest.json")
    return summary


def _clear_payloads(store: RunStore, keep: set[str]) -> None:
    """Remove `payloads/` except the files of the chunks in `keep`."""
    if not keep:
        store.remove(PAYLOADS)
        return
    for name in store.list(PAYLOADS):
        if name.split(".", 1)[0] not in keep:
            store.remove(PAYLOADS, name)


def iter_validated(store: RunStore, batch_rows: int) -> Iterator[pd.DataFrame]:
    """Landing frames from `validated/part-*.parquet`, one per record batch (bounded memory)."""
    for name in store.list("validated", suffix=".parquet"):
        if not name.startswith("part-"):
            continue
        with store.fs.open(store.path("validated", name), "rb") as fh:
            for record_batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows):
                yield record_batch.to_pandas()


def _count_outcomes(table: pa.Table) -> dict[str, int]:
    counts = outcomes.count_by_outcome(table)
    return {k: counts[k] for k in ("filtered", "skipped", "rejected")}


def _concat(frames: list[pd.DataFrame], columns: tuple[str, ...]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({c: [] for c in columns})


def _as_utc(when: datetime | str) -> datetime:
    if isinstance(when, str):
        when = datetime.fromisoformat(when.replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(f"reference_time={when.isoformat()} has no time zone; give it in UTC")
    return when.astimezone(UTC)


@contextmanager
def _gc_paused() -> Generator[None, None, None]:
    """Parsing a batch allocates hundreds of thousands of dicts with no reference cycles; the cyclic
    collector would walk them over and over (measured: 5x slower parsing). Reference counting frees them."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# ---- one batch ---------------------------------------------------------------------------------------

IDENTIFY_COLUMNS = ("row", "event_id", "user_id", "ts", "traits")


class BatchMapper:
    """Maps landing frames with one blueprint, settings and reference time (the run's window end)."""

    def __init__(self, blueprint: Blueprint, settings: MappingSettings, reference_time: datetime, *,
                 largest_line: int | None = None):
        self.bp, self.settings, self.reference_time = blueprint, settings, reference_time
        self.cleaner = PropertyCleaner(blueprint)
        self.events = EventBuilder(blueprint, self.cleaner, largest_line or settings.max_bytes)
        self._track = blueprint.track_names()
        self._by_type = blueprint.type_mappings()
        self._mapping_index = {id(m): i for i, m in enumerate(blueprint.events)}

    def map_batch(self, df: pd.DataFrame) -> MappedBatch:
        """One landing frame -> event lines, identify rows to fold later, and this stage's outcomes."""
        with _gc_paused():
            return self._map_batch(df.reset_index(drop=True))

    def _map_batch(self, df: pd.DataFrame) -> MappedBatch:
        n = len(df)
        verdict = Verdict(n)
        dtype = _column(df, "type")
        mapping_idx, fs_names = self._resolve_names(dtype, _column(df, "event"))
        self._skip_unmapped(verdict, dtype, fs_names)
        self._filter_event_types(verdict, dtype, fs_names, _column(df, "event"))
        ctx = _parse_json_column(_column(df, "context"), verdict, "context", pending=verdict.open())
        self._gate_consent(verdict, ctx)
        is_event = _isin(dtype, EVENT_TYPES)
        ident = self._identity(df, ctx, verdict, is_event)
        lines, line_rows = self._build_events(df, ctx, verdict, is_event, mapping_idx, fs_names, ident)
        identify = self._collect_identify(df, verdict, dtype)
        rows = df["_row"].to_numpy(dtype=np.int64)
        event_ids = _column(df, "event_id")
        return MappedBatch(lines=lines, rows=rows[line_rows], event_ids=event_ids[line_rows], identify=identify,
                           outcomes=verdict.frame(rows, event_ids, np.where(dtype == "identify", "user", "event")))

    def _resolve_names(self, dtype: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row: index of the blueprint mapping (-1 = pass-through track event) and the FullStory name.
        Looked up once per distinct name (factorize), then gathered: no per-row Python."""
        codes, names = pd.factorize(pd.Series(event, dtype=object), use_na_sentinel=True)
        found = [self._track.get(normalise_event_name(str(name))) for name in names]
        name_idx = np.array([self._mapping_index[id(m)] if m else -1 for m in found] + [-1], dtype=np.int64)
        name_fs = np.array([m.fullstory_name if m else name for m, name in zip(found, names, strict=True)]
                           + [None], dtype=object)
        mapping_idx = np.where(dtype == "track", name_idx[codes], -1)
        fs_names = np.where(dtype == "track", name_fs[codes], None)
        for datafly_type, mapping in self._by_type.items():
            is_type = dtype == datafly_type
            mapping_idx[is_type] = self._mapping_index[id(mapping)]
            fs_names[is_type] = mapping.fullstory_name
        return mapping_idx, fs_names

    def _skip_unmapped(self, verdict: Verdict, dtype: np.ndarray, fs_names: np.ndarray) -> None:
        for datafly_type in sorted(self.bp.unmapped_types):
            verdict.mark(dtype == datafly_type, "skipped",
                         f"Datafly '{datafly_type}' calls have no FullStory mapping in blueprint {self.bp.label}")
        known = _isin(dtype, [*EVENT_TYPES, "identify", *self.bp.unmapped_types])
        verdict.mark(~known, "skipped", f"unknown Datafly type: not one of page, track, identify, "
                     f"{', '.join(sorted(self.bp.unmapped_types))}")
        no_name = (dtype == "track") & pd.isna(fs_names)
        verdict.mark(no_name, "skipped", "track call without an event name: FullStory events need a name")

    def _filter_event_types(self, verdict: Verdict, dtype: np.ndarray, fs_names: np.ndarray,
                            event: np.ndarray) -> None:
        wanted = self.settings.event_types
        if not wanted:
            return
        keep = _isin(dtype, wanted) | _isin(fs_names, wanted) | _isin(event, wanted)
        verdict.mark(~keep, "filtered", f"not in this run's event_types {list(wanted)}: neither its Datafly type "
                     "nor its FullStory event name is listed")

    def _gate_consent(self, verdict: Verdict, ctx: list) -> None:
        """`analytics` consent gates every row, in both Datafly shapes; the first shape present decides."""
        category = self.bp.consent_category
        consent = _getter(self.bp.consent_paths, "scalar")
        raw = pd.Series([consent(c) for c in ctx], dtype=object)
        state = raw.map(self.bp.consent_values)  # True / False / NaN (absent or unreadable)
        denied = (state == False).to_numpy()  # noqa: E712  (NaN must not count as a denial)
        verdict.mark(denied, "filtered", f"{category} consent denied (context.consent): FullStory may not "
                     "receive this row")
        if self.settings.require_explicit_consent:
            verdict.mark(state.isna().to_numpy(), "filtered", f"no {category} consent recorded and the run "
                         "requires explicit consent (require_explicit_consent)")

    def _identity(self, df: pd.DataFrame, ctx: list, verdict: Verdict, is_event: np.ndarray) -> dict:
        """Which identification each event carries: a valid FullStory session id wins (FullStory refuses
        a user next to it), else `user.uid`; `use_most_recent` only for events in the last
        `recent_session_minutes` before the run's window end (the reference time), whose session may still
        be open when the run delivers them."""
        paths = self.bp.identity
        uid = _column(df, "user_id")
        uid_len = _text_lengths(df["user_id"])
        has_uid = uid_len > 0
        session_id = _getter(paths["fullstory_session_id"], "text")
        sid = pd.Series([session_id(c) for c in ctx], dtype="str")
        has_sid = sid.str.fullmatch(SESSION_ID.pattern).fillna(False).to_numpy(dtype=bool)
        bad_sid = sid.notna().to_numpy() & ~has_sid
        verdict.mark(is_event & ~has_sid & ~has_uid & bad_sid, "skipped",
                     "the FullStory session id in the context is not of the form '<deviceId>:<sessionId>' and the "
                     "event has no user_id: nothing FullStory accepts identifies it")
        verdict.mark(is_event & ~has_sid & ~has_uid, "skipped", NO_IDENTITY)
        use_uid = has_uid & ~has_sid
        too_long = use_uid & (uid_len > self.bp.limits["uid"])
        verdict.mark(is_event & too_long, "rejected", f"user_id is longer than FullStory's "
                     f"{self.bp.limits['uid']}-character uid limit")
        ts = _timestamps_ns(df["timestamp"])
        window = timedelta(minutes=self.settings.recent_session_minutes) // timedelta(microseconds=1) * 1000
        ref_ns = int(self.reference_time.timestamp() * 1_000_000) * 1000
        recent = (ts != np.iinfo(np.int64).min) & (np.abs(ref_ns - ts) <= window)
        return {"uid": np.where(use_uid, uid, None), "sid": np.where(has_sid, sid.to_numpy(dtype=object, na_value=None), None),
                "recent": use_uid & recent, "ts": _iso_utc(ts)}

    def _build_events(self, df, ctx, verdict, is_event, mapping_idx, fs_names, ident) -> tuple[list, np.ndarray]:
        keep = np.flatnonzero(is_event & verdict.open())
        columns = [mapping_idx[keep], fs_names[keep], _column(df, "properties")[keep], np.array(ctx, dtype=object)[keep],
                   ident["ts"][keep], ident["uid"][keep], ident["sid"][keep], ident["recent"][keep],
                   _column(df, "anonymous_id")[keep], _column(df, "event_id")[keep],
                   self._row_fills(df, mapping_idx)[keep]]
        build = self.events.build
        built = [build(*args) for args in zip(*(c.tolist() for c in columns), strict=True)]
        is_line = np.fromiter((type(b) is bytes for b in built), dtype=bool, count=len(built))
        rejected = keep[~is_line]
        verdict.set(rejected, "rejected", [built[i].reason for i in np.flatnonzero(~is_line)])
        return [b for b in built if type(b) is bytes], keep[is_line]

    def _row_fills(self, df: pd.DataFrame, mapping_idx: np.ndarray) -> np.ndarray:
        """Per row, the (property, landing column value) pairs its mapping's `from_row` asks for."""
        fills = np.full(len(df), None, dtype=object)
        for i, mapping in enumerate(self.bp.events):
            if not mapping.from_row:
                continue
            at = np.flatnonzero(mapping_idx == i)
            values = [_column(df, column)[at] for column in mapping.from_row.values()]
            fills[at] = [tuple(zip(mapping.from_row, vals, strict=True)) for vals in zip(*values, strict=True)]
        return fills

    def _collect_identify(self, df: pd.DataFrame, verdict: Verdict, dtype: np.ndarray) -> pd.DataFrame:
        is_identify = dtype == "identify"
        uid = _column(df, "user_id")
        no_uid = _text_lengths(df["user_id"]) == 0
        verdict.mark(is_identify & no_uid, "skipped", "identify without a user_id: FullStory users are keyed on "
                     "uid and this pipeline never creates an anonymous user per call")
        traits = _column(df, "traits")
        verdict.mark(is_identify & pd.isna(traits), "skipped", "identify without traits: nothing to update")
        take = np.flatnonzero(is_identify & verdict.open())
        return pd.DataFrame({"row": df["_row"].to_numpy(dtype=np.int64)[take], "event_id": _column(df, "event_id")[take],
                             "user_id": uid[take], "ts": _timestamps_ns(df["timestamp"])[take],
                             "traits": traits[take]})

    # ---- users ---------------------------------------------------------------------------------------

    def fold_users(self, identify: pd.DataFrame) -> tuple[list[bytes], tuple, pd.DataFrame]:
        """Fold every identify call of the window per uid, in timestamp order (latest trait value wins).
        Returns the user lines, their index (line_of, rows, event_ids) and outcomes for rejected updates."""
        with _gc_paused():
            ordered = identify.sort_values(["user_id", "ts", "row"], kind="stable").reset_index(drop=True)
            uid = ordered["user_id"].to_numpy(dtype=object, na_value=None)
            starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]]) if len(uid) else np.array([], dtype=np.int64)
            bounds = np.r_[starts, len(uid)]
            traits = ordered["traits"].to_numpy(dtype=object, na_value=None)
            built = [self._user_line(uid[a], traits[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        group = np.repeat(np.arange(len(starts)), np.diff(bounds))
        is_line = np.fromiter((type(b) is bytes for b in built), dtype=bool, count=len(built))
        line_number = np.cumsum(is_line) - 1
        in_line = is_line[group] if len(group) else np.array([], dtype=bool)
        rows, event_ids = ordered["row"].to_numpy(dtype=np.int64), ordered["event_id"].to_numpy(dtype=object, na_value=None)
        reasons = np.array([None if type(b) is bytes else b.reason for b in built], dtype=object)
        rejected = pd.DataFrame({"row": rows[~in_line], "event_id": event_ids[~in_line], "outcome": "rejected",
                                 "reason": reasons[group[~in_line]] if len(group) else [], "kind": "user",
                                 "chunk": None})
        lines = [b for b in built if type(b) is bytes]
        return lines, (line_number[group[in_line]], rows[in_line], event_ids[in_line]), rejected

    def _user_line(self, uid: str, traits_texts: np.ndarray) -> bytes | Reject:
        merged: dict = {}
        for text in traits_texts:
            try:
                traits = orjson.loads(text)
            except orjson.JSONDecodeError:
                return Reject("traits is not valid JSON in one of this user's identify calls")
            if type(traits) is dict:
                merged.update(traits)
        return self.events.user_body(uid, merged)


# ---- building bodies ---------------------------------------------------------------------------------


class EventBuilder:
    """Builds and serialises one body per row; the only per-row Python besides JSON parsing."""

    def __init__(self, blueprint: Blueprint, cleaner: PropertyCleaner, largest_line: int):
        self.bp, self.cleaner, self.largest_line = blueprint, cleaner, largest_line
        self.mappings: tuple[EventMapping, ...] = blueprint.events
        self.max_name = blueprint.limits["event_name"]
        self.anon_prop, self.locale_prop = blueprint.anonymous_id_property, blueprint.locale_property
        self.event_id_prop = blueprint.event_id_property
        self.locale, self.page_url, self.user_agent, self.ip = (
            _getter(blueprint.identity[key], "text") for key in ("locale", "page_url", "user_agent", "ip"))

    def build(self, m: int, name: str, props_text: str | None, ctx: dict | None, ts: str | None,
              uid: str | None, sid: str | None, recent: bool, anon: str | None, event_id: str | None,
              row_fills: tuple | None) -> bytes | Reject:
        if len(name) > self.max_name:
            return Reject(f"event name is {len(name)} characters; FullStory allows {self.max_name}")
        try:
            props = orjson.loads(props_text) if props_text is not None else {}
        except orjson.JSONDecodeError:
            return Reject("properties is not valid JSON")
        if type(props) is not dict:
            return Reject("properties is not a JSON object")
        mapping = self.mappings[m] if m >= 0 else None
        try:
            properties, schema = self._properties(mapping, props, ctx, row_fills, anon, self.locale(ctx),
                                                event_id)
        except Reject as reject:
            return reject
        body: dict[str, Any] = {"name": name}
        if ts is not None:
            body["timestamp"] = ts
        if sid is not None:
            body["session"] = {"id": sid}
        else:
            body["user"] = {"uid": uid}
            if recent:
                body["session"] = {"use_most_recent": True}
        context = _event_context(self.page_url(ctx), self.user_agent(ctx), self.ip(ctx))
        if context:
            body["context"] = context
        body["properties"] = properties
        if schema:
            body["schema"] = {"properties": schema}
        line = orjson.dumps(body)
        if len(line) > self.largest_line:
            return Reject(f"the event body is {len(line)} bytes, more than one request may carry (max_bytes)")
        return line

    def _properties(self, mapping: EventMapping | None, props: dict, ctx: dict | None, row_fills: tuple | None,
                    anon: str | None, locale: str | None, event_id: str | None) -> tuple[dict, dict]:
        items = self.cleaner.take_items(props)
        if mapping is not None:
            _apply_renames(props, mapping.renames)
            _fill_from_context(props, mapping.from_context, ctx)
            if row_fills:
                for prop, value in row_fills:
                    if props.get(prop) is None and value is not None:
                        props[prop] = value
        properties, count = self.cleaner.clean(props)
        schema = self.cleaner.declare(properties, mapping.schema) if mapping is not None and mapping.schema else {}
        if items is not None:
            count += self.cleaner.add_items(properties, schema, items,
                                            lift=mapping is not None and mapping.lift_first_item)
        for prop, value in ((self.anon_prop, anon), (self.locale_prop, locale), (self.event_id_prop, event_id)):
            if value is not None:
                count += prop not in properties
                properties[prop] = self.cleaner.checked_value(value, prop)
        self.cleaner.check_count(count, "properties")
        return properties, schema

    def user_body(self, uid: str, traits: dict) -> bytes | Reject:
        """One `BatchUserImportRequest` from folded traits."""
        body: dict[str, Any] = {"uid": uid}
        try:
            for field, sources in self.bp.user_fields.items():
                for source in sources:
                    value = traits.get(source)
                    if value is not None and type(value) is not dict and type(value) is not list:
                        body[field] = self.cleaner.checked_text(str(value), field, self.bp.limits[field])
                        del traits[source]
                        break
            if len(uid) > self.bp.limits["uid"]:
                raise Reject(f"user_id is longer than FullStory's {self.bp.limits['uid']}-character uid limit")
            properties, count = self.cleaner.clean(traits, where="traits")
            self.cleaner.check_count(count, "traits")
        except Reject as reject:
            return reject
        if properties:
            body["properties"] = properties
        return orjson.dumps(body)


def _apply_renames(props: dict, renames: dict[str, str]) -> None:
    """GA4 names onto the blueprint's (transaction_id -> order_id); an existing target keeps its value."""
    for source, target in renames.items():
        if source in props and target not in props:
            props[target] = props.pop(source)


def _fill_from_context(props: dict, from_context: dict[str, tuple[str, ...]], ctx: dict | None) -> None:
    if not from_context or ctx is None:
        return
    for prop, path in from_context.items():
        if props.get(prop) is None:
            value = _dig(ctx, path)
            if value is not None:
                props[prop] = value


def _event_context(url: str | None, user_agent: str | None, ip: str | None) -> dict:
    context: dict[str, dict] = {}
    if url is not None or user_agent is not None:
        browser = context["browser"] = {}
        if url is not None:
            browser["url"] = url
        if user_agent is not None:
            browser["user_agent"] = user_agent
    if ip is not None:
        context["location"] = {"ip_address": ip}
    return context


# ---- property rules ---------------------------------------------------------------------------------


class Reject(Exception):  # noqa: N818  (a row's fate, not a program error)
    """A row that would break a FullStory rule; `reason` goes to its outcome."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_VALID_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_INVALID_RUN = re.compile(r"[^A-Za-z0-9_]+")
_PLAN_CACHE_CAP = 100_000


class PropertyCleaner:
    """FullStory's property rules: names `[A-Za-z][A-Za-z0-9_]*`, reserved names renamed, dotted paths and
    values within limits, no nulls, no arrays of objects. The renaming plan of a key set is computed once
    and cached: Datafly payloads repeat the same few key sets millions of times."""

    def __init__(self, blueprint: Blueprint):
        self.reserved = blueprint.reserved_names
        self.suffixes = blueprint.reserved_suffixes
        self.max_value = blueprint.limits["value_bytes"]
        self.max_path = blueprint.limits["property_path"]
        self.max_count = blueprint.limits["properties"]
        self.item_keys = blueprint.item_source_keys
        self.item_fields = blueprint.item_fields
        self.item_fills = {f.property: _coerce_item(f.fill, f.type, None) for f in blueprint.item_fields}
        self.count_property = blueprint.item_count_property
        self._plans: dict[tuple, tuple[tuple[tuple[str, str], ...], int]] = {}
        self._item_plans: dict[tuple, tuple[tuple[int, str], ...]] = {}

    # names

    def plan(self, keys: tuple, top: bool) -> tuple[tuple[tuple[str, str], ...], int]:
        """(source key, FullStory name) pairs and the longest name. Valid names keep theirs; the others are
        cleaned in sorted order and numbered on collision (`_2`, `_3`), so the result never depends on key order."""
        cached = self._plans.get((top, keys))
        if cached is not None:
            return cached
        if len(self._plans) > _PLAN_CACHE_CAP:
            self._plans.clear()
        names = {k: k for k in keys if self._keeps_name(k, top)}
        taken = set(names)
        for key in sorted(set(keys) - taken):
            base = name = self.clean_name(key, top)
            number = 2
            while name in taken:
                name, number = f"{base}_{number}", number + 1
            names[key] = name
            taken.add(name)
        pairs = tuple((k, names[k]) for k in keys)
        result = (pairs, max((len(n) for n in names.values()), default=0))
        self._plans[(top, keys)] = result
        return result

    def _keeps_name(self, key: str, top: bool) -> bool:
        return (_VALID_NAME.fullmatch(key) is not None and not key.endswith(self.suffixes)
                and not (top and key in self.reserved))

    def clean_name(self, key: str, top: bool = True) -> str:
        """'Video Length (s)' -> 'Video_Length_s'; '1st' -> 'p_1st'; reserved 'uid' -> the blueprint's rename."""
        ascii_key = unicodedata.normalize("NFKD", key).encode("ascii", "ignore").decode()
        name = _INVALID_RUN.sub("_", ascii_key).strip("_") or "property"
        if not name[0].isalpha():
            name = f"p_{name}"
        if top and name in self.reserved:
            name = self.reserved[name]
        if name.endswith(self.suffixes):
            name = f"{name}_value"
        return name

    # values

    def clean(self, obj: dict, where: str = "properties", parent: str = "") -> tuple[dict, int]:
        """A cleaned copy of `obj` and its number of leaf properties (nested objects count their leaves)."""
        pairs, longest = self.plan(tuple(obj), not parent)
        if len(parent) + 1 + longest > self.max_path:
            raise Reject(f"{where}: a property path under {parent or 'the top level'} is longer than "
                         f"{self.max_path} characters")
        out: dict = {}
        count = 0
        for key, name in pairs:
            value = obj[key]
            kind = type(value)
            if value is None:
                continue
            if kind is list:
                value = self._array(value, where, f"{parent}.{name}" if parent else name)
                kind = type(value)
            if kind is dict:
                value, leaves = self.clean(value, where, f"{parent}.{name}" if parent else name)
                if value:
                    out[name] = value
                    count += leaves
                continue
            if kind is str and len(value) > self.max_value // 4:
                self.checked_value(value, f"{parent}.{name}" if parent else name, where)
            out[name] = value
            count += 1
        return out, count

    def _array(self, values: list, where: str, path: str) -> list | dict:
        """Arrays of primitives pass (nulls dropped, mixed types as text); an array of objects becomes an
        object of arrays, one per field, which FullStory can index."""
        kinds = {type(v) for v in values}
        if dict in kinds:
            elements = [v for v in values if type(v) is dict]
            fields_ = dict.fromkeys(k for e in elements for k in e)
            return {k: [e[k] for e in elements if type(e.get(k)) in _PRIMITIVES] for k in fields_}
        if list in kinds or dict in kinds:
            values = [orjson.dumps(v).decode() if type(v) in (list, dict) else v for v in values]
            kinds = {type(v) for v in values}
        if type(None) in kinds:
            values = [v for v in values if v is not None]
            kinds.discard(type(None))
        if len(kinds - {int, float}) > 0 and len(kinds) > 1:
            values = [v if type(v) is str else orjson.dumps(v).decode() for v in values]
        if len(values) > 64 or str in kinds:
            size = len(orjson.dumps(values))
            if size > self.max_value:
                raise Reject(f"{where}.{path} is {size} bytes; FullStory rejects values over {self.max_value} bytes")
        return values

    def checked_value(self, value: Any, path: str, where: str = "properties") -> Any:
        if type(value) is str and len(value) > self.max_value // 4 and len(value.encode()) > self.max_value:
            raise Reject(f"{where}.{path} is {len(value.encode())} bytes; FullStory rejects values over "
                         f"{self.max_value} bytes")
        return value

    def checked_text(self, text: str, field: str, limit: int) -> str:
        if len(text) > limit:
            raise Reject(f"{field} is {len(text)} characters; FullStory allows {limit}")
        return text

    def check_count(self, count: int, where: str) -> None:
        if count > self.max_count:
            raise Reject(f"{where} has {count} properties after flattening; FullStory allows {self.max_count}")

    # schema and items

    def declare(self, properties: dict, declared: dict[str, str]) -> dict[str, str]:
        """Top-level types the blueprint declares (quantity: int): the value is coerced so the property
        keeps one type across events; a value that cannot be coerced is left to FullStory's inference."""
        schema = {}
        for prop, type_name in declared.items():
            value = properties.get(prop)
            if value is None:
                continue
            coerced = _coerce_item(value, type_name + "s", None)
            if coerced is not None:
                properties[prop] = coerced
                schema[prop] = type_name
        return schema

    def take_items(self, props: dict) -> list | None:
        """Remove and return the first item list (products / items) holding objects."""
        for key in self.item_keys:
            value = props.get(key)
            if type(value) is list and any(type(v) is dict for v in value):
                del props[key]
                return [v for v in value if type(v) is dict]
        return None

    def add_items(self, properties: dict, schema: dict, items: list[dict], *, lift: bool) -> int:
        """Items as typed parallel arrays (one entry per item, `fill` where an item lacks the field) plus
        the item count; `lift` copies the first item's fields to the top level where absent.
        Returns the number of properties added."""
        n = len(items)
        columns: list[list] = [[None] * n for _ in self.item_fields]
        for j, item in enumerate(items):
            for field_index, key in self._item_plan(tuple(item)):
                columns[field_index][j] = item[key]
        added = 0
        for item_field, raw in zip(self.item_fields, columns, strict=True):
            if raw.count(None) == n:
                continue
            values = _ITEM_COERCE[item_field.type](raw, self.item_fills[item_field.property])
            self._check_item_size(values, item_field)
            added += item_field.property not in properties
            properties[item_field.property] = values
            schema[item_field.property] = item_field.type
            if lift:
                added += self._lift(properties, schema, item_field, raw[0], values[0])
        added += self.count_property not in properties
        properties[self.count_property] = n
        schema[self.count_property] = "int"
        return added

    def _item_plan(self, keys: tuple) -> tuple[tuple[int, str], ...]:
        """(item field, source key) pairs for an item's key set: the first alias present wins. Cached."""
        plan = self._item_plans.get(keys)
        if plan is None:
            present = set(keys)
            plan = tuple((i, next(s for s in f.sources if s in present)) for i, f in enumerate(self.item_fields)
                         if present.intersection(f.sources))
            if len(self._item_plans) > _PLAN_CACHE_CAP:
                self._item_plans.clear()
            self._item_plans[keys] = plan
        return plan

    def _check_item_size(self, values: list, item_field: ItemField) -> None:
        # Numbers serialise to at most ~24 bytes: only long arrays or long texts can pass 8 KB.
        if item_field.type == "strs":
            if sum(map(len, values)) + 3 * len(values) <= self.max_value // 4:
                return
        elif len(values) * 24 <= self.max_value:
            return
        self._array(values, "properties", item_field.property)

    @staticmethod
    def _lift(properties: dict, schema: dict, item_field: ItemField, raw: Any, value: Any) -> int:
        if item_field.lift_as is None or raw is None or properties.get(item_field.lift_as) is not None:
            return 0
        properties[item_field.lift_as] = value
        if item_field.type != "strs":
            schema[item_field.lift_as] = item_field.type[:-1]
        return 1


_PRIMITIVES = (str, int, float, bool)


_ITEM_COERCE = {  # the common case (already the right type) without a function call per value
    "strs": lambda raw, fill: [v if type(v) is str else _coerce_item(v, "strs", fill) for v in raw],
    "reals": lambda raw, fill: [float(v) if type(v) is float or type(v) is int else _coerce_item(v, "reals", fill)
                                for v in raw],
    "ints": lambda raw, fill: [v if type(v) is int else _coerce_item(v, "ints", fill) for v in raw],
}


def _coerce_item(value: Any, type_name: str, fill: Any) -> Any:
    """A value as the declared array element type (`strs`, `ints`, `reals`, ...), else `fill`."""
    kind = type(value)
    if type_name == "strs":
        if kind is str:
            return value
        return str(value).lower() if kind is bool else (str(value) if kind in (int, float) else fill)
    if type_name in ("ints", "reals"):
        if kind is str:
            try:
                value, kind = float(value), float
            except ValueError:
                return fill
        if kind not in (int, float) or (kind is float and not math.isfinite(value)):
            return fill
        return int(round(value)) if type_name == "ints" else float(value)
    if type_name == "bools":
        return value if kind is bool else fill
    return value if kind is str else fill


# ---- row verdicts and column helpers ----------------------------------------------------------------


class Verdict:
    """Each row's mapping outcome (None = still going to a chunk); the first rule to decide a row wins."""

    def __init__(self, n: int):
        self.outcome = np.full(n, None, dtype=object)
        self.reason = np.full(n, None, dtype=object)

    def open(self) -> np.ndarray:
        return pd.isna(self.outcome)

    def mark(self, mask: np.ndarray, outcome: str, reason: str) -> None:
        hit = np.asarray(mask, dtype=bool) & self.open()
        self.outcome[hit] = outcome
        self.reason[hit] = reason

    def set(self, positions: np.ndarray, outcome: str, reasons: list[str]) -> None:
        self.outcome[positions] = outcome
        self.reason[positions] = np.array(reasons, dtype=object) if len(reasons) else reasons

    def frame(self, rows: np.ndarray, event_ids: np.ndarray, kind: np.ndarray) -> pd.DataFrame:
        decided = ~self.open()
        return pd.DataFrame({"row": rows[decided], "event_id": event_ids[decided], "outcome": self.outcome[decided],
                             "reason": self.reason[decided], "kind": kind[decided], "chunk": None})


def _column(df: pd.DataFrame, name: str) -> np.ndarray:
    """A landing column as an object array with None for missing (absent columns are all None)."""
    if name not in df.columns:
        return np.full(len(df), None, dtype=object)
    return df[name].to_numpy(dtype=object, na_value=None)


def _text_lengths(values: pd.Series) -> np.ndarray:
    """Characters per value (0 for None), computed by Arrow."""
    lengths = values.astype("str").str.len()
    return lengths.fillna(0).to_numpy(dtype=np.int64)


def _timestamps_ns(column: pd.Series) -> np.ndarray:
    """UTC nanoseconds since the epoch; NaT as int64 min."""
    ts = pd.to_datetime(column, utc=True).dt.as_unit("ns").dt.tz_convert(None)
    return ts.to_numpy().view(np.int64)


def _iso_utc(ts_ns: np.ndarray) -> np.ndarray:
    """ISO-8601 UTC strings (millisecond precision, 'Z'); None where the timestamp is missing."""
    text = np.datetime_as_string(ts_ns.view("datetime64[ns]").astype("datetime64[ms]"), unit="ms",
                                 timezone="UTC").astype(object)
    text[ts_ns == np.iinfo(np.int64).min] = None
    return text


def _parse_json_column(values: np.ndarray, verdict: Verdict, column: str, pending: np.ndarray) -> list:
    """Parsed JSON objects (None for null). Bad JSON or a non-object only rejects rows still pending."""
    loads = orjson.loads
    try:
        parsed = [loads(v) if v is not None else None for v in values]
    except orjson.JSONDecodeError:
        parsed = [_loads_or_bad(v) for v in values]
    bad = np.fromiter((p is not None and type(p) is not dict for p in parsed), dtype=bool, count=len(parsed))
    if bad.any():
        verdict.mark(bad & pending, "rejected", f"{column} is not a JSON object")
        parsed = [None if b else p for p, b in zip(parsed, bad, strict=True)]
    return parsed


def _loads_or_bad(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return _BAD_JSON


_BAD_JSON = object()


def _isin(values: np.ndarray, options) -> np.ndarray:
    """Membership that tolerates None among strings (numpy's isin sorts, and None does not sort)."""
    return pd.Series(values, dtype=object).isin(list(options)).to_numpy(dtype=bool)


def _dig(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if type(obj) is not dict:
            return None
        obj = obj.get(key)
    return obj


def _getter(paths: tuple[tuple[str, ...], ...], want: str = "any"):
    """A function returning the value at the first of `paths` present in a parsed object. `want="text"`:
    strings only (numbers as text); `"scalar"`: no objects or arrays (so the value is hashable)."""
    def get(obj: Any) -> Any:
        for path in paths:
            value = obj
            for key in path:
                value = value.get(key) if type(value) is dict else None
                if value is None:
                    break
            if value is not None:
                return _WANT[want](value)
        return None

    return get


_WANT = {
    "any": lambda v: v,
    "text": lambda v: v if type(v) is str else (str(v) if type(v) in (int, float) else None),
    "scalar": lambda v: None if type(v) in (dict, list) else v,
}
