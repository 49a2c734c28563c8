"""Deletion requests without FullStory: reading the deletion source (Parquet and CSV, bad files), the params,
the ledger's `dffs_deletions` on SQLite and Postgres (idempotent, concurrent requests and takes), and the
mapping's suppression rule."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from include.datafly_fullstory import ledger as L
from include.datafly_fullstory.blueprint import load_blueprint
from include.datafly_fullstory.deletions import (
    DeletionSourceError,
    collect_requests,
    deletion_problems,
    param_requests,
    read_deletion_source,
)
from include.datafly_fullstory.errors import InputError, ParamError
from include.datafly_fullstory.ledger import Ledger
from include.datafly_fullstory.mapping import BatchMapper, MappingSettings
from include.datafly_fullstory.mapping.suppression import REASON, Suppression

DEST = "o-LOCAL-na1@na1"


# ---- the deletion source ---------------------------------------------------------------------------------


def test_parquet_with_both_columns(tmp_path):
    path = tmp_path / "del.parquet"
    pq.write_table(pa.table({"user_id": ["u-1", None, "u-3"], "anonymous_id": [None, "a-2", "a-3"]}), path)
    assert read_deletion_source(str(path)) == [
        ("user_id", "u-1", str(path)),
        ("anonymous_id", "a-2", str(path)),
        ("user_id", "u-3", str(path)),
        ("anonymous_id", "a-3", str(path)),
    ]


def test_csv_with_one_column_through_an_fsspec_uri(tmp_path):
    path = tmp_path / "del.csv"
    path.write_text("user_id\nu-1\nu-2\n")
    assert [r[:2] for r in read_deletion_source(f"file://{path}")] == [("user_id", "u-1"), ("user_id", "u-2")]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("user_id,email\nu-1,a@example.com\n", r"unknown column\(s\) \['email'\]"),
        ("user_id,anonymous_id\nu-1,\n,\n", r"row 2 \(line 3\) has neither a user_id nor an anonymous_id"),
        ("user_id\n u-1\n", r"row 1 \(line 2\), column user_id: the id has leading or trailing whitespace"),
        ("uid\nu-1\n", r"unknown column\(s\) \['uid'\]"),
    ],
)
def test_bad_csv_names_file_row_and_column(tmp_path, text, says):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DeletionSourceError, match=says) as caught:
        read_deletion_source(str(path))
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, InputError)  # the task fails at once, without retries


def test_bad_parquet_files(tmp_path):
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"user_id": [1, 2]}), numbers)
    with pytest.raises(DeletionSourceError, match=r"numbers.parquet: column user_id is of type int64"):
        read_deletion_source(str(numbers))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet at all")
    with pytest.raises(DeletionSourceError, match=r"corrupt.parquet: cannot read it as parquet"):
        read_deletion_source(str(corrupt))
    with pytest.raises(DeletionSourceError, match=r"missing.parquet: no such file"):
        read_deletion_source(str(tmp_path / "missing.parquet"))
    with pytest.raises(DeletionSourceError, match=r"give a .parquet or .csv file"):
        read_deletion_source(str(tmp_path / "list.txt"))


def test_params_and_source_merge_without_repeats(tmp_path):
    path = tmp_path / "del.csv"
    path.write_text("user_id\nu-1\n")
    got = collect_requests(str(path), ["u-1", "u-2"], ["a-1"])
    assert got == [
        ("user_id", "u-1", str(path)),
        ("user_id", "u-2", "param"),
        ("anonymous_id", "a-1", "param"),
    ]
    assert collect_requests(None, None, None) == []


@pytest.mark.parametrize(
    ("users", "says"), [("u-1", "must be a list"), (["ok", ""], r"delete_user_ids\[1\]"), ([7], "int value")]
)
def test_bad_params_name_the_param(users, says):
    with pytest.raises(ParamError, match=says):
        param_requests(users, None)


def test_a_failed_deletion_is_a_problem_for_the_summary():
    assert deletion_problems({"failed": 0}) == [] and deletion_problems(None) == []
    (problem,) = deletion_problems({"failed": 2, "errors": ["FullStoryRetryError: gave up"]})
    assert problem.startswith("2 deletion request(s) failed") and "gave up" in problem


# ---- the ledger ----------------------------------------------------------------------------------------


@pytest.fixture
def led(ledger_url) -> Ledger:
    return Ledger(ledger_url)


def test_requests_are_recorded_once_and_suppress_at_once(led):
    requests = [("user_id", "u-1", "f.csv"), ("user_id", "u-2", "f.csv"), ("anonymous_id", "a-1", "f.csv")]
    assert led.request_deletions(DEST, requests) == 3
    assert led.request_deletions(DEST, [*requests, ("user_id", "u-1", "param")]) == 0
    assert led.suppressed_people(DEST) == (frozenset({"u-1", "u-2"}), frozenset({"a-1"}))
    assert led.suppressed_people("o-OTHER-eu1@eu1") == (frozenset(), frozenset())
    rows = {(r.person_kind, r.person_key): r for r in led.deletion_rows(DEST)}
    assert rows["user_id", "u-1"].source == "f.csv"  # the first request's source is kept
    assert rows["anonymous_id", "a-1"].status == L.D_SUPPRESSED
    assert led.deletions_due(DEST) == ["u-1", "u-2"]  # anonymous ids have nothing to delete


def test_a_deletion_is_taken_once_and_done_is_final(led):
    led.request_deletions(DEST, [("user_id", "u-1", "param")])
    assert led.start_deletion(DEST, "u-1", "run-a") is True
    assert led.start_deletion(DEST, "u-1", "run-b") is False  # run-a is deleting it
    assert led.deletions_due(DEST) == []
    led.finish_deletion(DEST, "u-1", error="FullStoryRetryError: gave up after 6 attempt(s)")
    (row,) = led.deletion_rows(DEST)
    assert (row.status, row.attempts, row.last_error) == (
        "failed",
        1,
        "FullStoryRetryError: gave up after 6 attempt(s)",
    )
    assert led.deletions_due(DEST) == ["u-1"]  # the next run tries again
    assert led.start_deletion(DEST, "u-1", "run-b") is True
    led.finish_deletion(DEST, "u-1")
    (row,) = led.deletion_rows(DEST)
    assert (row.status, row.attempts, row.last_error) == ("deleted", 2, None) and row.deleted_at
    assert led.deletions_due(DEST) == [] and led.start_deletion(DEST, "u-1", "run-c") is False
    assert led.request_deletions(DEST, [("user_id", "u-1", "param")]) == 0
    assert led.deletion_rows(DEST)[0].status == "deleted"  # a repeated request does not reopen it


def test_a_deleting_row_of_a_dead_run_is_due_again_after_the_lease(led, monkeypatch):
    now = [1_800_000_000.0]
    monkeypatch.setattr(L, "wall_clock", lambda: now[0])
    led.request_deletions(DEST, [("user_id", "u-1", "param")])
    assert led.start_deletion(DEST, "u-1", "run-a")
    now[0] += L.deletion_ops.DELETING_LEASE_S + 1
    assert led.deletions_due(DEST) == ["u-1"]
    assert led.start_deletion(DEST, "u-1", "run-b")


def test_concurrent_requests_and_takes_do_not_duplicate(led):
    ids = [f"u-{i:04d}" for i in range(400)]
    new, taken, errors = [], [], []

    def request(part):
        try:
            mine = Ledger(led.url)
            new.append(mine.request_deletions(DEST, [("user_id", u, "param") for u in part]))
            taken.extend(u for u in part if mine.start_deletion(DEST, u, threading.current_thread().name))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=request, args=(p,)) for p in (ids[:300], ids[100:], ids[::-1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sum(new) == 400
    assert sorted(taken) == ids  # each uid taken by exactly one thread
    assert len(led.deletion_rows(DEST)) == 400


# ---- the mapping's suppression rule --------------------------------------------------------------------


def _frame(rows):
    df = pd.DataFrame.from_records(
        [
            {
                "type": t,
                "event": "Order Completed" if t == "track" else None,
                "name": None,
                "anonymous_id": anon,
                "user_id": uid,
                "timestamp": pd.Timestamp("2026-03-01T10:00:00Z"),
                "context": None,
                "properties": None,
                "traits": '{"plan": "pro"}' if t == "identify" else None,
                "event_id": f"evt-{i}",
            }
            for i, (t, uid, anon) in enumerate(rows)
        ]
    )
    df["_row"] = np.arange(len(df), dtype=np.int64)
    return df


def test_rows_of_suppressed_people_are_filtered_first_and_send_no_user_update():
    mapper = BatchMapper(
        load_blueprint(),
        MappingSettings(),
        datetime(2026, 3, 1, 11, tzinfo=UTC),
        suppression=Suppression(frozenset({"gone"}), frozenset({"anon-gone"})),
    )
    batch = mapper.map_batch(
        _frame(
            [
                ("track", "gone", "anon-1"),
                ("identify", "gone", "anon-1"),
                ("page", None, "anon-gone"),
                ("track", "kept", "anon-gone"),
                ("track", "kept", "anon-2"),
                ("identify", "kept", "anon-2"),
                ("alias", "gone", None),  # a type that is otherwise skipped: suppression decides first
            ]
        )
    )
    outcomes = {int(r.row): (r.outcome, r.reason) for r in batch.outcomes.itertuples()}
    for row in (0, 1, 6):
        assert outcomes[row] == ("filtered", f"{REASON} (user_id is on this destination's deletion list)")
    for row in (2, 3):
        assert outcomes[row] == (
            "filtered",
            f"{REASON} (anonymous_id is on this destination's deletion list)",
        )
    assert 4 not in outcomes and list(batch.rows) == [4]
    assert batch.identify["user_id"].tolist() == ["kept"]


def test_no_suppression_changes_nothing():
    df = _frame([("track", "u", "a")])
    args = (load_blueprint(), MappingSettings(), datetime(2026, 3, 1, 11, tzinfo=UTC))
    plain = BatchMapper(*args).map_batch(df)
    empty = BatchMapper(*args, suppression=Suppression()).map_batch(df)
    assert plain.lines == empty.lines and len(plain.lines) == 1
