"""End to end: N landed rows through extract+validate+claim -> map -> deliver into the local emulator, with
the delivery ledger (SQLite) as the DAG keeps it.

Prints each stage's seconds and rows/s, and how busy the emulator was while the sync delivered: its CPU
seconds (read from /proc) against the delivery stage's wall seconds. A ratio well below 1 means the run
was limited by the sync, not by the emulator.

    PYTHONPATH=.:plugins .venv/bin/python bench/bench_pipeline.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from include.datafly_fullstory.chunks import load_chunks
from include.datafly_fullstory.delivery import Delivery, DeliverySettings
from include.datafly_fullstory.ledger import Ledger
from include.datafly_fullstory.pipeline import extract_stage, map_stage
from include.datafly_fullstory.run import plan_run
from include.datafly_fullstory.sample import generate_landing
from include.datafly_fullstory.window import Window
from include.fullstory_emulator.testing import EmulatorProcess

START = datetime(2026, 11, 20, 10, tzinfo=UTC)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and its reaped children) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--max-in-flight", type=int, default=4)
    args = parser.parse_args()
    logging.getLogger("include.datafly_fullstory").setLevel(logging.WARNING)  # per-chunk lines, not figures

    work = Path(tempfile.mkdtemp(prefix="dffs-bench-pipeline-"))
    window = Window(START, START + timedelta(hours=1))
    t = time.perf_counter()
    generate_landing(work / "landing", args.rows, START, hours=1, files_per_hour=4)
    print(f"landing: {args.rows:,} rows generated in {time.perf_counter() - t:.1f}s (not counted)")
    with EmulatorProcess(job_seconds=0.2, rate=100_000, burst=100_000) as emulator:
        from fullstory_provider.hooks import FullStoryHook

        plan = plan_run(
            params={"lookback_hours": 0},
            run_id="bench",
            landing_uri=str(work / "landing"),
            state_uri=str(work / "state"),
            airflow_home=str(work),
            data_interval_start=window.start,
            data_interval_end=window.end,
            destination=f"{emulator.org_id}@{emulator.region}",
        )
        ledger_url, store = plan.ledger["url"], plan.store
        t0 = time.perf_counter()
        extracted = extract_stage(plan, ledger_url)  # read, validate, claim in the ledger
        t1 = time.perf_counter()
        mapped = map_stage(plan, extracted, ledger_url)  # map, register chunks in the ledger
        t2 = time.perf_counter()
        os.environ["AIRFLOW_CONN_BENCH_FULLSTORY"] = json.dumps(
            {
                "conn_type": "http",
                "host": emulator.base_url,
                "password": emulator.api_key,
                "extra": {"org_id": emulator.org_id},
            }
        )
        hook = FullStoryHook("bench_fullstory")
        emu_cpu_before = cpu_seconds(emulator.pid)
        names = [c["name"] for c in mapped["chunks"]]
        users = [n for n in names if n.startswith("users")]
        events = [n for n in names if n.startswith("events")]
        settings = DeliverySettings(max_in_flight=args.max_in_flight, poll_interval=0.2, timeout=1800)
        ledger = Ledger(ledger_url)
        # Users first, then events: two tasks in the DAG, so two Delivery runs here.
        Delivery(store, hook, ledger, plan.destination, settings).run(load_chunks(store, users))
        report = Delivery(store, hook, ledger, plan.destination, settings).run(load_chunks(store, events))
        t3 = time.perf_counter()
        emu_cpu = cpu_seconds(emulator.pid) - emu_cpu_before
        held = emulator.state()["events"]
        hook.close()

    rows = extracted["rows_read"]
    items = mapped["events_mapped"] + mapped["users_mapped"]
    print(f"\n{'stage':<22}{'seconds':>9}{'rows/s':>12}")
    for name, secs in (
        ("extract+validate+claim", t1 - t0),
        ("map + register", t2 - t1),
        ("deliver", t3 - t2),
        ("total", t3 - t0),
    ):
        print(f"{name:<22}{secs:>9.1f}{rows / secs:>12,.0f}")
    print(
        f"\nitems delivered: {items:,} ({mapped['events_mapped']:,} events, {mapped['users_mapped']:,} users) "
        f"in {len(names)} batch jobs; emulator holds {held:,} events"
    )
    print(f"delivery: {items / (t3 - t2):,.0f} items/s; {report.submitted} chunks submitted")
    print(
        f"emulator CPU while delivering: {emu_cpu:.1f}s of {t3 - t2:.1f}s wall = {emu_cpu / (t3 - t2):.2f} "
        f"(1.0 would mean the emulator was the bottleneck); of the whole run: {emu_cpu / (t3 - t0):.2f}"
    )


if __name__ == "__main__":
    main()
