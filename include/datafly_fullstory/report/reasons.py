"""Rows by outcome and the top reasons per outcome, from `outcomes.parquet`, in bounded memory.

The file is read one record batch at a time (outcomes.iter_merged); each batch is grouped with Arrow
(outcome, reason pattern) -> row count, the first full reason, a few example event ids. No row becomes a
Python object: only the groups of a batch do. Reasons that name a run, a time, a row, an id, a chunk or a
job are grouped under one pattern (`run <run>`, `<time>`, ...), so "delivered earlier by run X" for a
thousand runs is one line with one example reason. Should the patterns still be too many (more than
MAX_GROUPS for one outcome), the smallest are folded into `other_reasons`: counts stay exact, only the
split among the rarest reasons is lost, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from include.datafly_fullstory import outcomes
from include.datafly_fullstory.state import RunStore

EXAMPLES = 3  # example event ids per reason
MAX_GROUPS = 1000  # reason patterns tracked per outcome; past that the smallest are folded into `other`
NO_REASON = "(no reason recorded)"

# RE2 patterns (Arrow's regex engine) -> replacement: the parts of a reason that name one run, row or id.
PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\brun (\S*(?:__|\d)\S*?)([:,]\s|\)|\s|$)", r"run <run>\2"),
    (r"\d{4}-\d\d-\d\d[T ][\d:.]+(?:Z|[+-]\d\d:?\d\d)?", "<time>"),
    (r"\(row [^)]*\)", "(row <row>)"),
    (r"anonymous_id \S+ -> user \S+", "anonymous_id <anonymous_id> -> user <user>"),
    (r"\(learned from event [^)]*\)", "(learned from event <event>)"),
    (r"\((user_id|anonymous_id|uid) [^)]*\)", r"(\1 <id>)"),
    (r"\bchunk [a-z]+-\d+", "chunk <chunk>"),
    (r"\bjob (\S*\d\S*?)([:,]\s|\)|\s|$)", r"job <job>\2"),
)


def pattern_of(reasons: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each reason with the parts naming one run, time, row, id, chunk or job replaced by a placeholder.
    The patterns run once per distinct reason (of a batch, most rows share a few), not once per row."""
    encoded = pc.dictionary_encode(pc.fill_null(reasons, NO_REASON))
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    distinct = encoded.dictionary
    for pattern, replacement in PATTERNS:
        distinct = pc.replace_substring_regex(distinct, pattern=pattern, replacement=replacement)
    return pc.take(distinct, encoded.indices)


@dataclass
class Reason:
    reason: str  # the pattern
    rows: int = 0
    example_reason: str | None = None  # one full reason of the group
    examples: list[str] = field(default_factory=list)  # event ids (or `row <n>` when a row has none)


@dataclass
class OutcomeReasons:
    rows: int = 0
    groups: dict[str, Reason] = field(default_factory=dict)
    other_rows: int = 0  # rows of reasons folded away (MAX_GROUPS)
    other_groups: int = 0

    def add(self, reason: str, rows: int, example_reason: str | None, examples: list[str]) -> None:
        group = self.groups.get(reason)
        if group is None:
            group = self.groups[reason] = Reason(reason, example_reason=example_reason)
        group.rows += rows
        group.examples.extend(examples[: EXAMPLES - len(group.examples)])

    def fold(self) -> None:
        """Keep the MAX_GROUPS // 2 largest groups, fold the others into `other`."""
        if len(self.groups) <= MAX_GROUPS:
            return
        ranked = sorted(self.groups.values(), key=lambda g: (-g.rows, g.reason))
        keep, drop = ranked[: MAX_GROUPS // 2], ranked[MAX_GROUPS // 2 :]
        self.groups = {g.reason: g for g in keep}
        self.other_rows += sum(g.rows for g in drop)
        self.other_groups += len(drop)

    def top(self, n: int) -> list[Reason]:
        return sorted(self.groups.values(), key=lambda g: (-g.rows, g.reason))[:n]


def outcome_reasons(store: RunStore, *, batch_size: int = 65_536) -> dict[str, OutcomeReasons]:
    """outcome -> its rows and reasons, for every outcome present in the run's `outcomes.parquet`."""
    found: dict[str, OutcomeReasons] = {}
    columns = ["row", "event_id", "outcome", "reason"]
    for batch in outcomes.iter_merged(store, columns, batch_size=batch_size):
        if not batch.num_rows:
            continue
        example = pc.coalesce(
            batch.column("event_id"),
            pc.binary_join_element_wise("row ", pc.cast(batch.column("row"), pa.string()), ""),
        )
        table = pa.table(
            {
                "outcome": pc.fill_null(batch.column("outcome"), "unknown"),
                "pattern": pattern_of(batch.column("reason")),
                "reason": batch.column("reason"),
                "example": example,
            }
        )
        grouped = table.group_by(["outcome", "pattern"], use_threads=False).aggregate(
            [([], "count_all"), ("reason", "first"), ("example", "list")]
        )
        examples = pc.list_slice(grouped.column("example_list"), 0, EXAMPLES)
        for outcome, pattern, rows, first, ids in zip(
            grouped.column("outcome").to_pylist(),
            grouped.column("pattern").to_pylist(),
            grouped.column("count_all").to_pylist(),
            grouped.column("reason_first").to_pylist(),
            examples.to_pylist(),
            strict=True,
        ):
            entry = found.setdefault(outcome, OutcomeReasons())
            entry.rows += rows
            entry.add(pattern, rows, first, ids)
        for entry in found.values():
            entry.fold()
    return found


def as_data(found: dict[str, OutcomeReasons], read: int, top: int) -> dict[str, Any]:
    """The report's `outcomes` figures: per outcome, rows, share and the `top` reasons."""
    return {
        outcome: {
            "rows": entry.rows,
            "share": entry.rows / read if read else None,
            "reasons": [
                {
                    "reason": g.reason,
                    "rows": g.rows,
                    "share_of_outcome": g.rows / entry.rows if entry.rows else None,
                    "example_reason": g.example_reason,
                    "examples": g.examples,
                }
                for g in entry.top(top)
            ],
            "more_reasons": max(0, len(entry.groups) - top) + entry.other_groups,
            "more_reasons_rows": sum(g.rows for g in entry.groups.values())
            - sum(g.rows for g in entry.top(top))
            + entry.other_rows,
            "folded": entry.other_groups > 0,
        }
        for outcome, entry in found.items()
    }
