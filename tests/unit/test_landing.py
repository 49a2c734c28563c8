"""The Parquet landing reader: layouts, variations, window membership, pruning, errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import fsspec.implementations.local
import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from include.datafly_fullstory import sample
from include.datafly_fullstory.landing import (
    FRAME_COLUMNS,
    LandingError,
    iter_window_batches,
    list_window_files,
)
from include.datafly_fullstory.window import Window

H7 = datetime(2026, 11, 26, 7, tzinfo=UTC)
HOUR = timedelta(hours=1)
WINDOW = Window(H7 + HOUR, H7 + 2 * HOUR)  # 08:00-09:00


def read(uri, window=WINDOW, **kwargs) -> pd.DataFrame:
    frames = list(iter_window_batches(str(uri), window, **kwargs))
    return pd.concat(frames) if frames else pd.DataFrame(columns=list(FRAME_COLUMNS))


def event(i: int, ts: datetime | None, **overrides) -> dict:
    row = {
        "event_id": f"e{i}",
        "type": "track",
        "event": "Product Added",
        "anonymous_id": f"a{i}",
        "timestamp": ts,
        "received_at": (ts or H7) + timedelta(seconds=1),
        "context": '{"ip": "203.0.113.9"}',
        "properties": '{"sku": "S1"}',
    }
    row.update(overrides)
    return row


def write(path: Path, rows: list[dict], schema: pa.Schema | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, **kwargs)
    return path


NS_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("type", pa.string()),
        ("event", pa.string()),
        ("anonymous_id", pa.string()),
        ("timestamp", pa.timestamp("ns", "UTC")),
        ("received_at", pa.timestamp("ns", "UTC")),
        ("context", pa.string()),
        ("properties", pa.string()),
    ]
)


@pytest.fixture(scope="module")
def sample_landing(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("landing")
    sample.generate_landing(out, 6000, H7, hours=3, files_per_hour=2)
    return out


# -- the frame contract -----------------------------------------------------------------------------


def test_frame_has_every_column_in_order_with_contract_types(sample_landing):
    frames = list(iter_window_batches(str(sample_landing), WINDOW, batch_size=700))
    assert all(list(f.columns) == list(FRAME_COLUMNS) for f in frames)
    assert all(len(f) <= 700 for f in frames) and len(frames) > 2
    df = pd.concat(frames)
    for column in ("timestamp", "received_at", "sent_at"):
        assert str(df[column].dtype) == "datetime64[ns, UTC]"
    assert df["_row"].dtype == np.int64
    assert df["_row"].tolist() == list(range(len(df)))
    assert (df.index == df["_row"]).all()
    assert df["_file"].str.contains("hour=08").all()
    assert ((df["timestamp"] >= WINDOW.start) & (df["timestamp"] < WINDOW.end)).all()
    assert orjson.loads(df["context"].dropna().iloc[0])["page"]


def test_rows_are_deterministic_in_path_then_file_order(sample_landing):
    a = read(sample_landing, batch_size=333)
    b = read(sample_landing, batch_size=5000)
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    files = a["_file"].drop_duplicates().tolist()
    assert files == sorted(files) and len(files) == 2
    expected = pd.concat(pq.read_table(f).to_pandas() for f in files)
    assert a["event_id"].tolist() == expected["event_id"].tolist()


def test_flat_and_hive_layouts_give_the_same_rows(tmp_path):
    table = sample.generate_table(sample.LandingSpec(rows=3000, start=H7, end=H7 + 3 * HOUR))
    sample.write_landing(table, tmp_path / "hive", layout="hive")
    sample.write_landing(table, tmp_path / "flat", layout="flat")
    hive, flat = read(tmp_path / "hive"), read(tmp_path / "flat")
    assert len(hive) > 900
    assert hive["event_id"].tolist() == flat["event_id"].tolist()
    assert (flat["_file"].str.endswith("events-20261126T08-00000.parquet")).all()


def test_list_window_files_skips_hidden_files(sample_landing, tmp_path):
    (sample_landing / "_SUCCESS").write_text("")
    files = list_window_files(str(sample_landing), WINDOW, partition_slack=timedelta(0))
    assert [Path(f).parent.name for f in files] == ["hour=08", "hour=08"]
    assert len(read(sample_landing)) > 0


# -- variations -------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("tz", [None, "UTC", "Europe/Berlin"])
def test_timestamp_units_and_zones(tmp_path, unit, tz):
    stamps = [
        H7 + timedelta(minutes=59, seconds=59),
        WINDOW.start,
        WINDOW.end - timedelta(seconds=1),
        WINDOW.end,
    ]
    schema = NS_SCHEMA.set(4, pa.field("timestamp", pa.timestamp(unit, tz)))
    schema = schema.set(5, pa.field("received_at", pa.timestamp(unit, tz)))
    rows = [event(i, ts if tz else ts.replace(tzinfo=None)) for i, ts in enumerate(stamps)]
    for row in rows:
        row["received_at"] = row["timestamp"]
    write(tmp_path / "part.parquet", rows, schema)
    df = read(tmp_path)
    assert df["event_id"].tolist() == ["e1", "e2"]
    assert df["timestamp"].tolist() == [
        pd.Timestamp(WINDOW.start),
        pd.Timestamp(WINDOW.end - timedelta(seconds=1)),
    ]


def test_timestamps_as_iso_strings_and_epoch_numbers(tmp_path):
    inside = WINDOW.start + timedelta(minutes=5)
    iso = [
        inside.isoformat(),
        (inside + timedelta(hours=1)).astimezone().isoformat(),
        "2026-11-26T08:30:00",
        "not a time",
        None,
    ]
    received = [inside.isoformat()] * 5
    write(
        tmp_path / "a-iso.parquet",
        [
            event(i, None, timestamp=t, received_at=r)
            for i, (t, r) in enumerate(zip(iso, received, strict=True))
        ],
    )
    epochs = [
        int(inside.timestamp()),
        int(inside.timestamp() * 1e3),
        int(inside.timestamp() * 1e6),
        int(inside.timestamp() * 1e9),
        int(WINDOW.end.timestamp()),
    ]
    write(
        tmp_path / "b-epoch.parquet",
        [event(10 + i, None, timestamp=e, received_at=epochs[0]) for i, e in enumerate(epochs)],
    )
    df = read(tmp_path)
    # "not a time" and None have no timestamp: they belong to the window of their received_at
    assert df["event_id"].tolist() == ["e0", "e2", "e3", "e4", "e10", "e11", "e12", "e13"]
    assert df["timestamp"].isna().tolist() == [False, False, True, True, False, False, False, False]
    assert set(df["timestamp"].dropna()) == {pd.Timestamp(inside), pd.Timestamp("2026-11-26T08:30:00Z")}


def test_json_columns_as_struct_map_and_list_become_json_text(tmp_path):
    context = pa.array([{"page": {"url": "https://x.example/", "path": "/"}, "ip": "203.0.113.1"}, None])
    traits = pa.array(
        [[("email", "ada@example.com"), ("plan", "pro")], None], type=pa.map_(pa.string(), pa.string())
    )
    props = pa.array([[1, 2], [3]], type=pa.list_(pa.int64()))
    ts = pa.array([WINDOW.start, WINDOW.start], type=pa.timestamp("us", "UTC"))
    table = pa.table(
        {
            "event_id": ["e1", "e2"],
            "type": ["identify", "identify"],
            "anonymous_id": ["a", "b"],
            "timestamp": ts,
            "received_at": ts,
            "context": context,
            "traits": traits,
            "properties": props,
        }
    )
    pq.write_table(table, tmp_path / "nested.parquet")
    df = read(tmp_path)
    assert orjson.loads(df["context"].iloc[0]) == {
        "page": {"url": "https://x.example/", "path": "/"},
        "ip": "203.0.113.1",
    }
    assert orjson.loads(df["traits"].iloc[0]) == {"email": "ada@example.com", "plan": "pro"}
    assert df["properties"].tolist() == ["[1,2]", "[3]"]  # validation rejects these: not objects
    assert df["context"].isna().tolist() == [False, True]


def test_missing_optional_extra_and_reordered_columns(tmp_path):
    row = event(1, WINDOW.start)
    reordered = {
        "received_at": row["received_at"],
        "warehouse_loaded_at": "x",
        "anonymous_id": "a1",
        "timestamp": row["timestamp"],
        "type": "page",
        "event_id": "e1",
    }
    write(tmp_path / "p.parquet", [reordered])
    df = read(tmp_path)
    assert list(df.columns) == list(FRAME_COLUMNS)
    assert (
        df[["event", "name", "user_id", "sent_at", "context", "properties", "traits", "source_id"]]
        .isna()
        .all()
        .all()
    )
    assert df.iloc[0][["event_id", "type", "anonymous_id"]].tolist() == ["e1", "page", "a1"]


def test_files_with_different_schemas_in_one_landing(tmp_path):
    write(tmp_path / "a.parquet", [event(1, WINDOW.start)], NS_SCHEMA)
    naive_ms = pa.table(
        {
            "anonymous_id": ["a2"],
            "event_id": ["e2"],
            "type": ["page"],
            "user_id": [7],
            "timestamp": pa.array([WINDOW.start.replace(tzinfo=None)], pa.timestamp("ms")),
            "received_at": pa.array([WINDOW.start.replace(tzinfo=None)], pa.timestamp("ms")),
            "context": pa.array([{"locale": "de-DE"}]),
            "event_id_extra": pa.array([1.5]),
        }
    )
    pq.write_table(naive_ms, tmp_path / "b.parquet")
    write(
        tmp_path / "c.parquet",
        [event(3, WINDOW.start, type=None)],
        NS_SCHEMA.set(1, pa.field("type", pa.dictionary(pa.int32(), pa.string()))),
    )
    df = read(tmp_path)
    assert df["event_id"].tolist() == ["e1", "e2", "e3"]
    assert df["user_id"].tolist()[1] == "7"
    assert df["context"].tolist()[1] == '{"locale":"de-DE"}'
    assert df["timestamp"].nunique() == 1


# -- window membership ------------------------------------------------------------------------------


def test_null_timestamp_rows_belong_to_the_window_of_received_at(tmp_path):
    rows = [
        event(1, None, received_at=WINDOW.start + timedelta(minutes=1)),
        event(2, None, received_at=WINDOW.end + timedelta(minutes=1)),
        event(3, WINDOW.start - timedelta(seconds=1), received_at=WINDOW.start + timedelta(seconds=1)),
    ]
    write(tmp_path / "p.parquet", rows, NS_SCHEMA)
    assert read(tmp_path)["event_id"].tolist() == ["e1"]


def test_rows_without_any_time_belong_to_their_partition_hour(tmp_path):
    timeless = event(1, None, received_at=None)
    write(tmp_path / "dt=2026-11-26" / "hour=08" / "p.parquet", [timeless], NS_SCHEMA)
    write(tmp_path / "dt=2026-11-26" / "hour=09" / "p.parquet", [event(2, None, received_at=None)], NS_SCHEMA)
    df = read(tmp_path)
    assert df["event_id"].tolist() == ["e1"]
    assert df["timestamp"].isna().all()


def test_skewed_rows_in_a_neighbouring_hour_partition_are_read(tmp_path):
    """Clock skew: an 08:59 event landed in hour=09 (and a 09:00 one in hour=08): the 08-09 window reads
    the neighbours by default, and only with partition_slack=0 misses them."""
    write(
        tmp_path / "dt=2026-11-26" / "hour=08" / "p.parquet",
        [event(1, WINDOW.start + timedelta(minutes=3)), event(2, WINDOW.end)],
        NS_SCHEMA,
    )
    write(
        tmp_path / "dt=2026-11-26" / "hour=09" / "p.parquet",
        [event(3, WINDOW.end - timedelta(seconds=1)), event(4, WINDOW.end + timedelta(minutes=5))],
        NS_SCHEMA,
    )
    assert read(tmp_path)["event_id"].tolist() == ["e1", "e3"]
    assert read(tmp_path, partition_slack=timedelta(0))["event_id"].tolist() == ["e1"]
    later = Window(WINDOW.end, WINDOW.end + HOUR)
    assert read(tmp_path, window=later)["event_id"].tolist() == ["e2", "e4"]


class CountingFileSystem(fsspec.implementations.local.LocalFileSystem):
    """A local filesystem that records every file it opens."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.opened: list[str] = []

    def _open(self, path, mode="rb", **kwargs):
        self.opened.append(path)
        return super()._open(path, mode, **kwargs)


