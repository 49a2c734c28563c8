"""`make bench`: every benchmark in turn, at the sizes their issues name, each in its own process.

Benchmarks print figures and ratios against a baseline measured in the same run; they are not tests
and assert nothing about speed (these machines are noisy). Pass `--quick` for a smaller smoke run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL = {
    "bench_landing.py": ["--rows", "1000000", "--big-rows", "10000000"],
    "bench_mapping.py": ["--rows", "1000000"],
    "bench_emulator.py": [],
    "bench_delivery.py": [],
    "bench_pipeline.py": ["--rows", "1000000"],
    "bench_ledger.py": ["--rows", "1000000"],
    "bench_lookback.py": ["--rows-per-hour", "40000"],
    "bench_report.py": ["--rows", "10000000"],
}
QUICK = {
    "bench_landing.py": ["--rows", "100000", "--big-rows", "0"],
    "bench_mapping.py": ["--rows", "100000", "--naive-rows", "10000"],
    "bench_emulator.py": ["--batches", "4"],
    "bench_delivery.py": ["--events", "20000", "--chunk", "5000"],
    "bench_pipeline.py": ["--rows", "100000"],
    "bench_ledger.py": ["--rows", "100000"],
    "bench_lookback.py": ["--rows-per-hour", "4000"],
    "bench_report.py": ["--rows", "200000"],
}


def main() -> int:
    plan = QUICK if "--quick" in sys.argv else FULL
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}
    failed = []
    for script, args in plan.items():
        print(f"\n===== {script} {' '.join(args)}", flush=True)
        began = time.monotonic()
        code = subprocess.call([sys.executable, str(ROOT / "bench" / script), *args], env=env, cwd=ROOT)
        print(f"===== {script}: exit {code} in {time.monotonic() - began:.0f}s", flush=True)
        if code:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
