"""`make bench`: every benchmark in turn, at the sizes their issues name, each in its own process, then one
summary table of the issue's performance goals.

Benchmarks print figures and ratios against a baseline measured in the same run; they are not tests and
assert nothing about speed (these machines are noisy). The scripts the summary reads write their figures
to `bench/out/<name>.json` (`--json`); `bench_celery.py`, when present, writes `bench/out/celery.json`
itself. A figure whose script failed or did not run shows as "not measured". Pass `--quick` for a smaller
smoke run (its summary is not the issue's: the sizes are smaller).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
FULL = {
    "bench_landing.py": ["--rows", "1000000", "--big-rows", "10000000"],
    "bench_mapping.py": ["--rows", "1000000", "--distinct-rows", "200000"],
    "bench_emulator.py": [],
    "bench_delivery.py": [],
    "bench_pipeline.py": ["--rows", "1000000"],
    "bench_ledger.py": ["--rows", "1000000"],
    "bench_lookback.py": ["--rows-per-hour", "40000"],
    "bench_report.py": ["--rows", "10000000"],
    "bench_celery.py": ["--rows", "2000000"],
}
QUICK = {
    "bench_landing.py": ["--rows", "100000", "--big-rows", "1000000"],
    "bench_mapping.py": ["--rows", "100000", "--naive-rows", "10000", "--distinct-rows", "20000"],
    "bench_emulator.py": ["--batches", "4"],
    "bench_delivery.py": ["--events", "20000", "--chunk", "5000", "--slow-job-seconds", "5"],
    "bench_pipeline.py": ["--rows", "100000"],
    "bench_ledger.py": ["--rows", "100000"],
    "bench_lookback.py": ["--rows-per-hour", "4000"],
    "bench_report.py": ["--rows", "200000"],
    "bench_celery.py": ["--rows", "200000"],
}
# the scripts whose figures the summary reads: script -> its JSON file (written by the script)
JSON_OF = {
    "bench_landing.py": "landing.json",
    "bench_mapping.py": "mapping.json",
    "bench_delivery.py": "delivery.json",
    "bench_celery.py": "celery.json",
}
PASSES_JSON = {
    "bench_landing.py",
    "bench_mapping.py",
    "bench_delivery.py",
}  # take --json; celery writes its own


def run(plan: dict[str, list[str]]) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}
    OUT.mkdir(parents=True, exist_ok=True)
    failed = []
    for script, args in plan.items():
        path = ROOT / "bench" / script
        if not path.exists():
            print(f"\n===== {script}: not in this checkout, skipped", flush=True)
            continue
        figures = OUT / JSON_OF[script] if script in JSON_OF else None
        if figures is not None and figures.exists():
            figures.unlink()  # a failed run must not leave an earlier run's figures behind
        if script in PASSES_JSON:
            args = [*args, "--json", str(figures)]
        print(f"\n===== {script} {' '.join(args)}", flush=True)
        began = time.monotonic()
        code = subprocess.call([sys.executable, str(path), *args], env=env, cwd=ROOT)
        print(f"===== {script}: exit {code} in {time.monotonic() - began:.0f}s", flush=True)
        if code:
            failed.append(script)
    return failed


# ---- the summary ---------------------------------------------------------------------------------------------


def _load(name: str) -> dict | None:
    path = OUT / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _row(figure: str, source: str, compute: Callable[[dict], tuple[str, str, str, bool | None]]) -> list[str]:
    data = _load(source)
    if data is None:
        return [figure, "not measured", "", "", "-"]
    try:
        value, baseline, goal, met = compute(data)
    except (KeyError, TypeError, ZeroDivisionError) as exc:
        return [figure, f"unreadable {source} ({exc})", "", "", "-"]
    return [figure, value, baseline, goal, "-" if met is None else ("yes" if met else "NO")]


def _mapping_vs_naive(m: dict):
    speedup = m["naive_s"] / m["mapping_s"]
    return (
        f"{speedup:.1f}x faster ({m['mapping_s']:.1f} s)",
        f"naive per-row {m['naive_s']:.0f} s (from {m['naive_rows_measured']:,} rows)",
        ">= 10x",
        speedup >= 10,
    )


def _mapping_vs_floor(m: dict):
    ratio = m["mapping_s"] / m["floor_s"]
    beats = "beats the floor" if ratio < 1 else "does not beat the floor"
    return (
        f"{ratio:.2f}x the floor ({beats})",
        f"floor {m['floor_s']:.1f} s",
        "<= 2x, then < 1x",
        ratio <= 2,
    )


def _mapping_distinct(m: dict):
    d = m["distinct"]
    ratio = d["mapping_s"] / d["floor_s"]
    return (
        f"{ratio:.2f}x the floor; {d['speedup_vs_naive']:.1f}x vs naive",
        f"floor {d['floor_s']:.1f} s ({d['rows']:,} rows)",
        "(worst case, no goal)",
        None,
    )


def _gx_share(figures: dict):
    ext = figures["extract"]
    share = ext["gx_s"] / ext["seconds"]
    return (
        f"{share:.0%} (GX {ext['gx_s']:.1f} s)",
        f"extract stage {ext['seconds']:.1f} s",
        "<= 25%",
        share <= 0.25,
    )


def _rss(figures: dict):
    small, big = figures["read"], figures["big_read"]
    ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
    return (
        f"{ratio:.2f}x ({big['peak_rss_mb']:.0f} MB for {big['rows']:,} rows)",
        f"{small['rows']:,} rows: {small['peak_rss_mb']:.0f} MB",
        "<= 1.2x",
        ratio <= 1.2,
    )


def _requests(figures: dict):
    standard, *slower = figures["requests"]  # the DAG's way; the first at the bench's standard job time
    shown = [f"{standard['per_million']:.0f} ({standard['job_seconds']:g} s jobs)"]
    shown += [f"{r['per_million']:.0f} ({r['job_seconds']:g} s jobs)" for r in slower]
    one = figures.get("requests_one_task")
    if one:
        shown.append(f"{one['per_million']:.0f} ({one['job_seconds']:g} s jobs, one task)")
    return (
        "; ".join(shown),
        "1,000,000 (one request per event)",
        f"<= 200 ({standard['job_seconds']:g} s jobs)",
        standard["per_million"] <= 200,
    )


def _celery(c: dict):
    value = f"{c['speedup']:.2f}x (2 workers {c['two_workers_s']:.1f} s, {c['rows']:,} rows)"
    baseline = f"1 worker {c['one_worker_s']:.1f} s"
    if c.get("baseline_s") is not None:
        baseline += f"; baseline {c['baseline_s']:.1f} s"
    goal = c.get("goal", "see bench_celery.py")
    return value, baseline, str(goal), c.get("met")


SUMMARY = [
    ("map + serialise 1M mixed rows vs naive per-row", "mapping.json", _mapping_vs_naive),
    ("same vs the floor (orjson loads + dumps, no mapping)", "mapping.json", _mapping_vs_floor),
    ("  the same with no payload repeated (worst case)", "mapping.json", _mapping_distinct),
    ("Great Expectations' share of the extract stage, 1M rows", "landing.json", _gx_share),
    ("peak RSS reading a 10M-row window vs a 1M-row window", "landing.json", _rss),
    ("HTTP requests per 1M events delivered", "delivery.json", _requests),
    ("end to end 1M rows, 1 worker vs 2 Celery workers (2M rows)", "celery.json", _celery),
]


def summary_table(started: float) -> str:
    rows = [["figure", "this run", "same-run baseline", "goal", "met"]]
    rows += [_row(figure, source, compute) for figure, source, compute in SUMMARY]
    stale = [
        name
        for name in sorted({s for _, s, _ in SUMMARY})
        if (OUT / name).exists() and (OUT / name).stat().st_mtime < started
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    if stale:
        lines.append(f"(from an earlier run, not this one: {', '.join(stale)})")
    return "\n".join(lines)


def main() -> int:
    quick = "--quick" in sys.argv
    started = time.time()
    failed = run(QUICK if quick else FULL)
    print("\n===== summary" + (" (--quick: smaller sizes than the goals name)" if quick else ""))
    print(summary_table(started))
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
