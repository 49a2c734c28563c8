"""The v2 endpoints (and GET /me). Each handler: (emulator, path parts, query, body) -> Reply.

Handlers raise ItemError for a 400 and TooManyJobs for a 429; app.py turns those into answers.
"""

from __future__ import annotations

import base64

from include.fullstory_emulator import validation as v
from include.fullstory_emulator.batches import gc_paused, json_body, validate_events_body
from include.fullstory_emulator.replies import Reply, error_reply, json_reply


def me(emu, parts, query, body) -> Reply:
    return json_reply(200, {"email": "emulator@example.com", "orgId": emu.config.org_id, "role": "ADMIN"})


# ---- events ----------------------------------------------------------------------------------------


def create_event(emu, parts, query, body) -> Reply:
    event = json_body(body)
    accepted = v.check_event(event)
    rejected = emu.faults.rejection("events", event)
    if rejected:
        raise v.ItemError(emu.faults.faults.reject_code, rejected)
    with emu.lock:
        emu.events.append_many([accepted], emu.clock.now(), -1)
    return Reply(200, b"{}")


def create_events_batch(emu, parts, query, body) -> Reply:
    with emu.lock:
        emu.jobs.admit(0, emu.clock.now())  # refuse early, before the work
    faults = emu.faults.faults
    outcome = validate_events_body(body, faults, emu.config.keep_properties)
    if outcome[0] == "refused":
        raise v.ItemError(outcome[1], outcome[2])
    _, items, columns, failures = outcome
    with emu.lock:
        now = emu.clock.now()
        emu.jobs.admit(items, now)
        job = emu.jobs.create(emu.new_job_id(), "events", items, now, faults.job_seconds)
        job.imported = emu.events.append_columns(columns, now, job.no)
        job.failures = failures
        return json_reply(200, {"job": job.metadata()})


# ---- users -----------------------------------------------------------------------------------------


def create_user(emu, parts, query, body) -> Reply:
    user = v.check_user(json_body(body))
    rejected = emu.faults.rejection("users", user)
    if rejected:
        raise v.ItemError(emu.faults.faults.reject_code, rejected)
    with emu.lock:
        record = emu.users.upsert(user)
    return json_reply(200, {"id": record.id})


def get_user(emu, parts, query, body) -> Reply:
    with emu.lock:
        record = emu.users.by_id.get(parts[2])
        if record is None:
            return error_reply(404, "user_not_found", "User with that ID does not exist")
        return json_reply(200, {**record.as_dict(), "is_being_deleted": False})


def delete_user(emu, parts, query, body) -> Reply:
    """DELETE /v2/users/{id} or DELETE /v2/users?uid=: forget the user and erase its events, answer 200 {}.
    FullStory's docs give 200 as the only answer; deletion here is idempotent, so an unknown or already
    deleted user is answered 200 {} as well (nothing to erase). Neither an id nor a uid: 400."""
    uid = query.get("uid", [""])[0] if len(parts) == 2 else ""
    if len(parts) == 2 and not uid:
        raise v.ItemError("invalid_argument", "give the user's id in the path or its uid as ?uid=")
    with emu.lock:
        found = emu.users.by_uid.get(uid) if uid else parts[2]
        record = emu.users.by_id.get(found) if found else None
        if record is not None:
            emu.events.erase_user(record.uid, record.id)
            emu.users.delete(record)
        elif uid:
            emu.events.erase_user(uid, "")  # events sent by uid for a user never upserted
        emu.deleted_users += 1
    return Reply(200, b"{}")


def create_users_batch(emu, parts, query, body) -> Reply:
    with gc_paused():
        return _create_users_batch(emu, body)


