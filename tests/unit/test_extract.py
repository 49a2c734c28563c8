"""The extract stage: validated parts, quarantine, validation.json, outcomes; idempotent re-runs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from include.datafly_fullstory import outcomes, sample
from include.datafly_fullstory.extract import QUARANTINE_SCHEMA, run_extract
from include.datafly_fullstory.landing import FRAME_SCHEMA, LandingError
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.window import Window

WINDOW = Window(datetime(2026, 11, 26, 8, tzinfo=UTC), datetime(2026, 11, 26, 9, tzinfo=UTC))


@pytest.fixture(scope="module")
def landing(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("landing")
    sample.generate_landing(out, 9000, WINDOW.start - timedelta(hours=1), hours=3, bad_fraction=0.01)
    return out


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore(str(tmp_path / "state"), "scheduled__2026-11-26T08:00:00+00:00")


def test_extract_writes_every_output_and_accounts_for_every_row(landing, store):
    result = run_extract(str(landing), WINDOW, store, batch_size=1000)
    assert json.loads(json.dumps(result)) == result  # small and JSON-serialisable: it goes through XCom
    n = result["rows_read"]
    assert n > 2900 and result["rows_valid"] + result["rows_quarantined"] == n
    assert 0 < result["rows_quarantined"] < n // 20
    assert (
        len(result["parts"]) == -(-n // 1000) and result["parts"][0] == "validated/part-00000-00000.parquet"
    )
    assert store.list("validated") == [Path(p).name for p in result["parts"]]

    valid = pa.concat_tables([store.read_table(p) for p in result["parts"]])
    assert all(store.read_table(p).schema.equals(FRAME_SCHEMA) for p in result["parts"])
    assert all(store.read_table(p).num_rows <= 1000 for p in result["parts"])
    quarantine = store.read_table("quarantine.parquet")
    assert quarantine.schema.equals(QUARANTINE_SCHEMA)
    assert quarantine.num_rows == result["rows_quarantined"]
    assert pc.all(pc.greater(pc.list_value_length(quarantine["failed_expectations"]), 0)).as_py()
    assert pc.all(pc.greater(pc.utf8_length(quarantine["reason"]), 0)).as_py()

    rows = sorted(valid["_row"].to_pylist() + quarantine["_row"].to_pylist())
    assert rows == list(range(n))  # every row exactly once, in validated/ or the quarantine


def test_quarantine_outcomes_and_the_summary(landing, store):
    result = run_extract(str(landing), WINDOW, store)
    table = outcomes.read_partials(store)
    assert store.list("outcomes") == ["quarantine.parquet"]
    assert table.num_rows == result["rows_quarantined"]
    assert set(table["outcome"].to_pylist()) == {"quarantined"}
    quarantine = store.read_table("quarantine.parquet").to_pandas()
    by_row = quarantine.set_index("_row")
    frame = table.to_pandas().set_index("row")
    assert (frame["reason"] == by_row.loc[frame.index, "reason"]).all()
    identify = by_row.loc[frame.index, "type"] == "identify"
    assert (frame.loc[identify.to_numpy(), "kind"] == "user").all()
    assert (frame.loc[~identify.to_numpy(), "kind"] == "event").all()

    summary = store.read_json("validation.json")
    assert summary == result["validation"]
    assert summary["window"] == WINDOW.as_dict()
    assert summary["rows"] == result["rows_read"] and summary["rows_failed"] == result["rows_quarantined"]
    failed = {r for r, item in summary["expectations"].items() if item["unexpected"]}
    assert {"event_id_unique_in_window", "type_known", "identify_has_traits"} <= failed


def test_a_rerun_replaces_the_outputs(landing, store):
    first = run_extract(str(landing), WINDOW, store, batch_size=500)
    store.write_bytes(b"stale", "validated", "part-00099.parquet")
    second = run_extract(str(landing), WINDOW, store, batch_size=500)
    assert {k: v for k, v in first.items() if k != "validation"} == {
        k: v for k, v in second.items() if k != "validation"
    }
    assert "part-00099.parquet" not in store.list("validated")
    assert len(store.list("validated")) == len(second["parts"])


def test_an_empty_window_is_a_success_with_zero_rows(landing, store):
    empty = Window(WINDOW.start + timedelta(days=30), WINDOW.end + timedelta(days=30))
    result = run_extract(str(landing), empty, store)
    assert {k: result[k] for k in ("rows_read", "rows_valid", "rows_quarantined", "parts")} == {
        "rows_read": 0,
        "rows_valid": 0,
        "rows_quarantined": 0,
        "parts": [],
    }
    assert result["validation"]["success"] is True
    assert store.read_table("quarantine.parquet").num_rows == 0
    assert outcomes.read_partials(store).num_rows == 0
    assert store.read_json("validation.json")["rows"] == 0


def test_a_corrupt_file_fails_the_stage_naming_it_and_leaves_no_parts(landing, store, tmp_path):
    run_extract(str(landing), WINDOW, store)
    broken = tmp_path / "broken"
    sample.generate_landing(broken, 500, WINDOW.start, hours=1)
    (broken / "dt=2026-11-26" / "hour=08" / "part-00001.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(LandingError, match="hour=08/part-00001.parquet"):
        run_extract(str(broken), WINDOW, store)
    assert store.list("validated") == [] and not store.exists("quarantine.parquet")


def test_a_failure_mid_stream_publishes_no_quarantine(landing, store, monkeypatch):
    from include.datafly_fullstory import extract

    calls = []

    def failing_validate(df, window, seen):
        calls.append(len(df))
        if len(calls) == 2:
            raise RuntimeError("worker lost")
        return real_validate(df, window, seen)

    real_validate = extract.validate_batch
    monkeypatch.setattr(extract, "validate_batch", failing_validate)
    with pytest.raises(RuntimeError, match="worker lost"):
        run_extract(str(landing), WINDOW, store, batch_size=1000)
    assert not store.exists("quarantine.parquet") and not store.exists("validation.json")
    assert [n for n in store.fs.ls(store.root, detail=False) if ".tmp-" in n] == []
