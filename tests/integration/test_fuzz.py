"""Fuzz: random JSON shapes, types, unicode, sizes and depths through extract and mapping.

Each seed writes a real Parquet landing of rows whose JSON columns hold random documents (deep nesting up
to past orjson's limit, huge and tiny numbers, long and exotic unicode strings and keys, arrays of mixed
types, values that are not JSON or not objects) next to random types, event names, ids and timestamps.
The run's real stages read, validate and map it; a dry-run delivery writes the outcomes of the chunked
rows. Then every input row must have exactly one outcome (`outcomes.merge_outcomes` refuses zero or two),
nothing may crash, and every chunk line must be a body the project's FullStory schema accepts.
The generator is seeded, so a failure names a reproducible seed; the loops are bounded.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from include.datafly_fullstory import outcomes
from include.datafly_fullstory.chunks import load_chunks, read_manifest
from include.datafly_fullstory.delivery import Delivery
from include.datafly_fullstory.pipeline import extract_stage, map_stage
from include.datafly_fullstory.run import plan_run
from include.fullstory_emulator.schema import validator

H = datetime(2026, 11, 26, 7, tzinfo=UTC)
ROWS = 300
TYPES = ["page", "track", "identify", "group", "screen", "alias", "Track", "", "pageview", None]
NAMES = [
    "Order Completed",
    "Product Viewed",
    "purchase",
    "view_item",
    "Coupon Applied",
    "",
    " ",
    None,
    "ünïcødé event ✓",
    "x" * 300,
    "emoji 🛒🛒",
    "a.b.c",
    "123",
    "tab\tname",
]


def _text(rng: random.Random, longest: int = 40) -> str:
    """Random valid unicode (no lone surrogates: they cannot be written as UTF-8 at all)."""
    pools = [(0x20, 0x7E), (0xA0, 0x2FF), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F6FF), (0x0, 0x1F)]
    size = rng.choice([0, 1, 3, 10, longest, 5000]) if rng.random() < 0.1 else rng.randint(0, longest)
    chars = []
    for _ in range(size):
        lo, hi = rng.choice(pools)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def _value(rng: random.Random, depth: int) -> object:
    kind = rng.random()
    if depth <= 0 or kind < 0.45:
        return rng.choice(
            [
                None,
                True,
                False,
                0,
                -1,
                2**31,
                -(2**31) - 1,
                2**63 - 1,
                1.5,
                -0.0,
                1e308,
                5e-324,
                3.0,
                "90.00",
                "1001",
                "five",
                "",
                _text(rng),
                rng.randint(-(10**6), 10**6),
                rng.uniform(-1e9, 1e9),
            ]
        )
    if kind < 0.7:
        return [_value(rng, depth - 1) for _ in range(rng.randint(0, 6))]
    return {
        _text(rng, 20)
        if rng.random() < 0.3
        else rng.choice(
            [
                "revenue",
                "price",
                "quantity",
                "order_id",
                "sku",
                "products",
                "items",
                "email",
                "plan",
                "seats",
                "consent",
                "fullstory",
                "page",
                "analytics",
                "$type",
                "a.b",
                "1st",
                "Name With Space",
            ]
        ): _value(rng, depth - 1)
        for _ in range(rng.randint(0, 6))
    }


def _deep(rng: random.Random) -> str:
    """JSON text nested past what a recursive encoder handles (orjson stops at 255, its parser at 1024);
    written as text, since the test's own encoder could not either."""
    depth = rng.choice([64, 65, 200, 256, 300, 1100])
    opens = [rng.choice(["[", '{"k":']) for _ in range(depth)]
    closes = ["]" if o == "[" else "}" for o in reversed(opens)]
    return "".join(opens) + rng.choice(["1", '"x"', "null", "{}"]) + "".join(closes)


def _json_cell(rng: random.Random, column: str) -> str | None:
    roll = rng.random()
    if roll < 0.1:
        return None
    if roll < 0.15:
        return rng.choice(["{not json", "[]", "42", '"text"', "null", "", "{}", '{"a":1}{"b":2}', "\ufeff{}"])
    if roll < 0.22:
        return '{"nested":' + _deep(rng) + "}"
    else:
        doc = _value(rng, rng.randint(1, 6))
        doc = doc if isinstance(doc, dict) else {"value": doc}
        if column == "context" and rng.random() < 0.5:
            doc["consent"] = rng.choice(
                [
                    {"analytics": _value(rng, 1)},
                    {"canonical": {"analytics": True}},
                    {"categories": [_text(rng, 6), "C0002"]},
                    _value(rng, 2),
                ]
            )
        if column == "context" and rng.random() < 0.3:
            doc["fullstory"] = {"session_id": rng.choice(["1234:5678", "bad id", 7, None, _text(rng, 10)])}
    return json.dumps(doc, ensure_ascii=rng.random() < 0.5)


