"""`python -m include.fullstory_emulator --port 8089 --region na1 [--tls] ...` (run from the repo root)."""

from __future__ import annotations

import sys

from include.fullstory_emulator.config import config_from_args
from include.fullstory_emulator.server import serve


def main(argv: list[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
    except ValueError as exc:
        print(f"fullstory-emulator: {exc}", file=sys.stderr)
        return 2
    serve(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
