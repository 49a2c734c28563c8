"""Row verdicts: which rows end in the mapping stage and why (skipped, filtered, rejected), decided for a whole
batch at once. `Verdict` holds each row's outcome (the first rule to decide a row wins); the rule functions
mark it: Datafly types without a mapping, the run's `event_types`, analytics consent, identity."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import orjson
import pandas as pd

from include.datafly_fullstory import outcomes
from include.datafly_fullstory.blueprint import Blueprint
from include.datafly_fullstory.landing import EVENT_TYPES
from include.datafly_fullstory.mapping.columns import (
    ParsedJson,
    _column,
    _getter,
    _isin,
    _iso_utc,
    _text_lengths,
    _timestamps_ns,
)
from include.datafly_fullstory.mapping.settings import MappingSettings

SESSION_ID = re.compile(r"[^:\s]+:[^:\s]+")
NO_IDENTITY = (
    "no FullStory identification: the event has no user_id and no FullStory session id, and "
    "FullStory's server API has no anonymous-id field (an event without user or session is refused). "
    "Fix: pass the browser's FS('getSession', {format: 'id'}) into Signal as "
    "context.fullstory.session_id, or identify the user"
)
# How the reasons of events skipped for want of identification begin (the stats count them).
IDENTITY_REASONS = ("no FullStory identification", "the FullStory session id in the context", "anonymous_id ")


class Verdict:
    """Each row's mapping outcome (None = still going to a chunk); the first rule to decide a row wins."""

    def __init__(self, n: int):
        self.outcome = np.full(n, None, dtype=object)
        self.reason = np.full(n, None, dtype=object)
        self._open = np.ones(n, dtype=bool)  # kept with `outcome` by mark and set, its only writers

    def open(self) -> np.ndarray:
        return self._open.copy()

    def mark(self, mask: np.ndarray, outcome: str, reason: str) -> None:
        hit = np.asarray(mask, dtype=bool) & self._open
        self.outcome[hit] = outcome
        self.reason[hit] = reason
        self._open[hit] = False

    def set(self, positions: np.ndarray, outcome: str, reasons: list[str]) -> None:
        self.outcome[positions] = outcome
        self.reason[positions] = np.array(reasons, dtype=object) if len(reasons) else reasons
        self._open[positions] = False

    def frame(self, rows: np.ndarray, event_ids: np.ndarray, kind: np.ndarray) -> pd.DataFrame:
        decided = ~self.open()
        return outcomes.frame(
            rows[decided], event_ids[decided], self.outcome[decided], self.reason[decided], kind[decided]
        )


def skip_unmapped(bp: Blueprint, verdict: Verdict, dtype: np.ndarray, fs_names: np.ndarray) -> None:
    for datafly_type in sorted(bp.unmapped_types):
        verdict.mark(
            dtype == datafly_type,
            "skipped",
            f"Datafly '{datafly_type}' calls have no FullStory mapping in blueprint {bp.label}",
        )
    known = _isin(dtype, [*EVENT_TYPES, "identify", *bp.unmapped_types])
    verdict.mark(
        ~known,
        "skipped",
        f"unknown Datafly type: not one of page, track, identify, {', '.join(sorted(bp.unmapped_types))}",
    )
    no_name = (dtype == "track") & pd.isna(fs_names)
    verdict.mark(no_name, "skipped", "track call without an event name: FullStory events need a name")


def filter_event_types(
    settings: MappingSettings, verdict: Verdict, dtype: np.ndarray, fs_names: np.ndarray, event: np.ndarray
) -> None:
    wanted = settings.event_types
    if not wanted:
        return
    keep = _isin(dtype, wanted) | _isin(fs_names, wanted) | _isin(event, wanted)
    verdict.mark(
        ~keep,
        "filtered",
        f"not in this run's event_types {list(wanted)}: neither its Datafly type "
        "nor its FullStory event name is listed",
    )


def gate_consent(bp: Blueprint, settings: MappingSettings, verdict: Verdict, ctx: list, rules=None) -> None:
    """`analytics` consent gates every row and fails closed (mapping/consent.py has the rules)."""
    from include.datafly_fullstory.mapping import consent

    consent.gate(rules or consent.ConsentRules(bp), settings.require_explicit_consent, verdict, ctx)


def identity(
    bp: Blueprint,
    settings: MappingSettings,
    reference_time: datetime,
    df: pd.DataFrame,
    ctx: list,
    verdict: Verdict,
    is_event: np.ndarray,
    stitcher=None,
) -> dict:
    """Which identification each event carries: a valid FullStory session id wins (FullStory refuses
    a user next to it), else `user.uid`, else (with a `stitcher`, identity.py) the user its anonymous id
    was identified as; `use_most_recent` only for events in the last
    `recent_session_minutes` before the run's window end (the reference time), whose session may still
    be open when the run delivers them."""
    paths = bp.identity
    uid = _column(df, "user_id")
    uid_len = _text_lengths(df["user_id"])
    has_uid = uid_len > 0
    session_id = _getter(paths["fullstory_session_id"], "text")
    if isinstance(ctx, ParsedJson):  # once per distinct context
        texts = ctx.each(session_id)
        valid = np.fromiter(
            (t is not None and SESSION_ID.fullmatch(t) is not None for t in texts),
            dtype=bool,
            count=len(texts),
        )
        sid_text = texts[ctx.codes]
        has_sid, bad_sid = valid[ctx.codes], pd.notna(sid_text) & ~valid[ctx.codes]
        sid_values = np.where(has_sid, sid_text, None)
    else:
        sid = pd.Series([session_id(c) for c in ctx], dtype="str")
        has_sid = sid.str.fullmatch(SESSION_ID.pattern).fillna(False).to_numpy(dtype=bool)
        bad_sid = sid.notna().to_numpy() & ~has_sid
        sid_values = np.where(has_sid, sid.to_numpy(dtype=object, na_value=None), None)
    if stitcher is not None:
        uid, uid_len = stitcher.apply(
            df, verdict, is_event & ~has_sid & ~has_uid & verdict.open(), uid, uid_len
        )
        has_uid = uid_len > 0
    verdict.mark(
        is_event & ~has_sid & ~has_uid & bad_sid,
        "skipped",
        "the FullStory session id in the context is not of the form '<deviceId>:<sessionId>' and the "
        "event has no user_id: nothing FullStory accepts identifies it",
    )
    verdict.mark(is_event & ~has_sid & ~has_uid, "skipped", NO_IDENTITY)
    use_uid = has_uid & ~has_sid
    too_long = use_uid & (uid_len > bp.limits["uid"])
    verdict.mark(
        is_event & too_long,
        "rejected",
        f"user_id is longer than FullStory's {bp.limits['uid']}-character uid limit",
    )
    ts = _timestamps_ns(df["timestamp"])
    window = timedelta(minutes=settings.recent_session_minutes) // timedelta(microseconds=1) * 1000
    ref_ns = int(reference_time.timestamp() * 1_000_000) * 1000
    recent = (ts != np.iinfo(np.int64).min) & (np.abs(ref_ns - ts) <= window)
    return {
        "uid": np.where(use_uid, uid, None),
        "sid": sid_values,
        "recent": use_uid & recent,
        "ts": _iso_utc(ts),
    }


def parse_json_column(values, verdict: Verdict, column: str, pending: np.ndarray) -> ParsedJson:
    """The column parsed once per distinct text (`ParsedJson`). Bad JSON or a non-object only rejects rows
    still pending."""
    parsed = ParsedJson(values)
    bad = parsed.bad()
    if bad.any():
        verdict.mark(bad & pending, "rejected", f"{column} is not a JSON object")
    return parsed


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
