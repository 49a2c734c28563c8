"""FullStoryDeliveryOperator: payload chunks of one run -> FullStory batch import jobs.

Thin on purpose: the delivery loop, ledger, outcomes and dead letters are plain Python in
`include/datafly_fullstory/delivery.py`; this class wires them to the hook, XCom and Airflow's life cycle.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from fullstory_provider.hooks import FullStoryHook
from fullstory_provider.links import XCOM_APP_URL, FullStoryAppLink
from include.datafly_fullstory.delivery import (
    Delivery,
    DeliveryError,
    DeliveryReport,
    DeliverySettings,
    load_chunks,
    undelivered_users,
)
from include.datafly_fullstory.state import RunStore

if TYPE_CHECKING:
    from airflow.sdk import Context


class FullStoryDeliveryOperator(BaseOperator):
    """Deliver payload chunks of a run as FullStory batch import jobs; safe to re-run.

    :param state_uri: the state store (folder or fsspec URI) holding `runs/<run_id>/` (templated)
    :param run_id: the dag_run_id whose payloads to deliver (templated)
    :param chunks: chunk names from payloads/manifest.json, e.g. ["users-00000"] (templated; expandable)
    :param fullstory_conn_id: the FullStory connection (templated)
    :param dry_run: write outcome `dry_run` for every row and send nothing (templated)
    :param force: re-submit chunks the ledger says are complete, with the same Idempotency-Keys, so
        FullStory replays its first answers within its 24 h key window (templated)
    :param max_in_flight: batch jobs in progress at once for this task
    :param poll_interval: first wait before polling a job, seconds (grows 1.5x per poll, up to 30 s)
    :param timeout: seconds for the whole delivery; jobs still processing are resumed by a re-run
    :param require_users_first: refuse events chunks while users chunks of the same run are not delivered
        (False: only warn)
    """

    template_fields: Sequence[str] = (
        "state_uri",
        "run_id",
        "chunks",
        "fullstory_conn_id",
        "dry_run",
        "force",
    )
    operator_extra_links = (FullStoryAppLink(),)
    ui_color = "#8d5cf6"

    def __init__(
        self,
        *,
        state_uri: str,
        run_id: str,
        chunks: list[str] | str,
        fullstory_conn_id: str = FullStoryHook.default_conn_name,
        dry_run: bool | str = False,
        force: bool | str = False,
        max_in_flight: int = 4,
        poll_interval: float = 2.0,
        timeout: float = 3600.0,
        require_users_first: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.state_uri = state_uri
        self.run_id = run_id
        self.chunks = chunks
        self.fullstory_conn_id = fullstory_conn_id
        self.dry_run = dry_run
        self.force = force
        self.max_in_flight = max_in_flight
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.require_users_first = require_users_first
        self._delivery: Delivery | None = None

    def execute(self, context: Context) -> dict[str, Any]:
        started = time.monotonic()
        store = RunStore(str(self.state_uri), str(self.run_id))
        chunks = load_chunks(store, _names(self.chunks))
        if _flag(self.dry_run):
            report = Delivery(store, client=None).dry_run(chunks)  # type: ignore[arg-type] - never called
            self.log.info(
                "FullStory dry run: %d chunk(s), %d rows marked dry_run, nothing sent",
                len(chunks),
                report.dry_run_rows,
            )
            return report.stats({"requests": 0, "retries": 0, "status_counts": {}})
        self._check_users_first(store, chunks)
        hook = FullStoryHook(self.fullstory_conn_id)
        ti = context.get("ti")
        stop_record = f"{getattr(ti, 'task_id', self.task_id)}-{getattr(ti, 'map_index', -1)}.json"
        store.remove("delivery_stops", stop_record)
        try:
            hook.settings  # noqa: B018 - read and check the connection (regions, key) before anything is sent
            if ti is not None:  # before waiting, so the extra link works even if this try fails
                ti.xcom_push(key=XCOM_APP_URL, value=hook.app_url)
            self._delivery = Delivery(store, hook, self._settings(), logger=self.log)
            report = self._delivery.run(chunks)
        except Exception as exc:
            # The summarise step reads this to say why rows are still pending (messages carry no secret).
            store.write_json({"error": f"{type(exc).__name__}: {exc}", "chunks": _names(self.chunks)},
                             "delivery_stops", stop_record)
            if isinstance(exc, DeliveryError):
                raise AirflowException(str(exc)) from exc
            raise
        finally:
            hook.close()
        stats = report.stats(hook.http_stats())
        self.log.info("%s", _summary(report, stats, time.monotonic() - started))
        return stats

    def _settings(self) -> DeliverySettings:
        return DeliverySettings(
            max_in_flight=max(1, int(self.max_in_flight)),
            poll_interval=float(self.poll_interval),
            timeout=float(self.timeout),
            force=_flag(self.force),
        )

    def _check_users_first(self, store: RunStore, chunks) -> None:
        waiting = undelivered_users(store, chunks)
        if not waiting:
            return
        message = (
            f"events chunks were given while users chunks of run {self.run_id} are not delivered yet: "
            f"{', '.join(waiting[:5])}{' ...' if len(waiting) > 5 else ''}. Events refer to users by uid, so "
            "deliver the users chunks first (the DAG's users task), then re-run this task"
        )
        if self.require_users_first:
            raise AirflowException(message)
        self.log.warning("%s (continuing: require_users_first=False)", message)

    def on_kill(self) -> None:
        # Every ledger write is atomic and job ids are recorded before polling, so stopping here leaves a
        # ledger a re-run can resume from. FullStory has no call to cancel a batch job; jobs run to the end.
        if self._delivery is not None:
            self._delivery.stop()
            self.log.info(
                "FullStory delivery stopped; in-flight jobs stay in the ledger and a re-run polls them"
            )


def _names(chunks: list[str] | str) -> list[str]:
    if isinstance(chunks, str):
        return [name.strip() for name in chunks.split(",") if name.strip()]
    return [str(name) for name in chunks]


def _flag(value: bool | str) -> bool:
    """Templated booleans arrive as strings ("False") unless the DAG renders native objects."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _summary(report: DeliveryReport, stats: dict[str, Any], seconds: float) -> str:
    http = stats["http"]
    return (
        f"FullStory delivery: {report.chunks} chunk(s) ({report.already_complete} already complete, "
        f"{report.resumed} resumed, {report.submitted} submitted, {report.refused} refused); "
        f"events {stats['events']['delivered']} delivered / {stats['events']['rejected']} rejected, "
        f"users {stats['users']['delivered']} delivered / {stats['users']['rejected']} rejected; "
        f"{http['requests']} requests ({http['retries']} retries), {stats['batches']} batches, "
        f"{stats['bytes_sent']} bytes in {seconds:.1f}s"
    )
