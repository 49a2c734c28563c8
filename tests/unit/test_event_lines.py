"""The column-wise event lines (mapping/templates.py) are exactly EventBuilder.build's, row by row.

Seeded random rows cover what changes a body: every mapping and pass-through names (some too long),
properties that are broken, not objects, hold item lists, GA4 spellings, nulls, reserved and unclean names,
values of the wrong declared type, identity properties of their own; contexts with and without page
fields, locale, browser and session data; identity values with quotes, control characters, non-text and
sizes around the checks; and a line limit small enough to reject some bodies. Both paths must give the same
line or the same reason for every row, and the same type problems in the same order.
"""

from __future__ import annotations

import random

import numpy as np
import orjson
import pytest

from include.datafly_fullstory.blueprint import load_blueprint
from include.datafly_fullstory.mapping.bodies import EventBuilder
from include.datafly_fullstory.mapping.columns import ParsedJson
from include.datafly_fullstory.mapping.properties import PropertyCleaner, Reject
from include.datafly_fullstory.mapping.templates import EventLines
from tests.mapping_rows import BLUEPRINT_PATH, GA4_ORDER

KEYS = [
    "revenue", "price", "quantity", "order_id", "sku", "product_id", "url", "title", "path", "search", "name",
    "transaction_id", "value", "currency", "uid", "email", "Video Length (s)", "1st", "a_str", "locale",
    "anonymous_id", "datafly_event_id", "step",
]  # fmt: skip
VALUES = [None, True, 0, 3, -7, 2.5, 90.0, "90.00", "12abc", "1001", "", "x", 'Ünï "q" \\ \x01', [1, "a"], []]


