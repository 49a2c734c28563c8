"""The mapping stage's I/O: `run_mapping` reads a run's validated parts batch by batch, writes event and user
chunks through the payload writers, this stage's outcomes and, last, the payload manifest."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from include.datafly_fullstory import outcomes, validated
from include.datafly_fullstory.blueprint import Blueprint, load_blueprint
from include.datafly_fullstory.chunks import ChunkWriter, clear_payloads, idempotency_key, write_manifest
from include.datafly_fullstory.mapping import trait_diff, type_report
from include.datafly_fullstory.mapping.batch import IDENTIFICATION_MODES, IDENTIFY_COLUMNS, BatchMapper
from include.datafly_fullstory.mapping.consent import SCAN_COLUMNS, ConsentHistory, revocations
from include.datafly_fullstory.mapping.identity import IdentityMap, Stitcher, window_pairs
from include.datafly_fullstory.mapping.settings import MappingSettings
from include.datafly_fullstory.mapping.suppression import Suppression
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.window import Window


def run_mapping(
    store: RunStore,
    blueprint: Blueprint | str | Path | None,
    settings: MappingSettings | dict | None,
    *,
    reference_time: datetime | str,
    window: Window | None = None,
    keep: Iterable[str] = (),
    first_number: int = 0,
    consent_history: ConsentHistory | None = None,
    unchanged_users: trait_diff.UnchangedLookup | None = None,
    suppression: Suppression | None = None,
    identities: IdentityMap | None = None,
    late_from: int | None = None,
) -> dict:
    """Map `validated/part-*.parquet` into `payloads/` chunks, `outcomes/mapping.parquet` and, last,
    `payloads/manifest.json`. Returns the manifest's summary.

    A pure function of the rows, the blueprint, the settings and `reference_time` (the run's window end,
    fixed when the run was planned): the same rows map to the same bytes whenever they are mapped.
    Re-running replaces `payloads/`, except the chunks named in `keep` (chunks an earlier try sent, whose
    bytes the ledger points at); new chunks are numbered from `first_number`. With the run's `window`, each
    chunk entry carries its `idempotency_key` (see chunks.idempotency_key). Before any row is mapped, the
    window's consent is read to find revocations (mapping/consent.py), merged with earlier runs' through
    `consent_history` (the ledger's) when given. With `unchanged_users` (the
    ledger's trait lookup), user updates equal to the last one delivered are not sent (trait_diff.py);
    values that cannot take their declared type are not sent and go to `type_problems.parquet`. Rows of the people in
    `suppression` (deletion requests) are filtered (mapping/suppression.py). `identities`: the identity map
    events without a user_id or session id are stitched with (identity.py; rows from `late_from` on are the
    look-back's; None: the map the rows' own pairs give); the mapping is a pure function of the rows and that
    map too."""
    bp = blueprint if isinstance(blueprint, Blueprint) else load_blueprint(blueprint or "retail")
    settings = MappingSettings.from_dict(settings)
    reference_time = _as_utc(reference_time)
    clear_payloads(store, set(keep))
    events = ChunkWriter(
        store, "events", max_items=settings.max_items, max_bytes=settings.max_bytes, first_number=first_number
    )
    revoked = revocations(
        validated.iter_frames(store, settings.batch_rows, columns=SCAN_COLUMNS), bp, consent_history
    )
    if identities is None:
        identities = IdentityMap.of_pairs(window_pairs(store, bp, settings))
    stitcher = Stitcher(identities, late_from)
    mapper = BatchMapper(
        bp,
        settings,
        reference_time,
        largest_line=events.largest_line(),
        revocations=revoked,
        suppression=suppression,
        stitcher=stitcher,
    )
    outcome_tables, identify_parts, rows_read, problems = [], [], 0, []
    by_name, identification = Counter(), Counter(dict.fromkeys(IDENTIFICATION_MODES, 0))
    for frame in validated.iter_frames(store, settings.batch_rows):
        rows_read += len(frame)
        batch = mapper.map_batch(frame)
        by_name.update(batch.by_name)
        identification.update(batch.identification)
        events.add(batch.lines, np.arange(len(batch.lines)), batch.rows, batch.event_ids)
        identify_parts.append(batch.identify)
        problems.append(type_report.table(mapper.events.types.take_problems()))
        outcome_tables.append(outcomes.to_table(batch.outcomes))
    events.flush()
    users = ChunkWriter(
        store, "users", max_items=settings.max_items, max_bytes=settings.max_bytes, first_number=first_number
    )
    identify = _concat(identify_parts, IDENTIFY_COLUMNS)
    user_lines, user_index, user_outcomes = mapper.fold_users(identify)
    problems.append(
        type_report.name_user_rows(type_report.table(mapper.events.types.take_problems()), identify)
    )
    user_lines, user_index, unchanged, n_unchanged = trait_diff.drop_unchanged(
        user_lines, user_index, unchanged_users
    )
    outcome_tables.append(outcomes.to_table(unchanged))
    users.add(user_lines, *user_index)
    users.flush()
    outcome_tables.append(outcomes.to_table(user_outcomes))
    mapping_outcomes = pa.concat_tables(outcome_tables) if outcome_tables else outcomes.SCHEMA.empty_table()
    outcomes.write_outcomes(store, "mapping", mapping_outcomes)
    chunks = users.chunks + events.chunks
    if window is not None:
        chunks = [
            {**c, "idempotency_key": idempotency_key(store.run_id, window, c["kind"], c["name"], c["sha256"])}
            for c in chunks
        ]
    summary = {
        "chunks": chunks,
        "events_mapped": sum(c["items"] for c in events.chunks),
        "users_mapped": len(user_lines),
        "users_unchanged": n_unchanged,
        "type_problems": type_report.summary(type_report.write(store, problems)),
        "rows": {"read": rows_read, **_count_outcomes(mapping_outcomes)},
        "identity": stitcher.finish(store, mapping_outcomes),
        "events_by_name": dict(by_name.most_common()),
        "identification": dict(identification),
    }
    write_manifest(
        store,
        summary["chunks"],
        **{k: v for k, v in summary.items() if k != "chunks"},
        blueprint={"name": bp.name, "variant": bp.variant, "version": bp.version},
        settings=settings.as_dict(),
        reference_time=reference_time.isoformat(),
    )
    return summary


def _count_outcomes(table: pa.Table) -> dict[str, int]:
    counts = outcomes.count_by_outcome(table)
    return {k: counts[k] for k in ("filtered", "skipped", "rejected")}


def _concat(frames: list[pd.DataFrame], columns: tuple[str, ...]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({c: [] for c in columns})


def _as_utc(when: datetime | str) -> datetime:
    if isinstance(when, str):
        when = datetime.fromisoformat(when.replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(f"reference_time={when.isoformat()} has no time zone; give it in UTC")
    return when.astimezone(UTC)
