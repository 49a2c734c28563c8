"""Delivery against the FullStory emulator with injected latency: throughput, and HTTP requests per 1M
events, each with a same-run baseline.

    .venv/bin/python bench/bench_delivery.py [--events 200000] [--chunk 10000] [--latency-ms 50]
        [--job-seconds 1] [--slow-job-seconds 20] [--chunks-per-task 0] [--json bench/out/delivery.json]

Measures, on one emulator started here:
  1. FullStoryDeliveryOperator: batch import jobs, `--in-flight` jobs at once (the production path), in
     chunks of `--chunk` events, polling fast (0.25 s) to measure throughput;
  2. the same with one job in flight (what the concurrency buys);
  3. requests per 1M events: mapped events (sample rows through the mapping) in chunks as the mapping cuts
     them (at most 50,000 items / 8 MiB), delivered as the DAG delivers them (the DAG's chunks per task,
     each task a fresh operator execution), with the operator's default poll schedule, jobs that FullStory
     keeps PROCESSING `--job-seconds` and, second, `--slow-job-seconds`; then the slow jobs again with every
     chunk in one task (what the schedule learns within a task). Every request the client makes counts
     (job creates, status polls, error and import pages, retries), checked against the emulator's own count;
  4. baseline: the same events sent one per `POST /v2/events` (as a naive sync would), measured on a
     sample of `--sample` events and extrapolated to the full count.
Prints events/s, requests per 10,000 events and per 1M events, and the ratios. About 2-3 minutes.
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
    parts = {
        f"events-{c:05d}": [event(i) for i in range(start, min(total, start + chunk))]
        for c, start in enumerate(range(0, total, chunk))
    }
    return write_parts(state, run_id, parts)


def write_parts(state: Path, run_id: str, parts: dict[str, list[dict]]) -> tuple[list[str], dict]:
    store = RunStore(str(state), run_id)
    location = {"url": f"sqlite:///{state / (run_id + '-ledger.sqlite')}"}
    entries = write_run_folder(store, Ledger(location["url"]), parts)
    return [e["name"] for e in entries], location


def mapped_events(total: int) -> list[dict]:
    """`total` event bodies as the mapping writes them, from sample rows (about 450 bytes each)."""
    from datetime import UTC, datetime, timedelta

    import numpy as np
    import orjson

    from include.datafly_fullstory import sample
    from include.datafly_fullstory.blueprint import load_blueprint
    from include.datafly_fullstory.mapping import BatchMapper, MappingSettings

    now = datetime(2026, 11, 26, 10, tzinfo=UTC)
    rows = int(total / 0.45) + 2000  # about half the sample rows become events (no stitching here)
    spec = sample.LandingSpec(rows=rows, start=now - timedelta(hours=1), end=now, bad_fraction=0.0)
    table = sample.generate_table(spec)
    df = table.to_pandas()
    df["_row"], df["_file"] = np.arange(rows, dtype=np.int64), "landing/part-0.parquet"
    lines = BatchMapper(load_blueprint(), MappingSettings(), now).map_batch(df).lines
    if len(lines) < total:
        raise SystemExit(f"the sample gave {len(lines)} events, fewer than --events {total}")
    return [orjson.loads(line) for line in lines[:total]]


def mapping_chunks(items: list[dict]) -> dict[str, list[dict]]:
    """Items cut into chunks as the mapping's ChunkWriter cuts them: at most `max_items` lines and
    `max_bytes` of request body (mapping/settings.py defaults)."""
    import orjson

    from include.datafly_fullstory.chunks import ENVELOPE_BYTES
    from include.datafly_fullstory.mapping import MappingSettings

    settings = MappingSettings()
    parts: dict[str, list[dict]] = {}
    current: list[dict] = []
    body = ENVELOPE_BYTES
    for item in items:
        size = len(orjson.dumps(item)) + 1
        if current and (len(current) == settings.max_items or body + size > settings.max_bytes):
            parts[f"events-{len(parts):05d}"], current, body = current, [], ENVELOPE_BYTES
        current.append(item)
        body += size
    if current:
        parts[f"events-{len(parts):05d}"] = current
    return parts


class _TI:
    def xcom_push(self, key, value):
        pass


def run_operator(
    emu,
    state: Path,
    run_id: str,
    total: int,
    chunk: int,
    in_flight: int,
    parts: dict | None = None,
    poll_interval: float | None = 0.25,
) -> dict:
    """Deliver through the operator; `poll_interval` None: the operator's default schedule."""
    from fullstory_provider.operators import FullStoryDeliveryOperator

    emu.reset(keep_faults=True)
    chunks, ledger = write_parts(state, run_id, parts) if parts else write_run(state, run_id, total, chunk)
    op = FullStoryDeliveryOperator(
        task_id="bench",
        state_uri=str(state),
        run_id=run_id,
        chunks=chunks,
        ledger=ledger,
        destination=DESTINATION,
        max_in_flight=in_flight,
        timeout=1800,
        **({} if poll_interval is None else {"poll_interval": poll_interval}),
    )
    started = time.perf_counter()
    stats = op.execute({"ti": _TI()})
    seconds = time.perf_counter() - started
    delivered = emu.state()["events"]
    assert delivered == total == stats["events"]["delivered"], (delivered, total, stats["events"])
    return {
        "seconds": seconds,
        "events": total,
        "chunks": len(chunks),
        "requests": stats["http"]["requests"],
        "emulator_requests": emu.requests()["total"],
        "bytes": stats["bytes_sent"],
    }


