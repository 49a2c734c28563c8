"""The mapping stage's I/O, in three steps that can run as separate tasks on separate workers:

1. `prepare_mapping`: the window-wide facts every part maps with (consent revocations, the identity map,
   deletion requests), read once from the validated rows and saved (mapping/context.py);
2. `map_part`: one window part's events (its validated parts, batch by batch) -> event chunks numbered in
   the part's own range (`first_number + part * PART_CHUNKS`), its outcomes and identify rows;
3. `finish_mapping`: every part's identify rows folded per user into user chunks, the stage's outcomes
   (`outcomes/mapping.parquet`), the figures and, last, the payload manifest.

`run_mapping` runs the three in one process; either way a row maps to the same outcome and the same body.
"""

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
from include.datafly_fullstory.mapping.consent import ConsentHistory
from include.datafly_fullstory.mapping.context import MappingContext, PartResult
from include.datafly_fullstory.mapping.context import clear as clear_context
from include.datafly_fullstory.mapping.identity import IdentityMap, Stitcher
from include.datafly_fullstory.mapping.prepare import prepare_window
from include.datafly_fullstory.mapping.settings import MappingSettings
from include.datafly_fullstory.mapping.suppression import Suppression
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.window import Window

PART_CHUNKS = 100_000  # event chunk numbers each window part may use


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
    bp = _blueprint(blueprint)
    settings = MappingSettings.from_dict(settings)
    context = prepare_mapping(
        store,
        bp,
        settings,
        keep=keep,
        consent_history=consent_history,
        suppression=suppression,
        identities=identities,
    )
    for part in window_parts(store):
        map_part(
            store,
            bp,
            settings,
            part,
            reference_time=reference_time,
            first_number=first_number,
            late_from=late_from,
            context=context,
        )
    return finish_mapping(
        store,
        bp,
        settings,
        reference_time=reference_time,
        window=window,
        first_number=first_number,
        unchanged_users=unchanged_users,
        late_from=late_from,
        context=context,
    )


def window_parts(store: RunStore) -> list[int]:
    """The window parts the validated rows came from (map_part's unit of work)."""
    return sorted({validated.window_part_of(n) for n in validated.parts(store)}) or [0]


def prepare_mapping(
    store: RunStore,
    blueprint: Blueprint | str | Path | None,
    settings: MappingSettings | dict | None,
    *,
    keep: Iterable[str] = (),
    consent_history: ConsentHistory | None = None,
    suppression: Suppression | None = None,
    identities: IdentityMap | None = None,
) -> MappingContext:
    """Step 1 (see the module docstring): clears `payloads/` (but `keep`) and the mapping's working files,
    reads the window's revocations and, without `identities`, the identity map its own pairs give (one read
    of the validated parts for both: mapping/prepare.py)."""
    bp = _blueprint(blueprint)
    settings = MappingSettings.from_dict(settings)
    clear_payloads(store, set(keep))
    clear_context(store)
    facts = prepare_window(store, bp, settings, consent_history, with_pairs=identities is None)
    if identities is None:
        identities = IdentityMap.of_pairs(facts.pairs)
    context = MappingContext(facts.revocations, identities, suppression or Suppression())
    context.save(store)
    return context


def _mapper(bp, settings, reference_time, context: MappingContext, stitcher, largest_line) -> BatchMapper:
    return BatchMapper(
        bp,
        settings,
        _as_utc(reference_time),
        largest_line=largest_line,
        revocations=context.revocations,
        suppression=context.suppression,
        stitcher=stitcher,
    )