def _landing(rng: random.Random, folder) -> int:
    """Writes the landing; returns how many of its rows belong to the hour H (timestamp in it, or no
    timestamp and received_at in it: docs/landing.md). The others belong to other windows, or to none,
    which the reader reports."""

    def ts():
        roll = rng.random()
        if roll < 0.05:
            return None
        if roll < 0.1:
            return H - timedelta(days=rng.randint(1, 900))
        return H + timedelta(seconds=rng.randint(0, 3599), microseconds=rng.randint(0, 999_999))

    ids = [rng.choice([f"e{i}", f"e{rng.randint(0, ROWS)}", None, "", _text(rng, 12)]) for i in range(ROWS)]
    rows = {
        "event_id": ids,
        "type": [rng.choice(TYPES) for _ in range(ROWS)],
        "event": [rng.choice(NAMES) if rng.random() < 0.9 else _text(rng) for _ in range(ROWS)],
        "name": [rng.choice([None, "Home", _text(rng)]) for _ in range(ROWS)],
        "anonymous_id": [
            rng.choice([None, "", f"a{rng.randint(0, 40)}", _text(rng, 300)]) for _ in range(ROWS)
        ],
        "user_id": [
            rng.choice([None, "", f"u{rng.randint(0, 40)}", _text(rng, 300), "x" * 257]) for _ in range(ROWS)
        ],
        "timestamp": [ts() for _ in range(ROWS)],
        "received_at": [ts() for _ in range(ROWS)],
        "context": [_json_cell(rng, "context") for _ in range(ROWS)],
        "properties": [_json_cell(rng, "properties") for _ in range(ROWS)],
        "traits": [_json_cell(rng, "traits") for _ in range(ROWS)],
    }
    schema = pa.schema(
        [
            (k, pa.timestamp("us", tz="UTC") if k in ("timestamp", "received_at") else pa.string())
            for k in rows
        ]
    )
    folder.mkdir(parents=True)
    table = pa.table(rows, schema=schema)
    half = ROWS // 2
    pq.write_table(table.slice(0, half), folder / "part-0.parquet")
    pq.write_table(table.slice(half), folder / "part-1.parquet")

    def inside(t):
        return t is not None and H <= t < H + timedelta(hours=1)

    return sum(
        inside(t) or (t is None and inside(r))
        for t, r in zip(rows["timestamp"], rows["received_at"], strict=True)
    )


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_rows_each_end_with_exactly_one_outcome(tmp_path, seed):
    rng = random.Random(seed)
    rows = _landing(rng, tmp_path / "landing")
    plan = plan_run(
        params={"dry_run": True},
        run_id=f"fuzz-{seed}",
        landing_uri=str(tmp_path / "landing"),
        state_uri=str(tmp_path / "state"),
        airflow_home=str(tmp_path),
        data_interval_start=H,
        data_interval_end=H + timedelta(hours=1),
    )
    extracted = extract_stage(plan)
    mapped = map_stage(plan, extracted)
    store = plan.store
    chunks = load_chunks(store, [c["name"] for c in read_manifest(store)["chunks"]])
    Delivery(store, None, None, None).dry_run(chunks)

    assert extracted["rows_read"] == rows > ROWS // 2
    merged = outcomes.merge_outcomes(store, rows)  # refuses a row with no outcome or two
    assert merged.num_rows == rows
    counts = outcomes.count_by_outcome(merged)
    assert sum(counts.values()) == rows and counts["dry_run"] > 0 and counts["quarantined"] > 0
    reasons = [
        r
        for o, r in zip(
            merged.column("outcome").to_pylist(), merged.column("reason").to_pylist(), strict=True
        )
        if o in ("rejected", "skipped", "filtered", "quarantined")
    ]
    assert all(reasons), "every row that is not sent says why"
    assert any("nested deeper than" in r for r in reasons)  # the deep rows were in the window, and rejected
    kinds = {"events": validator("event"), "users": validator("user")}
    for chunk in chunks:
        for line in store.read_bytes("payloads", f"{chunk.name}.jsonl").splitlines():
            body = orjson.loads(line)
            errors = sorted(e.message for e in kinds[chunk.kind].iter_errors(body))
            assert not errors, (seed, chunk.name, errors[:3], line[:300])
    assert mapped["events_mapped"] + mapped["users_mapped"] > 0
