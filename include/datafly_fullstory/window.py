"""The run window: `[start, end)` on the event timestamp, in UTC.

Order of precedence (Airflow 3 manual runs may have no logical date or data interval):
1. params `window_start` / `window_end` (ISO-8601) when given,
2. the run's data interval,
3. the hour that ended at or before `run_after`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from include.datafly_fullstory.errors import WindowError


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if value.tzinfo is None:
                raise WindowError(f"window {name} {value.isoformat()} has no time zone; give it in UTC")
        if self.end <= self.start:
            raise WindowError(
                f"window end {self.end.isoformat()} must be after its start {self.start.isoformat()}"
            )
        object.__setattr__(self, "start", self.start.astimezone(UTC))
        object.__setattr__(self, "end", self.end.astimezone(UTC))

    def as_dict(self) -> dict[str, str]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat()}

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> Window:
        return cls(parse_instant(data["start"], "start"), parse_instant(data["end"], "end"))


def parse_instant(value: str | datetime, field: str) -> datetime:
    """An ISO-8601 instant; naive values are UTC (as in the landing)."""
    if isinstance(value, datetime):
        parsed = value
    else:
        text = str(value).strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError as exc:
            raise WindowError(
                f"param {field}={value!r} is not an ISO-8601 time, e.g. 2026-11-26T07:00:00+00:00"
            ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def resolve_window(
    *,
    window_start: str | None = None,
    window_end: str | None = None,
    data_interval_start: datetime | None = None,
    data_interval_end: datetime | None = None,
    run_after: datetime | None = None,
) -> Window:
    if window_start or window_end:
        if not (window_start and window_end):
            raise WindowError("give both window_start and window_end, or neither")
        return Window(parse_instant(window_start, "window_start"), parse_instant(window_end, "window_end"))
    if (
        data_interval_start is not None
        and data_interval_end is not None
        and data_interval_end > data_interval_start
    ):
        return Window(
            parse_instant(data_interval_start, "data_interval_start"),
            parse_instant(data_interval_end, "data_interval_end"),
        )
    if run_after is None:
        raise WindowError("no window: no window_start/window_end params, no data interval and no run_after")
    end = parse_instant(run_after, "run_after").replace(minute=0, second=0, microsecond=0)
    return Window(end - timedelta(hours=1), end)
