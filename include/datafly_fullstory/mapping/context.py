"""The mapping's working files in the run folder, between its tasks: this module writes and reads them.

The mapping runs as one `prepare` step (window-wide facts), one task per window part (events) and one
`finish` step (users, outcomes, the manifest); see mapping/stage.py. Under `mapping/`:
- `context/revocations.parquet`, `context/identities.parquet`, `context/suppression.json`: what every part
  maps with (consent revocations of the window and earlier runs, the identity map, deletion requests);
- `part-KKKKK/`: what part K produced besides its event chunks: `outcomes.parquet` (its rows the mapping
  did not send), `identify.parquet` (its identify rows, folded per user by `finish`),
  `type_problems.parquet`, `identity.parquet` (its stitching records) and `summary.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from include.datafly_fullstory.mapping.consent import Revocations
from include.datafly_fullstory.mapping.identity import IdentityMap
from include.datafly_fullstory.mapping.suppression import Suppression
from include.datafly_fullstory.state import RunStore

FOLDER = "mapping"
CONTEXT = (FOLDER, "context")

_REVOCATIONS = pa.schema([("person", pa.string()), ("at_ns", pa.int64()), ("event_id", pa.string())])
_IDENTITIES = pa.schema(
    [
        ("anonymous_id", pa.string()),
        ("user_id", pa.string()),
        ("event_id", pa.string()),
        ("other_user_id", pa.string()),
    ]
)


@dataclass
class MappingContext:
    revocations: Revocations
    identities: IdentityMap
    suppression: Suppression = field(default_factory=Suppression)

    def save(self, store: RunStore) -> None:
        rev = self.revocations
        people = list(rev.at_ns)
        store.write_table(
            pa.table(
                {
                    "person": pa.array(people, pa.string()),
                    "at_ns": pa.array([int(rev.at_ns[p]) for p in people], pa.int64()),
                    "event_id": pa.array([_text(rev.event_id.get(p)) for p in people], pa.string()),
                },
                schema=_REVOCATIONS,
            ),
            *CONTEXT,
            "revocations.parquet",
        )
        users, conflicts = self.identities.users, self.identities.conflicts
        anon = [*users, *conflicts]
        store.write_table(
            pa.table(
                {
                    "anonymous_id": anon,
                    "user_id": [users[a][0] for a in users] + [conflicts[a][0] for a in conflicts],
                    "event_id": [_text(users[a][1]) for a in users] + [None] * len(conflicts),
                    "other_user_id": [None] * len(users) + [conflicts[a][1] for a in conflicts],
                },
                schema=_IDENTITIES,
            ),
            *CONTEXT,
            "identities.parquet",
        )
        store.write_json(
            {
                "category": rev.category,
                "user_ids": sorted(self.suppression.user_ids),
                "anonymous_ids": sorted(self.suppression.anonymous_ids),
            },
            *CONTEXT,
            "suppression.json",
        )

    @classmethod
    def load(cls, store: RunStore) -> MappingContext:
        meta = store.read_json(*CONTEXT, "suppression.json")
        rev = store.read_table(*CONTEXT, "revocations.parquet").to_pandas()
        revocations = Revocations(
            pd.DataFrame(
                {
                    "person": rev["person"].to_numpy(dtype=object),
                    "at_ns": rev["at_ns"].to_numpy(dtype=np.int64),
                    "event_id": rev["event_id"].to_numpy(dtype=object),
                }
            ),
            meta["category"],
        )
        identities = IdentityMap()
        table = store.read_table(*CONTEXT, "identities.parquet")
        for anon, user, event_id, other in zip(
            *(table.column(c).to_pylist() for c in _IDENTITIES.names), strict=True
        ):
            if other is None:
                identities.users[anon] = (user, event_id)
            else:
                identities.conflicts[anon] = (user, other)
        suppression = Suppression(frozenset(meta["user_ids"]), frozenset(meta["anonymous_ids"]))
        return cls(revocations, identities, suppression)


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def clear(store: RunStore) -> None:
    store.remove(FOLDER)


def _part(number: int) -> tuple[str, str]:
    return FOLDER, f"part-{number:05d}"


@dataclass
class PartResult:
    """What one part's event mapping produced (besides its chunks)."""

    number: int
    summary: dict
    outcomes: pa.Table
    identify: pd.DataFrame
    type_problems: pa.Table
    identity: pa.Table

    def save(self, store: RunStore) -> None:
        where = _part(self.number)
        store.remove(*where)
        store.write_table(self.outcomes, *where, "outcomes.parquet")
        store.write_table(
            pa.Table.from_pandas(self.identify, preserve_index=False), *where, "identify.parquet"
        )
        store.write_table(self.type_problems, *where, "type_problems.parquet")
        store.write_table(self.identity, *where, "identity.parquet")
        store.write_json(self.summary, *where, "summary.json")  # last: the part is complete

    @classmethod
    def load(cls, store: RunStore, number: int) -> PartResult:
        where = _part(number)
        if not store.exists(*where, "summary.json"):
            raise FileNotFoundError(
                f"{store.uri(*where)}: part {number} of the mapping has no results; its map_part task did "
                "not finish. Clear it (and what follows) to map it again."
            )
        return cls(
            number,
            store.read_json(*where, "summary.json"),
            store.read_table(*where, "outcomes.parquet"),
            store.read_table(*where, "identify.parquet").to_pandas(),
            store.read_table(*where, "type_problems.parquet"),
            store.read_table(*where, "identity.parquet"),
        )
