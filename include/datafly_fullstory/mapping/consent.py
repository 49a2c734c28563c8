"""Consent that fails closed: the blueprint's consent category (`analytics`) decides, per row, whether
FullStory may receive it, and a newer denial of the same person revokes the person's earlier rows.

Per row (docs/mapping.md "Consent"):
1. an explicit value at the first of the blueprint's `paths` present (`context.consent.canonical.analytics`,
   else the flat `context.consent.analytics`), matched case- and type-insensitively against
   `granted_values` / `denied_values`; any other value (`"maybe"`, an object, ...) is not granted;
2. else the raw CMP codes at `categories_path` (`context.consent.categories`), the categories the visitor
   GRANTED: granted when a code maps to the category through `cmp_codes`, else not granted;
3. else no consent information: granted, unless `require_explicit_consent`.

Revocation: `scan_window` reads the consent of every row of the window (before any row is mapped) and keeps
each person's latest state; `Revocations` filters the rows of a person whose latest state is not granted
and was recorded after the row's timestamp. A person is `user:<user_id>` and `anon:<anonymous_id>`: a row
has both keys when it has both ids, and either key's revocation stops it. Across runs the ledger keeps each
person's latest state (`ledger/consent_ops.py`); `run_mapping` merges it in through `consent_history`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from include.datafly_fullstory.blueprint import Blueprint, consent_key
from include.datafly_fullstory.mapping.columns import (
    Distinct,
    ParsedJson,
    _column,
    _iso_utc,
    _json_values,
    _rows_of,
    _timestamps_ns,
)

GRANTED, DENIED, UNRECOGNISED, ABSENT = 1, 0, 2, -1
NOT_GRANTED = (DENIED, UNRECOGNISED)
SCAN_COLUMNS = ["event_id", "user_id", "anonymous_id", "timestamp", "context"]
LATEST_COLUMNS = ("person", "at_ns", "state", "event_id")  # state: "granted" | "denied"
_NAT = np.iinfo(np.int64).min


class ConsentRules:
    """The blueprint's consent section, ready to read parsed contexts."""

    def __init__(self, bp: Blueprint):
        self.category = bp.consent_category
        self.paths = bp.consent_paths
        self.values = bp.consent_values
        self.categories_path = bp.consent_categories_path
        self.codes = frozenset(
            code for code, purpose in bp.consent_cmp_codes.items() if purpose == self.category
        )
        self._reasons: dict[tuple, str] = {}

    def read(self, ctx: Any) -> tuple[int, str | None]:
        """(state, reason): the row's consent state and, when not granted, why."""
        for path in self.paths:
            value = _dig_present(ctx, path)
            if value is not _MISSING:
                return self._judge(value, ".".join(("context", *path)))
        if self.categories_path is not None:
            codes = _dig_present(ctx, self.categories_path)
            if codes is not _MISSING:
                return self._judge_codes(codes, ".".join(("context", *self.categories_path)))
        return ABSENT, None

    def states(self, ctxs: Iterable[Any] | ParsedJson) -> tuple[np.ndarray, np.ndarray]:
        """Per context: (state, reason). A `ParsedJson` column is read once per distinct context."""
        if isinstance(ctxs, ParsedJson):
            states, reasons = self.states(ctxs.objects)
            return states[ctxs.codes], reasons[ctxs.codes]
        read = [self.read(c) for c in ctxs]
        states = np.fromiter((s for s, _ in read), dtype=np.int8, count=len(read))
        return states, np.array([r for _, r in read], dtype=object)

    def _judge(self, value: Any, where: str) -> tuple[int, str | None]:
        normal = consent_key(value)
        granted = self.values.get(normal) if normal is not None else None
        if granted is True:
            return GRANTED, None
        if granted is False:
            return DENIED, self._reason("denied", where, value)
        return UNRECOGNISED, self._reason("unrecognised", where, value)

    def _judge_codes(self, codes: Any, where: str) -> tuple[int, str | None]:
        if type(codes) is str:  # OneTrust's groups string: "C0001:1,C0002:0" (or a bare "C0001,C0002")
            codes = [c for c in codes.replace(";", ",").split(",") if not c.strip().endswith(":0")]
            codes = [c.strip().split(":")[0] for c in codes]
        if type(codes) is not list:
            return UNRECOGNISED, self._reason("codes", where, codes)
        if any(consent_key(c) in self.codes for c in codes):
            return GRANTED, None
        return DENIED, self._reason("no_code", where, None)

    def _reason(self, kind: str, where: str, value: Any) -> str:
        shown = _show(value)
        key = (kind, where, shown)
        reason = self._reasons.get(key)
        if reason is None:
            cat = self.category
            reason = {
                "denied": f"{cat} consent denied ({where} = {shown}): FullStory may not receive this row",
                "unrecognised": f"{cat} consent value {shown} ({where}) is neither granted nor denied: "
                "not sent (consent fails closed)",
                "codes": f"{cat} consent categories {shown} ({where}) is not a list of CMP codes: not sent "
                "(consent fails closed)",
                "no_code": f"{cat} consent not granted: {where} lists no code the blueprint maps to "
                f"'{cat}' (the list names the granted categories)",
            }[kind]
            if len(self._reasons) < 10_000:
                self._reasons[key] = reason
        return reason