def dag_chunks_per_task() -> int:
    """How many chunks one mapped delivery task of the DAG delivers (its CHUNKS_PER_DELIVERY_TASK), read
    from the DAG file without importing it."""
    import ast

    tree = ast.parse((ROOT / "dags" / "datafly_fullstory_sync.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "CHUNKS_PER_DELIVERY_TASK" for t in node.targets
        ):
            return int(ast.literal_eval(node.value))
    raise SystemExit("dags/datafly_fullstory_sync.py has no CHUNKS_PER_DELIVERY_TASK")


def requests_per_million(
    emu, state: Path, parts: dict, total: int, in_flight: int, job_seconds: float, per_task: int
) -> dict:
    """Deliver mapping-sized chunks as the DAG does, `per_task` chunks per operator execution (each a task
    of its own: its poll schedule starts from nothing), with the operator's default poll schedule. Returns
    the requests the client made, per 1M events too."""
    from fullstory_provider.operators import FullStoryDeliveryOperator

    emu.reset(keep_faults=True)
    emu.set_faults(job_seconds=job_seconds)
    run_id = f"bench_requests_{job_seconds:g}s_{per_task}"
    chunks, ledger = write_parts(state, run_id, parts)
    tasks = [chunks[i : i + per_task] for i in range(0, len(chunks), per_task)]
    requests, started = 0, time.perf_counter()
    for names in tasks:
        op = FullStoryDeliveryOperator(
            task_id="bench",
            state_uri=str(state),
            run_id=run_id,
            chunks=names,
            ledger=ledger,
            destination=DESTINATION,
            max_in_flight=in_flight,
            timeout=1800,
        )
        requests += op.execute({"ti": _TI()})["http"]["requests"]
    seconds = time.perf_counter() - started
    delivered = emu.state()["events"]
    assert delivered == total, (delivered, total)
    return {
        "seconds": seconds,
        "events": total,
        "chunks": len(chunks),
        "tasks": len(tasks),
        "chunks_per_task": per_task,
        "job_seconds": job_seconds,
        "requests": requests,
        "emulator_requests": emu.requests()["total"],
        "per_million": requests * 1_000_000 / total,
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
        "--slow-job-seconds", type=float, default=20.0, help="the second job time of the requests figure"
    )
    parser.add_argument(
        "--sample", type=int, default=300, help="events sent one per request for the baseline"
    )
    parser.add_argument(
        "--chunks-per-task", type=int, default=0, help="chunks per delivery task (0: the DAG's number)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here (run_all.py's summary)")
    args = parser.parse_args()

    mapped = mapped_events(args.events)
    parts = mapping_chunks(mapped)
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
        per_task = args.chunks_per_task or dag_chunks_per_task()
        per_million = [
            requests_per_million(emu, state, parts, args.events, args.in_flight, seconds, per_task)
            for seconds in (args.job_seconds, args.slow_job_seconds)
        ]
        # the same slow jobs, all chunks in one task: what the schedule learns from the jobs that ended
        one_task = requests_per_million(
            emu, state, parts, args.events, args.in_flight, args.slow_job_seconds, len(parts)
        )
        emu.set_faults(job_seconds=args.job_seconds)
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
    print(
        f"requests per 1M events delivered: mapped events in {per_million[0]['chunks']} chunks of at most "
        f"50,000 items / 8 MiB, {per_task} chunks per delivery task as the DAG delivers them, "
        f"{args.in_flight} jobs in flight, the operator's default poll schedule; every request the client "
        "made (baseline: one request per event, 1,000,000):"
    )
    for r in [*per_million, one_task]:
        print(
            f"  jobs PROCESSING {r['job_seconds']:>4.0f} s, {r['chunks_per_task']:>2} chunks per task: "
            f"{r['per_million']:>6.0f} requests per 1M events ({r['requests']} requests for "
            f"{r['events']:,} events in {r['tasks']} task(s), emulator counted {r['emulator_requests']}; "
            f"{rate(r):,.0f} events/s)"
        )
    figures = {
        "batch": batch,
        "serial": serial,
        "requests": per_million,
        "requests_one_task": one_task,
        "single_sample": single,
    }
    print(json.dumps(figures))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
