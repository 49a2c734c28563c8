"""Fault knobs (set at start-up, changed while running via POST /_emulator/faults) and the rate limiter.

Faults apply to API requests only, never to /_emulator/. The seeded random generator makes
error/throttle/drop rates reproducible for a given sequence of requests.
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import asdict, dataclass, field, fields


@dataclass
class Faults:
    latency_ms: float = 0.0  # added before every API answer
    error_rate: float = 0.0  # fraction of API requests answered with error_status (not processed)
    error_status: int = 500  # 500 (server_error) or 503 (service_unavailable)
    error_next: int = 0  # the next N API requests answer error_status
    seed: int | None = None  # seeds the generator behind every *_rate knob
    throttle_next: int = 0  # the next N API requests answer 429 (a "429 storm")
    throttle_rate: float = 0.0  # fraction of API requests answered 429
    retry_after: int = 1  # Retry-After seconds on injected 429s
    drop_next: int = 0  # the next N API requests: socket closed without an answer
    drop_rate: float = 0.0
    drop_after_processing: bool = False  # drop only after the request took effect (lost answer)
    slow_next: int = 0  # the next N API requests are answered slow_seconds late (after processing)
    slow_seconds: float = 0.0
    rate: float = 1000.0  # token bucket: requests per second (<= 0 disables the limiter)
    burst: float = 2000.0  # token bucket size
    job_seconds: float = 0.3  # how long a batch job stays PROCESSING once it runs
    reject_event_names: list[str] = field(default_factory=list)  # items with these names fail
    reject_user_uids: list[str] = field(default_factory=list)  # user items with these uids fail
    reject_properties: dict[str, list] = field(default_factory=dict)  # {"prop": [values...]} fail
    reject_code: str = "invalid_argument"  # code used for those injected rejections

    def as_dict(self) -> dict:
        return asdict(self)


_FAULT_TYPES = {f.name: f.type for f in fields(Faults)}


def _coerce(name: str, value):
    kind = _FAULT_TYPES[name]
    if kind == "float":
        if type(value) not in (int, float):
            raise ValueError(f"{name} must be a number")
        return float(value)
    if kind == "int":
        if type(value) is not int:
            raise ValueError(f"{name} must be an integer")
        return value
    if kind == "int | None":
        if value is not None and type(value) is not int:
            raise ValueError(f"{name} must be an integer or null")
        return value
    if kind == "bool":
        if type(value) is not bool:
            raise ValueError(f"{name} must be a boolean")
        return value
    if kind == "str":
        if type(value) is not str:
            raise ValueError(f"{name} must be a string")
        return value
    if kind.startswith("list"):
        if type(value) is not list:
            raise ValueError(f"{name} must be a list")
        return list(value)
    if type(value) is not dict or not all(type(v) is list for v in value.values()):
        raise ValueError(f"{name} must be an object of lists")
    return dict(value)


def check_fault_ranges(faults: Faults) -> None:
    for name in ("error_rate", "throttle_rate", "drop_rate"):
        if not 0.0 <= getattr(faults, name) <= 1.0:
            raise ValueError(f"{name} must be within 0..1")
    if faults.error_status not in (500, 502, 503, 504):
        raise ValueError("error_status must be one of 500, 502, 503, 504")
    for name in ("latency_ms", "slow_seconds", "job_seconds", "burst"):
        if getattr(faults, name) < 0:
            raise ValueError(f"{name} must be >= 0")


class FaultBox:
    """The live Faults plus the decisions drawn from them, thread-safe."""

    def __init__(self, faults: Faults) -> None:
        check_fault_ranges(faults)
        self._lock = threading.Lock()
        self.faults = faults
        self._random = random.Random(faults.seed)
        self.bucket = TokenBucket(faults.rate, faults.burst)

    def update(self, changes: dict) -> Faults:
        """Partial update; unknown keys or bad values raise ValueError and change nothing."""
        unknown = sorted(set(changes) - set(_FAULT_TYPES))
        if unknown:
            raise ValueError(f"unknown fault keys: {', '.join(unknown)}")
        with self._lock:
            merged = Faults(**{**self.faults.as_dict(), **{k: _coerce(k, v) for k, v in changes.items()}})
            check_fault_ranges(merged)
            self.faults = merged
            if "seed" in changes:
                self._random = random.Random(merged.seed)
            if "rate" in changes or "burst" in changes:
                self.bucket = TokenBucket(merged.rate, merged.burst)
            return merged

    def _take(self, next_name: str, rate_name: str) -> bool:
        """Consume one of the 'next N' budget, else draw against the rate."""
        remaining = getattr(self.faults, next_name)
        if remaining > 0:
            setattr(self.faults, next_name, remaining - 1)
            return True
        rate = getattr(self.faults, rate_name) if rate_name else 0.0
        return rate > 0.0 and self._random.random() < rate

    def draw(self) -> dict:
        """The faults hitting one API request."""
        with self._lock:
            f = self.faults
            drop = self._take("drop_next", "drop_rate")
            if drop and not f.drop_after_processing:
                # the request never reaches the API: no other fault is drawn for it
                return {"drop": True, "throttle": False, "error": False, "latency": 0.0, "slow": 0.0}
            slow = 0.0
            if f.slow_next > 0:
                f.slow_next -= 1
                slow = f.slow_seconds
            return {
                "drop": drop,
                "throttle": self._take("throttle_next", "throttle_rate"),
                "error": self._take("error_next", "error_rate"),
                "latency": f.latency_ms / 1000.0,
                "slow": slow,
            }

    def rejection(self, kind: str, item) -> str | None:
        return rejection(self.faults, kind, item)


def rejects_anything(f: Faults, kind: str) -> bool:
    names = f.reject_event_names if kind == "events" else f.reject_user_uids
    return bool(names or f.reject_properties)


def rejection(f: Faults, kind: str, item) -> str | None:
    """Message for an item the tests asked the emulator to refuse, else None."""
    if type(item) is not dict:
        return None
    if kind == "events" and f.reject_event_names and item.get("name") in f.reject_event_names:
        return f"event name {item.get('name')!r} is rejected (emulator fault reject_event_names)"
    if kind == "users" and f.reject_user_uids and item.get("uid") in f.reject_user_uids:
        return f"uid {item.get('uid')!r} is rejected (emulator fault reject_user_uids)"
    props = item.get("properties")
    if f.reject_properties and type(props) is dict:
        for name, values in f.reject_properties.items():
            if name in props and props[name] in values:
                return (
                    f"properties.{name} value {props[name]!r} is rejected (emulator fault reject_properties)"
                )
    return None


class TokenBucket:
    """`rate` tokens per second up to `burst`; one token per request."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._tokens = self.burst
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> int:
        """0 when allowed, else the whole seconds to wait (Retry-After)."""
        if self.rate <= 0:
            return 0
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0
            return max(1, math.ceil((1.0 - self._tokens) / self.rate))
