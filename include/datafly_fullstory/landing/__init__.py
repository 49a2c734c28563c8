"""The Parquet landing (step 1 of the split: everything is still in `reader.py`)."""

from include.datafly_fullstory.errors import LandingError, LandingInputError
from include.datafly_fullstory.landing.reader import (
    CANONICAL_COLUMNS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_PARTITION_SLACK,
    EVENT_TYPES,
    FRAME_COLUMNS,
    FRAME_SCHEMA,
    JSON_COLUMNS,
    KNOWN_TYPES,
    REQUIRED_COLUMNS,
    STRING_COLUMNS,
    TIMESTAMP_COLUMNS,
    UTC_NS,
    LandingFile,
    iter_window_batches,
    list_landing_files,
    list_window_files,
    plan_window,
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
