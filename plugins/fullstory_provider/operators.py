"""FullStoryDeliveryOperator: payload chunks of one run -> FullStory batch import jobs.

Thin on purpose: the delivery loop, ledger, outcomes and dead letters are plain Python in
`include/datafly_fullstory/delivery.py`; this class wires them to the hook, XCom and Airflow's life cycle.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from fullstory_provider.connection import destination_of
from fullstory_provider.hooks import FullStoryHook
from fullstory_provider.ledger_db import ledger_url
from fullstory_provider.links import XCOM_APP_URL, FullStoryAppLink

if TYPE_CHECKING:
    from airflow.sdk import Context


class FullStoryDeliveryOperator(BaseOperator):
    """Deliver payload chunks of a run as FullStory batch import jobs; safe to re-run.

    :param state_uri: the state store (folder or fsspec URI) holding `runs/<run_id>/` (templated)
    :param run_id: the dag_run_id whose payloads to deliver (templated)
    :param chunks: chunk names from payloads/manifest.json, e.g. ["users-00000"] (templated; expandable)
    :param fullstory_conn_id: the FullStory connection (templated)
    :param dry_run: write outcome `dry_run` for every row and send nothing (templated)
    :param ledger: where the delivery ledger is: ``{"url": "sqlite:///..."}`` or ``{"conn_id": ...}`` of a
        Postgres connection (templated; the plan's ``ledger``)
    :param destination: the FullStory org and region the run claimed its rows for (``<org>@<region>``);
        the connection must name the same, or nothing is sent (templated)
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
        "ledger",
        "destination",
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
        ledger: dict | None = None,
        destination: str | None = None,
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
        self.ledger = ledger
        self.destination = destination
        self.max_in_flight = max_in_flight
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.require_users_first = require_users_first
        self._delivery = None  # the running Delivery, for on_kill

    def execute(self, context: Context) -> dict[str, Any]:
        from include.datafly_fullstory.chunks import load_chunks
        from include.datafly_fullstory.delivery import Delivery, stops, undelivered_users
        from include.datafly_fullstory.errors import DeliveryError
        from include.datafly_fullstory.ledger import Ledger
        from include.datafly_fullstory.state import RunStore
        from include.datafly_fullstory.stats import RunStats

        started = time.monotonic()
        store = RunStore(str(self.state_uri), str(self.run_id))
        chunks = load_chunks(store, _names(self.chunks))
        if _flag(self.dry_run):
            report = Delivery(store, None, None, None).dry_run(chunks)
            self.log.info(
                "FullStory dry run: %d chunk(s), %d rows marked dry_run, nothing sent",
                len(chunks),
                report.dry_run_rows,
            )
            return report.stats({"requests": 0, "retries": 0, "status_counts": {}})
        ledger = Ledger(ledger_url(_location(self.ledger)))
        self._check_users_first(undelivered_users(store, ledger, chunks))
        hook = FullStoryHook(self.fullstory_conn_id)
        ti = context.get("ti")
        stop_record = stops.record_name(getattr(ti, "task_id", self.task_id), getattr(ti, "map_index", -1))
        stops.clear_stop(store, stop_record)
        try:
            settings = hook.settings  # read and check the connection (regions, key) before anything is sent
            destination = destination_of(settings.org_id, settings.data_region)
            if self.destination and destination != self.destination:
                raise AirflowFailException(
                    f"connection {self.fullstory_conn_id!r} now names {destination}, but this run claimed its rows "
                    f"for {self.destination}; nothing was sent. Start a new run for the new org"
                )
            if ti is not None:  # before waiting, so the extra link works even if this try fails
                ti.xcom_push(key=XCOM_APP_URL, value=hook.app_url)
            self._delivery = Delivery(store, hook, ledger, destination, self._settings(), logger=self.log)
            report = self._delivery.run(chunks)
        except Exception as exc:
            # The summarise step reads this to say why rows are still pending (messages carry no secret).
            stops.write_stop(store, stop_record, exc, _names(self.chunks))
            if isinstance(exc, DeliveryError):
                raise AirflowException(str(exc)) from exc
            raise
        finally:
            hook.close()
        stats = report.stats(hook.http_stats())
        summary = RunStats(duration_s=time.monotonic() - started).add(stats)
        self.log.info("FullStory delivery: %s", summary.asstr())
        return stats

    def _settings(self):
        from include.datafly_fullstory.delivery import DeliverySettings

        return DeliverySettings(
            max_in_flight=max(1, int(self.max_in_flight)),
            poll_interval=float(self.poll_interval),
            timeout=float(self.timeout),
        )

    def _check_users_first(self, waiting: list[str]) -> None:
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


def _location(ledger: dict | str | None) -> dict | None:
    """The templated `ledger` argument: a dict, or its JSON / Python text when rendered as a string."""
    if isinstance(ledger, str):
        import ast

        return ast.literal_eval(ledger) if ledger.strip().startswith("{") else {"url": ledger}
    return ledger
