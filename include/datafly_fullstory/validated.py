"""Validated parts: the rows of a run that passed validation; this module writes and reads them.

`validated/part-KKKKK-NNNNN.parquet` in the run folder (`K` the window part that read the rows, parts.py;
`N` the batch within it), in landing order, with the landing's columns (`landing.FRAME_SCHEMA`) plus `_row`
(the row's number in the run, the key of its outcome) and `_file` (the landing file it came from). The
extract tasks write them, the claims step narrows them to the rows this run delivers, and the mapping stage
reads them batch by batch (bounded memory).

The claims step does not overwrite what extract wrote: its narrowed copy of a part goes to
`validated/claimed/<name>`, which readers take instead when present. Claiming again (a retried task) starts
from the extracted rows after `reset_claims`, so a row taken out by an earlier try is never lost.
"""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from include.datafly_fullstory.state import RunStore

FOLDER = "validated"
CLAIMED = "claimed"


def part_path(number: int | tuple[int, int]) -> str:
    """The run-folder path of part `number` (an int, or (window part, batch))."""
    return f"{FOLDER}/{part_name(number)}"


def part_name(number: int | tuple[int, int]) -> str:
    if isinstance(number, tuple):
        return f"part-{number[0]:05d}-{number[1]:05d}.parquet"
    return f"part-{number:05d}.parquet"


def write_part(store: RunStore, number: int | tuple[int, int], table: pa.Table) -> str:
    path = part_path(number)
    store.write_table(table, path)
    return path


def write_parts(store: RunStore, table: pa.Table, part_rows: int) -> list[str]:
    """`table` as consecutive parts of `part_rows` rows (tests and benchmarks start from here)."""
    return [
        write_part(store, i, table.slice(start, part_rows))
        for i, start in enumerate(range(0, table.num_rows, part_rows))
    ]


def parts(store: RunStore) -> list[str]:
    """The part file names, in order."""
    return [n for n in store.list(FOLDER, suffix=".parquet") if n.startswith("part-")]


def window_part_of(name: str) -> int:
    """The window part a file name belongs to (0 for the single-part names `part-NNNNN.parquet`)."""
    pieces = name.removesuffix(".parquet").split("-")
    return int(pieces[1]) if len(pieces) == 3 else 0


def parts_of(store: RunStore, window_part: int) -> list[str]:
    return [n for n in parts(store) if window_part_of(n) == window_part]


def _source(store: RunStore, name: str) -> tuple[str, ...]:
    claimed = (FOLDER, CLAIMED, name)
    return claimed if store.exists(*claimed) else (FOLDER, name)


def read_part(store: RunStore, name: str, columns: list[str] | None = None) -> pa.Table:
    return store.read_table(*_source(store, name), columns=columns)


def read_extracted(store: RunStore, name: str, columns: list[str] | None = None) -> pa.Table:
    """A part as extract wrote it, before the claims step narrowed it."""
    return store.read_table(FOLDER, name, columns=columns)


def replace_part(store: RunStore, name: str, table: pa.Table) -> None:
    """The claims step's narrowed copy of a part (see the module docstring)."""
    store.write_table(table, FOLDER, CLAIMED, name)


def reset_claims(store: RunStore) -> None:
    store.remove(FOLDER, CLAIMED)


def remove_parts(store: RunStore, names) -> None:
    for name in names:
        store.remove(FOLDER, name)
        store.remove(FOLDER, CLAIMED, name)


def clear(store: RunStore) -> None:
    store.remove(FOLDER)


def iter_frames(
    store: RunStore, batch_rows: int, columns: list[str] | None = None, names=None
) -> Iterator[pd.DataFrame]:
    """The validated rows as frames, one per record batch of at most `batch_rows` rows (only `columns`), of
    every part or of the parts `names`."""
    for name in parts(store) if names is None else names:
        with store.fs.open(store.path(*_source(store, name)), "rb") as fh:
            for record_batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=columns):
                yield record_batch.to_pandas()
