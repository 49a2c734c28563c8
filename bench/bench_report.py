"""What the run report costs on a big run: seconds and peak memory, each step in a fresh process.

A run folder with N outcome rows (default 10M) is written through outcomes.py as the stages leave it
(partial files of 1M rows, merged by `merge_outcomes` into `outcomes.parquet`), with a realistic mix of
outcomes and reasons: most rows delivered without a reason, a tenth stitched (a reason naming its own
anonymous id, user and event: one distinct reason per row), skips, consent revocations naming a time and a
row, quarantines, FullStory rejections. Then, each in its own process (peak RSS is the process's own):

- `reasons`: the report's rows by outcome and top reasons (reasons.outcome_reasons: Arrow group-bys over
  record batches);
- `report`: the whole report, written (build + render + write: reasons, timeline, previous runs);
- baseline `merge`: the summarise step's own `merge_outcomes` on the same rows (what a run already pays);
- baseline `pandas`: the "pandas session" a person runs today: read outcome, reason and event id, group.

Prints seconds, peak RSS and the ratios against the baselines; asserts nothing about speed.

    PYTHONPATH=.:plugins .venv/bin/python bench/bench_report.py --rows 10000000
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "plugins")) if p not in sys.path]

RUN = "scheduled__2026-11-20T10:00:00+00:00"
PART = 1_000_000


def build(state: Path, rows: int) -> None:
    """The run folder: partial outcome files through outcomes.py, merged; stats.json through stats.py."""
    import numpy as np
    import pyarrow as pa

    from include.datafly_fullstory import outcomes
    from include.datafly_fullstory.state import RunStore
    from include.datafly_fullstory.stats import RunStats, write_stats

    store = RunStore(str(state), RUN)
    rng = np.random.default_rng(7)
    for first in range(0, rows, PART):
        n = min(PART, rows - first)
        row = np.arange(first, first + n, dtype=np.int64)
        pick = rng.random(n)
        outcome = np.full(n, "delivered", dtype=object)
        reason = np.full(n, None, dtype=object)
        ids = np.char.add("evt-", row.astype(str)).astype(object)
        stitched = pick < 0.10
        reason[stitched] = [
            f"stitched: anonymous_id anon-{r % 50_000} -> user u-{r % 9_000} (learned from event evt-{r // 3})"
            for r in row[stitched]
        ]
        skipped = (pick >= 0.70) & (pick < 0.88)
        outcome[skipped] = "skipped"
        reason[skipped] = np.array(
            [
                "no FullStory identification: the event has no user_id and no FullStory session id",
                "Datafly 'screen' calls have no FullStory mapping in blueprint fullstory/retail 0.1.0",
                "traits unchanged since delivered by run scheduled__2026-11-19T10:00:00+00:00: no user update sent",
            ],
            dtype=object,
        )[(row[skipped] % 3)]
        filtered = (pick >= 0.88) & (pick < 0.91)
        outcome[filtered] = "filtered"
        reason[filtered] = [
            f"analytics consent revoked at 2026-11-20T10:{r % 60:02d}:00Z (row evt-{r}): a newer row denies it"
            for r in row[filtered]
        ]
        quarantined = (pick >= 0.91) & (pick < 0.93)
        outcome[quarantined] = "quarantined"
        reason[quarantined] = "timestamp is outside the window"
        rejected = pick >= 0.93
        outcome[rejected] = "rejected"
        reason[rejected] = np.array(
            [
                "invalid_argument: event name 'purchase' is rejected",
                "invalid_argument: property 'price' is not a number",
            ],
            dtype=object,
        )[row[rejected] % 2]
        table = pa.table(
            {
                "row": row,
                "event_id": pa.array(ids, pa.string()),
                "outcome": pa.array(outcome, pa.string()),
                "reason": pa.array(reason, pa.string()),
                "kind": pa.array(np.full(n, "event", dtype=object), pa.string()),
                "chunk": pa.array(
                    np.char.add("events-", (row // 50_000).astype(str)).astype(object), pa.string()
                ),
            }
        )
        outcomes.write_outcomes(store, f"bench-{first // PART:05d}", table)
    counts = outcomes.count_by_outcome(outcomes.merge_outcomes(store, rows))
    stats = RunStats(
        dag_run_id=RUN, window_start="2026-11-20T10:00:00+00:00", window_end="2026-11-20T11:00:00+00:00"
    )
    stats.rows = {"read": rows, **counts}
    stats.artifacts = store.uri()
    write_stats(store, stats)


def measure(state: Path, what: str, rows: int) -> dict:
    from include.datafly_fullstory import outcomes
    from include.datafly_fullstory.state import RunStore
    from include.datafly_fullstory.stats import RunStats, read_stats

    store = RunStore(str(state), RUN)
    if what == "pandas":
        import pandas as pd  # noqa: F401 - imported before the clock starts, as a session would have it
    if what in ("reasons", "report"):
        from include.datafly_fullstory import report
        from include.datafly_fullstory.report import page, reasons  # noqa: F401
    before = peak_rss_mb()
    started = time.perf_counter()
    if what == "reasons":
        found = reasons.outcome_reasons(store)
        check = sum(e.rows for e in found.values())
    elif what == "report":
        result = report.write_report(store, RunStats.from_dict(read_stats(store)))
        assert result["error"] is None, result
        data = json.loads(_data_block(store.read_bytes("report.html").decode()))
        check = sum(entry["rows"] for entry in data["outcomes"].values())
    elif what == "merge":
        check = outcomes.merge_outcomes(store, rows).num_rows
    elif what == "pandas":
        df = pd.read_parquet(store.path("outcomes.parquet"), columns=["outcome", "reason", "event_id"])
        grouped = df.groupby(["outcome", "reason"], dropna=False).agg(
            rows=("event_id", "size"), example=("event_id", "first")
        )
        check = int(grouped["rows"].sum())
    else:
        raise SystemExit(f"unknown step {what}")
    seconds = time.perf_counter() - started
    return {"what": what, "seconds": seconds, "peak_mb": peak_rss_mb(), "start_mb": before, "check": check}


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss would carry over the parent's peak across fork and exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _data_block(html: str) -> str:
    start = html.index('id="report-data">') + len('id="report-data">')
    return html[start : html.index("</script>", start)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "report"))
    parser.add_argument("--measure")
    args = parser.parse_args()
    state = Path(args.out)
    if args.measure == "build":  # in its own process, so the measuring processes start small
        build(state, args.rows)
        return 0
    if args.measure:
        print(json.dumps(measure(state, args.measure, args.rows)))
        return 0
    shutil.rmtree(state, ignore_errors=True)
    began = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--rows", str(args.rows), "--out", str(state), "--measure", "build"],
        check=True,
    )
    print(
        f"run folder with {args.rows:,} outcome rows written in {time.perf_counter() - began:.1f}s",
        flush=True,
    )
    results = {}
    for what in ("merge", "pandas", "reasons", "report"):
        out = subprocess.run(
            [sys.executable, __file__, "--rows", str(args.rows), "--out", str(state), "--measure", what],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results[what] = json.loads(out.strip().splitlines()[-1])
        r = results[what]
        print(
            f"  {what:<8} {r['seconds']:7.2f} s   peak RSS {r['peak_mb']:7.0f} MB (at start {r['start_mb']:.0f} MB)",
            flush=True,
        )
    assert all(r["check"] == args.rows for r in results.values()), results
    m, p, rs, rp = (results[k] for k in ("merge", "pandas", "reasons", "report"))
    print(
        f"report: {rp['seconds']:.2f} s = {rp['seconds'] / m['seconds']:.2f}x the summarise step's merge "
        f"({m['seconds']:.2f} s), {rp['seconds'] / p['seconds']:.2f}x the pandas group-by ({p['seconds']:.2f} s)"
    )
    print(
        f"peak RSS: report {rp['peak_mb']:.0f} MB (reasons alone {rs['peak_mb']:.0f} MB) against merge "
        f"{m['peak_mb']:.0f} MB and pandas {p['peak_mb']:.0f} MB: {rp['peak_mb'] / m['peak_mb']:.2f}x / "
        f"{rp['peak_mb'] / p['peak_mb']:.2f}x"
    )
    print(
        f"report.html: {(state / 'runs' / RUN.replace(':', '_') / 'report.html').stat().st_size / 1024:.0f} KB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
