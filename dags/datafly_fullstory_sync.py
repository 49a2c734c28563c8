"""
# Datafly Signal -> FullStory sync

Every hour, the events Datafly Signal landed in the warehouse for the hour that just ended are read
from the Parquet landing, validated, mapped with FullStory's retail blueprint (or the one the `blueprint`
param or the Variable `datafly_fullstory_blueprint` names) and delivered to FullStory's Server API as batch
import jobs, user updates first. Anonymous events are stitched to the user their anonymous id was
identified as (in this window or an earlier one); analytics consent fails closed, and a later denial stops
the person's earlier rows; user updates whose traits are unchanged are not sent again.

**Tasks**: `plan` (the window and settings) -> `plan_parts` (the window in parts of `part_rows` rows)
-> `extract_part` (mapped: each part read and validated, bad rows to the quarantine) -> `extract_and_validate`
(the parts joined, late rows, rows claimed) and `deletions` (deletion requests, see below) ->
`prepare_mapping` (consent, identities) -> `map_part` (mapped: each part's events) -> `map_payloads` (users,
request chunks) -> `deliver_users` -> `deliver_events` (mapped over chunk groups, capped by the
`fullstory_api` pool) -> `summarise` (outcomes, `stats.json`, the asset's metadata). The mapped tasks spread
over the workers of a Celery or Kubernetes deployment (docs/deploying.md).

**Every input row gets exactly one outcome** in `runs/<run_id>/outcomes.parquet` under the state URI:
delivered (stitched ones say so), rejected (see `dead_letters.parquet`), quarantined (see
`quarantine.parquet`), filtered (consent, deletion requests), skipped (with the reason) or dry_run.

**Manual runs** (Trigger DAG w/ config): `window_start` / `window_end` reprocess any window;
`dry_run` maps and writes payloads without sending; `event_types` limits the run; `force` replays a
window's delivered chunks (recorded bytes and keys, within 23 h: FullStory replays, nothing is imported
twice); `replay_dead_letters` re-sends earlier runs' fixable rejections; `allow_duplicates` re-sends
everything and may import duplicates.

**Deletion requests**: user ids and anonymous ids in the file named by the Variable
`datafly_fullstory_deletions_uri` (Parquet or CSV, columns `user_id` / `anonymous_id`) or in the params
`delete_user_ids` / `delete_anonymous_ids` are recorded in the ledger; FullStory is asked to delete each
user once, and no run sends anything about these people again (outcome filtered, "deleted by request").

**Exactly once**: the delivery ledger (SQLite beside the state, or Postgres through the Variable
`datafly_fullstory_ledger_conn_id`) claims every row per FullStory org before anything is sent, so
retries, clears, new and overlapping runs never import an event twice. Scheduled runs also deliver rows
that landed late, over a 24 h look-back.

**Configuration**: connection `fullstory_default` (password = Server API key, extra `org_id` and
`data_region`), Variables `datafly_landing_uri` and `datafly_fullstory_state_uri`, pool `fullstory_api`.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Asset, Param, dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

from fullstory_provider.alerts import RunAlert, finish_deadline, record_failure
from fullstory_provider.operators import FullStoryDeliveryOperator

FULLSTORY_SYNC = Asset(name="datafly_fullstory_sync", uri="fullstory://server-api/datafly-signal")
CHUNKS_PER_DELIVERY_TASK = 4

PARAMS = {
    "window_start": Param(
        None,
        type=["null", "string"],
        format="date-time",
        title="Window start",
        description="Reprocess this window instead of the run's hour (ISO-8601, UTC). Give window_end too.",
    ),
    "window_end": Param(
        None,
        type=["null", "string"],
        format="date-time",
        title="Window end",
        description="End of the reprocessed window, exclusive (ISO-8601, UTC).",
    ),
    "dry_run": Param(
        False,
        type="boolean",
        title="Dry run",
        description="Read, validate, map and write payloads and outcomes; send nothing.",
    ),
    "event_types": Param(
        [],
        type="array",
        items={"type": "string"},
        title="Event types",
        description="Only these Datafly types (page, track, identify) or FullStory event "
        "names (purchase, page_view, ...); empty means all.",
    ),
    "force": Param(
        False,
        type="boolean",
        title="Force replay",
        description="Replay the window's delivered chunks: their recorded bytes under their recorded "
        "idempotency keys, so FullStory answers from its record and imports nothing twice. "
        "Refused when a chunk was first sent more than 23 h ago.",
    ),
    "allow_duplicates": Param(
        False,
        type="boolean",
        title="Allow duplicates (re-import)",
        description="Send every row of the window again in new chunks, whatever the ledger "
        "says: FullStory then holds rows delivered before twice. Only for a "
        "person who checked FullStory.",
    ),
    "blueprint": Param(
        None,
        type=["null", "string"],
        title="Blueprint",
        description="The mapping blueprint for this run: a bundled variant name (retail) or a YAML path "
        "(relative paths are under AIRFLOW_HOME). Default: the Variable datafly_fullstory_blueprint, else "
        "retail.",
    ),
    "lookback_hours": Param(
        None,
        type=["null", "number"],
        minimum=0,
        maximum=336,
        title="Look-back hours",
        description="Also deliver rows that landed late for this many hours before the "
        "window (default 24 for scheduled runs, 0 with window_start/window_end).",
    ),
    "part_rows": Param(
        500_000,
        type="integer",
        minimum=1000,
        title="Rows per part",
        description="The window is read, validated and mapped in parts of at most this many rows (whole "
        "landing files), one task each, so several workers share a window.",
    ),
    "replay_dead_letters": Param(
        False,
        type="boolean",
        title="Replay dead letters",
        description="Also re-send the fixable items FullStory rejected in earlier runs of this window.",
    ),
    "fullstory_conn_id": Param(
        "fullstory_default",
        type="string",
        title="FullStory connection",
        description="The Airflow connection holding the Server API key and org.",
    ),
    "max_rejected_ratio": Param(
        0.05,
        type="number",
        minimum=0,
        maximum=1,
        title="Max rejected share",
        description="Fail the run when more than this share of its rows is rejected, by "
        "FullStory or before sending (see the dead letters).",
    ),
    "max_quarantined_ratio": Param(
        0.10,
        type="number",
        minimum=0,
        maximum=1,
        title="Max quarantined share",
        description="Fail the run when validation quarantines more than this share.",
    ),
    "max_skipped_ratio": Param(
        0.60,
        type="number",
        minimum=0,
        maximum=1,
        title="Max skipped share",
        description="Fail the run when more than this share is skipped (no FullStory "
        "identification, unknown type, ...).",
    ),
    "max_filtered_ratio": Param(
        1.0,
        type="number",
        minimum=0,
        maximum=1,
        title="Max filtered share",
        description="Fail the run when more than this share is filtered (consent, "
        "event_types); 1 never fails.",
    ),
    "max_unknown_rows": Param(
        0,
        type="integer",
        minimum=0,
        title="Max rows of unknown fate",
        description="Fail the run when more rows than this were sent but their fate is "
        "unknown (a lost answer whose key expired): a person checks FullStory.",
    ),
    "delete_user_ids": Param(
        [],
        type="array",
        items={"type": "string"},
        title="Delete users (uids)",
        description="Deletion requests: FullStory deletes these users (DELETE /v2/users?uid=) and no run "
        "sends anything about them again. Recorded once in the ledger; see docs/operations.md.",
    ),
    "delete_anonymous_ids": Param(
        [],
        type="array",
        items={"type": "string"},
        title="Suppress anonymous ids",
        description="Deletion requests for anonymous ids: never sent again (FullStory has no anonymous "
        "users to delete).",
    ),
    "require_explicit_consent": Param(
        False,
        type="boolean",
        title="Require explicit consent",
        description="Send only events with explicit analytics consent "
        "(absent consent counts as granted otherwise).",
    ),
}


@dag(
    dag_id="datafly_fullstory_sync",
    schedule=CronDataIntervalTimetable("@hourly", timezone="UTC"),
    catchup=False,
    max_active_runs=3,
    default_args={
        "owner": "data-eng",
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        "retry_exponential_backoff": True,
        "on_failure_callback": record_failure,  # keeps the task's error for the run's failure alert
    },
    # Alerts (docs/operations.md#alerts): a failed run, and a run not finished in time after its window.
    on_failure_callback=RunAlert(),
    deadline=finish_deadline(),
    params=PARAMS,
    tags=["datafly", "fullstory", "sync"],
    doc_md=__doc__,
)
def datafly_fullstory_sync():
    @task(multiple_outputs=True)
    def plan(**context) -> dict:
        from airflow.configuration import conf
        from airflow.sdk import Variable

        from fullstory_provider.connection import connection_destination
        from include.datafly_fullstory.run import plan_run

        params = context["params"]
        return _fail_fast(
            plan_run,
            params=params,
            run_id=context["run_id"],
            landing_uri=Variable.get("datafly_landing_uri", default=None),
            state_uri=Variable.get("datafly_fullstory_state_uri", default=None),
            airflow_home=conf.get("core", "airflow_home", fallback=None) or _airflow_home(),
            data_interval_start=context.get("data_interval_start"),
            data_interval_end=context.get("data_interval_end"),
            run_after=context["dag_run"].run_after,
            destination=connection_destination(
                params.get("fullstory_conn_id"), dry_run=params.get("dry_run")
            ),
            ledger_conn_id=Variable.get("datafly_fullstory_ledger_conn_id", default=None),
            executor=conf.get("core", "executor", fallback=None),
            blueprint=Variable.get("datafly_fullstory_blueprint", default=None),
            shared_mount=Variable.get("datafly_fullstory_shared_mount", default=None),
        ).to_xcom()

    @task
    def plan_parts(run_plan: dict) -> list[int]:
        from include.datafly_fullstory.pipeline import parts_stage

        return _fail_fast(parts_stage, run_plan)

    @task
    def extract_part(run_plan: dict, part: int) -> dict:
        from include.datafly_fullstory.pipeline import extract_part_stage

        return _fail_fast(extract_part_stage, run_plan, part)

    @task
    def extract_and_validate(run_plan: dict, parts) -> dict:
        from fullstory_provider.ledger_db import ledger_url
        from include.datafly_fullstory.pipeline import extract_stage

        return _fail_fast(extract_stage, run_plan, ledger_url(run_plan["ledger"]), _values(parts))

    @task
    def deletions(run_plan: dict, **context) -> dict:
        """Deletion requests (Variable datafly_fullstory_deletions_uri, params delete_*): recorded, then sent."""
        from airflow.sdk import Variable

        from fullstory_provider.connection import destination_of
        from fullstory_provider.hooks import FullStoryHook
        from fullstory_provider.ledger_db import ledger_url
        from include.datafly_fullstory.deletions import deletions_stage

        params = context["params"]
        hook = None if run_plan["dry_run"] else FullStoryHook(run_plan["fullstory_conn_id"])
        try:
            return _fail_fast(
                deletions_stage,
                run_plan,
                ledger_url(run_plan["ledger"]),
                hook,
                source_uri=Variable.get("datafly_fullstory_deletions_uri", default=None),
                user_ids=params.get("delete_user_ids"),
                anonymous_ids=params.get("delete_anonymous_ids"),
                client_destination=None
                if hook is None
                else destination_of(hook.settings.org_id, hook.settings.data_region),
            )
        finally:
            if hook is not None:
                hook.close()

    @task
    def prepare_mapping(run_plan: dict, extracted: dict) -> dict:
        from fullstory_provider.ledger_db import ledger_url
        from include.datafly_fullstory.pipeline import map_prepare_stage

        return _fail_fast(map_prepare_stage, run_plan, extracted, ledger_url(run_plan["ledger"]))

    @task
    def map_parts(prepared: dict) -> list[int]:
        """The window parts to map: one map_part task each."""
        return list(prepared["parts"])

    @task
    def map_part(run_plan: dict, prepared: dict, part: int) -> dict:
        from include.datafly_fullstory.pipeline import map_part_stage

        return _fail_fast(map_part_stage, run_plan, prepared, part)

    @task
    def map_payloads(run_plan: dict, extracted: dict, prepared: dict, parts) -> dict:
        from fullstory_provider.ledger_db import ledger_url
        from include.datafly_fullstory.pipeline import map_stage

        _values(parts)  # every part mapped (a failed one fails this task upstream)
        return _fail_fast(map_stage, run_plan, extracted, ledger_url(run_plan["ledger"]), prepared)

    @task
    def chunk_groups(mapped: dict, kind: str) -> list[list[str]]:
        """The chunk names of one kind, in groups: one mapped delivery task per group."""
        from include.datafly_fullstory.pipeline import group_chunks

        return group_chunks(mapped["chunks"], kind, CHUNKS_PER_DELIVERY_TASK)

    @task(trigger_rule="all_done", outlets=[FULLSTORY_SYNC])
    def summarise(users, events, **context) -> dict:
        """Runs whatever happened upstream, so a failed delivery still gets its outcomes and stats."""
        from fullstory_provider.ledger_db import ledger_url
        from include.datafly_fullstory.pipeline import STAGES, summarise_run

        # Pulled here, not passed as arguments: a stage that failed has no XCom, and the run should end
        # at once saying so instead of retrying this task.
        stages = [context["ti"].xcom_pull(task_ids=name) for name in STAGES]
        run_stats = _fail_fast(
            summarise_run,
            *stages,
            [*_values(users), *_values(events)],
            ledger_url((stages[0] or {}).get("ledger")),
            deletions=context["ti"].xcom_pull(task_ids="deletions"),
        )
        context["outlet_events"][FULLSTORY_SYNC].extra = run_stats.asset_metadata()
        print(run_stats.asstr())
        _fail_fast(run_stats.raise_on_problems)
        return run_stats.asdict()

    run_plan = plan()
    extracted_parts = extract_part.partial(run_plan=run_plan).expand(part=plan_parts(run_plan))
    extracted = extract_and_validate(run_plan, extracted_parts)
    prepared = prepare_mapping(run_plan, extracted)
    deletions(run_plan) >> prepared  # requests recorded (and their people suppressed) before mapping
    mapped_parts = map_part.partial(run_plan=run_plan, prepared=prepared).expand(part=map_parts(prepared))
    mapped = map_payloads(run_plan, extracted, prepared, mapped_parts)
    delivery = {
        "state_uri": run_plan["state_uri"],
        "run_id": run_plan["run_id"],
        "fullstory_conn_id": run_plan["fullstory_conn_id"],
        "dry_run": run_plan["dry_run"],
        "ledger": run_plan["ledger"],
        "destination": run_plan["destination"],
        "pool": "fullstory_api",
    }
    users = FullStoryDeliveryOperator.partial(task_id="deliver_users", **delivery).expand(
        chunks=chunk_groups.override(task_id="users_chunk_groups")(mapped, "users")
    )
    events = FullStoryDeliveryOperator.partial(
        task_id="deliver_events", trigger_rule="none_failed", **delivery
    ).expand(chunks=chunk_groups.override(task_id="events_chunk_groups")(mapped, "events"))
    users >> events
    summarise(users.output, events.output)


def _fail_fast(stage, *args, **kwargs):
    """Run a pipeline stage; errors a person must fix fail the task without Airflow retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from include.datafly_fullstory.errors import InputError

    try:
        return stage(*args, **kwargs)
    except InputError as exc:
        raise AirflowFailException(str(exc)) from exc


def _values(mapped_output) -> list:
    """A mapped task's return values, by index (iterating probes past the end and logs an error); a failed
    map index has none."""
    if mapped_output is None:
        return []
    values = []
    for i in range(len(mapped_output)):
        try:
            values.append(mapped_output[i])
        except (IndexError, KeyError):
            values.append(None)
    return values


def _airflow_home() -> str:
    import os

    return os.environ.get("AIRFLOW_HOME", os.path.expanduser("~/airflow"))


datafly_fullstory_sync()
