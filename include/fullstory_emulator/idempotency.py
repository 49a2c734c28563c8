"""Idempotency-Key records: the stored answer per key, the keys in flight, replay/mismatch/conflict counts.

Does not lock: the application object holds one lock around every mutation.
"""

from __future__ import annotations


class IdempotencyStore:
    """Stored answers per (org, route, Idempotency-Key), each with the digest of the body it answered."""

    def __init__(self, ttl_seconds: float = 86_400.0) -> None:
        self.ttl_seconds = ttl_seconds
        self.entries: dict[tuple, tuple[bytes, int, bytes, float]] = {}
        self.in_flight: set[tuple] = set()
        self.replays = 0
        self.mismatches = 0
        self.conflicts = 0
        self._since_prune = 0

    def lookup(self, scope: tuple, digest: bytes, now: float):
        """-> ("replay", status, body) | ("mismatch",) | ("conflict",) | ("new",)."""
        entry = self.entries.get(scope)
        if entry is not None and entry[3] + self.ttl_seconds <= now:
            del self.entries[scope]
            entry = None
        if entry is not None:
            if entry[0] != digest:
                self.mismatches += 1
                return ("mismatch",)
            self.replays += 1
            return ("replay", entry[1], entry[2])
        if scope in self.in_flight:
            self.conflicts += 1
            return ("conflict",)
        self.in_flight.add(scope)
        return ("new",)

    def finish(self, scope: tuple, digest: bytes, status: int, body: bytes, now: float, store: bool) -> None:
        self.in_flight.discard(scope)
        if store:
            self.entries[scope] = (digest, status, body, now)
            self._since_prune += 1
            if self._since_prune >= 1000:
                self._prune(now)

    def _prune(self, now: float) -> None:
        self._since_prune = 0
        cutoff = now - self.ttl_seconds
        for scope in [s for s, e in self.entries.items() if e[3] <= cutoff]:
            del self.entries[scope]

    def summary(self) -> dict:
        return {
            "stored": len(self.entries),
            "replays": self.replays,
            "mismatches": self.mismatches,
            "conflicts": self.conflicts,
        }