@pytest.fixture(scope="module")
def year_landing(tmp_path_factory) -> Path:
    """A year of daily partitions (one file at 12:00 each day) and every hour of 2026-11-26."""
    root = tmp_path_factory.mktemp("year")
    day = datetime(2026, 1, 1, 12, tzinfo=UTC)
    while day.year == 2026:
        write(root / f"dt={day:%Y-%m-%d}" / "hour=12" / "part-0.parquet", [event(0, day)], NS_SCHEMA)
        day += timedelta(days=1)
    for hour in range(24):
        ts = datetime(2026, 11, 26, hour, 30, tzinfo=UTC)
        write(root / "dt=2026-11-26" / f"hour={hour:02d}" / "part-0.parquet", [event(hour, ts)], NS_SCHEMA)
    return root


def test_partition_pruning_opens_only_the_window_and_its_neighbours(year_landing):
    fs = CountingFileSystem()
    df = read(year_landing, filesystem=fs)
    assert df["event_id"].tolist() == ["e8"]
    opened = sorted({Path(p).parent.name for p in fs.opened})
    assert opened == ["hour=07", "hour=08", "hour=09"]
    assert all("dt=2026-11-26" in p for p in fs.opened)
    fs.opened.clear()
    read(year_landing, filesystem=fs, partition_slack=timedelta(0))
    assert {Path(p).parent.name for p in fs.opened} == {"hour=08"}


