"""The run as a whole: plan it, claim and map its rows, group its chunks for delivery, summarise it.

The DAG's tasks call these functions with plain values taken from the Airflow context; nothing here
imports Airflow, so a run can be planned and summarised in a unit test. Where a stage needs the delivery
ledger it takes its SQLAlchemy URL as an argument (the DAG resolves it from the plan's `ledger`, so a
password never travels through XCom).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from include.datafly_fullstory import outcomes, stats
from include.datafly_fullstory.errors import InputError
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.window import Window, parse_instant, resolve_window

DEFAULT_MAX_REJECTED_RATIO = 0.05
DEFAULT_LOOKBACK_HOURS = 24.0
# Thresholds: the share of the run's rows (or, for `unknown`, the count) above which the run fails.
THRESHOLDS = {
    "max_rejected_ratio": ("rejected", DEFAULT_MAX_REJECTED_RATIO, "rejected (by FullStory or before sending)"),
    "max_quarantined_ratio": ("quarantined", 0.10, "quarantined by validation"),
    "max_skipped_ratio": ("skipped", 0.60, "skipped (no FullStory identification, unknown type, ...)"),
    "max_filtered_ratio": ("filtered", 1.0, "filtered (consent, event_types)"),
    "max_unknown_rows": ("unknown", 0, "of unknown fate (sent, answer lost)"),
}
DISTRIBUTED_EXECUTORS = ("CeleryExecutor", "KubernetesExecutor", "CeleryKubernetesExecutor", "EdgeExecutor")


class ParamError(InputError):
    """A run parameter or Variable the pipeline cannot use."""


def input_errors() -> tuple[type[Exception], ...]:
    """Errors a person must fix (params, the landing's content, the blueprint, a refused force): an
    Airflow retry cannot help, so the tasks fail at once with the message instead of retrying."""
    from include.datafly_fullstory.blueprint import BlueprintError
    from include.datafly_fullstory.landing import LandingInputError
    from include.datafly_fullstory.window import WindowError

    return (InputError, WindowError, LandingInputError, BlueprintError)


def resolve_uri(value: str | None, airflow_home: str, *, default: str | None = None) -> str:
    """A landing or state URI from an Airflow Variable: URIs stay as they are, relative paths are taken
    under AIRFLOW_HOME (so one airflow_settings.yaml serves a laptop and an Astro image)."""
    value = (value or default or "").strip()
    if not value:
        raise ParamError("no landing URI: set the Airflow Variable datafly_landing_uri "
                         "(a folder, s3:// or gs:// URI)")
    if "://" in value:
        return value
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = Path(airflow_home) / path
    return str(path)


def ledger_location(state_uri: str, airflow_home: str, *, conn_id: str | None, executor: str | None) -> dict:
    """Where the delivery ledger lives: `{"conn_id": ...}` (a Postgres connection, for several workers) or
    `{"url": "sqlite:///..."}` (the default: beside a local state folder, or under AIRFLOW_HOME when the
    state is on an object store). A SQLite ledger on a distributed executor is refused: each worker would
    keep its own, and exactly once would hold per machine only."""
    if conn_id:
        return {"conn_id": conn_id}
    if executor and executor.rsplit(".", 1)[-1] in DISTRIBUTED_EXECUTORS:
        raise ParamError(
            f"the executor is {executor.rsplit('.', 1)[-1]}, but the delivery ledger is the SQLite default, which "
            "serves one machine: tasks on other workers would not see each other's claims and could send "
            "an event twice. Set the Airflow Variable datafly_fullstory_ledger_conn_id to a Postgres connection")
    if "://" not in state_uri or state_uri.startswith("file://"):
        folder = Path(state_uri.removeprefix("file://"))
    else:
        folder = Path(airflow_home) / "datafly_fullstory"
    return {"url": f"sqlite:///{folder / 'ledger.sqlite'}"}


def plan_run(
    *,
    params: Mapping[str, Any],
    run_id: str,
    landing_uri: str | None,
    state_uri: str | None,
    airflow_home: str,
    data_interval_start: datetime | None = None,
    data_interval_end: datetime | None = None,
    run_after: datetime | None = None,
    destination: str | None = None,
    ledger_conn_id: str | None = None,
    executor: str | None = None,
) -> dict[str, Any]:
    """Everything a run's tasks need, as a small JSON-serialisable dict (it travels through XCom).

    `destination` is the FullStory org and region the run delivers to (`<org id>@<region>`): the ledger
    keeps exactly once per destination. The planning time is fixed here and never read again."""
    window = resolve_window(
        window_start=params.get("window_start") or None,
        window_end=params.get("window_end") or None,
        data_interval_start=data_interval_start,
        data_interval_end=data_interval_end,
        run_after=run_after,
    )
    event_types = [str(t) for t in (params.get("event_types") or []) if str(t).strip()]
    thresholds = {}
    for name, (_, default, _) in THRESHOLDS.items():
        value = params.get(name, default)
        value = default if value is None else value
        limit = float("inf") if name.endswith("_rows") else 1
        try:
            ok = 0 <= float(value) <= limit
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ParamError(f"param {name}={value!r} must be a number between 0 and {limit}")
        thresholds[name] = float(value)
    manual_window = bool(params.get("window_start") or params.get("window_end"))
    lookback = params.get("lookback_hours")
    lookback = (0.0 if manual_window else DEFAULT_LOOKBACK_HOURS) if lookback is None else float(lookback)
    if not 0 <= lookback <= 24 * 14:
        raise ParamError(f"param lookback_hours={lookback!r} must be between 0 and 336")
    dry_run = bool(params.get("dry_run", False))
    if not dry_run and not destination:
        raise ParamError("no FullStory destination: the connection's org id and region are needed to keep "
                         "exactly once per org")
    state = resolve_uri(state_uri, airflow_home, default="state")
    return {
        "run_id": run_id,
        "window": window.as_dict(),
        "scan_start": (parse_instant(window.start, "window_start") - timedelta(hours=lookback)).isoformat(),
        "lookback_hours": lookback,
        "landing_uri": resolve_uri(landing_uri, airflow_home),
        "state_uri": state,
        "destination": destination,
        "ledger": ledger_location(state, airflow_home, conn_id=ledger_conn_id, executor=executor),
        "dry_run": dry_run,
        "force": bool(params.get("force", False)),
        "replay_dead_letters": bool(params.get("replay_dead_letters", False)),
        "allow_duplicates": bool(params.get("allow_duplicates", False)),
        "fullstory_conn_id": str(params.get("fullstory_conn_id") or "fullstory_default"),
        "max_rejected_ratio": thresholds["max_rejected_ratio"],
        "thresholds": thresholds,
        "mapping": {
            "event_types": event_types,
            "require_explicit_consent": bool(params.get("require_explicit_consent", False)),
        },
        "started_at": time.time(),
    }


def group_chunks(chunks: Iterable[Mapping[str, Any]], kind: str, group_size: int) -> list[list[str]]:
    """Chunk names of one kind, in groups: one mapped delivery task per group."""
    names = [c["name"] for c in chunks if c["kind"] == kind]
    size = max(1, int(group_size))
    return [names[i:i + size] for i in range(0, len(names), size)]


# ---- stages --------------------------------------------------------------------------------------------


def _ledger(plan: Mapping[str, Any], ledger_url: str | None):
    from include.datafly_fullstory.ledger import Ledger

    if plan["dry_run"]:
        return None
    if not ledger_url:
        raise ParamError("no ledger URL: the task could not resolve the plan's ledger location")
    return Ledger(ledger_url)


def extract_stage(plan: Mapping[str, Any], ledger_url: str | None = None) -> dict[str, Any]:
    """Read and validate the window's landing (and the look-back's late rows) into the run folder, then
    claim the rows in the delivery ledger (see claims.py). A dry run claims nothing."""
    from include.datafly_fullstory import claims
    from include.datafly_fullstory.extract import run_extract

    store = RunStore(plan["state_uri"], plan["run_id"])
    window = Window.from_dict(plan["window"])
    ledger = _ledger(plan, ledger_url)
    if ledger is None:
        return {**run_extract(plan["landing_uri"], window, store), "claims": {}}
    destination = plan["destination"]
    span = (window.start.isoformat(), window.end.isoformat())
    ledger.start_run(destination, plan["run_id"], window=span, scan_start=plan["scan_start"])
    scan_start = parse_instant(plan["scan_start"], "scan_start")
    lookback = None
    lease = claims.ClaimOptions().lease_s
    if scan_start < window.start:
        lookback = _lookback(ledger, destination, Window(scan_start, window.start), lease)
    extracted = run_extract(plan["landing_uri"], window, store, lookback=lookback)
    options = claims.ClaimOptions(force=plan["force"], replay_dead_letters=plan["replay_dead_letters"],
                                  allow_duplicates=plan.get("allow_duplicates", False), lease_s=lease)
    report = claims.claim_rows(store, ledger, destination, span, options,
                               orphans_since=scan_start.timestamp() if lookback else None)
    claims.record_quarantine(store, ledger, destination, span)
    ledger.record_scans(destination, plan["run_id"], [tuple(f) for f in extracted["files"]],
                        (window.start.timestamp(), window.end.timestamp()))
    if lookback is not None:
        ledger.record_scans(destination, plan["run_id"], [tuple(f) for f in extracted["late_files"]],
                            (scan_start.timestamp(), window.start.timestamp()))
        extracted["late"]["beyond_lookback"] = _beyond_lookback(ledger, plan, scan_start)
    return {**extracted, "claims": report.as_dict()}


def _lookback(ledger, destination: str, window: Window, lease: float):
    """The look-back: files unchanged since a run read them over this range are not read again (unless a
    dead run left claims there to take over); of the rows read, only those the ledger has no record of
    (or a stale claim on) are the run's."""
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

    def select_files(files):
        if stale:
            return files
        seen = ledger.scans(destination, [f.uri for f in files])
        return [f for f in files if not ((s := seen.get(f.uri)) is not None and s.size == f.size and f.mtime
                                         and s.mtime == f.mtime and s.covered_start <= needed(f)[0]
                                         and s.covered_end >= needed(f)[1])]

    def new_rows(frame):
        ids = frame["event_id"].dropna().astype(str).tolist()
        if not ids:
            return frame
        if not stale:
            known = ledger.known(destination, ids)
            return frame[~frame["event_id"].isin(known)]
        found = ledger.lookup(destination, ids)
        drop = {e for e, item in found.items() if not (
            item.state == lg.CLAIMED and item.claimed_at < cutoff
            and item.chunk_status in (None, lg.C_CLAIMED, lg.C_ABANDONED))}
        return frame[~frame["event_id"].isin(drop)]

    return LookBack(window, select_files, new_rows)


