"""A window run as many parts ends exactly as the same window run as one part.

The same landing (several files an hour, bad rows, event ids repeated across files that fall in different
parts, a late file for the next run's look-back) goes through the DAG's tasks twice, each time with its own
state, ledger and emulator: once in one part, once in parts of 100 rows (extract and mapping of each part
run as their own tasks). Every row's outcome and reason, the quarantine, the validation summary, the run
statistics, the ledger's states and what FullStory holds must be the same.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa
from sync_driver import SyncDriver

from include.datafly_fullstory.sample import LandingSpec, generate_table, write_landing

H10 = datetime(2026, 11, 20, 10, tzinfo=UTC)
HOUR = timedelta(hours=1)
# stats that depend on how rows were cut into parts and chunks, not on what happened to them
_CUT_DEPENDENT = {
    "http",
    "report",
    "duration_s",
    "artifacts",
    "dag_run_id",
    "batches",
    "bytes_sent",
    "chunks",
    "delivery",
}


def _landing_table() -> pa.Table:
    table = generate_table(LandingSpec(rows=1500, start=H10, end=H10 + 2 * HOUR, seed=11, bad_fraction=0.02))
    # Event ids repeated across the hour's files (so across parts): a copy of a valid row, and a copy that
    # also breaks another rule (no anonymous id); both later in the hour than their first copy.
    hour10 = table.filter(
        pc.less(table.column("timestamp"), pa.scalar(H10 + HOUR, table.schema.field("timestamp").type))
    )
    first = hour10.slice(5, 2)
    copies = first.set_column(
        first.schema.get_field_index("timestamp"),
        "timestamp",
        pa.array([H10 + timedelta(minutes=55)] * 2, first.schema.field("timestamp").type),
    )
    anon = copies.column("anonymous_id").to_pylist()
    copies = copies.set_column(
        copies.schema.get_field_index("anonymous_id"), "anonymous_id", pa.array([anon[0], None], pa.string())
    )
    return pa.concat_tables([table, copies.cast(table.schema)]).sort_by("timestamp")


def _drive(tmp_path, name, emulator, table, late, part_rows: int):
    root = tmp_path / name
    landing = root / "landing"
    write_landing(table, landing, files_per_hour=4)
    driver = SyncDriver(
        landing=landing, state=root / "state", airflow_home=root, emulator=emulator, part_rows=part_rows
    )
    first = driver.go(driver.new_run("h10", hour=H10))
    pq.write_table(late, landing / "dt=2026-11-20" / "hour=10" / "part-late.parquet")
    second = driver.go(driver.new_run("h11", hour=H10 + HOUR))
    for run in (first, second):
        assert run.killed_in is None, (run.killed_in, run.error)
    return driver, [first, second]


def _outcomes(driver, run) -> list[tuple]:
    table = pq.read_table(driver.store(run).path("outcomes.parquet"))
    return list(
        zip(
            *(table.column(c).to_pylist() for c in ("row", "event_id", "outcome", "reason", "kind")),
            strict=True,
        )
    )


def _quarantine(driver, run) -> list[tuple]:
    table = pq.read_table(driver.store(run).path("quarantine.parquet"))
    return list(
        zip(
            *(table.column(c).to_pylist() for c in ("_row", "event_id", "failed_expectations", "reason")),
            strict=True,
        )
    )


def _stats(run) -> dict:
    stats = dict(run.xcom["summarise"]["stats"])
    for key in _CUT_DEPENDENT:
        stats.pop(key, None)
    stats["validation"] = {k: v for k, v in stats["validation"].items() if k != "seconds"}
    stats["late"] = {k: v for k, v in stats["late"].items() if k != "seconds"}
    return stats


def _ledger(driver) -> dict[str, tuple]:
    engine = sa.create_engine(driver.ledger_db_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "select event_id, state, kind, uid, run_id, window_start, window_end, event_time, code, message from dffs_items"
            )
        ).all()
    engine.dispose()
    return {r[0]: tuple(r[1:]) for r in rows}


def _held(emulator) -> Counter:
    return Counter(e["properties"]["datafly_event_id"] for e in emulator.events())


def test_many_parts_end_as_one_part(tmp_path, fullstory_emulator_factory, monkeypatch):
    # the drivers point the connection at their emulators through the environment: restored afterwards
    monkeypatch.setenv("AIRFLOW_CONN_FULLSTORY_DEFAULT", "")
    table = _landing_table()
    late = generate_table(LandingSpec(rows=60, start=H10, end=H10 + HOUR, seed=12, bad_fraction=0.05))
    one_emulator, many_emulator = fullstory_emulator_factory(), fullstory_emulator_factory()
    one, one_runs = _drive(tmp_path, "one", one_emulator, table, late, part_rows=10_000_000)
    many, many_runs = _drive(tmp_path, "many", many_emulator, table, late, part_rows=100)

    assert len(one_runs[0].xcom["plan_parts"]) == 1
    assert len(many_runs[0].xcom["plan_parts"]) >= 4 and len(many_runs[0].xcom["map_prepare"]["parts"]) >= 4
    for a, b in zip(one_runs, many_runs, strict=True):
        assert _outcomes(one, a) == _outcomes(many, b)
        assert _quarantine(one, a) == _quarantine(many, b)
        assert _stats(a) == _stats(b)
    # the repeated ids were caught across parts, once as a plain duplicate, once with the other rule too
    quarantined = _quarantine(many, many_runs[0])
    duplicates = [q for q in quarantined if "event_id_unique_in_window" in q[2]]
    assert {tuple(q[2]) for q in duplicates} >= {
        ("event_id_unique_in_window",),
        ("anonymous_id_not_null", "event_id_unique_in_window"),
    }
    assert _stats(many_runs[1])["late"]["rows"] > 0  # the look-back read the late file as its own part
    assert _ledger(one) == _ledger(many)
    held_one, held_many = _held(one_emulator), _held(many_emulator)
    assert held_one == held_many and max(held_many.values()) == 1