_MISSING = object()


def _dig_present(obj: Any, path: tuple[str, ...]) -> Any:
    """The value at `path`, or `_MISSING` when a key is absent or the value is null (null = not given)."""
    for key in path:
        if type(obj) is not dict:
            return _MISSING
        obj = obj.get(key)
    return _MISSING if obj is None else obj


def _show(value: Any) -> str:
    if type(value) is str:
        text = repr(value)
    else:
        try:
            text = orjson.dumps(value).decode()
        except TypeError:  # nested deeper than orjson writes
            text = f"a JSON {'array' if type(value) is list else 'object'} nested too deep to show"
    return text if len(text) <= 80 else text[:77] + "..."


# ---- the gate -----------------------------------------------------------------------------------------------


def gate(rules: ConsentRules, require_explicit: bool, verdict, ctx: list | ParsedJson) -> None:
    """Mark the rows whose consent is not granted (`filtered`, the reason naming the value); rows without
    consent information pass unless `require_explicit`."""
    states, reasons = rules.states(ctx)
    hit = np.isin(states, NOT_GRANTED) & verdict.open()
    if hit.any():
        verdict.set(np.flatnonzero(hit), "filtered", list(reasons[hit]))
    if require_explicit:
        verdict.mark(
            states == ABSENT,
            "filtered",
            f"no {rules.category} consent recorded and the run requires explicit consent "
            "(require_explicit_consent)",
        )


# ---- revocation -----------------------------------------------------------------------------------------------


def person_keys(user_id: np.ndarray, anonymous_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row its person keys: `user:<user_id>` and `anon:<anonymous_id>` (missing where the id is empty)."""
    keyed = _person_key_arrays(user_id, anonymous_id)
    if keyed is not None:
        return tuple(k.to_numpy(zero_copy_only=False) for k in keyed)
    uid = pd.Series(user_id, dtype=object)
    anon = pd.Series(anonymous_id, dtype=object)
    has_uid = uid.notna() & (uid.astype(str) != "")
    has_anon = anon.notna() & (anon.astype(str) != "")
    u = ("user:" + uid.astype(str)).where(has_uid, None).to_numpy(dtype=object)
    a = ("anon:" + anon.astype(str)).where(has_anon, None).to_numpy(dtype=object)
    return u, a


def _person_key_arrays(user_id: np.ndarray, anonymous_id: np.ndarray) -> tuple[pa.Array, pa.Array] | None:
    """`person_keys` as Arrow arrays, joined by Arrow; None when an id is not text (the landing's are)."""
    try:
        return _key(user_id, "user:"), _key(anonymous_id, "anon:")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def _key(ids: np.ndarray, prefix: str) -> pa.Array:
    text = pa.array(ids, type=pa.string(), from_pandas=True)
    keyed = pc.binary_join_element_wise(prefix, text, "")
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), keyed)


def latest_states(frame: pd.DataFrame, rules: ConsentRules) -> pd.DataFrame:
    """Each person's latest consent state among the rows of `frame` that carry consent information
    (`LATEST_COLUMNS`; a denial wins a tie). Unrecognised values count as denied (not granted)."""
    states, _ = rules.states(ParsedJson(_json_values(frame, "context")))
    return _latest(frame, states, _timestamps_ns(frame["timestamp"]))


