"""The test-facing admin API under /_emulator/ (no auth, no faults, not counted as API requests)."""

from __future__ import annotations

from collections import Counter

import orjson

from include.fullstory_emulator.replies import Reply, error_reply, json_reply

MAX_LIST = 100_000


def _int_arg(query: dict, name: str, default: int) -> int:
    try:
        return int(query.get(name, [default])[0])
    except ValueError:
        return default


def _object_body(body: bytes) -> dict:
    if not body.strip():
        return {}
    parsed = orjson.loads(body)
    if type(parsed) is not dict:
        raise ValueError("the body must be a JSON object")
    return parsed


def health(emu, query, body) -> Reply:
    c = emu.config
    return json_reply(
        200,
        {
            "status": "ok",
            "url": emu.url,
            "region": c.region,
            "org_id": c.org_id,
            "api_keys": c.api_keys,
            "ca_bundle": emu.ca_bundle,
        },
    )


def state(emu, query, body) -> Reply:
    with emu.lock:
        now = emu.clock.now()
        return json_reply(
            200,
            {
                "events": emu.events.live_count(),
                "users": len(emu.users),
                "deleted_users": emu.deleted_users,
                "jobs": emu.jobs.counts(now),
                "jobs_in_progress": emu.jobs.in_progress(),
                "idempotency": emu.idempotency.summary(),
                "requests": sum(emu.requests.values()),
                "clock_offset": emu.clock.offset,
                "faults": emu.faults.faults.as_dict(),
            },
        )


def events(emu, query, body) -> Reply:
    """Accepted events in arrival order, paged: ?offset=&limit=&name=&ident= (ident: the uid/id/session id)."""
    offset = max(0, _int_arg(query, "offset", 0))
    limit = min(MAX_LIST, max(0, _int_arg(query, "limit", 1000)))
    name = query.get("name", [None])[0]
    ident = query.get("ident", [None])[0]
    with emu.lock:
        log, job_ids = emu.events, emu.jobs.job_ids
        matching = range(len(log))
        if name is not None or ident is not None or log.live_count() != len(log):  # erased: deleted users
            matching = [i for i in matching if log.matches(i, name, ident)]
        page = [log.render(i, job_ids) for i in matching[offset : offset + limit]]
        total = len(matching)
    following = offset + len(page) if offset + len(page) < total else None
    return json_reply(200, {"total": total, "offset": offset, "next_offset": following, "events": page})


def users(emu, query, body) -> Reply:
    uid = query.get("uid", [None])[0]
    with emu.lock:
        records = emu.users.by_id.values()
        listed = [r.as_dict() | {"updates": r.updates} for r in records if uid is None or r.uid == uid]
    return json_reply(200, {"total": len(listed), "users": listed})


def faults(emu, query, body) -> Reply:
    return json_reply(200, emu.faults.faults.as_dict())


def set_faults(emu, query, body) -> Reply:
    try:
        updated = emu.faults.update(_object_body(body))
    except (ValueError, TypeError) as exc:
        return error_reply(400, "invalid_argument", str(exc))
    return json_reply(200, updated.as_dict())


def reset(emu, query, body) -> Reply:
    try:
        options = _object_body(body)
    except ValueError as exc:
        return error_reply(400, "invalid_argument", str(exc))
    emu.reset(keep_faults=bool(options.get("keep_faults", False)))
    return json_reply(200, {"status": "reset"})


def requests(emu, query, body) -> Reply:
    with emu.lock:
        counted = list(emu.requests.items())
    by_status: Counter = Counter()
    by_path: dict[str, dict[str, int]] = {}
    for (route, status), n in counted:
        by_status[status] += n
        by_path.setdefault(route, {})[status] = n
    return json_reply(200, {"total": sum(by_status.values()), "by_status": by_status, "by_path": by_path})


def jobs(emu, query, body) -> Reply:
    with emu.lock:
        emu.jobs.tick(emu.clock.now())
        listed = [{"kind": j.kind, "items": j.items, **j.status_response()} for j in emu.jobs.jobs.values()]
    return json_reply(200, {"total": len(listed), "jobs": listed})


def clock(emu, query, body) -> Reply:
    """Move the emulator's clock: {"advance_seconds": 86401} (idempotency expiry, job completion)."""
    try:
        advance = _object_body(body).get("advance_seconds", 0)
        if type(advance) not in (int, float) or advance < 0:
            raise ValueError("advance_seconds must be a number >= 0")
    except ValueError as exc:
        return error_reply(400, "invalid_argument", str(exc))
    with emu.lock:
        emu.clock.offset += advance
        return json_reply(200, {"clock_offset": emu.clock.offset})


_ROUTES = {
    ("GET", "health"): health,
    ("GET", "state"): state,
    ("GET", "events"): events,
    ("GET", "users"): users,
    ("GET", "faults"): faults,
    ("POST", "faults"): set_faults,
    ("POST", "reset"): reset,
    ("GET", "requests"): requests,
    ("GET", "jobs"): jobs,
    ("POST", "clock"): clock,
}


def handle_admin(emu, method: str, parts: list[str], query: dict, body: bytes) -> Reply:
    handler = _ROUTES.get((method, "/".join(parts)))
    if handler is None:
        return error_reply(404, "resource_not_found", f"no admin route {method} /_emulator/{'/'.join(parts)}")
    try:
        return handler(emu, query, body)
    except orjson.JSONDecodeError as exc:
        return error_reply(400, "invalid_argument", f"the body is not valid JSON: {exc}")
