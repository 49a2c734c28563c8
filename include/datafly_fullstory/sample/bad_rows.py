"""The bad rows of a landing: `BAD_KINDS`, each failing one validation rule, and `_inject_bad_rows`, which
writes `spec.bad_fraction` of them (kinds in turn) into the columns of a generated table."""

from __future__ import annotations

import numpy as np

from include.datafly_fullstory.sample.spec import LandingSpec

# The bad-row kinds, each failing one validation rule (see validation.py).
BAD_KINDS = (
    "null_event_id",
    "duplicate_event_id",
    "unknown_type",
    "track_without_event",
    "bad_json_properties",
    "identify_without_traits",
    "missing_anonymous_id",
    "json_not_object",
)


def _inject_bad_rows(rng: np.random.Generator, spec: LandingSpec, cols: dict) -> None:
    n = spec.rows
    n_bad = int(round(n * spec.bad_fraction))
    if n_bad == 0 or n < 20:
        return
    rows = rng.choice(np.arange(1, n), size=min(n_bad, n - 1), replace=False)
    for i, row in enumerate(rows):
        kind = BAD_KINDS[i % len(BAD_KINDS)]
        if kind == "null_event_id":
            cols["event_id"][row] = None
        elif kind == "duplicate_event_id":
            cols["event_id"][row] = cols["event_id"][row - 1]
        elif kind == "unknown_type":
            cols["type"][row] = "pageview"
        elif kind == "track_without_event":
            cols["type"][row], cols["event"][row] = "track", None
            cols["properties"][row] = '{"source": "web"}'
        elif kind == "bad_json_properties":
            cols["type"][row], cols["event"][row] = "track", "Product Added"
            cols["properties"][row] = '{"product_id": "P1", "price": 12.5'
        elif kind == "identify_without_traits":
            cols["type"][row], cols["traits"][row] = "identify", None
        elif kind == "missing_anonymous_id":
            cols["anonymous_id"][row] = None
        elif kind == "json_not_object":
            cols["context"][row] = '["not", "an", "object"]'