def map_part(
    store: RunStore,
    blueprint: Blueprint | str | Path | None,
    settings: MappingSettings | dict | None,
    part: int,
    *,
    reference_time: datetime | str,
    first_number: int = 0,
    late_from: int | None = None,
    context: MappingContext | None = None,
) -> dict:
    """Step 2: map one window part's events into chunks `events-<first_number + part * PART_CHUNKS + i>`
    and save what else it produced (mapping/context.py). Returns its small summary."""
    bp = _blueprint(blueprint)
    settings = MappingSettings.from_dict(settings)
    context = context or MappingContext.load(store)
    events = ChunkWriter(
        store,
        "events",
        max_items=settings.max_items,
        max_bytes=settings.max_bytes,
        first_number=first_number + part * PART_CHUNKS,
    )
    stitcher = Stitcher(context.identities, late_from)
    mapper = _mapper(bp, settings, reference_time, context, stitcher, events.largest_line())
    outcome_tables, identify_parts, rows_read, problems = [], [], 0, []
    by_name, identification = Counter(), Counter(dict.fromkeys(IDENTIFICATION_MODES, 0))
    for frame in validated.iter_frames(store, settings.batch_rows, names=validated.parts_of(store, part)):
        rows_read += len(frame)
        batch = mapper.map_batch(frame)
        by_name.update(batch.by_name)
        identification.update(batch.identification)
        events.add(batch.lines, np.arange(len(batch.lines)), batch.rows, batch.event_ids)
        identify_parts.append(batch.identify)
        problems.append(type_report.table(mapper.events.types.take_problems()))
        outcome_tables.append(outcomes.to_table(batch.outcomes))
    events.flush()
    if len(events.chunks) > PART_CHUNKS:
        raise ValueError(
            f"window part {part} made {len(events.chunks)} event chunks, more than the {PART_CHUNKS} a part may "
            "number: plan the window in smaller parts"
        )
    summary = {
        "part": part,
        "rows_read": rows_read,
        "chunks": events.chunks,
        "events_by_name": dict(by_name),
        "identification": dict(identification),
    }
    PartResult(
        part,
        summary,
        pa.concat_tables(outcome_tables) if outcome_tables else outcomes.SCHEMA.empty_table(),
        _concat(identify_parts, IDENTIFY_COLUMNS),
        pa.concat_tables(problems) if problems else type_report.table([]),
        stitcher.records(),
    ).save(store)
    return {"part": part, "rows_read": rows_read, "chunks": len(events.chunks)}


def finish_mapping(
    store: RunStore,
    blueprint: Blueprint | str | Path | None,
    settings: MappingSettings | dict | None,
    *,
    reference_time: datetime | str,
    window: Window | None = None,
    first_number: int = 0,
    unchanged_users: trait_diff.UnchangedLookup | None = None,
    late_from: int | None = None,
    context: MappingContext | None = None,
    parts: Iterable[int] | None = None,
) -> dict:
    """Step 3: users from every part's identify rows, the stage's outcomes, figures and the manifest."""
    bp = _blueprint(blueprint)
    settings = MappingSettings.from_dict(settings)
    reference_time = _as_utc(reference_time)
    context = context or MappingContext.load(store)
    results = [PartResult.load(store, n) for n in (window_parts(store) if parts is None else sorted(parts))]
    stitcher = Stitcher(context.identities, late_from)
    users = ChunkWriter(
        store, "users", max_items=settings.max_items, max_bytes=settings.max_bytes, first_number=first_number
    )
    mapper = _mapper(bp, settings, reference_time, context, stitcher, users.largest_line())
    outcome_tables = [r.outcomes for r in results]
    problems = [r.type_problems for r in results]
    by_name, identification = Counter(), Counter(dict.fromkeys(IDENTIFICATION_MODES, 0))
    event_chunks, rows_read = [], 0
    for r in results:
        stitcher.add_records(r.identity)
        by_name.update(r.summary["events_by_name"])
        identification.update(r.summary["identification"])
        event_chunks += r.summary["chunks"]
        rows_read += int(r.summary["rows_read"])
    identify = _concat([r.identify for r in results], IDENTIFY_COLUMNS)
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
    mapping_outcomes = pa.concat_tables([t.cast(outcomes.SCHEMA) for t in outcome_tables])
    outcomes.write_outcomes(store, "mapping", mapping_outcomes)
    chunks = users.chunks + event_chunks
    if window is not None:
        chunks = [
            {**c, "idempotency_key": idempotency_key(store.run_id, window, c["kind"], c["name"], c["sha256"])}
            for c in chunks
        ]
    summary = {
        "chunks": chunks,
        "events_mapped": sum(c["items"] for c in event_chunks),
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


def _blueprint(blueprint: Blueprint | str | Path | None) -> Blueprint:
    return blueprint if isinstance(blueprint, Blueprint) else load_blueprint(blueprint or "retail")


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
