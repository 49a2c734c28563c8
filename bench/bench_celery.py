"""Scale-out: one window of N rows through the DAG on a CeleryExecutor Airflow, with 1 worker, then 2.

The set-up is tests/integration/test_celery_run.py's (tests/integration/celery_cluster.py): Redis broker,
Postgres metadata DB and ledger, landing and state on a local S3 server (moto), the FullStory emulator.
Each measurement starts from nothing: a new cluster, metadata DB, ledger database, S3 server and emulator;
the same landing (generated once, not timed) is uploaded to each. A run is timed as Airflow saw it, from
the trigger (dag_run.queued_at) to its end (dag_run.end_date). Each run must succeed, give every row one
outcome and leave no event twice in the emulator (counted by datafly_event_id).

The baseline is the same window through the same stages called in one process, one after another, as the
DAG's tasks call them (plan, extract+validate, map, the delivery operator per group of chunks, summarise),
against the same kind of S3 server, Postgres ledger and emulator: the work without Airflow and Celery.

All of it shares this machine's cores: a second worker adds task slots, not CPUs.

    PYTHONPATH=.:plugins .venv/bin/python bench/bench_celery.py --rows 200000

Writes bench/out/celery.json: {"rows", "one_worker_s", "two_workers_s", "speedup", "baseline_s"}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins"), str(ROOT / "tests" / "integration")]

from celery_cluster import BUCKET, CeleryCluster, RunResult, S3Server  # noqa: E402

from include.datafly_fullstory.sample import generate_landing  # noqa: E402
from include.fullstory_emulator.testing import EmulatorProcess  # noqa: E402
from tests.db_servers import LocalPostgres  # noqa: E402

START = datetime(2026, 11, 20, 10, tzinfo=UTC)
WINDOW = (START, START + timedelta(hours=1))
EMULATOR_FLAGS = {"rate": 100_000, "burst": 100_000}  # FullStory's throttling is not what is measured


def check(result: RunResult, rows: int) -> None:
    """The run did the whole job once: success, one outcome per row, no event twice."""
    read = result.stats.get("rows", {}).get("read")
    problems = []
    if result.state != "success":
        problems.append(f"run {result.run_id} ended {result.state}: {result.task_states}")
    if not (result.outcome_rows == read == rows):
        problems.append(f"{result.outcome_rows} outcomes, {read} rows read, {rows} landed")
    if result.duplicate_event_ids:
        problems.append(f"{len(result.duplicate_event_ids)} event ids held twice or more")
    if result.events_held != result.stats.get("events", {}).get("delivered"):
        problems.append(f"emulator holds {result.events_held} events, stats say {result.stats.get('events')}")
    if problems:
        raise SystemExit("benchmark run is wrong: " + "; ".join(problems))


class WorkerMemory:
    """Samples the workers' process trees (every 0.5 s, in a thread) while a run goes on: the peak RSS of
    one process (a task's is the largest) and of one worker's whole tree, in MiB."""

    def __init__(self, pids: list[int]):
        self.pids, self.peak_process, self.peak_worker = pids, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.5):
            for pid in self.pids:
                try:
                    root = psutil.Process(pid)
                    rss = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
                except psutil.Error:
                    continue  # a process ended between listing and reading
                self.peak_process = max(self.peak_process, max(rss) / 2**20)
                self.peak_worker = max(self.peak_worker, sum(rss) / 2**20)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def distributed(
    work: Path,
    landing: Path,
    postgres,
    workers: tuple[str, ...],
    concurrency: int,
    timeout: float,
    part_rows: int,
):
    """One run on a new cluster: (the run, the workers' peak memory)."""
    with EmulatorProcess(**EMULATOR_FLAGS) as emulator:
        with CeleryCluster(
            work, postgres=postgres, emulator=emulator, workers=workers, concurrency=concurrency
        ) as cluster:
            cluster.upload_landing(landing)
            pids = [cluster.airflow.processes[f"worker {w}"].pid for w in workers]
            with WorkerMemory(pids) as memory:
                result = cluster.run(
                    f"bench_{len(workers)}_workers", WINDOW, timeout=timeout, part_rows=part_rows
                )
            return result, memory


def in_process(work: Path, landing: Path, postgres) -> tuple[float, int, int]:
    """The DAG's stages called directly, in order, in this process: (seconds, rows read, events held)."""
    from dags.datafly_fullstory_sync import CHUNKS_PER_DELIVERY_TASK
    from fullstory_provider.operators import FullStoryDeliveryOperator
    from include.datafly_fullstory.pipeline import extract_stage, group_chunks, map_stage, summarise_run
    from include.datafly_fullstory.run import plan_run

    class TaskInstance:  # what the operator reads of its context
        def __init__(self, map_index: int):
            self.task_id, self.map_index = "deliver", map_index

        def xcom_push(self, key, value):
            pass

    s3 = S3Server(work / "s3").start()
    database = "bench_baseline_ledger"
    ledger_url = postgres.new_database(database).replace("postgresql://", "postgresql+psycopg://", 1)
    saved = {k: os.environ.get(k) for k in [*s3.env, "AIRFLOW_CONN_FULLSTORY_DEFAULT"]}
    try:
        with EmulatorProcess(**EMULATOR_FLAGS) as emulator:
            os.environ.update(s3.env)
            os.environ["AIRFLOW_CONN_FULLSTORY_DEFAULT"] = json.dumps(
                {
                    "conn_type": "http",
                    "host": emulator.base_url,
                    "password": emulator.api_key,
                    "extra": {"org_id": emulator.org_id, "data_region": emulator.region},
                }
            )
            fs = s3.fs()
            fs.mkdir(BUCKET)
            fs.put(f"{landing}/", f"{BUCKET}/landing/", recursive=True)
            began = time.perf_counter()
            plan = plan_run(
                params={"window_start": WINDOW[0].isoformat(), "window_end": WINDOW[1].isoformat()},
                run_id="bench_in_process",
                landing_uri=f"s3://{BUCKET}/landing",
                state_uri=f"s3://{BUCKET}/state",
                airflow_home=str(work),
                run_after=datetime.now(UTC),
                destination=f"{emulator.org_id}@{emulator.region}",
            )
            plan = plan.__class__.from_xcom({**plan.to_xcom(), "ledger": {"url": ledger_url}})
            marks = [("plan", time.perf_counter())]
            extracted = extract_stage(plan, ledger_url)
            marks.append(("extract_and_validate", time.perf_counter()))
            mapped = map_stage(plan, extracted, ledger_url)
            marks.append(("map_payloads", time.perf_counter()))
            delivered = []
            for kind in ("users", "events"):
                for i, group in enumerate(group_chunks(mapped["chunks"], kind, CHUNKS_PER_DELIVERY_TASK)):
                    operator = FullStoryDeliveryOperator(
                        task_id=f"deliver_{kind}",
                        state_uri=plan.state_uri,
                        run_id=plan.run_id,
                        chunks=group,
                        ledger=plan.ledger,
                        destination=plan.destination,
                    )
                    delivered.append(operator.execute({"ti": TaskInstance(i)}))
            marks.append(("deliver", time.perf_counter()))
            stats = summarise_run(plan.to_xcom(), extracted, mapped, delivered, ledger_url)
            marks.append(("summarise", time.perf_counter()))
            seconds = time.perf_counter() - began
            stages = [
                f"{name} {end - start:.0f}s"
                for (name, end), (_, start) in zip(marks, [("", began), *marks[:-1]], strict=True)
            ]
            print(f"in process, per stage: {', '.join(stages)}", flush=True)
            held = emulator.state()["events"]
            if held != stats.asdict()["events"]["delivered"] or stats.problems:
                raise SystemExit(f"baseline run is wrong: {held} events held; {stats.problems}")
            return seconds, stats.asdict()["rows"]["read"], held
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3.stop()
        postgres.drop_database(database)


def describe(label: str, result: RunResult, rows: int) -> str:
    per_task: dict[str, list[float]] = {}
    for (task, _), secs in sorted(result.task_seconds.items()):
        per_task.setdefault(task, []).append(secs)
    busiest = sorted(per_task.items(), key=lambda kv: -sum(kv[1]))[:4]
    tasks = ", ".join(f"{t} {sum(s):.0f}s" + (f" over {len(s)}" if len(s) > 1 else "") for t, s in busiest)
    hosts = {}
    for host in result.mapped_hosts.values():
        hosts[host] = hosts.get(host, 0) + 1
    return (
        f"{label:<22}{result.seconds:>9.1f}{rows / result.seconds:>10,.0f}{result.events_held:>12,}"
        f"   mapped tasks per worker {dict(sorted(hosts.items()))}; task time: {tasks}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--concurrency", type=int, default=1, help="tasks each worker runs at once")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one DAG run may take")
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-process run")
    parser.add_argument(
        "--part-rows", type=int, default=None, help="rows per window part (default: a quarter of --rows)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "celery.json")
    args = parser.parse_args()
    logging.getLogger("include.datafly_fullstory").setLevel(logging.WARNING)
    logging.getLogger("fullstory_provider").setLevel(logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="dffs-bench-celery-"))
    # The in-process baseline imports Airflow (the operator, the DAG's group size): a throwaway home.
    os.environ["AIRFLOW_HOME"] = str(work / "airflow-home")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "ERROR"  # figures, not per-chunk lines
    try:
        t = time.perf_counter()
        landing = work / "landing"
        generate_landing(landing, args.rows, START, hours=1, files_per_hour=max(1, args.rows // 50_000))
        print(
            f"landing: {args.rows:,} rows generated in {time.perf_counter() - t:.1f}s (not timed)", flush=True
        )
        with LocalPostgres() as postgres:
            baseline = None
            if not args.no_baseline:
                baseline, read, held = in_process(work / "baseline", landing, postgres)
                print(f"in process: {baseline:.1f}s, {read:,} rows read, {held:,} events held", flush=True)
            results = {}
            for n in (1, 2):
                workers = tuple(f"worker-{i + 1}" for i in range(n))
                began = time.perf_counter()
                result, memory = distributed(
                    work / f"cluster-{n}",
                    landing,
                    postgres,
                    workers,
                    args.concurrency,
                    args.timeout,
                    args.part_rows or max(1000, args.rows // 4),
                )
                check(result, args.rows)
                results[n] = result
                print(
                    f"{n} worker(s): run {result.seconds:.1f}s (cluster up, run and checks "
                    f"{time.perf_counter() - began:.0f}s); peak RSS of one task process "
                    f"{memory.peak_process:,.0f} MiB, of one worker with its tasks {memory.peak_worker:,.0f} MiB",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    one, two = results[1].seconds, results[2].seconds
    print(
        f"\n{args.rows:,} rows, one window; each worker runs {args.concurrency} task(s) at once; 2 cores shared"
    )
    print(f"{'':<22}{'seconds':>9}{'rows/s':>10}{'events held':>12}")
    if baseline is not None:
        print(f"{'in process (no Airflow)':<22}{baseline:>9.1f}{args.rows / baseline:>10,.0f}{held:>12,}")
    print(describe("celery, 1 worker", results[1], args.rows))
    print(describe("celery, 2 workers", results[2], args.rows))
    print(f"\nspeedup 1 -> 2 workers: {one / two:.2f}x")
    if baseline is not None:
        print(
            f"Airflow + Celery vs in process: 1 worker {one / baseline:.2f}x, 2 workers {two / baseline:.2f}x the time"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figures = {
        "rows": args.rows,
        "one_worker_s": round(one, 2),
        "two_workers_s": round(two, 2),
        "speedup": round(one / two, 3),
        "baseline_s": None if baseline is None else round(baseline, 2),
    }
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
