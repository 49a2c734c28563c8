"""Suppression: rows about a person with a deletion request are never sent (outcome `filtered`).

The people come from the delivery ledger's deletion requests for the run's destination (any status: a
person is suppressed from the moment their request is recorded, before FullStory confirmed the deletion).
The rule runs first in `BatchMapper.map_batch`, so no other rule can send the row, and identify rows of the
person are filtered too (no user update is sent). A dry run without a ledger suppresses no one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from include.datafly_fullstory.mapping.columns import _column, _isin

REASON = "deleted by request"


@dataclass(frozen=True)
class Suppression:
    """The user_ids and anonymous_ids whose rows this run must not send."""

    user_ids: frozenset[str] = frozenset()
    anonymous_ids: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.user_ids or self.anonymous_ids)


def suppressed_rows(suppression: Suppression | None, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (its user_id is suppressed, its anonymous_id is suppressed)."""
    none = np.zeros(len(df), dtype=bool)
    if not suppression:
        return none, none
    by_user = _isin(_column(df, "user_id"), suppression.user_ids) if suppression.user_ids else none
    by_anon = (
        _isin(_column(df, "anonymous_id"), suppression.anonymous_ids) if suppression.anonymous_ids else none
    )
    return by_user, by_anon


def suppress(suppression: Suppression | None, verdict, df: pd.DataFrame) -> None:
    """Mark the rows of suppressed people `filtered` (first rule: nothing else decides them)."""
    by_user, by_anon = suppressed_rows(suppression, df)
    verdict.mark(by_user, "filtered", f"{REASON} (user_id is on this destination's deletion list)")
    verdict.mark(by_anon, "filtered", f"{REASON} (anonymous_id is on this destination's deletion list)")


def suppress_stitched(suppression: Suppression | None, verdict, uid: np.ndarray) -> None:
    """Rows stitched to a suppressed user (their anonymous id was identified as that person) are that
    person's rows too: `filtered`, like the rows that carry the user_id themselves."""
    if not suppression or not suppression.user_ids:
        return
    verdict.mark(
        _isin(uid, suppression.user_ids),
        "filtered",
        f"{REASON} (the user this row's anonymous_id was identified as is on this destination's deletion list)",
    )