def _beyond_lookback(ledger, plan: Mapping[str, Any], scan_start: datetime) -> dict[str, Any]:
    """Landing files changed since this destination's previous run whose hour lies before the look-back:
    their rows are too old for any scheduled run, so they are reported (a person reprocesses that window)."""
    from include.datafly_fullstory.landing import list_landing_files

    since = ledger.last_run_started(plan["destination"], before_run=plan["run_id"])
    if since is None:
        return {"files": 0, "examples": []}
    files = [f for f in list_landing_files(plan["landing_uri"])
             if f.partition is not None and f.partition[1] <= scan_start and f.mtime > since]
    return {"files": len(files), "examples": [f.uri for f in files[:5]]}


def map_stage(plan: Mapping[str, Any], extracted: Mapping[str, Any], ledger_url: str | None = None) -> dict[str, Any]:
    """Map the claimed rows into payload chunks (see mapping.run_mapping), hand each chunk its items in the
    ledger, record the rows mapping will not send, and list the chunks of earlier runs this run resumes."""
    from include.datafly_fullstory import claims
    from include.datafly_fullstory.blueprint import load_blueprint
    from include.datafly_fullstory.mapping import MappingSettings, run_mapping

    store = RunStore(plan["state_uri"], plan["run_id"])
    settings = MappingSettings.from_dict(dict(plan.get("mapping", {})))
    window = Window.from_dict(plan["window"])
    ledger = _ledger(plan, ledger_url)
    store.remove("dead_letters")
    for name in store.list("outcomes", suffix=".parquet"):
        if name.startswith("delivery-"):  # delivery rewrites them from the ledger
            store.remove("outcomes", name)
    if ledger is None:
        return run_mapping(store, load_blueprint(), settings, reference_time=window.end, window=window)
    destination = plan["destination"]
    sent = ledger.abandon_unsent_chunks(destination, plan["run_id"])
    first = 1 + max((int(c.name.rsplit("-", 1)[1]) for c in sent), default=-1)
    summary = run_mapping(store, load_blueprint(), settings, reference_time=window.end, window=window,
                          keep=[c.name for c in sent], first_number=first)
    registered = claims.register_chunks(store, ledger, destination, summary["chunks"])
    _settle_mapping_outcomes(store, ledger, destination)
    resumed = claims.resume_entries(store)
    chunks = registered + resumed
    manifest = store.read_json("payloads", "manifest.json")
    store.write_json({**manifest, "chunks": chunks}, "payloads", "manifest.json")
    return {**summary, "chunks": chunks}


