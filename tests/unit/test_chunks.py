"""Payload chunks and the mapping stage end to end on a RunStore: limits, index, idempotency, re-runs,
and the invariant that every validated row is in exactly one chunk line's index or in the outcomes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pyarrow as pa
import pytest

from include.datafly_fullstory import sample, validated
from include.datafly_fullstory.chunks import ENVELOPE_BYTES, ChunkWriter, batch_body, idempotency_key
from include.datafly_fullstory.mapping import MappingSettings, run_mapping
from include.datafly_fullstory.outcomes import SCHEMA as OUTCOME_SCHEMA
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.window import Window

NOW = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
WINDOW = Window(NOW - timedelta(hours=1), NOW)


def landing(rows: int, seed: int = 7) -> pa.Table:
    spec = sample.LandingSpec(rows=rows, start=WINDOW.start, end=WINDOW.end, seed=seed, bad_fraction=0.0)
    table = sample.generate_table(spec)
    return table.append_column("_row", pa.array(np.arange(rows), type=pa.int64())).append_column(
        "_file", pa.array(["landing/part-0.parquet"] * rows)
    )


def store_with(tmp_path, table: pa.Table, parts: int = 2) -> RunStore:
    store = RunStore(str(tmp_path), "manual__2026-11-26T10:00:00+00:00")
    validated.write_parts(store, table, -(-table.num_rows // parts))
    return store


def chunk_rows(store: RunStore, summary: dict) -> list[int]:
    return [
        r
        for c in summary["chunks"]
        for r in store.read_table("payloads", f"{c['name']}.index.parquet").column("row").to_pylist()
    ]


# ---- idempotency keys ---------------------------------------------------------------------------------


def test_idempotency_key_is_a_pure_function_of_run_window_chunk_and_content():
    key = idempotency_key("r1", WINDOW, "events", "events-00000", "ab" * 32)
    assert key == idempotency_key(
        "r1", Window.from_dict(WINDOW.as_dict()), "events", "events-00000", "ab" * 32
    )
    assert key.startswith("dffs-events-") and len(key) == len("dffs-events-") + 40
    others = {
        idempotency_key(
            "r1", Window(WINDOW.start, WINDOW.end + timedelta(hours=1)), "events", "events-00000", "ab" * 32
        ),
        idempotency_key("r2", WINDOW, "events", "events-00000", "ab" * 32),
        idempotency_key("r1", WINDOW, "events", "events-00001", "ab" * 32),
        idempotency_key("r1", WINDOW, "events", "events-00000", "cd" * 32),
    }
    assert key not in others and len(others) == 4


# ---- chunk writer ---------------------------------------------------------------------------------------


def test_chunks_respect_max_items_and_max_bytes_and_index_every_row(tmp_path):
    store = RunStore(str(tmp_path), "r")
    writer = ChunkWriter(store, "events", max_items=7, max_bytes=400)
    lines = [orjson.dumps({"name": f"e{i}", "properties": {"pad": "x" * (i % 40)}}) for i in range(50)]
    rows = np.arange(100, 150, dtype=np.int64)
    writer.add(lines[:20], np.arange(20), rows[:20], np.array([f"id{r}" for r in rows[:20]], dtype=object))
    writer.add(lines[20:], np.arange(30), rows[20:], np.array([f"id{r}" for r in rows[20:]], dtype=object))
    writer.flush()
    seen = []
    for chunk in writer.chunks:
        chunk_lines = list(store.iter_lines("payloads", f"{chunk['name']}.jsonl"))
        body = batch_body(chunk_lines)
        assert len(chunk_lines) == chunk["items"] <= 7 and len(body) <= 400
        assert json.loads(body)["requests"][0]["name"].startswith("e")
        index = store.read_table("payloads", f"{chunk['name']}.index.parquet").to_pylist()
        assert [i["item_index"] for i in index] == list(range(len(chunk_lines)))
        for entry in index:
            assert orjson.loads(chunk_lines[entry["item_index"]])["name"] == f"e{entry['row'] - 100}"
            assert entry["event_id"] == f"id{entry['row']}"
        seen += [i["row"] for i in index]
    assert seen == list(range(100, 150))
    assert [c["name"] for c in writer.chunks] == [f"events-{i:05d}" for i in range(len(writer.chunks))]


def test_a_user_line_carries_all_its_folded_rows(tmp_path):
    store = RunStore(str(tmp_path), "r")
    writer = ChunkWriter(store, "users", max_items=2, max_bytes=10_000)
    lines = [b'{"uid":"a"}', b'{"uid":"b"}', b'{"uid":"c"}']
    writer.add(
        lines, np.array([0, 0, 1, 2, 2, 2]), np.array([5, 9, 1, 2, 3, 4]), np.array(["x"] * 6, dtype=object)
    )
    writer.flush()
    first = store.read_table("payloads", "users-00000.index.parquet").to_pylist()
    second = store.read_table("payloads", "users-00001.index.parquet").to_pylist()
    assert [(i["item_index"], i["row"]) for i in first] == [(0, 5), (0, 9), (1, 1)]
    assert [(i["item_index"], i["row"]) for i in second] == [(0, 2), (0, 3), (0, 4)]


def test_chunk_limits_are_checked():
    with pytest.raises(ValueError, match="50000"):
        ChunkWriter(RunStore("/tmp", "r"), "events", max_items=50_001, max_bytes=1 << 20)
    assert ChunkWriter(RunStore("/tmp", "r"), "events", max_items=10, max_bytes=1000).largest_line() == (
        1000 - ENVELOPE_BYTES - 1
    )


# ---- settings -------------------------------------------------------------------------------------------


def test_settings_from_a_plain_dict():
    settings = MappingSettings.from_dict(
        {"require_explicit_consent": True, "event_types": ["page"], "max_items": 1000, "max_bytes": None}
    )
    assert settings.event_types == ("page",) and settings.max_bytes == 8 * 1024 * 1024
    assert MappingSettings.from_dict({"event_types": []}).event_types is None
    assert MappingSettings.from_dict(settings.as_dict()) == settings
    with pytest.raises(ValueError, match="unknown mapping setting"):
        MappingSettings.from_dict({"max_item": 5})
    with pytest.raises(ValueError, match="max_items"):
        MappingSettings(max_items=60_000)


# ---- the stage ------------------------------------------------------------------------------------------


def test_every_validated_row_is_in_one_chunk_line_or_one_outcome(tmp_path):
    table = landing(12_000)
    store = store_with(tmp_path, table, parts=3)
    summary = run_mapping(
        store, "retail", {"max_items": 1500, "max_bytes": 600_000, "batch_rows": 2500}, reference_time=NOW
    )
    outcome_table = store.read_table("outcomes", "mapping.parquet")
    assert outcome_table.schema.equals(OUTCOME_SCHEMA)
    in_chunks, in_outcomes = chunk_rows(store, summary), outcome_table.column("row").to_pylist()
    assert len(in_chunks) == len(set(in_chunks))
    assert sorted(in_chunks + in_outcomes) == list(range(table.num_rows))
    assert summary["rows"]["read"] == table.num_rows
    assert set(outcome_table.column("outcome").to_pylist()) <= {"filtered", "skipped", "rejected"}
    assert summary["events_mapped"] > 3000 and summary["users_mapped"] > 100
    for chunk in summary["chunks"]:
        lines = list(store.iter_lines("payloads", f"{chunk['name']}.jsonl"))
        assert len(lines) == chunk["items"] <= 1500 and len(batch_body(lines)) <= 600_000
    assert store.read_json("payloads", "manifest.json")["chunks"] == summary["chunks"]


def test_identify_calls_fold_across_parts_and_batches(tmp_path):
    table = landing(3_000)
    store = store_with(tmp_path, table, parts=3)
    summary = run_mapping(store, None, {"batch_rows": 500}, reference_time=NOW)
    users = [c for c in summary["chunks"] if c["kind"] == "users"]
    index = store.read_table("payloads", f"{users[0]['name']}.index.parquet")
    lines = list(store.iter_lines("payloads", f"{users[0]['name']}.jsonl"))
    uids = [orjson.loads(line)["uid"] for line in lines]
    assert len(uids) == len(set(uids)) == summary["users_mapped"]
    user_id = dict(zip(table.column("_row").to_pylist(), table.column("user_id").to_pylist(), strict=True))
    folded = [i for i in index.to_pylist() if user_id[i["row"]] == uids[i["item_index"]]]
    assert len(folded) == index.num_rows > len(lines)  # several identify calls share a line


def test_rerun_replaces_payloads_and_gives_the_same_chunks(tmp_path):
    store = store_with(tmp_path, landing(4_000))
    first = run_mapping(store, None, {"max_items": 200}, reference_time=NOW)
    again = run_mapping(store, None, {"max_items": 200}, reference_time=NOW)
    assert again == first
    keys = {idempotency_key(store.run_id, WINDOW, c["kind"], c["name"], c["sha256"]) for c in first["chunks"]}
    assert len(keys) == len(first["chunks"])
    keyed = run_mapping(store, None, {"max_items": 200}, reference_time=NOW, window=WINDOW)
    assert [c["idempotency_key"] for c in keyed["chunks"]] == [
        idempotency_key(store.run_id, WINDOW, c["kind"], c["name"], c["sha256"]) for c in first["chunks"]
    ]
    assert store.read_json("payloads", "manifest.json")["chunks"] == keyed["chunks"]
    fewer = run_mapping(store, None, {"max_items": 50_000}, reference_time=NOW)
    names = {f"{c['name']}{suffix}" for c in fewer["chunks"] for suffix in (".jsonl", ".index.parquet")}
    assert set(store.list("payloads")) == names | {"manifest.json"}


def test_a_body_larger_than_one_request_is_rejected(tmp_path):
    table = landing(40).slice(0, 40)
    props = table.column("properties").to_pylist()
    types = table.column("type").to_pylist()
    users = table.column("user_id").to_pylist()
    big = next(i for i, t in enumerate(types) if t == "track" and users[i])
    props[big] = json.dumps({f"note{k}": "x" * 8000 for k in range(10)})
    table = table.set_column(
        table.schema.get_field_index("properties"), "properties", pa.array(props, pa.string())
    )
    store = store_with(tmp_path, table, parts=1)
    run_mapping(store, None, {"max_bytes": 65_536}, reference_time=NOW)
    outcome = {r["row"]: r for r in store.read_table("outcomes", "mapping.parquet").to_pylist()}[big]
    assert outcome["outcome"] == "rejected" and "max_bytes" in outcome["reason"]


def test_an_empty_window_writes_an_empty_manifest(tmp_path):
    store = RunStore(str(tmp_path), "r")
    summary = run_mapping(store, None, None, reference_time=NOW)
    assert summary == {
        "chunks": [],
        "events_mapped": 0,
        "users_mapped": 0,
        "users_unchanged": 0,
        "type_problems": {"values": 0, "events": 0, "users": 0, "fields": {}},
        "rows": {"read": 0, "filtered": 0, "skipped": 0, "rejected": 0},
        "identity": {
            "stitched": 0,
            "stitched_late": 0,
            "conflicts": 0,
            "conflicted_rows": 0,
            "anonymous_unidentified": 0,
        },
        "events_by_name": {},
        "identification": {"session_id": 0, "uid": 0, "use_most_recent": 0, "stitched": 0, "skipped": 0},
    }
    assert store.read_table("outcomes", "mapping.parquet").num_rows == 0
