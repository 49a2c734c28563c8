"""A run's figures: `RunStats`, written as the run folder's `stats.json` and shown as one summary line.

In the manner of dlt's `LoadInfo`: each delivery task returns partial figures (a plain dict, through XCom)
that `add` sums; the summarise task fills in the rows by outcome and the run's facts, `asdict()` is the
`stats.json` contract (docs/stats.md: keys may be added, none renamed), `asstr()` the one line for the task
log, `asset_metadata()` the same document for the sync's Asset event, and `problems` what needs a person
(a threshold tripped, delivery stopped part-way), raised by `raise_on_problems()`. This module owns
`stats.json`: `write_stats` / `read_stats`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson

from include.datafly_fullstory.errors import RunProblems
from include.datafly_fullstory.state import RunStore

STATS_FILE = "stats.json"
# The Asset event's extra is stored by Airflow in a JSON column of its metadata database and shown in the
# UI's asset event list: keep it well under what every backend takes (MySQL's JSON is bounded by
# max_allowed_packet) and readable. The whole stats document is a few KB; only the open-ended maps below
# can grow with the data, and past this size they keep their largest entries (see `asset_metadata`).
ASSET_METADATA_MAX_BYTES = 64 * 1024
ASSET_METADATA_TRIM_TO = 50  # entries kept per open-ended map when trimming

ROW_OUTCOMES = ("delivered", "rejected", "quarantined", "filtered", "skipped", "unknown")
# Thresholds (run params): the share of the run's rows (for `unknown`, the count) above which the run fails.
# name -> (outcome, default, what the rows are).
THRESHOLDS: dict[str, tuple[str, float, str]] = {
    "max_rejected_ratio": ("rejected", 0.05, "rejected (by FullStory or before sending)"),
    "max_quarantined_ratio": ("quarantined", 0.10, "quarantined by validation"),
    "max_skipped_ratio": ("skipped", 0.60, "skipped (no FullStory identification, unknown type, ...)"),
    "max_filtered_ratio": ("filtered", 1.0, "filtered (consent, event_types)"),
    "max_unknown_rows": ("unknown", 0, "of unknown fate (sent, answer lost)"),
}
# Identity stitching (mapping/identity.py, stitching.py): events stitched to a user by their anonymous id
# (in this window / look-back rows), anonymous ids seen with two users, rows skipped for want of identity.
IDENTITY_FIGURES = ("stitched", "stitched_late", "conflicts", "conflicted_rows", "anonymous_unidentified")
# What one delivery task reports about its chunks (DeliveryReport), in the order the summary names them.
DELIVERY_FIGURES = (
    "chunks",
    "already_complete",
    "resumed",
    "submitted",
    "reposted",
    "replayed",
    "refused",
    "abandoned",
    "unknown_items",
    "unmatched_errors",
    "dry_run_rows",
)


def _items() -> dict[str, int]:
    return {"mapped": 0, "delivered": 0, "rejected": 0}


@dataclass
class RunStats:
    rows: dict[str, int] = field(default_factory=lambda: {"read": 0, **dict.fromkeys(ROW_OUTCOMES, 0)})
    events: dict[str, int] = field(default_factory=_items)
    users: dict[str, int] = field(default_factory=lambda: {**_items(), "unchanged": 0})
    http: dict[str, Any] = field(default_factory=lambda: {"requests": 0, "retries": 0, "status_counts": {}})
    batches: int = 0
    bytes_sent: int = 0
    delivery: dict[str, int] = field(default_factory=dict)
    dag_run_id: str | None = None
    window_start: str | None = None
    window_end: str | None = None
    destination: str | None = None
    dry_run: bool = False
    duration_s: float = 0.0
    validation: dict[str, Any] = field(default_factory=dict)
    artifacts: str | None = None
    previously: dict[str, int] = field(default_factory=dict)
    late: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, int] = field(default_factory=lambda: dict.fromkeys(IDENTITY_FIGURES, 0))
    # Event lines mapped into chunks, per FullStory event name and per identification mode (session_id,
    # uid, use_most_recent, stitched; skipped: events without any identification).
    events_by_name: dict[str, int] = field(default_factory=dict)
    identification: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    deletions: dict[str, Any] = field(default_factory=dict)  # the deletions task's figures (deletions.py)
    problems: list[str] = field(default_factory=list)
    type_problems: dict[str, Any] = field(
        default_factory=lambda: {"values": 0, "events": 0, "users": 0, "fields": {}}
    )
    # The run report (report/): {"path": <report.html in the run folder>, "error": null or why it could not
    # be written}. A report that fails to render never fails the run; its error is recorded here.
    report: dict[str, Any] = field(default_factory=dict)

    # ---- adding up -----------------------------------------------------------------------------------

    def add(self, part: Mapping[str, Any] | None) -> RunStats:
        """Add one task's partial figures (numbers add, nested dicts merge key by key); returns self."""
        if part:
            for key, value in _merge(asdict(self), {k: v for k, v in part.items() if k in _FIELDS}).items():
                setattr(self, key, value)
        return self

    # ---- reading -------------------------------------------------------------------------------------

    def asdict(self) -> dict[str, Any]:
        """The `stats.json` contract."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunStats:
        return cls().add({k: v for k, v in data.items() if k in _FIELDS})

    def asstr(self) -> str:
        """One readable line for the task log."""
        rows, http = self.rows, self.http
        head = (
            f"window {self.window_start} -> {self.window_end}{' (dry run)' if self.dry_run else ''}: "
            if self.window_start
            else ""
        )
        counts = (
            (
                f"read {rows.get('read', 0)}, "
                + ", ".join(f"{o} {rows.get(o, 0)}" for o in ROW_OUTCOMES[:5])
                + "".join(f", {o} {rows[o]}" for o in ("unknown", "pending", "dry_run") if rows.get(o))
                + (f" ({self.late['rows']} late)" if self.late.get("rows") else "")
                + "; "
            )
            if rows.get("read")
            else ""
        )
        items = (
            ""
            if rows.get("read")
            else (
                f"events {self.events['delivered']} delivered / {self.events['rejected']} rejected, "
                f"users {self.users['delivered']} delivered / {self.users['rejected']} rejected; "
            )
        )
        chunks = ""
        if self.delivery.get("chunks"):
            parts = [
                f"{self.delivery[k]} {k.replace('_', ' ')}"
                for k in DELIVERY_FIGURES[1:8]
                if self.delivery.get(k)
            ]
            chunks = (
                f"{self.delivery['chunks']} chunk(s)" + (f" ({', '.join(parts)})" if parts else "") + ", "
            )
        ident = ", ".join(f"{n} {m.replace('_', ' ')}" for m, n in self.identification.items() if n)
        ident = f"identified by {ident}; " if ident else ""
        top = sorted(self.events_by_name.items(), key=lambda kv: (-kv[1], kv[0]))
        names = ", ".join(f"{name} {n}" for name, n in top[:5]) + (" ..." if len(top) > 5 else "")
        names = f"events {names}; " if names else ""
        return (
            f"{head}{counts}{ident}{names}{items}{chunks}{self.batches} batches, {http.get('requests', 0)} "
            f"requests ({http.get('retries', 0)} retries), {self.bytes_sent} bytes in {self.duration_s:.1f}s"
        )

    __str__ = asstr

    def asset_metadata(self) -> dict[str, Any]:
        """What the sync's Asset event carries: the whole `stats.json` document, as plain JSON values (string
        keys, finite numbers; Airflow takes `dict[str, JsonValue]`). Should it pass ASSET_METADATA_MAX_BYTES,
        the open-ended maps (`events_by_name`, `type_problems.fields`) keep their largest entries and
        `trimmed` says how many each left out; stats.json always has them all."""
        meta = json_safe(self.asdict())
        if len(orjson.dumps(meta)) <= ASSET_METADATA_MAX_BYTES:
            return meta
        trimmed = {}
        for path in (("events_by_name",), ("type_problems", "fields")):
            parent = meta
            for key in path[:-1]:
                parent = parent.get(key) if isinstance(parent.get(key), dict) else {}
            values = parent.get(path[-1])
            if isinstance(values, dict) and len(values) > ASSET_METADATA_TRIM_TO:
                top = sorted(values.items(), key=lambda kv: (-_size(kv[1]), kv[0]))[:ASSET_METADATA_TRIM_TO]
                parent[path[-1]] = dict(top)
                trimmed[".".join(path)] = len(values) - len(top)
        meta["trimmed"] = trimmed
        if len(orjson.dumps(meta)) > ASSET_METADATA_MAX_BYTES:  # still too large: the figures, not the maps
            meta["events_by_name"], meta["type_problems"]["fields"] = {}, {}
            meta["trimmed"] = {
                "events_by_name": len(self.events_by_name),
                "type_problems.fields": len(self.type_problems.get("fields") or {}),
            }
        return meta

    # ---- problems ------------------------------------------------------------------------------------

    @property
    def has_problems(self) -> bool:
        return bool(self.problems)

    def raise_on_problems(self) -> None:
        if self.problems:
            raise RunProblems(self.problems)

    def threshold_problems(self, thresholds: Mapping[str, float]) -> list[str]:
        """A share of rows above its threshold (each row that did not reach FullStory counts: rejected before
        or by FullStory, quarantined, skipped, filtered), or more rows of unknown fate than allowed. Each
        names its threshold; missing thresholds take their defaults."""
        read = self.rows.get("read", 0)
        problems = []
        for name, (outcome, default, words) in THRESHOLDS.items():
            count, limit = self.rows.get(outcome, 0), float(thresholds.get(name, default))
            if name.endswith("_rows"):
                if count > limit:
                    problems.append(
                        f"{count} row(s) {words}: above {name}={limit:g}. Each one's outcome says "
                        f"what to check (outcomes.parquet in {self.artifacts})"
                    )
            elif read and count / read > limit:
                where = "dead_letters.parquet" if outcome == "rejected" else "outcomes.parquet"
                problems.append(
                    f"{count} of {read} rows ({count / read:.1%}) {words}: above {name}={limit:.1%}. "
                    f"See {where} in {self.artifacts}"
                )
        return problems


_FIELDS = frozenset(f.name for f in fields(RunStats))


def write_stats(store: RunStore, stats: RunStats) -> None:
    """`stats.json` in the run folder (atomic)."""
    store.write_json(stats.asdict(), STATS_FILE)


def read_stats(store: RunStore) -> dict[str, Any]:
    """A run's `stats.json` as written (a dict; older runs may lack newer keys). Raises FileNotFoundError
    when the run has none, ValueError when it is not a JSON object."""
    if not store.exists(STATS_FILE):
        raise FileNotFoundError(f"no {STATS_FILE} in {store.uri()}")
    data = orjson.loads(store.read_bytes(STATS_FILE))
    if not isinstance(data, dict):
        raise ValueError(f"{store.uri(STATS_FILE)} holds a JSON {type(data).__name__}, not an object")
    return data


def json_safe(value: Any) -> Any:
    """Plain JSON values: string keys, lists for tuples, null for NaN and infinities (the asset event's
    metadata, the run report's data)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | bool | int | float):
        return value
    return str(value)


def _size(value: Any) -> float:
    """How large an entry of an open-ended map is: its number, or the sum of a nested map's numbers."""
    if isinstance(value, Mapping):
        return sum(_size(v) for v in value.values())
    return float(value) if _is_number(value) else 0.0


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(a)
    for key, value in b.items():
        if key in out and isinstance(out[key], Mapping) and isinstance(value, Mapping):
            out[key] = _merge(out[key], value)
        elif key in out and _is_number(out[key]) and _is_number(value):
            out[key] = out[key] + value
        else:
            out[key] = value
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
