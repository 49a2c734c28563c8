"""A sync run's HTML report in the Airflow UI: its URL, which requests name one, where it is read from.

The report is `<state URI>/runs/<run id>/report.html`, written by the run's `summarise` task. The API
server serves it (report_app.py) under `/datafly-fullstory/runs/<run id>/report.html` to users logged in
to Airflow who may read this DAG's runs. A request names a run id; before anything is read it must match
Airflow's run id alphabet, must not start with a dot, and must be a run of `datafly_fullstory_sync` in
the metadata database (report_app.py looks it up). The path is then built by the state store
(`RunStore`), never by joining the request's text, and only the one file name is ever served: the run
folder's other files (outcomes, dead letters, payloads) are not.

Plain logic, no FastAPI and no Airflow imports at module level: Airflow executes every file of the plugins
folder when it loads plugins, in every component.
"""

from __future__ import annotations

import os
import re
from pathlib import PurePosixPath
from urllib.parse import quote

DAG_ID = "datafly_fullstory_sync"
URL_PREFIX = "/datafly-fullstory"
REPORT_NAME = "report.html"
STATE_URI_VARIABLE = "datafly_fullstory_state_uri"
# Airflow's own run id alphabet ([scheduler] allowed_run_id_pattern's default), bounded in length, and no
# leading dot: `.` and `..` would name the runs folder itself or its parent.
_RUN_ID = re.compile(r"[A-Za-z0-9_~:+-][A-Za-z0-9_.~:+-]{0,249}")
# What the report page may do in the browser: show itself (inline CSS, data: images), run no script, load
# nothing, and live in an opaque origin (sandbox), so no markup in a report can act as the logged-in user.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class ReportNotFound(LookupError):
    """No report to serve for the request; the message says why, without any path of the server."""


def report_path(run_id: str) -> str:
    """The report's path under the API server's base URL (the run id percent-encoded, `/` included)."""
    return f"{URL_PREFIX}/runs/{quote(run_id, safe='')}/{REPORT_NAME}"


def report_url(run_id: str, base_url: str | None) -> str:
    """The report's URL: under `[api] base_url` when it is set, else a path on the UI's own origin."""
    return f"{(base_url or '').rstrip('/')}{report_path(run_id)}"


def check_run_id(run_id: str) -> str:
    """The run id, when it may name a run folder; ReportNotFound otherwise."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ReportNotFound("not a run id of this DAG")
    return run_id


def state_location(planned: str | None, variable: str | None, airflow_home: str) -> str:
    """Where the run's folder is: the state URI the run planned with (the `plan` task's XCom), else the
    Variable `datafly_fullstory_state_uri`, else `state/` under AIRFLOW_HOME, as the plan resolves it."""
    from include.datafly_fullstory.run import resolve_uri

    if isinstance(planned, str) and planned.strip():
        return planned.strip()
    return resolve_uri(variable, airflow_home, default="state")


def read_report(state_uri: str, run_id: str) -> bytes:
    """The report of `run_id` under `state_uri` (a folder or an fsspec URI); ReportNotFound when absent."""
    from include.datafly_fullstory.state import RunStore

    store = RunStore(state_uri, check_run_id(run_id))
    _inside_runs(store)
    if not store.exists(REPORT_NAME):
        raise ReportNotFound(
            f"run {run_id} has no report yet: its summarise task writes {REPORT_NAME} when the run ends"
        )
    return store.read_bytes(REPORT_NAME)


def _inside_runs(store) -> None:
    """Belt and braces: the report's path is a child of the state's runs folder (local paths resolved)."""
    runs = PurePosixPath(store.root).parent
    target = PurePosixPath(store.path(REPORT_NAME))
    if store.is_local:
        runs = PurePosixPath(os.path.realpath(runs))
        target = PurePosixPath(os.path.realpath(target))
    if target.parent.parent != runs or target.name != REPORT_NAME:
        raise ReportNotFound("not a run id of this DAG")
