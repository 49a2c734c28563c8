"""The emulated FullStory Server API, independent of the HTTP plumbing.

`Emulator.handle(method, path, query, headers, body)` returns a `Reply`; server.py only moves bytes.
Order for an API request: faults (drop, latency, injected 429/5xx) -> rate limit -> auth and region ->
Idempotency-Key -> the endpoint. Admin routes (/_emulator/...) skip all of that.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import threading
import uuid
from collections import Counter
from urllib.parse import parse_qs

from include.fullstory_emulator import endpoints
from include.fullstory_emulator import validation as v
from include.fullstory_emulator.admin import handle_admin
from include.fullstory_emulator.config import EmulatorConfig, key_region
from include.fullstory_emulator.faults import FaultBox
from include.fullstory_emulator.idempotency import IdempotencyStore
from include.fullstory_emulator.jobs import JobBoard, TooManyJobs
from include.fullstory_emulator.replies import Reply, error_reply
from include.fullstory_emulator.state import Clock, EventLog, UserStore

IDEMPOTENT_ROUTES = frozenset(
    {"POST /v2/events", "POST /v2/events/batch", "POST /v2/users", "POST /v2/users/batch"}
)
_ERROR_CODES = {500: "server_error", 502: "bad_gateway", 503: "service_unavailable", 504: "gateway_timeout"}


def _route(method: str, parts: list[str]) -> str:
    """Route template used for request counts and idempotency scope, e.g. 'GET /v2/events/batch/{job_id}'."""
    if parts[:1] in (["v2"], ["v2beta"]):
        shape = ["v2", *parts[1:]]
        if len(shape) >= 4 and shape[2] == "batch":
            shape[3] = "{job_id}"
        elif len(shape) == 3 and shape[1] == "users" and shape[2] != "batch":
            shape[2] = "{id}"
        return f"{method} /{'/'.join(shape)}"
    return f"{method} /{'/'.join(parts)}"


class Emulator:
    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config.resolved()
        self.started_faults = copy.deepcopy(self.config.faults)
        self.keys = set(self.config.api_keys)
        self.clock = Clock()
        self.lock = threading.RLock()
        self.faults = FaultBox(copy.deepcopy(self.started_faults))
        self.ca_bundle: str | None = None
        self.url: str | None = None
        self.owned_tls_dir: str | None = None  # a generated temp dir, removed at shutdown
        self._fresh_state()

    def _fresh_state(self) -> None:
        self.events = EventLog(self.config.keep_properties)
        self.users = UserStore()
        self.jobs = JobBoard(
            self.config.max_running_jobs, self.config.max_in_progress_jobs, self.config.max_in_progress_items
        )
        self.idempotency = IdempotencyStore(self.config.idempotency_ttl)
        self.requests: Counter = Counter()
        self.deleted_users = 0  # DELETE /v2/users answered 200 (known or not)

    def reset(self, keep_faults: bool = False) -> None:
        with self.lock:
            self._fresh_state()
            self.clock.offset = 0.0
            if not keep_faults:
                self.faults = FaultBox(copy.deepcopy(self.started_faults))

    # ---- entry point ---------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: str, headers, body: bytes) -> Reply:
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["_emulator"]:
            return handle_admin(self, method, parts[1:], parse_qs(query), body)
        route = _route(method, parts)
        reply = self._api(method, parts, route, query, headers, body)
        with self.lock:
            self.requests[(route, "dropped" if reply.drop else str(reply.status))] += 1
        return reply

    def _api(self, method, parts, route, query, headers, body) -> Reply:
        fault = self.faults.draw()
        if fault["drop"] and not self.faults.faults.drop_after_processing:
            reply = Reply(0)
            reply.drop = True
            return reply
        reply = self._faulted(fault) or self._serve(method, parts, route, query, headers, body)
        reply.delay = fault["latency"] + fault["slow"]
        reply.drop = fault["drop"]
        return reply

    def _faulted(self, fault: dict) -> Reply | None:
        f = self.faults.faults
        if fault["throttle"]:
            return self._too_many(f.retry_after)
        if fault["error"]:
            status = f.error_status
            return error_reply(status, _ERROR_CODES[status], "Server error was encountered (emulator fault)")
        wait = self.faults.bucket.take()
        return self._too_many(wait) if wait else None

    @staticmethod
    def _too_many(seconds: float) -> Reply:
        return error_reply(
            429,
            "too_many_requests",
            "Too many requests. Client has exceeded the rate limit for this endpoint.",
            [("Retry-After", str(max(1, int(seconds + 0.999))))],
        )

    def _serve(self, method, parts, route, query, headers, body) -> Reply:
        org, refused = self._authenticate(headers.get("Authorization"))
        if refused is not None:
            return refused
        key = headers.get("Idempotency-Key")
        if not key or route not in IDEMPOTENT_ROUTES:
            return self._dispatch(method, parts, route, query, body)
        return self._idempotent((org, route, key), method, parts, route, query, body)

    def _authenticate(self, header: str | None) -> tuple[str | None, Reply | None]:
        scheme, _, key = (header or "").partition(" ")
        key = key.strip()
        if scheme != "Basic" or not key:
            return None, error_reply(
                401, "unauthorized", "access is unauthorized: send 'Authorization: Basic <key>'"
            )
        if key in self.keys:
            return self.config.org_id, None
        named = key_region(key)
        if named in ("na1", "eu1") and named != self.config.region:
            return None, error_reply(
                404,
                "resource_not_found",
                f"org not found in this data region: the key is for {named}, this is {self.config.region}",
            )
        return None, error_reply(401, "unauthorized", self._unknown_key_message(key))

    def _unknown_key_message(self, key: str) -> str:
        try:
            decoded = base64.b64decode(key, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        if decoded.rstrip(":") in self.keys:
            return "access is unauthorized: send the API key verbatim after 'Basic ', not base64-encoded"
        return "access is unauthorized: unknown API key"

    def _idempotent(self, scope, method, parts, route, query, body) -> Reply:
        digest = hashlib.sha256(body).digest()
        with self.lock:
            found = self.idempotency.lookup(scope, digest, self.clock.now())
        if found[0] == "replay":
            return Reply(found[1], found[2], [("Idempotent-Replayed", "true")])
        if found[0] == "mismatch":
            return error_reply(
                400,
                "idempotency_key_mismatch",
                "Idempotency-Key was already used with a different request body",
            )
        if found[0] == "conflict":
            return error_reply(
                409, "idempotency_key_in_use", "a request with this Idempotency-Key is in progress"
            )
        reply = None
        try:
            reply = self._dispatch(method, parts, route, query, body)
            return reply
        finally:
            # 429 and 5xx are retryable: not stored, the key stays usable.
            store = reply is not None and reply.status != 429 and reply.status < 500
            with self.lock:
                self.idempotency.finish(
                    scope,
                    digest,
                    reply.status if reply else 0,
                    reply.body if reply else b"",
                    self.clock.now(),
                    store,
                )

    # ---- endpoints -----------------------------------------------------------------------------------

    def _dispatch(self, method, parts, route, query, body) -> Reply:
        handler = endpoints.ROUTES.get(route)
        if handler is None:
            return error_reply(404, "resource_not_found", f"Requested resource does not exist: {route}")
        try:
            return handler(self, parts, parse_qs(query), body)
        except v.ItemError as exc:
            return error_reply(400, exc.code, exc.message)
        except TooManyJobs as exc:
            return self._too_many(exc.retry_after)

    def new_job_id(self) -> str:
        return uuid.uuid4().hex[:20]
