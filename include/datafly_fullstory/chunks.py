"""The payload chunk format: this module writes it (mapping) and reads it (delivery, claims, tests).

A chunk is one batch-import request: `payloads/<kind>-NNNNN.jsonl` holds one request item per line (the
body is `{"requests": [line, ...]}`), `<kind>-NNNNN.index.parquet` says which input rows each line carries,
and `payloads/manifest.json` lists the chunks a run delivers (`Chunk`: its own, and earlier runs' chunks it
resumes or replays). `ChunkWriter` fills chunks up to `max_items` lines and `max_bytes` body bytes, holding
at most one chunk in memory. A chunk's bytes are checked against the sha256 the ledger recorded before
they are sent: they are what FullStory holds under the chunk's idempotency key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from include.datafly_fullstory.errors import DeliveryError
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.window import Window

PAYLOADS = "payloads"
RESUME = "resume"  # earlier runs' chunks this run resumes or replays: their index of this run's rows
MAX_BATCH_ITEMS = 50_000  # FullStory's cap on request objects per batch import
# `{"requests":[` + `]}` around the joined lines; each line then costs its length plus one separator.
ENVELOPE_BYTES = len(b'{"requests":[]}')
INDEX_SCHEMA = pa.schema([("item_index", pa.int32()), ("row", pa.int64()), ("event_id", pa.string())])


def idempotency_key(run_id: str, window: Window, kind: str, chunk_name: str, sha256: str) -> str:
    """The `Idempotency-Key` of a chunk: a pure function of the run, its window, the chunk and its content.
    The ledger records it with the chunk; every later POST of the chunk (a retry, a resume by another
    run, a forced replay) sends the recorded key with the recorded bytes, so FullStory replays its first
    answer instead of importing again."""
    material = f"{run_id}|{window.start.isoformat()}|{window.end.isoformat()}|{kind}|{chunk_name}|{sha256}"
    return f"dffs-{kind}-{hashlib.sha256(material.encode()).hexdigest()[:40]}"


def index_uri_of(payload_uri: str) -> str:
    """The index file beside a chunk's lines: `<chunk>.jsonl` -> `<chunk>.index.parquet`."""
    return payload_uri.removesuffix(".jsonl") + ".index.parquet"


def read_uri(uri: str) -> bytes:
    """Bytes of a chunk file named by its full URI (local path or fsspec URI), as the ledger records it."""
    import fsspec

    with fsspec.open(uri, "rb") as fh:
        return fh.read()


def read_index_uri(uri: str) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(read_uri(uri)), columns=INDEX_SCHEMA.names).cast(INDEX_SCHEMA)


def batch_body(lines: list[bytes]) -> bytes:
    """The batch-import request body for a chunk's lines."""
    return b'{"requests":[' + b",".join(lines) + b"]}"


@dataclass
class _Pending:
    lines: list[bytes]
    rows: list[np.ndarray]
    event_ids: list[np.ndarray]
    items: list[np.ndarray]
    body_bytes: int = ENVELOPE_BYTES


