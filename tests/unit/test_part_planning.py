"""Planning a window into parts (parts.py) and reading it part by part (extract.extract_part, extract.seal)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
import pytest

from include.datafly_fullstory import extract, parts, sample, validated
from include.datafly_fullstory.errors import LandingInputError
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.validation import build_suite
from include.datafly_fullstory.window import Window

START = datetime(2026, 11, 26, 9, tzinfo=UTC)
WINDOW = Window(START, START + timedelta(hours=1))


def _file(uri: str, rows: int) -> parts.PartFile:
    return parts.PartFile(uri, 100, 1.0, rows)


def test_group_keeps_files_whole_in_order_and_numbers_rows_on():
    files = [_file("a", 0), _file("b", 60), _file("c", 50), _file("d", 0), _file("e", 150), _file("f", 10)]
    planned = parts.group(files, max_rows=100)
    assert [[f.uri for f in p.files] for p in planned] == [["a", "b"], ["c", "d"], ["e"], ["f"]]
    assert [(p.number, p.first_row, p.rows) for p in planned] == [
        (0, 0, 60),
        (1, 60, 50),
        (2, 110, 150),
        (3, 260, 10),
    ]
    assert parts.window_rows(planned) == 270


def test_a_window_without_files_is_one_empty_part():
    assert parts.group([], max_rows=10) == [parts.Part(0, 0, 0, ())]
    only_neighbours = parts.group([_file("a", 0), _file("b", 0)], max_rows=10)
    assert len(only_neighbours) == 1 and only_neighbours[0].rows == 0 and len(only_neighbours[0].files) == 2


@pytest.fixture
def landing(tmp_path):
    table = sample.generate_table(
        sample.LandingSpec(
            rows=1200,
            start=START - timedelta(hours=1),
            end=START + timedelta(hours=2),
            seed=3,
            bad_fraction=0.03,
        )
    )
    sample.write_landing(table, tmp_path / "landing", files_per_hour=4)
    return tmp_path / "landing"


def test_parts_count_exactly_the_rows_the_reader_gives(landing, tmp_path):
    one = run_store(tmp_path, "one")
    whole = extract.run_extract(str(landing), WINDOW, one, part_rows=10**9)
    many = run_store(tmp_path, "many")
    planned = parts.plan_parts(str(landing), WINDOW, many, max_rows=120)
    assert len(planned) >= 3 and parts.window_rows(planned) == whole["rows_read"]
    assert parts.read(many) == planned
    results = [extract.extract_part(str(landing), WINDOW, many, p) for p in planned]
    for part, result in zip(planned, results, strict=True):
        assert result["part"] == part.number and result["rows_read"] == part.rows
        rows = (
            sorted(
                r
                for name in validated.parts_of(many, part.number)
                for r in validated.read_part(many, name, ["_row"]).column("_row").to_pylist()
            )
            + pq.read_table(many.path("extract", f"part-{part.number:05d}", "quarantine.parquet"))
            .column("_row")
            .to_pylist()
        )
        assert sorted(rows) == list(range(part.first_row, part.first_row + part.rows))
    sealed = extract.run_extract(str(landing), WINDOW, many, part_results=results)
    assert {k: sealed[k] for k in ("rows_read", "rows_valid", "rows_quarantined")} == {
        k: whole[k] for k in ("rows_read", "rows_valid", "rows_quarantined")
    }
    assert one.read_table("quarantine.parquet").equals(many.read_table("quarantine.parquet"))


def test_a_landing_changed_after_planning_stops_the_part_naming_the_file(landing, tmp_path):
    store = run_store(tmp_path, "run")
    planned = parts.plan_parts(str(landing), WINDOW, store, max_rows=120)
    victim = planned[1].files[0].uri
    os.utime(victim, (1, 1))  # rewritten: another modification time
    with pytest.raises(LandingInputError, match=f"part 1: .*{os.path.basename(victim)}.*plan_parts"):
        extract.extract_part(str(landing), WINDOW, store, planned[1])
    extract.extract_part(str(landing), WINDOW, store, planned[0])  # the other parts are untouched


def test_the_missing_plan_says_which_task_to_clear(tmp_path):
    with pytest.raises(LandingInputError, match="plan_parts"):
        parts.read(run_store(tmp_path, "nothing"))


def test_the_duplicate_rule_order_is_the_suites():
    assert extract.SUITE_ORDER == tuple(e.meta["name"] for e in build_suite(WINDOW).expectations)


def run_store(tmp_path, run_id: str) -> RunStore:
    return RunStore(str(tmp_path / "state"), run_id)
