"""The run's stages, as the DAG's tasks call them: extract (read, validate, claim), map, summarise.

Each stage takes the run's `RunPlan` (run.py) and returns small JSON values for XCom; the data stays in the
run folder. Nothing here imports Airflow, so a run can be driven in a unit test (tests/integration/
sync_driver.py does). Where a stage needs the delivery ledger it takes its SQLAlchemy URL as an argument:
the task resolves it from the plan's `ledger`, so a password never travels through XCom.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from include.datafly_fullstory import chunks as chunk_files
from include.datafly_fullstory import dead_letters, outcomes
from include.datafly_fullstory.deletions import deletion_problems
from include.datafly_fullstory.delivery import stops
from include.datafly_fullstory.errors import ParamError, RunProblems
from include.datafly_fullstory.run import RunPlan
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.stats import RunStats
from include.datafly_fullstory.window import Window

STAGES = ("plan", "extract_and_validate", "map_payloads")  # the tasks whose XCom the summary needs


def group_chunks(chunks: Iterable[Mapping[str, Any]], kind: str, group_size: int) -> list[list[str]]:
    """Chunk names of one kind, in groups: one mapped delivery task per group."""
    names = [c["name"] for c in chunks if c["kind"] == kind]
    size = max(1, int(group_size))
    return [names[i : i + size] for i in range(0, len(names), size)]


# ---- stages --------------------------------------------------------------------------------------------


def _ledger(plan: RunPlan, ledger_url: str | None):
    from include.datafly_fullstory.ledger import Ledger

    if plan.dry_run:
        return None
    if not ledger_url:
        raise ParamError("no ledger URL: the task could not resolve the plan's ledger location")
    return Ledger(ledger_url)


def parts_stage(plan: RunPlan) -> list[int]:
    """Plan the window into parts (parts.py) after clearing an earlier extract of the run; returns the part
    numbers, one extract task each."""
    from include.datafly_fullstory import extract, parts

    plan = RunPlan.from_xcom(plan)
    extract.clear(plan.store)
    planned = parts.plan_parts(plan.landing_uri, plan.window, plan.store, max_rows=plan.part_rows)
    return [p.number for p in planned]


def extract_part_stage(plan: RunPlan, part: int) -> dict[str, Any]:
    """Read and validate one part of the window (extract.extract_part)."""
    from include.datafly_fullstory import parts
    from include.datafly_fullstory.extract import extract_part

    plan = RunPlan.from_xcom(plan)
    planned = {p.number: p for p in parts.read(plan.store)}
    if int(part) not in planned:
        raise ParamError(f"part {part} is not in the run's plan of parts ({len(planned)} part(s))")
    return extract_part(plan.landing_uri, plan.window, plan.store, planned[int(part)])


def extract_stage(
    plan: RunPlan, ledger_url: str | None = None, part_results: list[dict] | None = None
) -> dict[str, Any]:
    """Join the window's parts (read by the extract tasks, `part_results`; without them, read here) and the
    look-back's late rows into the run folder, then claim the rows in the delivery ledger (see claims.py).
    A dry run claims nothing."""
    from include.datafly_fullstory import claims, stitching
    from include.datafly_fullstory.extract import run_extract

    plan = RunPlan.from_xcom(plan)
    store, window = plan.store, plan.window
    source = {"part_results": part_results, "part_rows": plan.part_rows}
    ledger = _ledger(plan, ledger_url)
    if ledger is None:
        return {**run_extract(plan.landing_uri, window, store, **source), "claims": {}}
    destination, span, scan_start = plan.destination, plan.span, plan.scan_start
    ledger.start_run(destination, plan.run_id, window=span, scan_start=scan_start.isoformat())
    lookback = late = None
    lease = claims.ClaimOptions().lease_s
    if scan_start < window.start:
        late = _late_stitch(plan, ledger, Window(scan_start, window.start))
        lookback = _lookback(ledger, destination, Window(scan_start, window.start), lease, late)
    extracted = run_extract(plan.landing_uri, window, store, lookback=lookback, **source)
    if late is None:  # identity pairs are learned as early as possible (with a look-back: before it reads)
        stitching.learn(store, ledger, destination, *_identity_inputs(plan))
    options = claims.ClaimOptions(
        force=plan.force,
        replay_dead_letters=plan.replay_dead_letters,
        allow_duplicates=plan.allow_duplicates,
        lease_s=lease,
    )
    report = claims.claim_rows(
        store, ledger, destination, span, options, orphans_since=scan_start.timestamp() if lookback else None
    )
    claims.record_quarantine(store, ledger, destination, span)
    ledger.record_scans(
        destination,
        plan.run_id,
        [tuple(f) for f in extracted["files"]],
        (window.start.timestamp(), window.end.timestamp()),
    )
    if lookback is not None:
        ledger.record_scans(
            destination,
            plan.run_id,
            [tuple(f) for f in extracted["late_files"]],
            (scan_start.timestamp(), window.start.timestamp()),
        )
        extracted["late"]["beyond_lookback"] = _beyond_lookback(ledger, plan, scan_start)
        extracted["late"]["rows_identified"] = late.admitted
    return {**extracted, "claims": report.as_dict()}


def _identity_inputs(plan: RunPlan):
    """The blueprint and mapping settings identity learning reads rows with (consent decides)."""
    from include.datafly_fullstory.blueprint import load_blueprint
    from include.datafly_fullstory.mapping import MappingSettings

    return load_blueprint(plan.blueprint), MappingSettings.from_dict(plan.mapping)


def _late_stitch(plan: RunPlan, ledger, lookback: Window):
    from include.datafly_fullstory.stitching import LateStitch

    return LateStitch(plan.store, ledger, plan.destination, lookback, *_identity_inputs(plan))


def _lookback(ledger, destination: str, window: Window, lease: float, late=None):
    """The look-back: files unchanged since a run read them over this range are not read again (unless a
    dead run left claims there to take over, or hold rows skipped for want of identity whose anonymous id
    is now identified: stitching.LateStitch); of the rows read, only those the ledger has no record of
    (or a stale claim on, or that late stitching names) are the run's."""
    from include.datafly_fullstory import ledger as lg
    from include.datafly_fullstory.extract import LookBack
    from include.datafly_fullstory.landing import DEFAULT_PARTITION_SLACK

    cutoff = lg.wall_clock() - lease
    stale = ledger.stale_claims(destination, since=window.start.timestamp(), claimed_before=cutoff)
    lo, hi = window.start.timestamp(), window.end.timestamp()

    def needed(f) -> tuple[float, float]:
        """The part of the look-back a file can hold rows of: its partition (with the reader's slack for
        clock skew), or all of it in a flat layout."""
        if f.partition is None:
            return lo, hi
        slack = DEFAULT_PARTITION_SLACK.total_seconds()
        return max(lo, f.partition[0].timestamp() - slack), min(hi, f.partition[1].timestamp() + slack)

    only_waiting: set[str] = set()  # unchanged files read again only for their rows waiting for identity

    def select_files(files):
        if stale:
            return files
        seen = ledger.scans(destination, [f.uri for f in files])
        rereads = late.files if late else set()

        def unchanged(f) -> bool:
            return (
                (s := seen.get(f.uri)) is not None
                and s.size == f.size
                and bool(f.mtime)
                and s.mtime == f.mtime
                and s.covered_start <= needed(f)[0]
                and s.covered_end >= needed(f)[1]
            )

        kept = [f for f in files if f.uri in rereads or not unchanged(f)]
        only_waiting.update(f.uri for f in kept if f.uri in rereads and unchanged(f))
        return kept

    def new_rows(frame):
        if only_waiting:  # of those files, only the waiting rows (not, say, rows without an event id)
            frame = frame[~frame["_file"].isin(only_waiting) | frame["event_id"].isin(late.event_ids)]
        ids = frame["event_id"].dropna().astype(str).tolist()
        if not ids:
            return frame
        readmit = late.event_ids if late else set()
        if readmit:
            late.admitted += int(frame["event_id"].isin(readmit).sum())
        if not stale:
            known = ledger.known(destination, ids) - readmit
            return frame[~frame["event_id"].isin(known)]
        found = ledger.lookup(destination, ids)
        drop = {
            e
            for e, item in found.items()
            if e not in readmit
            and not (
                item.state == lg.CLAIMED
                and item.claimed_at < cutoff
                and item.chunk_status in (None, lg.C_CLAIMED, lg.C_ABANDONED)
            )
        }
        return frame[~frame["event_id"].isin(drop)]

    return LookBack(window, select_files, new_rows, late.before if late else None)


