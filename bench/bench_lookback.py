"""What the 24 h look-back costs a scheduled run: the extract stage (read, validate, claim) of one hour with
the look-back against the same stage without it, on the same landing and the same ledger.

Set-up: a hive landing of `--hours` + 1 hours of `--rows-per-hour` rows; the ledger (SQLite) learns the
first `--hours` hours by running their extract stages in turn, as the hourly schedule would. Then the last
hour is extracted, from a copy of that ledger each time:
- baseline: `lookback_hours=0`;
- steady state: `lookback_hours=24`, nothing landed late (unchanged files are not read again);
- late data: the same after one late file (`--late-rows` rows) landed in an hour inside the look-back.

    PYTHONPATH=.:plugins .venv/bin/python bench/bench_lookback.py --rows-per-hour 40000
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory import pipeline
from include.datafly_fullstory.run import RunPlan, plan_run
from include.datafly_fullstory.sample import LandingSpec, generate_table, write_landing

START = datetime(2026, 11, 19, 0, tzinfo=UTC)
DEST = "o-BENCH-na1@na1"


def plan(run_id: str, hour: int, landing: Path, state: Path, lookback: float) -> RunPlan:
    begin = START + timedelta(hours=hour)
    return plan_run(
        params={"lookback_hours": lookback},
        run_id=run_id,
        landing_uri=str(landing),
        state_uri=str(state),
        airflow_home=str(state.parent),
        data_interval_start=begin,
        data_interval_end=begin + timedelta(hours=1),
        destination=DEST,
    )


def extract(run_id: str, hour: int, landing: Path, state: Path, lookback: float) -> tuple[float, dict]:
    p = plan(run_id, hour, landing, state, lookback)
    began = time.perf_counter()
    out = pipeline.extract_stage(p, p.ledger["url"])
    return time.perf_counter() - began, out


def measure(label: str, base: Path, landing: Path, hours: int, lookback: float) -> tuple[float, dict]:
    """The last hour's extract on a fresh copy of the learned state (ledger included)."""
    work = Path(tempfile.mkdtemp(prefix="dffs-lb-"))
    shutil.copytree(base / "state", work / "state")
    lg.dispose_engines()
    seconds, out = extract(f"measure-{label}", hours, landing, work / "state", lookback)
    lg.dispose_engines()
    shutil.rmtree(work, ignore_errors=True)
    return seconds, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows-per-hour", type=int, default=40_000)
    parser.add_argument("--hours", type=int, default=24)
    parser.add_argument("--late-rows", type=int, default=2_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="dffs-bench-lookback-"))
    landing = root / "landing"
    total = args.rows_per_hour * (args.hours + 1)
    table = generate_table(
        LandingSpec(rows=total, start=START, end=START + timedelta(hours=args.hours + 1), seed=3)
    )
    write_landing(table, landing)
    print(f"landing: {total:,} rows over {args.hours + 1} hours ({args.rows_per_hour:,}/hour) in {landing}")

    began = time.perf_counter()
    for hour in range(args.hours):
        extract(f"learn-{hour:02d}", hour, landing, root / "state", 0)
    lg.dispose_engines()
    print(
        f"ledger learned {args.hours} hours in {time.perf_counter() - began:.1f}s "
        f"({(root / 'state' / 'ledger.sqlite').stat().st_size / 1e6:.0f} MB)"
    )

    base_s, base = measure("base", root, landing, args.hours, 0)
    steady_s, steady = measure("steady", root, landing, args.hours, 24)
    # A late file lands in an hour the look-back covers (rows with new ids, timestamps of that hour).
    hour = args.hours - 5
    sample = generate_table(
        LandingSpec(
            rows=args.late_rows,
            start=START + timedelta(hours=hour),
            end=START + timedelta(hours=hour + 1),
            seed=99,
        )
    )
    ids = pa.array([f"late-{i}" for i in range(sample.num_rows)])
    sample = sample.set_column(sample.schema.get_field_index("event_id"), "event_id", ids)
    day = (START + timedelta(hours=hour)).strftime("%Y-%m-%d")
    pq.write_table(
        sample, landing / f"dt={day}" / f"hour={(START + timedelta(hours=hour)).hour:02d}" / "late.parquet"
    )
    late_s, late = measure("late", root, landing, args.hours, 24)

    rows = base["rows_read"]
    print(f"\nextract stage of one hour ({rows:,} rows), same landing and ledger each time:")
    print(
        f"{'case':<34} {'seconds':>8} {'vs baseline':>12} {'late rows':>10} {'files read':>11} {'skipped':>8}"
    )
    for name, secs, out in (
        ("baseline: no look-back", base_s, base),
        ("look-back 24 h, nothing late", steady_s, steady),
        (f"look-back 24 h, {args.late_rows:,} late rows", late_s, late),
    ):
        lb = out.get("late", {})
        print(
            f"{name:<34} {secs:>8.2f} {secs / base_s:>11.2f}x {lb.get('rows', 0):>10,} "
            f"{lb.get('files_read', 0):>11} {lb.get('files_skipped', 0):>8}"
        )
    print(
        f"\nlook-back cost per run: {steady_s - base_s:+.2f}s with nothing late "
        f"({(steady_s - base_s) / base_s:+.0%} of the hour's extract), {late_s - base_s:+.2f}s with a late file"
    )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
