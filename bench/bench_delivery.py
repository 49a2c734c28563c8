"""Delivery throughput against the FullStory emulator with injected latency, with a same-run baseline.

    .venv/bin/python bench/bench_delivery.py [--events 200000] [--chunk 10000] [--latency-ms 50]

Measures, on one emulator started here:
  1. FullStoryDeliveryOperator: batch import jobs, `--in-flight` jobs at once (the production path);
  2. the same with one job in flight (what the concurrency buys);
  3. baseline: the same events sent one per `POST /v2/events` (as a naive sync would), measured on a
     sample of `--sample` events and extrapolated to the full count.
Prints events/s, requests per 10,000 events and the ratios. Runs in about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="dffs-bench-airflow-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from include.datafly_fullstory.ledger import Ledger  # noqa: E402
from include.datafly_fullstory.state import RunStore  # noqa: E402
from include.fullstory_emulator.testing import EmulatorProcess  # noqa: E402
from tests.run_helpers import DESTINATION  # noqa: E402
from tests.run_helpers import write_run as write_run_folder  # noqa: E402


def event(i: int) -> dict:
    return {
        "name": "Order Completed",
        "timestamp": "2026-03-01T10:00:00Z",
        "user": {"uid": f"user-{i % 5000}"},
        "properties": {
            "order_id": f"o-{i}",
            "revenue": 12.5 + i % 100,
            "currency": "EUR",
            "items": 1 + i % 4,
        },
    }


def write_run(state: Path, run_id: str, total: int, chunk: int) -> tuple[list[str], dict]:
    """Payload chunks and their ledger records as the mapping stage leaves them, written through the
    format owners (tests/run_helpers.py). Returns the chunk names and the ledger location."""
    store = RunStore(str(state), run_id)
    location = {"url": f"sqlite:///{state / (run_id + '-ledger.sqlite')}"}
    parts = {
        f"events-{c:05d}": [event(i) for i in range(start, min(total, start + chunk))]
        for c, start in enumerate(range(0, total, chunk))
    }
    entries = write_run_folder(store, Ledger(location["url"]), parts)
    return [e["name"] for e in entries], location


class _TI:
    def xcom_push(self, key, value):
        pass


def run_operator(emu, state: Path, run_id: str, total: int, chunk: int, in_flight: int) -> dict:
    from fullstory_provider.operators import FullStoryDeliveryOperator

    emu.reset(keep_faults=True)
    chunks, ledger = write_run(state, run_id, total, chunk)
    op = FullStoryDeliveryOperator(
        task_id="bench",
        state_uri=str(state),
        run_id=run_id,
        chunks=chunks,
        ledger=ledger,
        destination=DESTINATION,
        max_in_flight=in_flight,
        poll_interval=0.25,
        timeout=600,
    )
    started = time.perf_counter()
    stats = op.execute({"ti": _TI()})
    seconds = time.perf_counter() - started
    delivered = emu.state()["events"]
    assert delivered == total == stats["events"]["delivered"], (delivered, total, stats["events"])
    return {
        "seconds": seconds,
        "events": total,
        "requests": stats["http"]["requests"],
        "bytes": stats["bytes_sent"],
    }


def run_single_events(emu, sample: int) -> dict:
    from fullstory_provider.hooks import FullStoryHook

    emu.reset(keep_faults=True)
    hook = FullStoryHook()
    started = time.perf_counter()
    for i in range(sample):
        hook.create_event(event(i), idempotency_key=f"bench-{i}")
    seconds = time.perf_counter() - started
    assert emu.state()["events"] == sample
    return {"seconds": seconds, "events": sample, "requests": hook.http_stats()["requests"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=10_000, help="events per chunk (one batch job each)")
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument(
        "--job-seconds", type=float, default=1.0, help="how long the emulator keeps a job PROCESSING"
    )
    parser.add_argument(
        "--sample", type=int, default=300, help="events sent one per request for the baseline"
    )
    args = parser.parse_args()

    with (
        EmulatorProcess(latency_ms=args.latency_ms, job_seconds=args.job_seconds) as emu,
        tempfile.TemporaryDirectory() as tmp,
    ):
        os.environ["AIRFLOW_CONN_FULLSTORY_DEFAULT"] = json.dumps(
            {
                "conn_type": "http",
                "host": emu.base_url,
                "password": emu.api_key,
                "extra": {"org_id": emu.org_id, "data_region": emu.region},
            }
        )
        state = Path(tmp)
        batch = run_operator(emu, state, "bench_in_flight", args.events, args.chunk, args.in_flight)
        serial = run_operator(emu, state, "bench_serial", args.events, args.chunk, 1)
        single = run_single_events(emu, args.sample)

    def rate(r):
        return r["events"] / r["seconds"]

    def per_10k(r):
        return r["requests"] * 10_000 / r["events"]

    single_total_s = args.events / rate(single)
    print(
        f"FullStory delivery benchmark: {args.events:,} events, {args.chunk:,} per chunk, "
        f"{args.latency_ms:.0f} ms latency, jobs PROCESSING {args.job_seconds:.1f} s"
    )
    print(f"{'path':44} {'events/s':>10} {'req/10k ev':>11} {'wall s':>8}")
    print(
        f"{'batch jobs, ' + str(args.in_flight) + ' in flight (operator)':44} {rate(batch):>10,.0f} "
        f"{per_10k(batch):>11.1f} {batch['seconds']:>8.1f}"
    )
    print(
        f"{'batch jobs, 1 in flight':44} {rate(serial):>10,.0f} {per_10k(serial):>11.1f} {serial['seconds']:>8.1f}"
    )
    print(
        f"{'baseline: one POST /v2/events per event':44} {rate(single):>10,.0f} {per_10k(single):>11.1f} "
        f"{single_total_s:>8.0f}  (measured on {args.sample} events, extrapolated)"
    )
    print(
        f"speed-up vs baseline: {rate(batch) / rate(single):,.0f}x; requests: "
        f"{per_10k(single) / per_10k(batch):,.0f}x fewer; in-flight vs serial jobs: {rate(batch) / rate(serial):.1f}x"
    )
    print(json.dumps({"batch": batch, "serial": serial, "single_sample": single}))


if __name__ == "__main__":
    main()