def _beyond_lookback(ledger, plan: RunPlan, scan_start: datetime) -> dict[str, Any]:
    """Landing files changed since this destination's previous run whose hour lies before the look-back:
    their rows are too old for any scheduled run, so they are reported (a person reprocesses that window)."""
    from include.datafly_fullstory.landing import list_landing_files

    since = ledger.last_run_started(plan.destination, before_run=plan.run_id)
    if since is None:
        return {"files": 0, "examples": []}
    files = [
        f
        for f in list_landing_files(plan.landing_uri)
        if f.partition is not None and f.partition[1] <= scan_start and f.mtime > since
    ]
    return {"files": len(files), "examples": [f.uri for f in files[:5]]}


def map_prepare_stage(
    plan: RunPlan, extracted: Mapping[str, Any], ledger_url: str | None = None
) -> dict[str, Any]:
    """The mapping's first step (mapping/stage.py prepare_mapping) with the ledger's part in it: chunks an
    earlier try registered but never sent are abandoned (new ones are numbered after the sent ones), and
    the deletion requests, the identity map and earlier runs' consent come from the ledger. Returns what
    the part tasks and the last step need: `parts` (one map task each), `first_number`, `late_from`."""
    from include.datafly_fullstory import stitching
    from include.datafly_fullstory.blueprint import load_blueprint
    from include.datafly_fullstory.mapping import MappingSettings
    from include.datafly_fullstory.mapping.consent import ledger_history
    from include.datafly_fullstory.mapping.stage import prepare_mapping, window_parts
    from include.datafly_fullstory.mapping.suppression import Suppression

    plan = RunPlan.from_xcom(plan)
    store = plan.store
    settings = MappingSettings.from_dict(plan.mapping)
    ledger = _ledger(plan, ledger_url)
    dead_letters.clear(store)
    outcomes.remove_delivery_outcomes(store)  # delivery rewrites them from the ledger
    late_from = int(extracted["rows_read"]) - int(extracted.get("late", {}).get("rows", 0))
    blueprint = load_blueprint(plan.blueprint)
    first = 0
    if ledger is None:  # a dry run: the window's own rows stitch (prepare_mapping's default map)
        prepare_mapping(store, blueprint, settings)
    else:
        destination = plan.destination
        sent = ledger.abandon_unsent_chunks(destination, plan.run_id)
        first = 1 + max((int(c.name.rsplit("-", 1)[1]) for c in sent), default=-1)
        prepare_mapping(
            store,
            blueprint,
            settings,
            keep=[c.name for c in sent],
            consent_history=ledger_history(ledger, destination, plan.run_id),
            suppression=Suppression(*ledger.suppressed_people(destination)),  # deletion requests
            identities=stitching.identity_map(store, ledger, destination, blueprint, settings),
        )
    return {"parts": window_parts(store), "first_number": first, "late_from": late_from}


