"""`LandingSpec`: what to generate, the rows, their time span, the seed and the bad-row share."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class LandingSpec:
    rows: int
    start: datetime
    end: datetime
    seed: int = 7
    bad_fraction: float = 0.004
    denied_fraction: float = 0.03