def _create_users_batch(emu, body: bytes) -> Reply:
    requests = v.check_users_batch(json_body(body))
    with emu.lock:
        emu.jobs.admit(len(requests), emu.clock.now())
    checked = []
    for index, item in enumerate(requests):
        try:
            v.check_user(item, batch_item=True)
            message = emu.faults.rejection("users", item)
            checked.append((index, item, (message, emu.faults.faults.reject_code) if message else None))
        except v.ItemError as exc:
            checked.append((index, item, (exc.message, exc.code)))
    with emu.lock:
        now = emu.clock.now()
        emu.jobs.admit(len(requests), now)
        job = emu.jobs.create(emu.new_job_id(), "users", len(requests), now, emu.faults.faults.job_seconds)
        job.imported = imported = []
        for _, item, failure in checked:
            if failure is None:
                try:
                    imported.append(emu.users.upsert(item).id)
                    continue
                except v.ItemError as exc:
                    failure = (exc.message, exc.code)
            job.failures.append((failure[0], failure[1], item, None))
        return json_reply(200, {"job": job.metadata()})


# ---- batch job status, imports, errors ---------------------------------------------------------------


def _job(emu, kind: str, job_id: str):
    job = emu.jobs.get(kind, job_id, emu.clock.now())
    if job is None:
        raise LookupError
    return job


def _page_bounds(emu, query: dict, total: int) -> tuple[int, int, str | None]:
    token = query.get("page_token", [""])[0]
    offset = 0
    if token:
        try:
            offset = int(base64.urlsafe_b64decode(token.encode()).decode().removeprefix("o"))
        except ValueError:
            raise v.ItemError("invalid_argument", f"page_token {token[:32]!r} is not valid") from None
        if not 0 <= offset <= total:
            raise v.ItemError("invalid_argument", f"page_token {token[:32]!r} is out of range")
    end = min(total, offset + emu.config.page_size)
    following = base64.urlsafe_b64encode(f"o{end}".encode()).decode() if end < total else None
    return offset, end, following


def _paged(results: list, total: int, following: str | None) -> Reply:
    page = {"results": results, "total_records": str(total)}
    if following:
        page["next_page_token"] = following
    return json_reply(200, page)


def _job_view(kind: str, view: str):
    def handler(emu, parts, query, body) -> Reply:
        with emu.lock:
            try:
                job = _job(emu, kind, parts[3])
            except LookupError:
                return error_reply(404, "resource_not_found", f"no {kind} import job {parts[3]!r}")
            if view == "status":
                return json_reply(200, job.status_response())
            if job.finished is None:
                return Reply(202, b"{}")
            if view == "errors":
                return _errors_page(emu, kind, job, query)
            return _imports_page(emu, kind, job, query)

    return handler


def _errors_page(emu, kind, job, query) -> Reply:
    offset, end, following = _page_bounds(emu, query, len(job.failures))
    item_field = "event" if kind == "events" else "user"
    results = []
    for message, code, item, shared in job.failures[offset:end]:
        result = {"message": message, "code": code, item_field: item}
        if shared is not None:
            result["shared"] = shared
        results.append(result)
    return _paged(results, len(job.failures), following)


def _imports_page(emu, kind, job, query) -> Reply:
    offset, end, following = _page_bounds(emu, query, job.imports)
    if kind == "events":
        first = job.imported[0]
        results = [emu.events.render_import(i) for i in range(first + offset, first + end)]
    else:
        results = [emu.users.by_id[uid].as_dict() for uid in job.imported[offset:end]]
    return _paged(results, job.imports, following)


ROUTES = {
    "GET /me": me,
    "POST /v2/events": create_event,
    "POST /v2/events/batch": create_events_batch,
    "GET /v2/events/batch/{job_id}": _job_view("events", "status"),
    "GET /v2/events/batch/{job_id}/imports": _job_view("events", "imports"),
    "GET /v2/events/batch/{job_id}/errors": _job_view("events", "errors"),
    "POST /v2/users": create_user,
    "GET /v2/users/{id}": get_user,
    "DELETE /v2/users": delete_user,
    "DELETE /v2/users/{id}": delete_user,
    "POST /v2/users/batch": create_users_batch,
    "GET /v2/users/batch/{job_id}": _job_view("users", "status"),
    "GET /v2/users/batch/{job_id}/imports": _job_view("users", "imports"),
    "GET /v2/users/batch/{job_id}/errors": _job_view("users", "errors"),
}