class ChunkWriter:
    """Fills `<kind>-NNNNN` chunks in order; `chunks` lists what was written (for the manifest)."""

    def __init__(self, store: RunStore, kind: str, *, max_items: int, max_bytes: int, first_number: int = 0):
        if not 0 < max_items <= MAX_BATCH_ITEMS:
            raise ValueError(f"max_items={max_items}: FullStory takes 1..{MAX_BATCH_ITEMS} items per batch")
        self.store, self.kind, self.max_items, self.max_bytes = store, kind, max_items, max_bytes
        self.first_number = first_number  # chunk numbers go on after chunks an earlier try sent
        self.chunks: list[dict] = []
        self._pending = self._empty()

    def largest_line(self) -> int:
        """The longest line a chunk can hold: one item alone must fit in a body."""
        return self.max_bytes - ENVELOPE_BYTES - 1

    def add(self, lines: list[bytes], line_of: np.ndarray, rows: np.ndarray, event_ids: np.ndarray) -> None:
        """Append `lines`; index entry k says input row `rows[k]` is carried by line `line_of[k]`
        (sorted ascending). Every line must be at most `largest_line()` bytes."""
        sizes = np.fromiter(map(len, lines), dtype=np.int64, count=len(lines)) + 1
        cumulative = np.concatenate([[0], np.cumsum(sizes)])
        pos = 0
        while pos < len(lines):
            pending = self._pending
            room_bytes = self.max_bytes - pending.body_bytes
            fits = int(np.searchsorted(cumulative, cumulative[pos] + room_bytes, side="right")) - 1 - pos
            take = min(self.max_items - len(pending.lines), fits, len(lines) - pos)
            if take <= 0:
                if not pending.lines:
                    raise ValueError(
                        f"a {self.kind} line of {sizes[pos] - 1} bytes exceeds max_bytes={self.max_bytes}"
                    )
                self.flush()
                continue
            lo, hi = np.searchsorted(line_of, [pos, pos + take])
            pending.items.append(line_of[lo:hi] - pos + len(pending.lines))
            pending.rows.append(rows[lo:hi])
            pending.event_ids.append(event_ids[lo:hi])
            pending.lines.extend(lines[pos : pos + take])
            pending.body_bytes += int(cumulative[pos + take] - cumulative[pos])
            pos += take
            if len(pending.lines) >= self.max_items or pos < len(lines):
                self.flush()

    def flush(self) -> None:
        """Write the pending chunk (if any) and its index."""
        pending = self._pending
        if not pending.lines:
            return
        name = f"{self.kind}-{self.first_number + len(self.chunks):05d}"
        data = b"\n".join(pending.lines) + b"\n"
        index = pa.table(
            {
                "item_index": pa.array(np.concatenate(pending.items), type=pa.int32()),
                "row": pa.array(np.concatenate(pending.rows), type=pa.int64()),
                "event_id": pa.array(np.concatenate(pending.event_ids), type=pa.string()),
            },
            schema=INDEX_SCHEMA,
        )
        self.store.write_bytes(data, PAYLOADS, f"{name}.jsonl")
        self.store.write_table(index, PAYLOADS, f"{name}.index.parquet")
        self.chunks.append(
            {
                "name": name,
                "kind": self.kind,
                "items": len(pending.lines),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        self._pending = self._empty()

    @staticmethod
    def _empty() -> _Pending:
        return _Pending(lines=[], rows=[], event_ids=[], items=[])


# ---- the manifest: which chunks a run delivers -----------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """A manifest entry: a chunk this run delivers (`deliver`), or an earlier run's chunk it resumes
    (`resume`) or replays for `force` (`replay`)."""

    name: str
    kind: str  # users | events
    ledger_chunk_id: int | None
    payload_uri: str | None
    index: str  # this run's index of the chunk (row, event_id per item), relative to the run folder
    sha256: str | None = None
    idempotency_key: str | None = None
    mode: str = "deliver"
    origin_run: str | None = None

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> Chunk:
        name = str(entry["name"])
        return cls(
            name=name,
            kind=str(entry["kind"]),
            ledger_chunk_id=entry.get("ledger_chunk_id"),
            payload_uri=entry.get("payload_uri"),
            index=entry.get("index") or f"{PAYLOADS}/{name}.index.parquet",
            sha256=entry.get("sha256"),
            idempotency_key=entry.get("idempotency_key"),
            mode=entry.get("mode", "deliver"),
            origin_run=entry.get("origin_run"),
        )


def write_manifest(store: RunStore, chunks: list[dict[str, Any]], **fields: Any) -> None:
    """`payloads/manifest.json`: the run's chunk entries (and any summary fields beside them)."""
    store.write_json({**fields, "chunks": chunks}, PAYLOADS, "manifest.json")


def read_manifest(store: RunStore) -> dict[str, Any]:
    if not store.exists(PAYLOADS, "manifest.json"):
        raise DeliveryError(f"{store.path(PAYLOADS, 'manifest.json')} is missing: run the mapping task first")
    return store.read_json(PAYLOADS, "manifest.json")


def manifest_entries(store: RunStore) -> list[dict[str, Any]]:
    return list(read_manifest(store).get("chunks", []))


def load_chunks(store: RunStore, names: Iterable[str]) -> list[Chunk]:
    """The named chunks, as `payloads/manifest.json` describes them."""
    entries = {c["name"]: c for c in manifest_entries(store)}
    missing = [n for n in names if n not in entries]
    if missing:
        raise DeliveryError(f"chunk(s) {missing[:5]} are not in {store.path(PAYLOADS, 'manifest.json')}")
    return [Chunk.from_entry(entries[n]) for n in names]


def read_lines(chunk: Chunk, expected_sha: str | None) -> list[bytes]:
    """The chunk's lines, checked against the sha256 the ledger recorded when it was made."""
    data = read_uri(chunk.payload_uri)
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha and digest != expected_sha:
        raise DeliveryError(
            f"{chunk.payload_uri} changed after it was recorded (sha256 {digest[:12]}, ledger {expected_sha[:12]}); "
            "its bytes are what FullStory holds under its key, so it cannot be sent. Restore the file"
        )
    return [line for line in data.split(b"\n") if line.strip()]


def read_run_index(store: RunStore, chunk: Chunk) -> pd.DataFrame:
    """This run's rows of the chunk: item_index, row, event_id (empty when the run has none)."""
    if not store.exists(chunk.index):
        return INDEX_SCHEMA.empty_table().to_pandas()
    return store.read_table(chunk.index, columns=INDEX_SCHEMA.names).to_pandas()


def read_chunk_index(chunk: Chunk) -> pd.DataFrame:
    """The index the chunk was written with (every row it carries, of whichever run made it)."""
    return read_index_uri(index_uri_of(chunk.payload_uri)).to_pandas()


def payload_uri(store: RunStore, name: str) -> str:
    """The full URI of one of this run's chunks, as the ledger records it."""
    return store.uri(PAYLOADS, f"{name}.jsonl")


def chunk_event_ids(store: RunStore, name: str) -> list[str]:
    """The event ids one of this run's new chunks carries (every row of its index)."""
    return (
        store.read_table(PAYLOADS, f"{name}.index.parquet", columns=["event_id"])
        .column("event_id")
        .to_pylist()
    )


def write_resume_index(
    store: RunStore, name: str, payload_uri: str, rows: list[tuple[int, str]]
) -> tuple[str, int]:
    """This run's rows (row, event_id) of an earlier run's chunk, placed on the chunk's lines by its
    original index; rows the chunk does not carry are left out. Returns the index path (relative to the
    run folder) and how many rows it holds."""
    original = read_index_uri(index_uri_of(payload_uri))
    position = dict(
        zip(original.column("event_id").to_pylist(), original.column("item_index").to_pylist(), strict=True)
    )
    kept = [(r, e) for r, e in rows if e in position]
    store.write_table(
        pa.table(
            {
                "item_index": pa.array([position[e] for _, e in kept], pa.int32()),
                "row": pa.array([r for r, _ in kept], pa.int64()),
                "event_id": pa.array([e for _, e in kept], pa.string()),
            },
            schema=INDEX_SCHEMA,
        ),
        RESUME,
        f"{name}.index.parquet",
    )
    return f"{RESUME}/{name}.index.parquet", len(kept)


def write_resume_manifest(store: RunStore, entries: list[dict[str, Any]]) -> None:
    store.write_json({"chunks": entries}, RESUME, "chunks.json")


def resume_entries(store: RunStore) -> list[dict[str, Any]]:
    if not store.exists(RESUME, "chunks.json"):
        return []
    return list(store.read_json(RESUME, "chunks.json").get("chunks", []))


def clear_payloads(store: RunStore, keep: set[str]) -> None:
    """Remove `payloads/` except the files of the chunks in `keep` (chunks an earlier try already sent)."""
    if not keep:
        store.remove(PAYLOADS)
        return
    for name in store.list(PAYLOADS):
        if name.split(".", 1)[0] not in keep:
            store.remove(PAYLOADS, name)