def _latest(
    frame: pd.DataFrame, states: np.ndarray, ts: np.ndarray, rows: np.ndarray | None = None, ordered=True
):
    """`latest_states` of the rows (all, or those of the mask `rows`) from their consent states and times."""
    has = (states != ABSENT) & (ts != _NAT)
    if rows is not None:
        has &= rows
    if not has.any():
        return _empty_latest()
    at = np.flatnonzero(has)
    keyed = _person_key_arrays(_rows_of(frame, "user_id", at), _rows_of(frame, "anonymous_id", at))
    if keyed is not None:  # text ids: the keys stay Arrow text
        u, a = (k.to_pandas() for k in keyed)
    else:
        u, a = person_keys(_column(frame, "user_id")[at], _column(frame, "anonymous_id")[at])
    state = np.where(states[has] == GRANTED, "granted", "denied")
    event_id = _rows_of(frame, "event_id", at)
    parts = [
        pd.DataFrame({"person": keys, "at_ns": ts[has], "state": state, "event_id": event_id})
        for keys in (u, a)
    ]
    return collapse(pd.concat(parts, ignore_index=True), ordered=ordered)


def collapse(latest: pd.DataFrame, *, ordered: bool = True) -> pd.DataFrame:
    """One row per person: the latest state (at equal times a denial wins; at equal times and states, the
    later row), sorted by person (`ordered`; a frame's part of the window's scan need not be)."""
    latest = latest[latest["person"].notna()]
    if not len(latest):
        return _empty_latest()
    # a stable sort by (person, time, denied) keeping each person's last row, done on the persons' codes:
    # sorting the person texts themselves is the slow part, and only the kept rows need it
    codes, _ = pd.factorize(latest["person"])
    denied = (latest["state"] == "denied").to_numpy(dtype=bool)
    order = np.lexsort((denied, latest["at_ns"].to_numpy(dtype=np.int64), codes))
    last = np.flatnonzero(np.r_[codes[order][1:] != codes[order][:-1], True])
    kept = latest.iloc[order[last]]
    if ordered:
        kept = kept.sort_values("person", kind="stable")
    return kept[list(LATEST_COLUMNS)].reset_index(drop=True)


def scan_window(frames: Iterable[pd.DataFrame], rules: ConsentRules) -> tuple[pd.DataFrame, int | None]:
    """Each person's latest consent state over all of the window's validated rows, and the earliest row
    time (ns; None without rows). Only rows whose context text mentions consent count (a context can spell
    the key with a JSON escape; such a row's own consent is still read by the gate)."""
    scan = WindowConsent(rules)
    for frame in frames:
        scan.add(frame)
    return scan.result()


class WindowConsent:
    """`scan_window` frame by frame, for a caller that parsed the frame's contexts already."""

    def __init__(self, rules: ConsentRules):
        self.rules, self.parts, self.earliest = rules, [], None

    def add(self, frame: pd.DataFrame, ctx: ParsedJson | None = None, ts: np.ndarray | None = None) -> None:
        """One frame; `ctx`: its contexts parsed already (else only those that mention consent are)."""
        ts = _timestamps_ns(frame["timestamp"]) if ts is None else ts
        valid = ts[ts != _NAT]
        if len(valid):
            low = int(valid.min())
            self.earliest = low if self.earliest is None else min(self.earliest, low)
        texts = ctx.texts if ctx is not None else Distinct(_json_values(frame, "context"))
        codes = ctx.codes if ctx is not None else texts.codes
        text = (texts if ctx is not None else texts.values)[:-1]
        mention = np.fromiter((type(t) is str and "consent" in t for t in text), dtype=bool, count=len(text))
        mentions = np.append(mention, False)[codes]
        if not mentions.any():
            return
        if ctx is not None:
            states, _ = self.rules.states(ctx)
        else:
            at = np.flatnonzero(mentions)
            states = np.full(len(frame), ABSENT, dtype=np.int8)
            states[at] = self.rules.states(ParsedJson(texts.take(at)))[0]
        self.parts.append(_latest(frame, states, ts, mentions, ordered=False))

    def result(self) -> tuple[pd.DataFrame, int | None]:
        parts = [p for p in self.parts if len(p)]
        latest = collapse(pd.concat(parts, ignore_index=True)) if parts else _empty_latest()
        return latest, self.earliest


ConsentHistory = Callable[[pd.DataFrame, int], pd.DataFrame]
"""(this window's latest states, earliest row time in ns) -> every person's latest state recorded after that
time that is a denial, merged with what earlier runs recorded (see `ledger_history`)."""


