"""`identity.fold_pairs` folds pairs with sorted codes instead of sorting every pair's texts; it must give
what the definition says, written here the obvious way (a stable sort of the pairs by anonymous id, time
and event id, missing values last, then per anonymous id its first pair and the least other user), on
seeded random pairs with ties in time, missing times and event ids, unicode and case, in both text kinds
(Python objects and Arrow strings)."""

from __future__ import annotations

import math
import random

import pandas as pd
import pytest

from include.datafly_fullstory.mapping.identity import IdentityMap, fold_pairs


def by_definition(pairs: pd.DataFrame) -> list[tuple]:
    rows = list(pairs.itertuples(index=False))

    def key(r):
        ts_missing = r.ts != r.ts
        event_missing = not isinstance(r.event_id, str)
        return (r.anonymous_id, ts_missing, 0.0 if ts_missing else r.ts, event_missing, r.event_id or "")

    ordered = sorted(rows, key=key)  # stable
    out = []
    for anon in sorted({r.anonymous_id for r in rows}):
        mine = [r for r in ordered if r.anonymous_id == anon]
        head = mine[0]
        others = sorted({r.user_id for r in mine} - {head.user_id})
        times = [r.ts for r in mine if r.ts == r.ts]
        out.append(
            (
                anon,
                head.user_id,
                others[0] if others else None,
                min(times) if times else None,
                max(times) if times else None,
                head.event_id if isinstance(head.event_id, str) else None,
            )
        )
    return out


def shown(folded: pd.DataFrame) -> list[tuple]:
    def plain(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    return [tuple(plain(v) for v in row) for row in folded.itertuples(index=False)]


@pytest.mark.parametrize("seed", range(60))
def test_fold_pairs_is_the_definition(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 80)
    pairs = pd.DataFrame(
        {
            "anonymous_id": [rng.choice(["a", "b", "c", "é", "A", "a1", "dfid-9"]) for _ in range(n)],
            "user_id": [rng.choice(["u1", "u2", "U", "u10", "ü"]) for _ in range(n)],
            "ts": [rng.choice([float("nan"), 1.0, 2.0, 3.0, 1.5]) for _ in range(n)],
            "event_id": [rng.choice([None, "e1", "e2", "e10", "", "E"]) for _ in range(n)],
        }
    )
    if seed % 2:
        pairs = pairs.astype({"anonymous_id": "str", "user_id": "str", "event_id": "str"})
    assert shown(fold_pairs(pairs)) == by_definition(pairs)
    shuffled = pairs.sample(frac=1, random_state=seed)  # exact ties (same time and event id) go by order
    assert shown(fold_pairs(shuffled)) == by_definition(shuffled)


def test_conflicts_and_stitches_follow_the_fold():
    pairs = pd.DataFrame(
        {
            "anonymous_id": ["a", "a", "b", "b", "c"],
            "user_id": ["u2", "u1", "u3", "u3", "u4"],
            "ts": [2.0, 1.0, 5.0, 4.0, float("nan")],
            "event_id": ["e2", "e1", "e5", "e4", None],
        }
    )
    identities = IdentityMap.of_pairs(pairs)
    assert identities.conflicts == {"a": ("u1", "u2")}
    assert identities.users == {"b": ("u3", "e4"), "c": ("u4", None)}
