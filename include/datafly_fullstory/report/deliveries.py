"""The delivery timeline's figures: batch jobs in flight over time, items/s, retries and 429s.

From the run's timeline files (delivery/timeline.py), every try of every delivery task on one time axis
(seconds since the first try started). A job is in flight from its POST's answer (or, resumed from an
earlier try, from the start of the try that polled it) until its results were recorded (or its try ended).
Items count towards items/s when their job ends; retries and 429s when the call that met them ended.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from include.datafly_fullstory.delivery.timeline import TimelineFiles

MAX_BUCKETS = 60
MAX_JOBS_SHOWN = 200  # jobs listed in the report's table (all of them count in the charts)
STEPS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def bucket_width(span: float) -> float:
    """The smallest round width that splits `span` seconds into at most MAX_BUCKETS buckets."""
    for step in STEPS:
        if span / step <= MAX_BUCKETS:
            return float(step)
    return float(STEPS[-1] * (int(span / (STEPS[-1] * MAX_BUCKETS)) + 1))


def delivery_data(files: TimelineFiles) -> dict[str, Any]:
    tries = files.tries
    jobs: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    times: list[float] = []
    ended = []
    for number, entry in enumerate(tries):
        start = _num(entry.get("started_at"))
        if start is None:
            continue
        end = _num(entry.get("ended_at"))
        times += [start] + ([end] if end is not None else [])
        ended.append(str(entry.get("ended") or "did not end (the task was killed)"))
        for job in entry.get("jobs") or []:
            if not isinstance(job, dict):
                continue
            submitted, finished = _num(job.get("submitted_at")), _num(job.get("finished_at"))
            begin = submitted if submitted is not None else start
            stop = finished if finished is not None else end
            times += [t for t in (begin, stop) if t is not None]
            jobs.append(
                {
                    "try": number,
                    "chunk": str(job.get("chunk")),
                    "kind": str(job.get("kind")),
                    "mode": str(job.get("mode")),
                    "job_id": job.get("job_id"),
                    "items": _int(job.get("items")),
                    "outcome": str(job.get("outcome")),
                    "delivered": _int(job.get("delivered")),
                    "rejected": _int(job.get("rejected")),
                    "unknown": _int(job.get("unknown")),
                    "polls": _int(job.get("polls")),
                    "retries": _int(job.get("retries")),
                    "throttled": _int(job.get("throttled")),
                    "_begin": begin,
                    "_end": stop,
                    "_finished": finished,
                }
            )
        for call in entry.get("calls") or []:
            at = _num(call.get("at")) if isinstance(call, dict) else None
            if at is not None:
                times.append(at)
                calls.append(
                    {"at": at, "retries": _int(call.get("retries")), "throttled": _int(call.get("throttled"))}
                )
    http = {"requests": 0, "retries": 0, "throttled": 0}
    for entry in tries:
        for key in http:
            http[key] += (
                _int((entry.get("http") or {}).get(key)) if isinstance(entry.get("http"), dict) else 0
            )
    data: dict[str, Any] = {
        "tries": len(tries),
        "ended": ended,
        "unreadable": files.unreadable,
        "jobs": len(jobs),
        "http": http,
    }
    if not times:
        return {**data, "seconds": 0.0, "series": None, "job_rows": [], "max_in_flight": 0}
    t0, t1 = min(times), max(times)
    span = max(t1 - t0, 1e-3)
    width = bucket_width(span)
    buckets = int(span // width) + 1
    items = [0] * buckets
    retries = [0] * buckets
    throttled = [0] * buckets
    for job in jobs:
        if job["_finished"] is not None:
            items[min(buckets - 1, int((job["_finished"] - t0) // width))] += job["items"]
    for call in calls:
        i = min(buckets - 1, int((call["at"] - t0) // width))
        retries[i] += call["retries"]
        throttled[i] += call["throttled"]
    steps = _in_flight(jobs, t0, t1)
    finished = [j for j in jobs if j["_finished"] is not None]
    done_items = sum(j["items"] for j in finished)
    durations = [j["_finished"] - j["_begin"] for j in finished if j["_begin"] is not None]
    rows = []
    for job in sorted(jobs, key=lambda j: (j["_begin"] if j["_begin"] is not None else t1, j["chunk"])):
        rows.append(
            {
                **{k: v for k, v in job.items() if not k.startswith("_")},
                "begin_s": None if job["_begin"] is None else round(job["_begin"] - t0, 3),
                "end_s": None if job["_end"] is None else round(job["_end"] - t0, 3),
            }
        )
    return {
        **data,
        "started_at": datetime.fromtimestamp(t0, UTC).isoformat(timespec="seconds"),
        "seconds": round(span, 3),
        "jobs_finished": len(finished),
        "items": sum(j["items"] for j in jobs),
        "items_finished": done_items,
        "items_per_s": round(done_items / span, 1),
        "delivered": sum(j["delivered"] for j in jobs),
        "rejected": sum(j["rejected"] for j in jobs),
        "unknown": sum(j["unknown"] for j in jobs),
        "retries": sum(j["retries"] for j in jobs),
        "throttled": sum(j["throttled"] for j in jobs),
        "max_in_flight": max((n for _, n in steps), default=0),
        "mean_job_s": round(sum(durations) / len(durations), 3) if durations else None,
        "series": {
            "bucket_s": width,
            "in_flight": steps,
            "items_per_s": [round(n / width, 2) for n in items],
            "retries": retries,
            "throttled": throttled,
        },
        "job_rows": rows[:MAX_JOBS_SHOWN],
        "job_rows_left_out": max(0, len(rows) - MAX_JOBS_SHOWN),
    }


def _in_flight(jobs: list[dict[str, Any]], t0: float, t1: float) -> list[list[float]]:
    """[[seconds since t0, jobs in flight from then on], ...]: a step series from 0 to the end."""
    events = []
    for job in jobs:
        begin = job["_begin"]
        if begin is None:
            continue
        end = job["_end"] if job["_end"] is not None else t1
        events += [(begin, 1), (max(begin, end), -1)]
    events.sort(key=lambda e: (e[0], e[1]))  # at one instant, ends before starts
    steps, level = [[0.0, 0]], 0
    for at, change in events:
        level += change
        t = round(at - t0, 3)
        if steps[-1][0] == t:
            steps[-1][1] = level
        else:
            steps.append([t, level])
    return steps
