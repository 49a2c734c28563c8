"""The run as a whole: plan it, group its chunks for delivery, summarise it.

The DAG's tasks call these functions with plain values taken from the Airflow context; nothing here
imports Airflow, so a run can be planned and summarised in a unit test.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from include.datafly_fullstory import outcomes, stats
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.window import resolve_window

DEFAULT_MAX_REJECTED_RATIO = 0.05


class ParamError(ValueError):
    """A run parameter or Variable the pipeline cannot use."""


def input_errors() -> tuple[type[Exception], ...]:
    """Errors a person must fix (params, the landing's content, the blueprint): an Airflow retry cannot
    help, so the tasks fail at once with the message instead of retrying."""
    from include.datafly_fullstory.blueprint import BlueprintError
    from include.datafly_fullstory.landing import LandingInputError
    from include.datafly_fullstory.window import WindowError

    return (ParamError, WindowError, LandingInputError, BlueprintError)


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
) -> dict[str, Any]:
    """Everything a run's tasks need, as a small JSON-serialisable dict (it travels through XCom)."""
    window = resolve_window(
        window_start=params.get("window_start") or None,
        window_end=params.get("window_end") or None,
        data_interval_start=data_interval_start,
        data_interval_end=data_interval_end,
        run_after=run_after,
    )
    event_types = [str(t) for t in (params.get("event_types") or []) if str(t).strip()]
    ratio = params.get("max_rejected_ratio", DEFAULT_MAX_REJECTED_RATIO)
    if ratio is None or not 0 <= float(ratio) <= 1:
        raise ParamError(f"param max_rejected_ratio={ratio!r} must be between 0 and 1")
    return {
        "run_id": run_id,
        "window": window.as_dict(),
        "landing_uri": resolve_uri(landing_uri, airflow_home),
        "state_uri": resolve_uri(state_uri, airflow_home, default="state"),
        "dry_run": bool(params.get("dry_run", False)),
        "force": bool(params.get("force", False)),
        "replay_dead_letters": bool(params.get("replay_dead_letters", False)),
        "fullstory_conn_id": str(params.get("fullstory_conn_id") or "fullstory_default"),
        "max_rejected_ratio": float(ratio),
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


def summarise_run(
    plan: Mapping[str, Any],
    extracted: Mapping[str, Any],
    mapped: Mapping[str, Any],
    delivery_stats: Iterable[Mapping[str, Any] | None],
) -> tuple[dict[str, Any], list[str]]:
    """Merge the outcomes, write stats.json, and list what needs a person's attention."""
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
        dry_run=plan["dry_run"],
        duration_s=round(time.time() - float(plan["started_at"]), 3),
        validation=extracted.get("validation", {}),
        artifacts=store.uri(),
    )
    run_stats["previously"] = extracted.get("registry", {})
    run_stats["dead_letters"] = merge_dead_letters(store)
    if not plan["dry_run"]:
        from include.datafly_fullstory import registry
        from include.datafly_fullstory.window import Window

        registry.record(store, Window.from_dict(plan["window"]), merged)
    problems = ([pending_reason] if pending_reason else []) + attention_needed(run_stats, plan)
    run_stats["problems"] = problems
    store.write_json(run_stats, "stats.json")
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
    """Reasons to fail the run: rejections above the threshold share of the window's items."""
    problems = []
    items = run_stats["events"]["mapped"] + run_stats["users"]["mapped"]
    rejected = run_stats["events"]["rejected"] + run_stats["users"]["rejected"]
    limit = float(plan.get("max_rejected_ratio", DEFAULT_MAX_REJECTED_RATIO))
    if items and rejected / items > limit:
        problems.append(
            f"FullStory rejected {rejected} of {items} items ({rejected / items:.1%}), above the "
            f"max_rejected_ratio of {limit:.1%}: see dead_letters.parquet in {run_stats.get('artifacts')}"
        )
    return problems


def extract_stage(plan: Mapping[str, Any]) -> dict[str, Any]:
    """Read and validate the window's landing into the run folder (see extract.run_extract), then take
    out the rows an earlier run of the window delivered already (see registry.py)."""
    from include.datafly_fullstory import registry
    from include.datafly_fullstory.extract import run_extract
    from include.datafly_fullstory.window import Window

    store = RunStore(plan["state_uri"], plan["run_id"])
    window = Window.from_dict(plan["window"])
    extracted = run_extract(plan["landing_uri"], window, store)
    extracted["registry"] = registry.apply(store, window, force=plan["force"],
                                           replay_dead_letters=plan["replay_dead_letters"])
    return extracted


def map_stage(plan: Mapping[str, Any], extracted: Mapping[str, Any]) -> dict[str, Any]:
    """Map the validated rows into payload chunks (see mapping.run_mapping)."""
    from include.datafly_fullstory.blueprint import load_blueprint
    from include.datafly_fullstory.mapping import MappingSettings, run_mapping

    store = RunStore(plan["state_uri"], plan["run_id"])
    settings = MappingSettings.from_dict(dict(plan.get("mapping", {})))
    return run_mapping(store, load_blueprint(), settings, now=datetime.now(UTC), window=plan["window"])
