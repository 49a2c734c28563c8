"""How many rows of each file a window reads, from the time columns alone (`count_window_rows`).

The partition-parallel extract (parts.py) numbers each part's rows from where the previous part ends, so
it needs these counts before any part is read. They come from the same push-down filter and window rule
as the reader's (`reader._frame`), reading only `timestamp` and `received_at`: a few percent of a file's
bytes, since the JSON columns are most of it.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from include.datafly_fullstory.landing.columns import _convert, _FilePlan
from include.datafly_fullstory.landing.reader import _in_window, _orphans_here, _pushdown_filter, corrupt_file
from include.datafly_fullstory.window import Window

_TIME_COLUMNS = ("timestamp", "received_at")


def count_window_rows(plan: _FilePlan, window: Window, batch_size: int = 1_000_000) -> int:
    """The number of rows `iter_window_batches` yields for this file and window."""
    columns = [c for c in _TIME_COLUMNS if c in plan.kinds]
    orphans_here = _orphans_here(plan.file, window)
    scanner = plan.dataset.scanner(
        columns=columns,
        filter=_pushdown_filter(plan, window),
        batch_size=batch_size,
        batch_readahead=1,
        fragment_readahead=1,
    )
    total = 0
    try:
        for batch in scanner.to_batches():
            if not batch.num_rows:
                continue
            ts = _convert(batch, plan, "timestamp", plan.kinds.get("timestamp"))
            received = _convert(batch, plan, "received_at", plan.kinds.get("received_at"))
            mask, timeless = _in_window(ts, received, window)
            if orphans_here:
                mask = pc.or_(mask, timeless)
            total += int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)
    except (pa.ArrowException, OSError) as exc:
        raise corrupt_file(plan, exc) from exc
    return total
