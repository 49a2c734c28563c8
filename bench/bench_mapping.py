"""Benchmark of the mapping stage: N mixed Datafly rows (sample/) mapped and serialised into chunks.

Three timings in the same run, on the same validated parts:
- mapping: `run_mapping` end to end (read parts, map, write chunks, outcomes, manifest), in a cold state
           (no JSON parses or templates remembered from an earlier run in the process);
- floor:   read the same JSON columns, `orjson.loads` and `orjson.dumps` every value, write the lines:
           the cost of touching the data with no mapping at all;
- naive:   a per-row implementation written here as the baseline (iterrows, `json`, dicts built per row),
           run on the first `--naive-rows` rows and extrapolated per row.

The sample repeats its payloads (600 contexts, about 1,000 property sets), as real traffic repeats pages,
products and consent banners, and the mapping works once per distinct payload where it can. So a second
landing of `--distinct-rows` rows gives every row its own context and properties (a unique `request_id`
in each): mapping against its own floor there is the cost when nothing repeats.

    PYTHONPATH=. .venv/bin/python bench/bench_mapping.py --rows 1000000 [--distinct-rows 200000]
        [--json bench/out/mapping.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from include.datafly_fullstory import sample, validated
from include.datafly_fullstory.blueprint import load_blueprint, normalise_event_name
from include.datafly_fullstory.landing import JSON_COLUMNS
from include.datafly_fullstory.mapping import run_mapping
from include.datafly_fullstory.state import RunStore

NOW = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
PART_ROWS = 250_000


def write_validated(store: RunStore, rows: int, distinct: bool = False) -> None:
    spec = sample.LandingSpec(rows=rows, start=NOW - timedelta(hours=3), end=NOW, bad_fraction=0.0)
    table = sample.generate_table(spec)
    if distinct:
        for column in ("context", "properties"):
            table = table.set_column(
                table.schema.get_field_index(column), column, with_request_id(table.column(column), rows)
            )
    table = table.append_column("_row", pa.array(np.arange(rows), type=pa.int64())).append_column(
        "_file", pa.array(np.full(rows, "landing/part-0.parquet"), type=pa.string())
    )
    validated.write_parts(store, table, PART_ROWS)


def with_request_id(texts: pa.ChunkedArray, rows: int) -> pa.Array:
    """JSON objects with a `request_id` unique to their row put first: no two values alike."""
    text = texts.combine_chunks()
    key = pc.binary_join_element_wise('"request_id":"r', pa.array(np.arange(rows)).cast(pa.string()), '"', "")
    empty = pc.equal(text, "{}")
    filled = pc.binary_join_element_wise("{", key, ",", pc.utf8_slice_codeunits(text, 1), "")
    alone = pc.binary_join_element_wise("{", key, "}", "")
    return pc.if_else(empty, alone, filled)  # nulls stay null


def parts(store: RunStore) -> list[str]:
    return [store.path(validated.FOLDER, n) for n in validated.parts(store)]


def run_floor(store: RunStore, out: Path, batch_rows: int) -> None:
    """Parse and re-serialise every JSON value, no mapping (GC paused, as the mapping does)."""
    gc.disable()
    try:
        with open(out, "wb") as fh:
            for path in parts(store):
                for batch in pq.ParquetFile(path).iter_batches(
                    batch_size=batch_rows, columns=list(JSON_COLUMNS)
                ):
                    for column in batch.columns:
                        parsed = [orjson.loads(v) if v is not None else None for v in column.to_pylist()]
                        fh.write(b"\n".join(orjson.dumps(p) for p in parsed))
    finally:
        gc.enable()


def run_naive(store: RunStore, out: Path, rows: int) -> int:
    """The per-row baseline: the same rules, written the obvious way (iterrows, `json`, a dict per row)."""
    bp = load_blueprint("retail")
    names = {normalise_event_name(e): m.fullstory_name for m in bp.events for e in m.events}
    renames = {m.fullstory_name: m.renames for m in bp.events}
    df = pq.read_table(parts(store)[0]).slice(0, rows).to_pandas()
    lines, identifies = [], {}
    for _, r in df.iterrows():
        if r["type"] not in ("page", "track", "identify"):
            continue
        ctx = json.loads(r["context"]) if r["context"] else {}
        consent = ctx.get("consent") or {}
        analytics = (consent.get("canonical") or {}).get("analytics", consent.get("analytics"))
        if analytics is False:
            continue
        if r["type"] == "identify":
            if r["user_id"] and r["traits"]:
                identifies.setdefault(r["user_id"], []).append((r["timestamp"], json.loads(r["traits"])))
            continue
        session_id = str((ctx.get("fullstory") or {}).get("session_id") or "")
        if not re.fullmatch(r"[^:\s]+:[^:\s]+", session_id) and not r["user_id"]:
            continue
        props = json.loads(r["properties"]) if r["properties"] else {}
        name = "page_view" if r["type"] == "page" else names.get(normalise_event_name(r["event"]), r["event"])
        for old, new in renames.get(name, {}).items():
            if old in props and new not in props:
                props[new] = props.pop(old)
        if r["type"] == "page":
            for key in ("url", "title", "referrer", "path", "search"):
                props.setdefault(key, (ctx.get("page") or {}).get(key))
            props.setdefault("name", r["name"])
        items = props.pop("products", None) or props.pop("items", None)
        clean = {}
        for key, value in props.items():
            key = re.sub(r"[^A-Za-z0-9_]+", "_", key).strip("_")
            key = bp.reserved_names.get(key, key)
            if value is not None and len(json.dumps(value).encode()) <= 8192:
                clean[key] = value
        schema = {}
        if items:
            for f in bp.item_fields:
                values = [next((i[s] for s in f.sources if i.get(s) is not None), f.fill) for i in items]
                cast = {"strs": str, "reals": float, "ints": int}[f.type]
                clean[f.property] = [cast(v) for v in values]
                schema[f.property] = f.type
            clean["item_count"] = len(items)
            schema["item_count"] = "int"
        clean["anonymous_id"] = r["anonymous_id"]
        if ctx.get("locale"):
            clean["locale"] = ctx["locale"]
        body = {"name": name, "timestamp": r["timestamp"].strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"}
        if ":" in session_id:
            body["session"] = {"id": session_id}
        else:
            body["user"] = {"uid": r["user_id"]}
            if abs((NOW - r["timestamp"]).total_seconds()) <= 1800:
                body["session"] = {"use_most_recent": True}
        body["context"] = {
            "browser": {
                "url": (ctx.get("page") or {}).get("url", ""),
                "user_agent": ctx.get("userAgent") or ctx.get("user_agent") or "",
            },
            "location": {"ip_address": ctx.get("ip", "")},
        }
        body["properties"] = clean
        if schema:
            body["schema"] = {"properties": schema}
        lines.append(json.dumps(body))
    for uid, calls in identifies.items():
        traits = {}
        for _, call in sorted(calls, key=lambda c: c[0]):
            traits.update(call)
        user = {"uid": uid}
        for field, sources in bp.user_fields.items():
            found = next((s for s in sources if traits.get(s) is not None), None)
            if found:
                user[field] = str(traits.pop(found))
        user["properties"] = {
            re.sub(r"[^A-Za-z0-9_]+", "_", k).strip("_"): v for k, v in traits.items() if v is not None
        }
        lines.append(json.dumps(user))
    out.write_text("\n".join(lines))
    return len(df)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def cold_mapping(store: RunStore, batch_rows: int) -> tuple[float, dict]:
    """`run_mapping` timed from a cold state: no parses remembered from an earlier run in this process."""
    from include.datafly_fullstory.mapping.columns import forget_parses

    forget_parses()
    return timed(run_mapping, store, "retail", {"batch_rows": batch_rows}, reference_time=NOW)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--naive-rows", type=int, default=50_000, help="rows the naive baseline runs on")
    parser.add_argument("--batch-rows", type=int, default=100_000)
    parser.add_argument(
        "--distinct-rows",
        type=int,
        default=0,
        help="rows of the landing whose payloads never repeat (0: none)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here (run_all.py's summary)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-mapping-") as tmp:
        store = RunStore(tmp, "bench")
        gen_s, _ = timed(write_validated, store, args.rows)
        print(f"landing: {args.rows:,} rows generated and written as validated parts in {gen_s:.1f}s")
        map_s, summary = cold_mapping(store, args.batch_rows)
        floor_s, _ = timed(run_floor, store, Path(tmp) / "floor.jsonl", args.batch_rows)
        naive_rows = min(args.naive_rows, args.rows)
        naive_s, naive_n = timed(run_naive, store, Path(tmp) / "naive.jsonl", naive_rows)
    distinct = None
    if args.distinct_rows:
        with tempfile.TemporaryDirectory(prefix="bench-mapping-distinct-") as tmp:
            store = RunStore(tmp, "bench")
            write_validated(store, args.distinct_rows, distinct=True)
            d_map_s, d_summary = cold_mapping(store, args.batch_rows)
            d_floor_s, _ = timed(run_floor, store, Path(tmp) / "floor.jsonl", args.batch_rows)
        distinct = {"rows": args.distinct_rows, "mapping_s": d_map_s, "floor_s": d_floor_s}
    naive_full_s = naive_s / naive_n * args.rows
    print(
        f"mapping:  {map_s:7.2f}s  {args.rows / map_s:12,.0f} rows/s  "
        f"{summary['events_mapped'] / map_s:12,.0f} events/s  "
        f"({summary['events_mapped']:,} events, {summary['users_mapped']:,} users, "
        f"{len(summary['chunks'])} chunks; outcomes {summary['rows']})"
    )
    print(
        f"floor:    {floor_s:7.2f}s  {args.rows / floor_s:12,.0f} rows/s  (orjson loads+dumps of "
        f"{', '.join(JSON_COLUMNS)}, no mapping)"
    )
    print(
        f"naive:    {naive_full_s:7.2f}s  {args.rows / naive_full_s:12,.0f} rows/s  (extrapolated from "
        f"{naive_n:,} rows measured in {naive_s:.2f}s: iterrows + json + per-row dicts)"
    )
    print(f"speed-up vs naive: {naive_full_s / map_s:5.1f}x   (target >= 10x)")
    print(f"cost vs floor:     {map_s / floor_s:5.2f}x   (target <= 2x, then below 1x)")
    if distinct:
        d_naive_s = naive_s / naive_n * distinct["rows"]
        print(
            f"no repeated payloads ({distinct['rows']:,} rows, each context and properties value unique): "
            f"mapping {distinct['mapping_s']:.2f}s, floor {distinct['floor_s']:.2f}s -> "
            f"{distinct['mapping_s'] / distinct['floor_s']:.2f}x the floor; "
            f"{d_naive_s / distinct['mapping_s']:.1f}x faster than the naive per-row cost above"
        )
        distinct.update(
            cost_vs_floor=distinct["mapping_s"] / distinct["floor_s"],
            speedup_vs_naive=d_naive_s / distinct["mapping_s"],
            events=d_summary["events_mapped"],
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        figures = {
            "rows": args.rows,
            "mapping_s": map_s,
            "floor_s": floor_s,
            "naive_s": naive_full_s,
            "naive_rows_measured": naive_n,
            "naive_measured_s": naive_s,
            "speedup_vs_naive": naive_full_s / map_s,
            "cost_vs_floor": map_s / floor_s,
            "events": summary["events_mapped"],
            "users": summary["users_mapped"],
            "chunks": len(summary["chunks"]),
            "distinct": distinct,
        }
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
