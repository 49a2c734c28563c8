"""The landing vocabulary: the landing frame's columns and their types (`FRAME_SCHEMA`), and the
Datafly call types."""

from __future__ import annotations

import pyarrow as pa

# The landing vocabulary (contracts.md "Landing frame"), defined here only: validation, mapping, the
# sample landing and the benchmarks import it.
STRING_COLUMNS = ("event_id", "type", "event", "name", "anonymous_id", "user_id")
TIMESTAMP_COLUMNS = ("timestamp", "received_at", "sent_at")
JSON_COLUMNS = ("context", "properties", "traits")
CANONICAL_COLUMNS = (*STRING_COLUMNS, *TIMESTAMP_COLUMNS, *JSON_COLUMNS, "source_id")
REQUIRED_COLUMNS = ("event_id", "type", "anonymous_id", "timestamp", "received_at")
FRAME_COLUMNS = (*CANONICAL_COLUMNS, "_row", "_file")
KNOWN_TYPES = ("page", "track", "identify", "group", "screen", "alias")  # Datafly call types (`type`)
EVENT_TYPES = ("page", "track")  # the types that become FullStory events; `identify` updates users

UTC_NS = pa.timestamp("ns", tz="UTC")
FRAME_SCHEMA = pa.schema(
    [(c, UTC_NS if c in TIMESTAMP_COLUMNS else pa.string()) for c in CANONICAL_COLUMNS]
    + [("_row", pa.int64()), ("_file", pa.string())]
)
