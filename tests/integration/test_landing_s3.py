"""The landing on an object store: a local S3-compatible server (moto) on 127.0.0.1, reached through
s3fs with `endpoint_url` in storage_options: the same code path users get with `s3://` URIs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import s3fs
from moto.server import ThreadedMotoServer

from include.datafly_fullstory import sample
from include.datafly_fullstory.extract import run_extract
from include.datafly_fullstory.landing import LandingError, iter_window_batches, list_window_files
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.window import Window

WINDOW = Window(datetime(2026, 11, 26, 8, tzinfo=UTC), datetime(2026, 11, 26, 9, tzinfo=UTC))
BUCKET = "datafly-landing"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server holding a 3-hour hive landing (uploaded from local files), stopped afterwards."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {
            "key": "testing",
            "secret": "testing",
            "endpoint_url": f"http://{host}:{port}",
            "client_kwargs": {"region_name": "eu-west-1"},
            "skip_instance_cache": True,
        }
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir(BUCKET)
        local = tmp_path_factory.mktemp("landing")
        files = sample.generate_landing(local, 3000, WINDOW.start - timedelta(hours=1), hours=3)
        for path in files:
            fs.put_file(str(path), f"{BUCKET}/events/{path.relative_to(local).as_posix()}")
        yield fs, options, local
    finally:
        server.stop()


def test_reading_a_window_from_s3_matches_the_local_read(s3):
    fs, options, local = s3
    remote = list(iter_window_batches(f"s3://{BUCKET}/events", WINDOW, storage_options=options))
    local_rows = list(iter_window_batches(str(local), WINDOW))
    assert sum(map(len, remote)) == sum(map(len, local_rows)) > 900
    assert [f["event_id"].tolist() for f in remote] == [f["event_id"].tolist() for f in local_rows]
    assert remote[0]["_file"].iloc[0] == f"s3://{BUCKET}/events/dt=2026-11-26/hour=08/part-00000.parquet"


def test_pruning_on_s3_never_opens_far_partitions(s3):
    fs, options, _ = s3
    corrupt = f"{BUCKET}/events/dt=2026-11-25/hour=03/part-00000.parquet"
    fs.pipe_file(corrupt, b"not parquet")
    try:
        files = list_window_files(f"s3://{BUCKET}/events", WINDOW, storage_options=options)
        assert [Path(f).parent.name for f in files] == ["hour=07", "hour=08", "hour=09"]
        assert (
            sum(map(len, iter_window_batches(f"s3://{BUCKET}/events", WINDOW, storage_options=options))) > 900
        )
        early = Window(datetime(2026, 11, 25, 3, tzinfo=UTC), datetime(2026, 11, 25, 4, tzinfo=UTC))
        with pytest.raises(LandingError, match=f"s3://{corrupt}"):
            list(iter_window_batches(f"s3://{BUCKET}/events", early, storage_options=options))
    finally:
        fs.rm(corrupt)


def test_extract_from_s3(s3, tmp_path):
    _, options, _ = s3
    store = RunStore(str(tmp_path / "state"), "manual__s3")
    result = run_extract(f"s3://{BUCKET}/events", WINDOW, store, storage_options=options)
    assert result["rows_read"] == result["rows_valid"] + result["rows_quarantined"] > 900
    assert store.read_json("validation.json")["rows"] == result["rows_read"]


def test_a_missing_prefix_is_an_error(s3):
    _, options, _ = s3
    with pytest.raises(LandingError, match=f"s3://{BUCKET}/nothing-here does not exist"):
        list_window_files(f"s3://{BUCKET}/nothing-here", WINDOW, storage_options=options)


def test_gcs_landings_resolve_through_gcsfs_without_a_code_change():
    """No GCS is reachable here: this checks that gs:// URIs take the same fsspec path as s3:// (the
    dependency is installed and the URI resolves), with anonymous credentials and no request sent."""
    import gcsfs

    from include.datafly_fullstory.landing.files import _open_landing

    landing = _open_landing("gs://datafly-landing/events", {"token": "anon"}, None)
    assert landing.root == "datafly-landing/events" and landing.prefix == "gs://"
    assert isinstance(landing.fs.handler.fs, gcsfs.GCSFileSystem)