def test_a_corrupt_file_in_another_hour_is_never_opened(year_landing, tmp_path):
    corrupt = year_landing / "dt=2026-11-26" / "hour=15" / "part-1.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    try:
        assert read(year_landing)["event_id"].tolist() == ["e8"]
        with pytest.raises(LandingError, match="hour=15/part-1.parquet"):
            read(year_landing, window=Window(WINDOW.start + 7 * HOUR, WINDOW.end + 7 * HOUR))
    finally:
        corrupt.unlink()


# -- errors and empty windows -------------------------------------------------------------------------


def test_a_corrupt_file_stops_the_read_naming_the_file(tmp_path):
    write(tmp_path / "a.parquet", [event(1, WINDOW.start)], NS_SCHEMA)
    (tmp_path / "b.parquet").write_bytes(b"garbage")
    with pytest.raises(LandingError, match=r"b\.parquet.*Re-export"):
        read(tmp_path)


def test_a_truncated_file_stops_the_read_before_any_row(tmp_path):
    good = write(tmp_path / "b.parquet", [event(i, WINDOW.start) for i in range(50)], NS_SCHEMA)
    data = good.read_bytes()
    write(tmp_path / "a.parquet", [event(1, WINDOW.start)], NS_SCHEMA)
    (tmp_path / "b.parquet").write_bytes(data[: len(data) // 2])
    batches = iter_window_batches(str(tmp_path), WINDOW)
    with pytest.raises(LandingError, match="b.parquet"):
        next(batches)


def test_corrupt_data_pages_stop_the_read_naming_the_file(tmp_path):
    rows = [event(i, WINDOW.start, properties=f'{{"n": "{"x" * 50}{i}"}}') for i in range(2000)]
    path = write(tmp_path / "p.parquet", rows, NS_SCHEMA, compression="none", use_dictionary=False)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4000] = b"\xff" * 4000  # the footer stays intact: the scan itself must fail
    path.write_bytes(bytes(data))
    with pytest.raises(LandingError, match=r"cannot read .*p\.parquet.*corrupt"):
        read(tmp_path)


def test_missing_required_columns_are_named_with_the_file(tmp_path):
    write(tmp_path / "p.parquet", [{"event_id": "e1", "type": "page", "timestamp": WINDOW.start}])
    with pytest.raises(
        LandingError, match=r"p\.parquet: required column\(s\) missing: anonymous_id, received_at"
    ):
        read(tmp_path)


def test_unusable_column_types_are_named_with_the_file(tmp_path):
    rows = [event(1, WINDOW.start, event_id={"id": 1}, timestamp=True)]
    write(tmp_path / "p.parquet", rows)
    with pytest.raises(LandingError, match=r"event_id \(struct<id: int64>\), timestamp \(bool\)"):
        read(tmp_path)


def test_empty_windows_are_zero_rows(tmp_path):
    write(tmp_path / "dt=2026-11-26" / "hour=03" / "p.parquet", [event(1, H7 - 4 * HOUR)], NS_SCHEMA)
    assert list(iter_window_batches(str(tmp_path), WINDOW)) == []
    write(tmp_path / "dt=2026-11-26" / "hour=08" / "p.parquet", [event(1, H7 - 4 * HOUR)], NS_SCHEMA)
    assert list(iter_window_batches(str(tmp_path), WINDOW)) == []
    write(tmp_path / "dt=2026-11-26" / "hour=08" / "empty.parquet", [], NS_SCHEMA)
    assert list(iter_window_batches(str(tmp_path), WINDOW)) == []


def test_a_landing_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(LandingError, match="does not exist: check the Airflow Variable datafly_landing_uri"):
        list_window_files(str(tmp_path / "nope"), WINDOW)


def test_memory_is_bounded_by_batch_size_not_window(tmp_path):
    sample.generate_landing(tmp_path, 20_000, WINDOW.start, hours=1)
    sizes = [len(f) for f in iter_window_batches(str(tmp_path), WINDOW, batch_size=1000)]
    assert sum(sizes) == 20_000 and max(sizes) == 1000 and len(sizes) == 20


def test_content_errors_are_final_and_object_store_io_errors_may_pass_on_a_retry():
    import pyarrow as pa

    from include.datafly_fullstory.landing import LandingError, LandingInputError
    from include.datafly_fullstory.landing.columns import _read_error

    assert type(_read_error("m", pa.ArrowInvalid("bad magic"), "s3://b/x.parquet")) is LandingInputError
    assert type(_read_error("m", OSError("corrupt snappy"), "/data/x.parquet")) is LandingInputError
    remote = _read_error("m", OSError("connection reset"), "s3://b/x.parquet")
    assert type(remote) is LandingError and not isinstance(remote, LandingInputError)
