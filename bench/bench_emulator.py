"""Benchmark: items/s the FullStory emulator accepts through POST /v2/events/batch.

The emulator runs as its own process (the real server); this script is the client. Figures:
- accepted items/s: from the first POST until every job has finished (validation, storage, job state);
- baseline: orjson-parsing the very same bodies in this process, the floor any server pays;
- ratio baseline/emulator: how many times the bare parse the server's whole work costs.

    .venv/bin/python bench/bench_emulator.py [--batches 20] [--items 50000] [--clients 2]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from include.fullstory_emulator.testing import EmulatorProcess  # noqa: E402

EVENT_NAMES = ["page_view", "product_viewed", "purchase", "add_to_cart", "signup", "search"]


def realistic_item(rng: random.Random, n: int) -> dict:
    """A mapped Datafly event as the sync sends it: identification, timestamp, a dozen properties."""
    item = {
        "name": EVENT_NAMES[n % len(EVENT_NAMES)],
        "timestamp": f"2024-05-01T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}.{n % 1000:03d}Z",
        "user": {"uid": f"user-{rng.randrange(200_000)}"},
        "properties": {
            "event_id": f"evt-{n:09d}",
            "url": f"https://shop.example.com/p/{rng.randrange(5000)}",
            "title": "Product page",
            "revenue": round(rng.random() * 300, 2),
            "quantity": rng.randrange(1, 5),
            "currency": "EUR",
            "logged_in": n % 2 == 0,
            "tags": ["gift", "promo"],
            "product": {"sku": f"SKU-{rng.randrange(90_000)}", "category": "shoes", "price": 59.9},
            "source_id": "web-eu",
        },
    }
    if n % 3 == 0:
        item["context"] = {
            "browser": {"url": item["properties"]["url"], "user_agent": "Mozilla/5.0 (X11; Linux x86_64)"},
            "location": {"ip_address": "203.0.113.7", "country": "DE", "city": "Berlin"},
        }
    if n % 5 == 0:
        item["schema"] = {"properties": {"quantity": "int", "product.price": "real"}}
    return item


def build_bodies(batches: int, items: int) -> list[bytes]:
    rng = random.Random(42)
    return [
        orjson.dumps({"requests": [realistic_item(rng, b * items + i) for i in range(items)]})
        for b in range(batches)
    ]


def parse_baseline(bodies: list[bytes]) -> float:
    """orjson.loads of every body, under the same GC policy as the server (collector paused)."""
    gc.disable()
    try:
        started = time.perf_counter()
        for body in bodies:
            orjson.loads(body)
        return time.perf_counter() - started
    finally:
        gc.enable()


def wait_for_jobs(emu: EmulatorProcess, expected: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = emu.state()["jobs"]
        if jobs.get("COMPLETED", 0) + jobs.get("FAILED", 0) >= expected:
            return
        time.sleep(0.01)
    raise TimeoutError(f"jobs did not finish: {emu.state()['jobs']}")


def post_all(emu: EmulatorProcess, bodies: list[bytes], clients: int) -> list[int]:
    sessions = [emu.api_session() for _ in range(clients)]
    headers = {"Content-Type": "application/json"}

    def post(index: int) -> int:
        session = sessions[index % clients]
        response = session.post(
            f"{emu.base_url}/v2/events/batch", data=bodies[index], headers=headers, timeout=60
        )
        return response.status_code

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(post, range(len(bodies))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()

    print(f"building {args.batches} bodies of {args.items} items ...", flush=True)
    bodies = build_bodies(args.batches, args.items)
    total_items = args.batches * args.items
    total_mb = sum(map(len, bodies)) / 1e6
    print(f"{total_items} items, {total_mb:.0f} MB ({total_mb * 1e6 / total_items:.0f} B/item)")

    # Fast jobs and no rate limit: the figure is the server's work, not its simulated delays.
    with EmulatorProcess(job_seconds=0.01, rate=0, max_in_progress_items=10_000_000) as emu:
        started = time.perf_counter()
        statuses = post_all(emu, bodies, args.clients)
        posted = time.perf_counter() - started
        wait_for_jobs(emu, args.batches)
        elapsed = time.perf_counter() - started
        accepted = emu.state()["events"]
    baseline = parse_baseline(bodies)

    if set(statuses) != {200} or accepted != total_items:
        print(f"FAILED: statuses {sorted(set(statuses))}, accepted {accepted} of {total_items}")
        return 1
    rate = total_items / elapsed
    parse_rate = total_items / baseline
    print(
        f"emulator: {rate:,.0f} items/s accepted ({elapsed:.2f} s; all POSTs answered after {posted:.2f} s)"
    )
    print(f"baseline: {parse_rate:,.0f} items/s orjson.loads in-process ({baseline:.2f} s)")
    print(f"ratio: emulator costs {parse_rate / rate:.1f}x a bare parse of the same bodies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
