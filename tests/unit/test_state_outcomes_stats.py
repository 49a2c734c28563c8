import os

import fsspec
import pandas as pd
import pytest

from include.datafly_fullstory import outcomes, stats
from include.datafly_fullstory.errors import InputError
from include.datafly_fullstory.state import RunStore, safe_run_id


def _frame(rows, outcome="delivered", kind="event"):
    return pd.DataFrame(
        {
            "row": rows,
            "event_id": [f"e{r}" for r in rows],
            "outcome": outcome,
            "reason": None,
            "kind": kind,
            "chunk": "events-00000",
        }
    )


def test_run_ids_become_safe_folder_names(tmp_path):
    store = RunStore(str(tmp_path), "manual__2026-11-26T07:00:00+00:00")
    assert safe_run_id(store.run_id) == "manual__2026-11-26T07_00_00+00_00"
    store.write_json({"a": 1}, "x", "y.json")
    assert store.read_json("x", "y.json") == {"a": 1}
    assert store.list("x") == ["y.json"] and store.list("missing") == []


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    store = RunStore(str(tmp_path), "r1")
    for i in range(3):
        store.write_bytes(f"v{i}".encode(), "ledger", "c.json")
    assert store.read_bytes("ledger", "c.json") == b"v2"
    assert os.listdir(tmp_path / "runs" / "r1" / "ledger") == ["c.json"]


def test_store_works_on_an_fsspec_uri():
    fs = fsspec.filesystem("memory")
    store = RunStore("memory://dffs-test-state", "r2")
    store.write_table(outcomes.to_table(_frame([0, 1])), "outcomes", "a.parquet")
    assert store.uri("outcomes").startswith("memory://")
    assert store.read_table("outcomes", "a.parquet").num_rows == 2
    fs.rm("/dffs-test-state", recursive=True)


def test_merge_outcomes_accounts_for_every_row_once(tmp_path):
    store = RunStore(str(tmp_path), "r")
    outcomes.write_outcomes(store, "quarantine", _frame([1], "quarantined"))
    outcomes.write_outcomes(store, "mapping", _frame([3], "filtered"))
    outcomes.write_outcomes(store, "delivery-events-00000", _frame([0, 2]))
    merged = outcomes.merge_outcomes(store, rows_read=4)
    assert merged.column("row").to_pylist() == [0, 1, 2, 3]
    assert outcomes.count_by_outcome(merged)["delivered"] == 2
    assert store.exists("outcomes.parquet")


def test_merge_outcomes_refuses_missing_and_double_outcomes(tmp_path):
    store = RunStore(str(tmp_path), "r")
    outcomes.write_outcomes(store, "a", _frame([0, 1]))
    with pytest.raises(outcomes.OutcomeError, match=r"3 rows were read but 2 have an outcome.*\[2\]"):
        outcomes.merge_outcomes(store, rows_read=3)
    outcomes.write_outcomes(store, "b", _frame([1], "rejected"))
    with pytest.raises(outcomes.OutcomeError, match=r"more than one outcome.*\[1\]"):
        outcomes.merge_outcomes(store, rows_read=2)


def test_unknown_outcomes_are_refused():
    with pytest.raises(ValueError, match="unknown outcome"):
        outcomes.to_table(_frame([0], "lost"))


def test_stats_add_together_and_read_as_one_line():
    run = stats.RunStats().add({"http": {"requests": 3, "status_counts": {"200": 3}}, "batches": 1})
    run.add(
        {
            "http": {"requests": 2, "retries": 1, "status_counts": {"200": 1, "429": 1}},
            "batches": 1,
            "bytes_sent": 10,
            "delivery": {"chunks": 2, "submitted": 2},
            "not_a_stat": 1,
        }
    )
    assert run.http == {"requests": 5, "retries": 1, "status_counts": {"200": 4, "429": 1}}
    assert run.batches == 2 and run.bytes_sent == 10 and "not_a_stat" not in run.asdict()
    run.window_start, run.window_end, run.duration_s = "s", "e", 1.25
    run.rows.update(read=3, delivered=2, skipped=1)
    line = run.asstr()
    assert line.startswith(
        "window s -> e: read 3, delivered 2, rejected 0, quarantined 0, filtered 0, skipped 1;"
    )
    assert "2 chunk(s) (2 submitted)" in line and "5 requests (1 retries)" in line and "2 batches" in line
    assert str(run) == line and stats.RunStats.from_dict(run.asdict()) == run


def test_run_problems_are_raised_as_one_error_a_person_must_fix():
    run = stats.RunStats()
    run.raise_on_problems()  # none: nothing happens
    run.problems = ["3 of 10 rows rejected", "delivery stopped"]
    with pytest.raises(InputError, match="3 of 10 rows rejected; delivery stopped") as caught:
        run.raise_on_problems()
    assert caught.value.problems == run.problems and run.has_problems


def test_rows_a_stopped_delivery_never_reached_are_pending_with_the_reason(tmp_path):
    store = RunStore(str(tmp_path), "r")
    outcomes.write_outcomes(store, "mapping", _frame([1], "skipped"))
    merged = outcomes.merge_outcomes(store, rows_read=3, pending_reason="delivery stopped: 401")
    assert merged.column("outcome").to_pylist() == ["pending", "skipped", "pending"]
    assert merged.column("reason").to_pylist()[0] == "delivery stopped: 401"
    outcomes.write_outcomes(store, "again", _frame([1], "delivered"))
    with pytest.raises(outcomes.OutcomeError, match="more than one outcome"):
        outcomes.merge_outcomes(store, rows_read=3, pending_reason="x")  # pending never hides doubles
