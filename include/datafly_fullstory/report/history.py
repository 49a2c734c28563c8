"""The previous runs of the DAG, for the report's trend charts: their `stats.json` beside this run's.

Run folders are siblings under `<state URI>/runs/`, on a local disk or an object store (RunStore). A
previous run is one whose window starts before this run's, or the same window run earlier (its stats
exist while this run is summarising); later windows (this run reprocesses an old window) are left out.
The `MAX_RUNS` latest of them are kept, ordered by window.

Bounded work on a store with thousands of runs: one listing of `runs/`, then at most `MAX_READS` stats
files are read. When there are more folders than that, the ones read are chosen by the time in their run
id (Airflow's ids end in the logical date or trigger time: `scheduled__2026-11-20T10:00:00+00:00`),
latest first among those not after this run's window end; folders whose id has no time are then not
read, and the report says how many folders it did not look at. A folder without `stats.json` (a run in
progress, or one that stopped before its summary) and a `stats.json` that cannot be read are named in the
report; neither stops it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

from include.datafly_fullstory.state import RunStore, safe_run_id
from include.datafly_fullstory.stats import read_stats

MAX_RUNS = 24
MAX_READS = 96
SHOWN_PROBLEMS = 10  # missing / unreadable folders named in the report (the rest are counted)
_ID_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d)[:_](\d\d)[:_](\d\d)")
_OUTCOMES = ("delivered", "rejected", "quarantined", "filtered", "skipped", "dry_run", "pending", "unknown")


@dataclass
class History:
    runs: list[dict[str, Any]] = field(default_factory=list)  # run_summary() of each, oldest window first
    folders: int = 0  # run folders beside this run's
    read: int = 0  # stats files read
    not_read: int = 0  # folders left unread (MAX_READS)
    later: int = 0  # runs of later windows, left out
    missing: list[str] = field(default_factory=list)  # folders without stats.json
    missing_count: int = 0
    unreadable: list[str] = field(default_factory=list)  # "folder: why"
    unreadable_count: int = 0

    def as_data(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "folders": self.folders,
            "read": self.read,
            "not_read": self.not_read,
            "later": self.later,
            "missing": self.missing,
            "missing_count": self.missing_count,
            "unreadable": self.unreadable,
            "unreadable_count": self.unreadable_count,
            "max_runs": MAX_RUNS,
            "max_reads": MAX_READS,
        }


def run_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """The figures a trend chart needs from one run's stats (any stats.json version: missing keys are 0)."""
    rows = stats.get("rows") if isinstance(stats.get("rows"), dict) else {}
    read = _int(rows.get("read"))
    http = stats.get("http") if isinstance(stats.get("http"), dict) else {}
    statuses = http.get("status_counts") if isinstance(http.get("status_counts"), dict) else {}
    events = stats.get("events") if isinstance(stats.get("events"), dict) else {}
    summary = {
        "run_id": str(stats.get("dag_run_id") or ""),
        "window_start": stats.get("window_start"),
        "window_end": stats.get("window_end"),
        "dry_run": bool(stats.get("dry_run")),
        "read": read,
        **{o: _int(rows.get(o)) for o in _OUTCOMES},
        "events_delivered": _int(events.get("delivered")),
        "duration_s": float(stats.get("duration_s") or 0.0),
        "retries": _int(http.get("retries")),
        "throttled": _int(statuses.get("429")),
        "batches": _int(stats.get("batches")),
        "problems": len(stats.get("problems") or []),
    }
    for outcome in ("delivered", "rejected", "quarantined", "skipped", "filtered"):
        summary[f"{outcome}_share"] = summary[outcome] / read if read else None
    return summary


def previous_runs(store: RunStore, current: dict[str, Any]) -> History:
    """The previous runs of the DAG beside `store`'s run (see the module's docstring); never raises for a
    missing or broken run folder."""
    history = History()
    runs_dir = str(PurePosixPath(store.root).parent)
    fs = store.fs
    entries = fs.ls(runs_dir, detail=True) if fs.exists(runs_dir) else []
    names = sorted(PurePosixPath(e["name"]).name for e in entries if e.get("type") == "directory")
    names = [n for n in names if n != safe_run_id(store.run_id)]
    history.folders = len(names)
    start, end = _time(current.get("window_start")), _time(current.get("window_end"))
    candidates = _candidates(names, end)
    history.not_read = len(names) - len(candidates)
    found = []
    for name in candidates:
        try:
            stats = read_stats(RunStore(store.state_uri, name, area=store.area))
            history.read += 1
            summary = run_summary(stats)
            when = _time(summary["window_start"])
            if when is None:
                raise ValueError("no window_start")
        except FileNotFoundError:
            history.missing_count += 1
            if len(history.missing) < SHOWN_PROBLEMS:
                history.missing.append(name)
            continue
        except Exception as exc:  # a corrupt or foreign file: named, never fatal
            history.unreadable_count += 1
            if len(history.unreadable) < SHOWN_PROBLEMS:
                history.unreadable.append(f"{name}: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        if start is not None and when > start:
            history.later += 1
            continue
        found.append((when, _time(summary["window_end"]) or when, summary["run_id"] or name, summary))
    found.sort(key=lambda f: f[:3])
    history.runs = [f[3] for f in found[-MAX_RUNS:]]
    return history


def _candidates(names: list[str], end: datetime | None) -> list[str]:
    """All folders when they are few; else the MAX_READS latest by the time in their id, up to `end`."""
    if len(names) <= MAX_READS:
        return names
    timed = [(t, n) for n in names if (t := _id_time(n)) is not None]
    if end is not None:  # a run id carries its logical date or trigger time: allow a little slack
        timed = [(t, n) for t, n in timed if t <= end + timedelta(hours=1)]
    return [n for _, n in sorted(timed, reverse=True)[:MAX_READS]]


def _id_time(name: str) -> datetime | None:
    match = _ID_TIME.search(name)
    if not match:
        return None
    try:
        return datetime(*(int(g) for g in match.groups()), tzinfo=UTC)
    except ValueError:
        return None


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0