def map_part_stage(plan: RunPlan, prepared: Mapping[str, Any], part: int) -> dict[str, Any]:
    """Map one window part's events (mapping/stage.py map_part)."""
    from include.datafly_fullstory.blueprint import load_blueprint
    from include.datafly_fullstory.mapping.stage import map_part

    plan = RunPlan.from_xcom(plan)
    return map_part(
        plan.store,
        load_blueprint(plan.blueprint),
        plan.mapping,
        int(part),
        reference_time=plan.window.end,
        first_number=int(prepared["first_number"]),
        late_from=int(prepared["late_from"]),
    )


def map_stage(
    plan: RunPlan,
    extracted: Mapping[str, Any],
    ledger_url: str | None = None,
    prepared: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The mapping's last step: users, outcomes, the manifest (mapping/stage.py finish_mapping); then each
    chunk gets its items in the ledger, the rows mapping will not send are recorded, and the chunks of
    earlier runs this run resumes are listed. Without `prepared` (the first step's result, the parts mapped
    by their own tasks) all three steps run here."""
    from include.datafly_fullstory import claims, stitching
    from include.datafly_fullstory.blueprint import load_blueprint
    from include.datafly_fullstory.mapping import MappingSettings, trait_diff
    from include.datafly_fullstory.mapping.stage import finish_mapping

    plan = RunPlan.from_xcom(plan)
    store, window = plan.store, plan.window
    if prepared is None:
        prepared = map_prepare_stage(plan, extracted, ledger_url)
        for part in prepared["parts"]:
            map_part_stage(plan, prepared, part)
    settings = MappingSettings.from_dict(plan.mapping)
    ledger = _ledger(plan, ledger_url)
    destination = plan.destination
    summary = finish_mapping(
        store,
        load_blueprint(plan.blueprint),
        settings,
        reference_time=window.end,
        window=window,
        first_number=int(prepared["first_number"]),
        unchanged_users=None
        if ledger is None
        else (lambda uids, hashes: ledger.unchanged_traits(destination, uids, hashes)),
        late_from=int(prepared["late_from"]),
        parts=prepared["parts"],
    )
    if ledger is None:
        return summary
    registered = claims.register_chunks(store, ledger, destination, summary["chunks"])
    stitching.record_waits(store, ledger, destination)  # before the skips are settled: never lost
    trait_diff.register(ledger, destination, plan.run_id, registered)
    _settle_mapping_outcomes(store, ledger, destination)
    chunks = registered + chunk_files.resume_entries(store)
    chunk_files.write_manifest(
        store, chunks, **{k: v for k, v in chunk_files.read_manifest(store).items() if k != "chunks"}
    )
    return {**summary, "chunks": chunks}


_UNSENT = {"filtered": "filtered", "skipped": "skipped", "rejected": "invalid"}


def _settle_mapping_outcomes(store: RunStore, ledger, destination: str) -> None:
    """Rows the mapping filtered, skipped or refused are final for this run: the ledger says so."""
    import pyarrow.compute as pc

    table = outcomes.read_partial(store, "mapping", columns=["event_id", "outcome", "reason"])
    if table is None:
        return
    table = table.filter(pc.is_valid(table.column("event_id")))
    ledger.settle_unsent(
        destination,
        store.run_id,
        (
            (e, _UNSENT[o], r)
            for e, o, r in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True)
            if o in _UNSENT
        ),
    )


# ---- summary -------------------------------------------------------------------------------------------


def summarise_run(
    plan: RunPlan | Mapping[str, Any] | None,
    extracted: Mapping[str, Any] | None,
    mapped: Mapping[str, Any] | None,
    delivery_stats: Iterable[Mapping[str, Any] | None],
    ledger_url: str | None = None,
    deletions: Mapping[str, Any] | None = None,
) -> RunStats:
    """Merge the outcomes, write stats.json and record the run in the ledger; `problems` lists what needs a
    person's attention. A stage that returned nothing (it failed) stops the run here, saying which."""
    stopped = [name for name, value in zip(STAGES, (plan, extracted, mapped), strict=True) if value is None]
    if stopped:
        raise RunProblems([f"the run stopped at {stopped[0]} before delivery: see that task's log"])
    plan = RunPlan.from_xcom(plan)
    store = plan.store
    unfinished = undelivered_chunks(store, mapped.get("chunks", []))
    pending_reason = None
    if unfinished:
        why = stops.read_stops(store)
        pending_reason = (
            f"delivery stopped before {len(unfinished)} chunk(s) finished "
            f"({', '.join(unfinished[:5])}{' ...' if len(unfinished) > 5 else ''})"
            + (f": {'; '.join(why)}" if why else "")
            + ". Fix the cause and clear the failed delivery task(s) to resume."
        )
    rows_read = int(extracted["rows_read"])
    counts = outcomes.count_by_outcome(
        outcomes.merge_outcomes(store, rows_read, pending_reason=pending_reason)
    )

    run_stats = RunStats()
    for part in delivery_stats:
        run_stats.add(part)
    run_stats.rows = {"read": rows_read, **counts}
    run_stats.events["mapped"] = int(mapped.get("events_mapped", 0))
    run_stats.users["mapped"] = int(mapped.get("users_mapped", 0))
    run_stats.users["unchanged"] = int(mapped.get("users_unchanged", 0))
    run_stats.type_problems = dict(mapped.get("type_problems") or run_stats.type_problems)
    run_stats.dag_run_id = plan.run_id
    run_stats.window_start, run_stats.window_end = plan.span
    run_stats.destination = plan.destination
    run_stats.dry_run = plan.dry_run
    run_stats.duration_s = round(time.time() - plan.planned_at, 3)
    run_stats.validation = dict(extracted.get("validation", {}))
    run_stats.artifacts = store.uri()
    run_stats.previously = dict(extracted.get("claims", {}))
    run_stats.late = {**extracted.get("late", {}), "lookback_hours": plan.lookback_hours}
    run_stats.identity = {**run_stats.identity, **mapped.get("identity", {})}
    run_stats.events_by_name = dict(mapped.get("events_by_name", {}))
    run_stats.identification = dict(mapped.get("identification", {}))
    run_stats.dead_letters = dead_letters.merge(store)
    run_stats.problems = ([pending_reason] if pending_reason else []) + run_stats.threshold_problems(
        plan.thresholds
    )
    run_stats.deletions = dict(deletions or {})  # the deletions task's figures; a failed DELETE is a problem
    run_stats.problems += deletion_problems(deletions)
    from include.datafly_fullstory import report as run_report

    run_stats.report = run_report.location(store)  # report.html, written right after stats.json
    store.write_json(run_stats.asdict(), "stats.json")
    run_report.write_report(store, run_stats)  # never fails the run: an error goes to stats.json's `report`
    ledger = _ledger(plan, ledger_url)
    if ledger is not None:
        ledger.finish_run(
            plan.destination,
            plan.run_id,
            counts=run_stats.rows,
            late_rows=int(run_stats.late.get("rows", 0)),
            problems=run_stats.problems,
        )
    return run_stats


def undelivered_chunks(store: RunStore, chunks: Iterable[Mapping[str, Any]]) -> list[str]:
    """Chunks of the manifest that have no delivery outcomes yet (delivery writes them when a chunk ends)."""
    done = set(outcomes.partials(store))
    return [c["name"] for c in chunks if f"delivery-{c['name']}" not in done]
