"""Landing read and validation: rows/s, peak memory, and GX time against the same run's read time.

    .venv/bin/python bench/bench_landing.py [--rows 1000000] [--big-rows 10000000] [--batch-size 100000]
        [--json bench/out/landing.json]

Landings are generated with sample/ (one hive hour per million rows) and cached under bench/out/.
Each measurement runs in a fresh child process, which reports its own peak RSS (getrusage) and its RSS
after imports, so the figures are not polluted by the parent or by one another:
  1. read `--rows` rows (one window);
  2. read `--big-rows` rows (a window ten times longer): peak RSS should stay flat, bounded by the batch
     size, while the window grows;
  3. read + validate `--rows` rows as the extract stage does: GX seconds against the seconds of
     measurement 1 (reading the same rows alone: the same-run baseline), and the helper checks;
  4. the whole extract stage on `--rows` rows (read, validate, write parts and quarantine).
About 2-3 minutes with the defaults on 2 cores (the first run also generates the landings, ~1 minute).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"
START = datetime(2026, 11, 26, 0, tzinfo=UTC)
ROWS_PER_HOUR = 1_000_000


def _rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set. Not getrusage's ru_maxrss: Linux
    carries the parent's peak into a forked-and-exec'd child, so a child would report the parent's."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB (macOS: bytes)


def landing_for(rows: int) -> tuple[Path, int]:
    """A cached hive landing of `rows` rows, one hour per million rows (generated hour by hour, so even
    10M rows never sit in memory at once). Returns (folder, hours)."""
    from include.datafly_fullstory import sample

    hours = max(1, -(-rows // ROWS_PER_HOUR))
    folder = OUT / f"landing-{rows}"
    done = folder / ".complete"  # hidden: the reader ignores it
    if not done.exists():
        per_hour = -(-rows // hours)
        for h in range(hours):
            n = min(per_hour, rows - h * per_hour)
            print(f"  generating hour {h + 1}/{hours} ({n} rows) under {folder}", flush=True)
            sample.generate_landing(folder, n, START + timedelta(hours=h), hours=1, seed=100 + h)
        done.write_text("ok")
    return folder, hours


# -- children ------------------------------------------------------------------------------------------


def child_read(landing: str, hours: int, batch_size: int) -> dict:
    from include.datafly_fullstory.landing import iter_window_batches
    from include.datafly_fullstory.window import Window

    window = Window(START, START + timedelta(hours=hours))
    rss_imports = _rss_mb("VmRSS")
    started, rows = time.perf_counter(), 0
    for frame in iter_window_batches(landing, window, batch_size=batch_size):
        rows += len(frame)
    return {"rows": rows, "seconds": time.perf_counter() - started, "rss_after_imports_mb": rss_imports}


def child_validate(landing: str, hours: int, batch_size: int) -> dict:
    from include.datafly_fullstory import validation
    from include.datafly_fullstory.extract import _coalesce
    from include.datafly_fullstory.landing import iter_window_batches
    from include.datafly_fullstory.window import Window

    window = Window(START, START + timedelta(hours=hours))
    started = time.perf_counter()
    validation._batch_definition()  # one GX import and context per worker process: not per run
    gx_setup = time.perf_counter() - started
    rss_imports = _rss_mb("VmRSS")
    frames = _coalesce(iter_window_batches(landing, window, batch_size=batch_size), batch_size)
    seen, summary, rows, validate = validation.SeenEventIds(), None, 0, 0.0
    started = time.perf_counter()
    for frame in frames:  # the scanner decodes the next batch in the background meanwhile
        begun = time.perf_counter()
        _, _, batch = validation.validate_batch(frame, window, seen)
        validate += time.perf_counter() - begun
        summary = validation.merge_summaries(summary, batch)
        rows += len(frame)
    return {
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "validate_s": validate,
        "gx_s": summary["seconds"]["gx"],
        "checks_s": summary["seconds"]["checks"],
        "gx_setup_s": gx_setup,
        "quarantined": summary["rows_failed"],
        "rss_after_imports_mb": rss_imports,
    }


def child_extract(landing: str, hours: int, batch_size: int) -> dict:
    from include.datafly_fullstory import validation
    from include.datafly_fullstory.extract import run_extract
    from include.datafly_fullstory.state import RunStore
    from include.datafly_fullstory.window import Window

    validation._batch_definition()
    rss_imports = _rss_mb("VmRSS")
    with tempfile.TemporaryDirectory(prefix="dffs-bench-state-") as state:
        started = time.perf_counter()
        result = run_extract(
            landing,
            Window(START, START + timedelta(hours=hours)),
            RunStore(state, "bench"),
            batch_size=batch_size,
        )
        seconds = time.perf_counter() - started
    return {
        "rows": result["rows_read"],
        "seconds": seconds,
        "gx_s": result["validation"]["seconds"]["gx"],
        "parts": len(result["parts"]),
        "rss_after_imports_mb": rss_imports,
    }


CHILDREN = {"read": child_read, "validate": child_validate, "extract": child_extract}


def measure(kind: str, landing: Path, hours: int, batch_size: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--landing",
        str(landing),
        "--hours",
        str(hours),
        "--batch-size",
        str(batch_size),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- report --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--big-rows", type=int, default=10_000_000, help="0 skips the big read")
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--json", type=Path, help="also write the figures here (run_all.py's summary)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--landing", help=argparse.SUPPRESS)
    parser.add_argument("--hours", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = CHILDREN[args.child](args.landing, args.hours, args.batch_size)
        print(json.dumps({**result, "peak_rss_mb": _rss_mb()}))
        return

    small, small_hours = landing_for(args.rows)
    print(f"batch size {args.batch_size:,} rows; each figure from a fresh process")
    figures: dict = {"rows": args.rows, "big_rows": args.big_rows, "batch_size": args.batch_size}
    read = figures["read"] = measure("read", small, small_hours, args.batch_size)
    print(
        f"read      {read['rows']:>11,} rows  {read['rows'] / read['seconds']:>10,.0f} rows/s  "
        f"peak RSS {read['peak_rss_mb']:,.0f} MB (after imports {read['rss_after_imports_mb']:,.0f} MB)"
    )
    if args.big_rows:
        big, big_hours = landing_for(args.big_rows)
        big_read = figures["big_read"] = measure("read", big, big_hours, args.batch_size)
        print(
            f"read      {big_read['rows']:>11,} rows  {big_read['rows'] / big_read['seconds']:>10,.0f} rows/s  "
            f"peak RSS {big_read['peak_rss_mb']:,.0f} MB"
        )
        print(
            f"  window x{big_read['rows'] / read['rows']:.0f} -> peak RSS x"
            f"{big_read['peak_rss_mb'] / read['peak_rss_mb']:.2f} (bounded by the batch size, not the window)"
        )
        half = figures["big_read_half_batch"] = measure("read", big, big_hours, args.batch_size // 2)
        print(f"  same window, batch size {args.batch_size // 2:,}: peak RSS {half['peak_rss_mb']:,.0f} MB")
    val = figures["validate"] = measure("validate", small, small_hours, args.batch_size)
    print(
        f"read+validate {val['rows']:>7,} rows  {val['rows'] / val['seconds']:>10,.0f} rows/s  "
        f"({val['seconds']:.2f} s; {val['quarantined']:,} quarantined; peak RSS {val['peak_rss_mb']:,.0f} MB)"
    )
    print(
        f"  validate {val['validate_s']:.2f} s = GX {val['gx_s']:.2f} s + helper checks {val['checks_s']:.2f} s "
        f"+ split into valid / quarantined"
    )
    print(
        f"  baseline: reading the same rows alone took {read['seconds']:.2f} s ->  GX / read = "
        f"{val['gx_s'] / read['seconds']:.2f},  validate / read = {val['validate_s'] / read['seconds']:.2f}  "
        f"(one-off GX import + context per worker process: {val['gx_setup_s']:.1f} s)"
    )
    ext = figures["extract"] = measure("extract", small, small_hours, args.batch_size)
    print(
        f"extract   {ext['rows']:>11,} rows  {ext['rows'] / ext['seconds']:>10,.0f} rows/s  "
        f"({ext['seconds']:.1f} s, GX {ext['gx_s'] / ext['seconds']:.0%} of the stage, {ext['parts']} parts, "
        f"peak RSS {ext['peak_rss_mb']:,.0f} MB)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
