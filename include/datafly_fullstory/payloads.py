"""Request chunks: mapped FullStory bodies as JSON-lines files, with their row index and idempotency keys.

A chunk is one future batch-import request: `payloads/<kind>-NNNNN.jsonl` holds one request item per line
(the delivery body is `{"requests": [line, ...]}`), `<kind>-NNNNN.index.parquet` says which input rows each
line carries. `ChunkWriter` fills chunks up to `max_items` lines and `max_bytes` request-body bytes, and
holds at most one chunk in memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.window import Window

PAYLOADS = "payloads"
MAX_BATCH_ITEMS = 50_000  # FullStory's cap on request objects per batch import
# `{"requests":[` + `]}` around the joined lines; each line then costs its length plus one separator.
ENVELOPE_BYTES = len(b'{"requests":[]}')
INDEX_SCHEMA = pa.schema([("item_index", pa.int32()), ("row", pa.int64()), ("event_id", pa.string())])


def idempotency_key(run_id: str, window: Window | dict, kind: str, chunk_name: str, sha256: str) -> str:
    """The `Idempotency-Key` of a chunk: a pure function of the run, its window, the chunk and its content.
    The ledger records it with the chunk; every later POST of the chunk (a retry, a resume by another
    run, a forced replay) sends the recorded key with the recorded bytes, so FullStory replays its first
    answer instead of importing again."""
    if isinstance(window, dict):
        window = Window.from_dict(window)
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
                    raise ValueError(f"a {self.kind} line of {sizes[pos] - 1} bytes exceeds max_bytes={self.max_bytes}")
                self.flush()
                continue
            lo, hi = np.searchsorted(line_of, [pos, pos + take])
            pending.items.append(line_of[lo:hi] - pos + len(pending.lines))
            pending.rows.append(rows[lo:hi])
            pending.event_ids.append(event_ids[lo:hi])
            pending.lines.extend(lines[pos:pos + take])
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
        index = pa.table({
            "item_index": pa.array(np.concatenate(pending.items), type=pa.int32()),
            "row": pa.array(np.concatenate(pending.rows), type=pa.int64()),
            "event_id": pa.array(np.concatenate(pending.event_ids), type=pa.string()),
        }, schema=INDEX_SCHEMA)
        self.store.write_bytes(data, PAYLOADS, f"{name}.jsonl")
        self.store.write_table(index, PAYLOADS, f"{name}.index.parquet")
        self.chunks.append({"name": name, "kind": self.kind, "items": len(pending.lines), "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
        self._pending = self._empty()

    @staticmethod
    def _empty() -> _Pending:
        return _Pending(lines=[], rows=[], event_ids=[], items=[])
