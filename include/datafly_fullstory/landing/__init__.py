"""The Parquet landing: the files of a window, read as bounded record batches in the landing frame.

Modules, each importing only those listed before it:
- `vocabulary.py`: the landing vocabulary: column names (`STRING_COLUMNS`, `JSON_COLUMNS`, ...),
  `KNOWN_TYPES`, `EVENT_TYPES`, `FRAME_SCHEMA`;
- `files.py`: the files of a landing (`LandingFile`, `list_landing_files`, `list_window_files`): local
  or fsspec stores, hive partitions and partition pruning;
- `columns.py`: one file's footer checked against the landing, and its columns converted to the landing
  frame's types (timestamps, JSON text);
- `reader.py`: a window's rows as landing frames (`plan_window`, `iter_window_batches`).
"""

from include.datafly_fullstory.errors import LandingError, LandingInputError
from include.datafly_fullstory.landing.files import (
    DEFAULT_PARTITION_SLACK,
    LandingFile,
    list_landing_files,
    list_window_files,
)
from include.datafly_fullstory.landing.reader import DEFAULT_BATCH_SIZE, iter_window_batches, plan_window
from include.datafly_fullstory.landing.vocabulary import (
    CANONICAL_COLUMNS,
    EVENT_TYPES,
    FRAME_COLUMNS,
    FRAME_SCHEMA,
    JSON_COLUMNS,
    KNOWN_TYPES,
    REQUIRED_COLUMNS,
    STRING_COLUMNS,
    TIMESTAMP_COLUMNS,
    UTC_NS,
)

__all__ = [
    "CANONICAL_COLUMNS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_PARTITION_SLACK",
    "EVENT_TYPES",
    "FRAME_COLUMNS",
    "FRAME_SCHEMA",
    "JSON_COLUMNS",
    "KNOWN_TYPES",
    "REQUIRED_COLUMNS",
    "STRING_COLUMNS",
    "TIMESTAMP_COLUMNS",
    "UTC_NS",
    "LandingError",
    "LandingFile",
    "LandingInputError",
    "iter_window_batches",
    "list_landing_files",
    "list_window_files",
    "plan_window",
]
