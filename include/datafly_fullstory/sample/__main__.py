"""Realistic Datafly Signal landings for the demo, the tests and the benchmarks.

The command line, which writes one with `generate_landing`:

    python -m include.datafly_fullstory.sample OUT_DIR --rows 5000 --start 2026-11-26T07:00:00Z --hours 3
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from include.datafly_fullstory.sample.write import generate_landing


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--start", default="2026-11-26T07:00:00+00:00")
    parser.add_argument("--hours", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--layout", choices=("hive", "flat"), default="hive")
    parser.add_argument("--bad-fraction", type=float, default=0.004)
    args = parser.parse_args()
    start = datetime.fromisoformat(args.start.replace("Z", "+00:00")).astimezone(UTC)
    files = generate_landing(
        args.out_dir,
        args.rows,
        start,
        args.hours,
        seed=args.seed,
        layout=args.layout,
        bad_fraction=args.bad_fraction,
    )
    print(f"wrote {args.rows} rows in {len(files)} files under {args.out_dir}")


if __name__ == "__main__":
    _main()
