"""The API server's report pages: a FastAPI app the plugin mounts at `/datafly-fullstory` (reports.py says
what is served and why it is safe).

    GET /datafly-fullstory/runs/<run id>/report.html   the run's report (text/html)

Authentication and authorisation are Airflow's own: the route depends on the core API's
`requires_access_dag("GET", RUN)` for `datafly_fullstory_sync`, which takes the user from the JWT in the
`Authorization: Bearer` header or the UI's session cookie, through the configured auth manager. Without a
token the answer is 401, with an invalid one 403, for a user who may not read this DAG's runs 403; only
then is the run looked up (404 for a run id that is not one of this DAG's runs, or a run without report).

The app is built on first use (`create_app`), in the API server only: importing this module loads neither
FastAPI nor the pipeline.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at run
# time, and they name things imported inside create_app().
import json
import os

from fullstory_provider.reports import (
    DAG_ID,
    REPORT_NAME,
    SECURITY_HEADERS,
    STATE_URI_VARIABLE,
    URL_PREFIX,
    ReportNotFound,
    check_run_id,
    read_report,
    state_location,
)

APP_NAME = "datafly_fullstory_reports"
_app = None


def app_spec() -> dict:
    """The plugin's `fastapi_apps` entry (the app is built once per process)."""
    global _app
    if _app is None:
        _app = create_app()
    return {"app": _app, "url_prefix": URL_PREFIX, "name": APP_NAME}


def create_app():
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.common.db.common import SessionDep
    from airflow.api_fastapi.core_api.security import requires_access_dag
    from fastapi import Depends, FastAPI, HTTPException, status
    from fastapi.responses import Response

    app = FastAPI(title="Datafly FullStory run reports", docs_url=None, redoc_url=None, openapi_url=None)
    may_read_runs = Depends(requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=DAG_ID))

    def not_found(reason: str) -> HTTPException:
        return HTTPException(status.HTTP_404_NOT_FOUND, reason)

    @app.get(f"/runs/{{run_id}}/{REPORT_NAME}", dependencies=[may_read_runs])
    def run_report(run_id: str, session: SessionDep) -> Response:
        """The run's HTML report."""
        try:
            check_run_id(run_id)
            if not _is_run_of_the_dag(session, run_id):
                raise ReportNotFound(f"{DAG_ID} has no run {run_id!r}")
            body = read_report(_state_uri(session, run_id), run_id)
        except ReportNotFound as exc:
            raise not_found(str(exc)) from None
        return Response(body, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    @app.get("/runs/{run_id}/{name}", dependencies=[may_read_runs])
    def other_file(run_id: str, name: str) -> Response:
        """Any other file of a run folder: refused."""
        raise not_found(f"only a run's {REPORT_NAME} is served here")

    return app


def _is_run_of_the_dag(session, run_id: str) -> bool:
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    return (
        session.scalar(select(DagRun.id).where(DagRun.dag_id == DAG_ID, DagRun.run_id == run_id)) is not None
    )


def _state_uri(session, run_id: str) -> str:
    """The state URI the run planned with (its `plan` task's `state_uri` XCom), so a report stays
    reachable after the Variable changes; else the Variable as the plan would resolve it now."""
    from airflow.configuration import AIRFLOW_HOME, conf
    from airflow.models.variable import Variable
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    value = session.scalar(
        select(XComModel.value).where(
            XComModel.dag_id == DAG_ID,
            XComModel.run_id == run_id,
            XComModel.task_id == "plan",
            XComModel.map_index == -1,
            XComModel.key == "state_uri",
        )
    )
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            pass
    home = conf.get("core", "airflow_home", fallback=None) or os.environ.get("AIRFLOW_HOME") or AIRFLOW_HOME
    return state_location(
        value if isinstance(value, str) else None,
        Variable.get(STATE_URI_VARIABLE, default_var=None),
        home,
    )
