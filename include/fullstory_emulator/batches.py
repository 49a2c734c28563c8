"""Parsing and validating a batch body: the hot path of the emulator.

The result is compact columns (names, kinds, idents, timestamps, one properties blob) plus the failed
items. A pool of worker processes was tried for this and measured slower on a 2-core machine (moving
a 22 MB body and a 15 MB answer through pipes costs more than it saves), so it runs in-process.
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager

import orjson

from include.fullstory_emulator import validation as v
from include.fullstory_emulator.faults import Faults, rejection, rejects_anything
from include.fullstory_emulator.state import pack_events

_gc_lock = threading.Lock()
_gc_pauses = 0


@contextmanager
def gc_paused():
    """Parsing a 50,000-item batch allocates millions of acyclic objects; the cyclic collector would
    rescan them over and over (3x the parse cost). Paused while any batch is in hand."""
    global _gc_pauses
    with _gc_lock:
        _gc_pauses += 1
        if _gc_pauses == 1:
            gc.disable()
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0:
                gc.enable()


def json_body(body: bytes):
    if not body:
        raise v.ItemError("invalid_argument", "the request body is empty")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise v.ItemError("invalid_argument", f"the request body is not valid JSON: {exc}") from None


def validate_event_items(requests: list, shared: dict | None, faults: Faults) -> tuple[list, list]:
    """Split batch items into accepted event tuples and failures (message, code, item, shared or None)."""
    shared_context = shared is not None and "context" in shared
    rejecting = rejects_anything(faults, "events")
    accepted, failures = [], []
    check = v.check_event
    for item in requests:
        try:
            accepted.append(check(item, shared_context=shared_context))
        except v.ItemError as exc:
            conflict = shared_context and type(item) is dict and "context" in item
            failures.append((exc.message, exc.code, item, shared if conflict else None))
            continue
        message = rejection(faults, "events", item) if rejecting else None
        if message:
            accepted.pop()
            failures.append((message, faults.reject_code, item, None))
    return accepted, failures


def validate_events_body(body: bytes, faults: Faults, keep_properties: bool) -> tuple:
    """-> ("refused", code, message) for a bad envelope, else ("ok", item count, columns, failures)."""
    with gc_paused():
        try:
            requests, shared = v.check_events_batch(json_body(body))
        except v.ItemError as exc:
            return ("refused", exc.code, exc.message)
        accepted, failures = validate_event_items(requests, shared, faults)
        return ("ok", len(requests), pack_events(accepted, keep_properties), failures)