def ledger_history(ledger, destination: str, run_id: str) -> ConsentHistory:
    """A `ConsentHistory` over the delivery ledger's consent table (ledger/consent_ops.py): records this
    window's latest states (a newer record wins), then reads back the denials newer than the window's
    earliest row."""

    def history(latest: pd.DataFrame, earliest_ns: int) -> pd.DataFrame:
        ledger.record_consent(
            destination,
            run_id,
            zip(
                latest["person"].tolist(),
                latest["state"].tolist(),
                (latest["at_ns"].to_numpy(dtype=np.int64) // 1000 / 1e6).tolist(),
                latest["event_id"].tolist(),
                strict=True,
            ),
        )
        rows = ledger.consent_denials(destination, since=earliest_ns / 1e9)
        return pd.DataFrame(
            {
                "person": pd.Series([r[0] for r in rows], dtype=object),
                "at_ns": pd.Series([round(r[1] * 1e6) * 1000 for r in rows], dtype=np.int64),
                "state": "denied",
                "event_id": pd.Series([r[2] for r in rows], dtype=object),
            }
        )

    return history


class Revocations:
    """Persons whose latest consent state is not granted, with the time and row of that state."""

    def __init__(self, denials: pd.DataFrame, category: str = "analytics"):
        denials = denials[denials["state"] == "denied"] if "state" in denials else denials
        self.category = category
        self.at_ns = dict(zip(denials["person"], denials["at_ns"].astype(np.int64), strict=True))
        self.event_id = dict(zip(denials["person"], denials["event_id"], strict=True))
        self._persons = list(self.at_ns)
        # the times as the rule compares them: through float64, as they always were (pandas' map)
        at = np.fromiter(self.at_ns.values(), dtype=np.int64, count=len(self.at_ns))
        self._at = at.astype(np.float64).astype(np.int64)
        self._person_set = None

    def __len__(self) -> int:
        return len(self.at_ns)

    def mark(self, verdict, df: pd.DataFrame) -> None:
        """Filter the open rows of a revoked person stamped before the revocation."""
        if not self.at_ns or not len(df):
            return
        ts = _timestamps_ns(df["timestamp"])
        at, who = self._revoked_at(_column(df, "user_id"), _column(df, "anonymous_id"))
        revoked = (at != _NAT) & (ts != _NAT) & (ts < at) & verdict.open()
        if not revoked.any():
            return
        rows = np.flatnonzero(revoked)
        when = _iso_utc(at[rows])
        verdict.set(
            rows,
            "filtered",
            [
                f"{self.category} consent revoked at {w} (row {self.event_id.get(p)}): a newer row of this "
                f"person ({p.split(':', 1)[0]}_id) denies it, so this earlier row is not sent"
                for w, p in zip(when, who(rows), strict=True)
            ],
        )

    def _revoked_at(self, user_id: np.ndarray, anonymous_id: np.ndarray):
        """Per row the latest revocation time of its person keys (`_NAT`: none), and a function giving the
        revoking person of given rows (the user key wins a tie)."""
        n = len(user_id)
        at = np.full(n, _NAT, dtype=np.int64)
        keyed = _person_key_arrays(user_id, anonymous_id)
        if keyed is not None and self._person_set is None:
            try:
                self._person_set = pa.array(self._persons, type=pa.string())
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                self._person_set = False
        if keyed is None or self._person_set is False:  # ids that are not text: looked up one by one
            u, a = person_keys(user_id, anonymous_id)
            who = np.full(n, None, dtype=object)
            for keys in (u, a):
                found = pd.Series(keys, dtype=object).map(self.at_ns)
                hit_at = found.fillna(_NAT).to_numpy(dtype=np.float64).astype(np.int64)
                better = hit_at > at
                at[better], who[better] = hit_at[better], keys[better]
            return at, lambda rows: who[rows]
        person = np.full(n, -1, dtype=np.int64)
        for keys in keyed:
            found = pc.index_in(keys, value_set=self._person_set)
            pos = pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)
            hit_at = np.where(pos >= 0, self._at[pos], _NAT)
            better = hit_at > at
            at[better], person[better] = hit_at[better], pos[better]
        return at, lambda rows: [self._persons[p] for p in person[rows]]


def revocations(
    frames: Iterable[pd.DataFrame], bp: Blueprint, history: ConsentHistory | None = None
) -> Revocations:
    """The window's revocations, merged with earlier runs' through `history` when given."""
    rules = ConsentRules(bp)
    latest, earliest = scan_window(frames, rules)
    if history is not None and earliest is not None:
        latest = history(latest, earliest)
    return Revocations(latest, rules.category)


def _empty_latest() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "person": pd.Series([], dtype=object),
            "at_ns": pd.Series([], dtype=np.int64),
            "state": pd.Series([], dtype=object),
            "event_id": pd.Series([], dtype=object),
        }
    )
