"""The window-wide facts the mapping needs before it maps a row, from one read of the validated parts:
the consent revocations (consent.py) and the identity pairs (identity.py).

`revocations(frames, ...)` and `window_pairs(store, ...)` each read the parts' `event_id`, `user_id`,
`anonymous_id`, `timestamp` and `context` and parse the contexts; `prepare_window` reads and parses them
once for both, with the same results (tests/unit/test_prepare.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from include.datafly_fullstory.blueprint import Blueprint
from include.datafly_fullstory.mapping.columns import ParsedJson, _json_values, _timestamps_ns
from include.datafly_fullstory.mapping.consent import (
    ConsentHistory,
    ConsentRules,
    Revocations,
    WindowConsent,
)
from include.datafly_fullstory.mapping.identity import PAIR_COLUMNS, collect_pairs
from include.datafly_fullstory.mapping.settings import MappingSettings
from include.datafly_fullstory.state import RunStore


@dataclass
class WindowFacts:
    revocations: Revocations
    pairs: pd.DataFrame  # identity pairs: anonymous_id, user_id, ts, event_id (identity.collect_pairs)


def prepare_window(
    store: RunStore,
    bp: Blueprint,
    settings: MappingSettings,
    history: ConsentHistory | None = None,
    parts: list[str] | None = None,
    *,
    with_pairs: bool = True,
) -> WindowFacts:
    """`consent.revocations` over the run's validated parts (all, or the named ones) merged through
    `history`, and `identity.window_pairs` of the same parts (unless `with_pairs` is False: a run whose
    identity map comes from the ledger), in one pass."""
    from include.datafly_fullstory import validated

    rules = ConsentRules(bp)
    consent = WindowConsent(rules)
    pairs = []
    names = validated.parts(store) if parts is None else parts
    for name in names:
        table = validated.read_part(store, name, columns=PAIR_COLUMNS)
        for batch in table.to_batches(max_chunksize=settings.batch_rows):
            frame = batch.to_pandas()
            ctx = ParsedJson(_json_values(frame, "context"))
            consent.add(frame, ctx, _timestamps_ns(frame["timestamp"]))
            found = collect_pairs(frame, bp, settings, ctx) if with_pairs else ()
            if len(found):
                pairs.append(found)
    latest, earliest = consent.result()
    if history is not None and earliest is not None:
        latest = history(latest, earliest)
    if pairs:
        pairs = pd.concat(pairs, ignore_index=True)
    else:
        pairs = pd.DataFrame({"anonymous_id": [], "user_id": [], "ts": [], "event_id": []})
    return WindowFacts(Revocations(latest, rules.category), pairs)