_UNSENT = {"filtered": "filtered", "skipped": "skipped", "rejected": "invalid"}


def _settle_mapping_outcomes(store: RunStore, ledger, destination: str) -> None:
    """Rows the mapping filtered, skipped or refused are final for this run: the ledger says so."""
    import pyarrow.compute as pc

    if not store.exists("outcomes", "mapping.parquet"):
        return
    table = store.read_table("outcomes", "mapping.parquet", columns=["event_id", "outcome", "reason"])
    table = table.filter(pc.is_valid(table.column("event_id")))
    ledger.settle_unsent(destination, store.run_id, (
        (e, _UNSENT[o], r) for e, o, r in zip(*(table.column(c).to_pylist() for c in table.column_names),
                                               strict=True) if o in _UNSENT))


# ---- summary -------------------------------------------------------------------------------------------


def summarise_run(
    plan: Mapping[str, Any],
    extracted: Mapping[str, Any],
    mapped: Mapping[str, Any],
    delivery_stats: Iterable[Mapping[str, Any] | None],
    ledger_url: str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Merge the outcomes, write stats.json, record the run in the ledger, and list what needs a person's
    attention."""
    store = RunStore(plan["state_uri"], plan["run_id"])
    unfinished = undelivered_chunks(store, mapped.get("chunks", []))
    stops = delivery_stops(store)
    pending_reason = None
    if unfinished:
        pending_reason = (f"delivery stopped before {len(unfinished)} chunk(s) finished "
                          f"({', '.join(unfinished[:5])}{' ...' if len(unfinished) > 5 else ''})"
                          + (f": {'; '.join(stops)}" if stops else "")
                          + ". Fix the cause and clear the failed delivery task(s) to resume.")
    merged = outcomes.merge_outcomes(store, int(extracted["rows_read"]), pending_reason=pending_reason)
    counts = outcomes.count_by_outcome(merged)

    run_stats = stats.empty()
    for part in delivery_stats:
        if part:
            run_stats = stats.merge(run_stats, part)
    run_stats["rows"] = {"read": int(extracted["rows_read"]), **counts}
    run_stats["events"]["mapped"] = int(mapped.get("events_mapped", 0))
    run_stats["users"]["mapped"] = int(mapped.get("users_mapped", 0))
    run_stats.update(
        dag_run_id=plan["run_id"],
        window_start=plan["window"]["start"],
        window_end=plan["window"]["end"],
        destination=plan.get("destination"),
        dry_run=plan["dry_run"],
        duration_s=round(time.time() - float(plan["started_at"]), 3),
        validation=extracted.get("validation", {}),
        artifacts=store.uri(),
    )
    run_stats["previously"] = extracted.get("claims", {})
    run_stats["late"] = {**extracted.get("late", {}), "lookback_hours": plan.get("lookback_hours", 0)}
    run_stats["dead_letters"] = merge_dead_letters(store)
    problems = ([pending_reason] if pending_reason else []) + attention_needed(run_stats, plan)
    run_stats["problems"] = problems
    store.write_json(run_stats, "stats.json")
    ledger = _ledger(plan, ledger_url)
    if ledger is not None:
        ledger.finish_run(plan["destination"], plan["run_id"], counts={"read": int(extracted["rows_read"]), **counts},
                          late_rows=int(run_stats["late"].get("rows", 0)), problems=problems)
    return run_stats, problems


def undelivered_chunks(store: RunStore, chunks: Iterable[Mapping[str, Any]]) -> list[str]:
    """Chunks of the manifest that have no delivery outcomes yet (delivery writes them when a chunk ends)."""
    done = set(store.list("outcomes", suffix=".parquet"))
    return [c["name"] for c in chunks if f"delivery-{c['name']}.parquet" not in done]


def delivery_stops(store: RunStore) -> list[str]:
    """Why delivery tasks stopped, as they recorded it (`delivery_stops/<task>.json`)."""
    return [str(store.read_json("delivery_stops", name).get("error")) for name in
            store.list("delivery_stops", suffix=".json")]


def merge_dead_letters(store: RunStore) -> int:
    """Join the per-chunk dead letters into `dead_letters.parquet`; returns how many there are."""
    import pyarrow as pa

    names = store.list("dead_letters", suffix=".parquet")
    if not names:
        store.remove("dead_letters.parquet")
        return 0
    table = pa.concat_tables([store.read_table("dead_letters", n) for n in names], promote_options="default")
    store.write_table(table, "dead_letters.parquet")
    return table.num_rows


def attention_needed(run_stats: Mapping[str, Any], plan: Mapping[str, Any]) -> list[str]:
    """Reasons to fail the run: a share of rows above a threshold (each row that did not reach FullStory
    counts: rejected before or by FullStory, quarantined, skipped, filtered), or any row of unknown fate.
    Each names its threshold."""
    rows = run_stats["rows"]
    read = rows.get("read", 0)
    limits = {**{n: d for n, (_, d, _) in THRESHOLDS.items()}, **plan.get("thresholds", {})}
    if "max_rejected_ratio" in plan:
        limits["max_rejected_ratio"] = float(plan["max_rejected_ratio"])
    problems = []
    for name, (outcome, _, words) in THRESHOLDS.items():
        count, limit = rows.get(outcome, 0), limits[name]
        if name.endswith("_rows"):
            if count > limit:
                problems.append(f"{count} row(s) {words}: above {name}={limit:g}. Each one's outcome says what "
                                f"to check (outcomes.parquet in {run_stats.get('artifacts')})")
        elif read and count / read > limit:
            where = "dead_letters.parquet" if outcome == "rejected" else "outcomes.parquet"
            problems.append(f"{count} of {read} rows ({count / read:.1%}) {words}: above {name}={limit:.1%}. "
                            f"See {where} in {run_stats.get('artifacts')}")
    return problems
