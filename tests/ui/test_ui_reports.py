"""Which requests name a run's report, where it is read from (a folder or an object store), its link.

The pages themselves, behind Airflow's login, are tested against a real api-server in
tests/integration/test_ui_airflow.py.
"""

from __future__ import annotations

import re
import uuid

import pytest
import s3fs
from moto.server import ThreadedMotoServer

from fullstory_provider.links import RunReportLink
from fullstory_provider.reports import (
    DAG_ID,
    REPORT_NAME,
    SECURITY_HEADERS,
    ReportNotFound,
    check_run_id,
    read_report,
    report_path,
    report_url,
    state_location,
)
from include.datafly_fullstory.state import RunStore

RUN_IDS = (
    "scheduled__2026-11-20T10:00:00+00:00",
    "manual__2026-11-20T10:03:12.123456+00:00",
    "backfill__2026-11-20T09:00:00+00:00",
    "asset_triggered__2026-11-20T10:00:00.5+00:00",
    "ui_ok",
    "my~run.1",
)
REFUSED = (
    "",
    ".",
    "..",
    ".hidden",
    "../runs",
    "a/b",
    "a\\b",
    "/etc/passwd",
    "a%2Fb",
    "run\x00id",
    "run id",
    "x" * 251,
    "ümlaut",
)


@pytest.mark.parametrize("run_id", RUN_IDS)
def test_airflow_run_ids_are_accepted(run_id):
    assert check_run_id(run_id) == run_id


@pytest.mark.parametrize("run_id", REFUSED)
def test_paths_and_strange_run_ids_are_refused(run_id):
    with pytest.raises(ReportNotFound, match="not a run id of this DAG"):
        check_run_id(run_id)


def test_report_url_encodes_the_run_id_whole():
    run_id = "manual__2026-11-20T10:00:00+00:00"
    assert (
        report_path(run_id) == "/datafly-fullstory/runs/manual__2026-11-20T10%3A00%3A00%2B00%3A00/report.html"
    )
    assert report_url("a/b", "https://airflow.example.com/") == (
        "https://airflow.example.com/datafly-fullstory/runs/a%2Fb/report.html"
    )
    assert report_url("r1", None) == "/datafly-fullstory/runs/r1/report.html"


def test_the_report_is_read_from_the_run_folder_and_nothing_else(tmp_path):
    state = str(tmp_path / "state")
    run_id = RUN_IDS[0]
    store = RunStore(state, run_id)
    with pytest.raises(ReportNotFound, match=f"run {re.escape(run_id)} has no report yet"):
        read_report(state, run_id)
    store.write_bytes(b"<html>the report</html>", REPORT_NAME)
    store.write_bytes(b'{"rows": {}}', "stats.json")
    assert read_report(state, run_id) == b"<html>the report</html>"
    # A file beside the runs folder is not reachable by any run id.
    (tmp_path / "state" / REPORT_NAME).write_text("outside")
    for bad in ("..", ".", "../state"):
        with pytest.raises(ReportNotFound):
            read_report(state, bad)


def test_a_run_folder_that_links_elsewhere_is_refused(tmp_path):
    state = tmp_path / "state"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / REPORT_NAME).write_text("not a run's")
    (state / "runs").mkdir(parents=True)
    (state / "runs" / "linked").symlink_to(elsewhere)
    with pytest.raises(ReportNotFound, match="not a run id"):
        read_report(str(state), "linked")


def test_state_location_prefers_the_runs_own_plan(tmp_path):
    home = str(tmp_path)
    assert state_location("s3://bucket/state", "other", home) == "s3://bucket/state"
    assert state_location(None, "gs://b/state", home) == "gs://b/state"
    assert state_location("", "custom", home) == str(tmp_path / "custom")
    assert state_location(None, None, home) == str(tmp_path / "state")


def test_reports_on_an_object_store(tmp_path, monkeypatch):
    # moto's in-process servers share one backend: a bucket name of its own, whatever ran before
    bucket = f"dffs-ui-{uuid.uuid4().hex[:12]}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3fs.S3FileSystem(
            key="testing",
            secret="testing",
            endpoint_url=endpoint,
            client_kwargs={"region_name": "eu-west-1"},
            skip_instance_cache=True,
        ).mkdir(bucket)
        # The API server reaches the store with its standard credentials, as the workers do.
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "eu-west-1",
        }.items():
            monkeypatch.setenv(name, value)
        run_id = RUN_IDS[1]
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(ReportNotFound, match="has no report yet"):
            read_report(f"s3://{bucket}/state", run_id)
        RunStore(f"s3://{bucket}/state", run_id).write_bytes(b"<p>on s3</p>", REPORT_NAME)
        assert read_report(f"s3://{bucket}/state", run_id) == b"<p>on s3</p>"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


class _Key:
    def __init__(self, dag_id, run_id, task_id="summarise"):
        self.dag_id, self.run_id, self.task_id, self.map_index, self.try_number = (
            dag_id,
            run_id,
            task_id,
            -1,
            1,
        )


def test_the_run_report_link_answers_for_the_sync_dag_only(monkeypatch):
    link = RunReportLink()
    assert link.name == "Run report"
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com")
    url = link.get_link(None, ti_key=_Key(DAG_ID, "scheduled__2026-11-20T10:00:00+00:00"))
    assert url == (
        "https://airflow.example.com/datafly-fullstory/runs/"
        "scheduled__2026-11-20T10%3A00%3A00%2B00%3A00/report.html"
    )
    for task in ("deliver_users", "deliver_events", "plan"):
        assert link.get_link(None, ti_key=_Key(DAG_ID, "r1", task)).endswith("/runs/r1/report.html")
    assert link.get_link(None, ti_key=_Key("another_dag", "r1")) == ""


def test_the_page_runs_no_script_and_loads_nothing():
    csp = SECURITY_HEADERS["Content-Security-Policy"]
    assert csp.startswith("sandbox;") and "default-src 'none'" in csp and "script-src" not in csp
    assert SECURITY_HEADERS["X-Content-Type-Options"] == "nosniff"
