"""Per-run figures: partial stats from each stage add together; rows.* come from the outcomes.

The keys of `stats.json` are a public contract (README "Run stats"): more may be added, none renamed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def empty() -> dict[str, Any]:
    return {
        "rows": {"read": 0, "delivered": 0, "rejected": 0, "quarantined": 0, "filtered": 0, "skipped": 0,
                 "unknown": 0},
        "events": {"mapped": 0, "delivered": 0, "rejected": 0},
        "users": {"mapped": 0, "delivered": 0, "rejected": 0},
        "http": {"requests": 0, "retries": 0, "status_counts": {}},
        "batches": 0,
        "bytes_sent": 0,
    }


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Add two partial stats: numbers add, nested dicts merge key by key, other values from `b` win."""
    out: dict[str, Any] = dict(a)
    for key, value in b.items():
        if key in out and isinstance(out[key], Mapping) and isinstance(value, Mapping):
            out[key] = merge(out[key], value)
        elif key in out and _is_number(out[key]) and _is_number(value):
            out[key] = out[key] + value
        else:
            out[key] = value
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def summary_line(stats: Mapping[str, Any]) -> str:
    """One readable line for the task log."""
    rows = stats.get("rows", {})
    http = stats.get("http", {})
    return (
        f"window {stats.get('window_start')} -> {stats.get('window_end')}"
        f"{' (dry run)' if stats.get('dry_run') else ''}: "
        f"read {rows.get('read', 0)}, delivered {rows.get('delivered', 0)}, rejected {rows.get('rejected', 0)}, "
        f"quarantined {rows.get('quarantined', 0)}, filtered {rows.get('filtered', 0)}, "
        f"skipped {rows.get('skipped', 0)}"
        + (f", unknown {rows['unknown']}" if rows.get("unknown") else "")
        + (f", pending {rows['pending']}" if rows.get("pending") else "")
        + (f" ({stats['late']['rows']} late)" if (stats.get("late") or {}).get("rows") else "")
        + f"; {stats.get('batches', 0)} batches, "
        f"{http.get('requests', 0)} requests ({http.get('retries', 0)} retries), "
        f"{stats.get('bytes_sent', 0)} bytes in {stats.get('duration_s', 0):.1f}s"
    )
