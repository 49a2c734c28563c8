"""The report on an object store: the state URI is `s3://...` on a local S3-compatible server (moto) on
127.0.0.1, reached through s3fs as deployments reach theirs (fsspec's configuration supplies the endpoint
and test credentials). Run folders are written through their format owners; the report finds the
previous runs by listing `runs/` on the bucket and writes `report.html` at its contract path there.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import fsspec.config
import numpy as np
import pytest
from moto.server import ThreadedMotoServer

from include.datafly_fullstory import outcomes
from include.datafly_fullstory import report as run_report
from include.datafly_fullstory.delivery import timeline
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.stats import RunStats, read_stats, write_stats
from tests.report.report_html import parse_report

BUCKET = "dffs-state"
H0 = datetime(2026, 11, 20, 10, tzinfo=UTC)


@pytest.fixture(scope="module")
def s3_state():
    """An S3 server with an empty bucket; fsspec's s3 config points at it while the module runs."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    saved = fsspec.config.conf.get("s3")
    try:
        host, port = server.get_host_and_port()
        fsspec.config.conf["s3"] = {
            "key": "testing",
            "secret": "testing",
            "endpoint_url": f"http://{host}:{port}",
            "client_kwargs": {"region_name": "eu-west-1"},
            "skip_instance_cache": True,
        }
        fsspec.filesystem("s3").mkdir(BUCKET)
        yield f"s3://{BUCKET}/state"
    finally:
        if saved is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved
        server.stop()


def a_run(state: str, hour: int, rejected: int, *, with_outcomes: bool) -> tuple[RunStore, RunStats]:
    """A run folder (each object store write costs a round trip: the earlier runs get only stats.json)."""
    start = H0 + timedelta(hours=hour)
    store = RunStore(state, f"scheduled__{start.isoformat()}")
    n = 100
    counts = {**dict.fromkeys(outcomes.OUTCOMES, 0), "rejected": rejected, "delivered": n - rejected}
    if with_outcomes:
        outcome = ["rejected"] * rejected + ["delivered"] * (n - rejected)
        reason = ["invalid_argument: bad value"] * rejected + [None] * (n - rejected)
        ids = [f"ev-{hour}-{i}" for i in range(n)]
        outcomes.write_outcomes(store, "mapping", outcomes.frame(np.arange(n), ids, outcome, reason, "event"))
        counts = outcomes.count_by_outcome(outcomes.merge_outcomes(store, n))
    stats = RunStats(
        dag_run_id=store.run_id,
        window_start=start.isoformat(),
        window_end=(start + timedelta(hours=1)).isoformat(),
        artifacts=store.uri(),
    )
    stats.rows = {"read": n, **counts}
    stats.report = run_report.location(store)
    write_stats(store, stats)
    return store, stats


def test_the_report_reads_and_writes_on_an_object_store(s3_state):
    for hour, rejected in ((0, 1), (1, 2)):
        a_run(s3_state, hour, rejected, with_outcomes=False)
    store, stats = a_run(s3_state, 2, 7, with_outcomes=True)
    store.write_bytes(b"{torn", timeline.FOLDER, "timeline-events-00000.json")

    assert run_report.write_report(store, stats) == {"path": store.uri("report.html"), "error": None}
    assert store.uri("report.html") == f"{s3_state}/runs/scheduled__2026-11-20T12_00_00+00_00/report.html"
    assert fsspec.filesystem("s3").exists(store.uri("report.html"))
    page = parse_report(store.read_bytes("report.html").decode())
    data = page.data
    assert [r["rejected"] for r in data["history"]["runs"]] == [1, 2]
    assert data["outcomes"]["rejected"]["rows"] == 7 and page.figure("rows.rejected") == "7"
    assert data["delivery"]["unreadable"] == ["timeline-events-00000.json: JSONDecodeError"]
    assert read_stats(store)["report"]["error"] is None
