import sys
from datetime import UTC, datetime, timedelta

import orjson
import pyarrow.compute as pc
import pyarrow.parquet as pq

from include.datafly_fullstory.sample import LandingSpec, generate_landing, generate_table
from include.datafly_fullstory.sample import __main__ as sample_main

START = datetime(2026, 11, 26, 7, tzinfo=UTC)


def test_same_seed_same_landing_and_sized_by_rows():
    spec = LandingSpec(rows=3000, start=START, end=START + timedelta(hours=2), seed=11)
    a, b = generate_table(spec), generate_table(spec)
    assert a.num_rows == 3000 and a.equals(b)
    assert not a.equals(generate_table(LandingSpec(rows=3000, start=START, end=spec.end, seed=12)))


def test_covers_the_blueprint_events_identity_and_consent_shapes():
    t = generate_table(LandingSpec(rows=20000, start=START, end=START + timedelta(hours=1)))
    types = set(t.column("type").to_pylist())
    assert {"page", "track", "identify", "group", "screen", "alias"} <= types
    names = set(n for n in t.column("event").to_pylist() if n)
    assert {
        "Product Viewed",
        "product_viewed",
        "view_item",
        "Order Completed",
        "order_completed",
        "purchase",
    } <= names
    contexts = " ".join(c for c in t.column("context").to_pylist()[:3000] if c)
    for key in ('"canonical"', '"consent":{"analytics"', '"userAgent"', '"user_agent"', '"session_id"'):
        assert key in contexts
    traits = " ".join(x for x in t.column("traits").to_pylist() if x)
    for key in ('"displayName"', '"display_name"', '"name"', '"firstName"', '"first_name"'):
        assert key in traits
    ts = t.column("timestamp")
    assert pc.min(ts).as_py() >= START and pc.max(ts).as_py() < START + timedelta(hours=1)


def test_bad_rows_are_there_for_validation():
    t = generate_table(
        LandingSpec(rows=10000, start=START, end=START + timedelta(hours=1), bad_fraction=0.01)
    )
    ids = t.column("event_id").to_pylist()
    assert ids.count(None) > 0 and len(set(i for i in ids if i)) < len([i for i in ids if i])
    assert "pageview" in t.column("type").to_pylist()
    broken = 0
    for p in t.column("properties").to_pylist():
        if p:
            try:
                orjson.loads(p)
            except orjson.JSONDecodeError:
                broken += 1
    assert broken > 0


def test_hive_and_flat_layouts(tmp_path):
    hive = generate_landing(tmp_path / "hive", 2000, START, hours=3)
    assert [p.relative_to(tmp_path / "hive").parts[:2] for p in hive] == [
        ("dt=2026-11-26", f"hour={h:02d}") for h in (7, 8, 9)
    ]
    flat = generate_landing(tmp_path / "flat", 2000, START, hours=2, layout="flat", files_per_hour=2)
    assert len(flat) == 4 and all(p.parent == tmp_path / "flat" for p in flat)
    assert sum(pq.read_metadata(p).num_rows for p in flat) == 2000


def test_command_line_writes_a_landing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    argv = ["sample", str(out), "--rows", "600", "--hours", "2", "--layout", "flat", "--seed", "5"]
    monkeypatch.setattr(sys, "argv", argv)
    sample_main._main()
    files = sorted(out.glob("*.parquet"))
    assert len(files) == 2 and sum(pq.read_metadata(p).num_rows for p in files) == 600
    assert capsys.readouterr().out == f"wrote 600 rows in 2 files under {out}\n"