def _value(rng: random.Random, depth: int = 2):
    roll = rng.random()
    if depth and roll < 0.1:
        return {rng.choice(KEYS): _value(rng, depth - 1) for _ in range(rng.randint(0, 3))}
    if depth and roll < 0.15:
        return [_value(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    if roll < 0.18:
        return "y" * rng.choice([2047, 2049, 9000])
    return rng.choice(VALUES)


def _properties(rng: random.Random) -> str | None:
    roll = rng.random()
    if roll < 0.05:
        return None
    if roll < 0.08:
        return rng.choice(["{broken", "[1, 2]", '"text"', "null"])
    if roll < 0.15:
        return orjson.dumps(GA4_ORDER).decode()
    props = {rng.choice(KEYS): _value(rng) for _ in range(rng.randint(0, 6))}
    if rng.random() < 0.15:
        key = rng.choice(["products", "items"])
        props[key] = [
            {rng.choice(["product_id", "item_id", "sku", "price", "quantity", "name"]): _value(rng, 0)}
            for _ in range(rng.randint(0, 3))
        ]
    if rng.random() < 0.02:
        props.update({f"p{i}": i for i in range(500)})  # past the property count
    return orjson.dumps(props).decode()


def _context(rng: random.Random) -> str | None:
    if rng.random() < 0.05:
        return None
    ctx: dict = {}
    if rng.random() < 0.7:
        ctx["page"] = {
            k: _value(rng, 0) for k in ("url", "title", "referrer", "path", "search") if rng.random() < 0.6
        }
    for key, values in (
        ("locale", ["en-US", "de-DE", 5, None, "l" * 2100]),
        ("userAgent", ["Mozilla/5.0", None]),
        ("ip", ["203.0.113.9", None]),
    ):
        if rng.random() < 0.6:
            ctx[key] = rng.choice(values)
    return orjson.dumps(ctx).decode()


def _rows(rng: random.Random, n: int, bp) -> dict[str, np.ndarray]:
    names = ["page_view", "product_viewed", "purchase", "Product Added", "Signup ✓", "n" * 251]
    contexts = [_context(rng) for _ in range(max(3, n // 8))]  # contexts repeat, as in a landing
    properties = [_properties(rng) for _ in range(max(3, n // 5))]

    def pick(options, weights=None):
        return np.array([rng.choices(options, weights)[0] for _ in range(n)], dtype=object)

    return {
        "m": np.array([rng.randint(-1, len(bp.events) - 1) for _ in range(n)], dtype=np.int64),
        "names": pick(names),
        "props": pick(properties),
        "ctx": pick(contexts),
        "ts": pick(["2026-11-26T09:59:00.123Z", None]),
        "uid": pick(["user-1", 'us"er', None]),
        "sid": pick([None, None, "58:67", "a\\b:c"]),
        "recent": np.array([rng.random() < 0.3 for _ in range(n)], dtype=bool),
        "anon": pick(["dfid-1", "dfid-\x02", None, "a" * 2049, 7]),
        "event_id": pick([f"evt-{i}" for i in range(n)] + ['e"1', "e\\2", "\x1f", None, "e" * 3000]),
        "row_fills": pick([None, (("name", "Home"),), (("name", None),), (("name", "Cart"),)]),
        "rows": np.arange(n, dtype=np.int64),
    }


def _both(bp, rows: dict, largest_line: int, again: bool = False):
    """(column-wise lines, row-by-row lines, their type problems). `again`: the column-wise lines of a
    second batch of the same rows, from the templates the first one left behind."""
    ctx = ParsedJson(rows["ctx"])
    fast = EventBuilder(bp, PropertyCleaner(bp), largest_line)
    event_lines = EventLines(fast)
    for _ in range(2 if again else 1):
        fast.types.take_problems()
        lines = event_lines.build(
            rows["m"], rows["names"], rows["props"], ctx, ctx.codes, rows["ts"], rows["uid"], rows["sid"],
            rows["recent"], rows["anon"], rows["event_id"], rows["row_fills"], rows["rows"],
        )  # fmt: skip
    slow = EventBuilder(bp, PropertyCleaner(bp), largest_line)
    objects = ctx.rows()
    expected = [
        slow.build(
            int(rows["m"][i]), rows["names"][i], rows["props"][i], objects[i], rows["ts"][i], rows["uid"][i],
            rows["sid"][i], bool(rows["recent"][i]), rows["anon"][i], rows["event_id"][i],
            rows["row_fills"][i], int(rows["rows"][i]),
        )
        for i in range(len(rows["m"]))
    ]  # fmt: skip
    return lines, expected, fast.types.take_problems(), slow.types.take_problems()


def _shown(built) -> list:
    return [b if type(b) is bytes else ("reject", b.reason) for b in built]


def _declaring_identity(tmp_path):
    """The retail blueprint with declared types on the identity properties (rows then go one by one)."""
    text = BLUEPRINT_PATH.read_text().replace(
        "property_types:\n", "property_types:\n  locale: str\n  datafly_event_id: str\n", 1
    )
    path = tmp_path / "declaring.yaml"
    path.write_text(text)
    return load_blueprint(path)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("largest_line", [8 * 1024 * 1024, 700])
def test_column_wise_lines_equal_the_row_builder(seed, largest_line):
    bp = load_blueprint()
    lines, expected, problems, expected_problems = _both(
        bp, _rows(random.Random(seed), 3000, bp), largest_line
    )
    assert _shown(lines) == _shown(expected)
    assert problems == expected_problems
    kinds = {type(b) for b in lines}
    assert kinds == {bytes, Reject}  # both outcomes occur
    reasons = {b.reason.split(" ")[0] for b in lines if type(b) is Reject}
    assert {"event", "properties"} <= reasons
    if largest_line < 1000:
        assert "the" in reasons  # "the event body is N bytes, more than one request may carry"
    assert len(problems) > 10


def test_declared_identity_properties_go_row_by_row_with_the_same_bytes(tmp_path):
    bp = _declaring_identity(tmp_path)
    lines, expected, problems, expected_problems = _both(
        bp, _rows(random.Random(9), 1500, bp), 8 * 1024 * 1024
    )
    assert _shown(lines) == _shown(expected)
    assert problems == expected_problems
    assert any(b'"schema":{"properties":{"locale":"str"' in b for b in lines if type(b) is bytes)


def test_no_rows():
    bp = load_blueprint()
    ctx = ParsedJson(np.array([], dtype=object))
    empty = np.array([], dtype=object)
    builder = EventBuilder(bp, PropertyCleaner(bp), 1000)
    m = np.array([], dtype=np.int64)
    assert EventLines(builder).build(m, *[empty] * 2, ctx, ctx.codes, *[empty] * 8) == []
