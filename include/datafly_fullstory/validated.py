"""Validated parts: the rows of a run that passed validation; this module writes and reads them.

`validated/part-NNNNN.parquet` in the run folder, in landing order, with the landing's columns
(`landing.FRAME_SCHEMA`) plus `_row` (the row's number in the run, the key of its outcome) and `_file` (the
landing file it came from). The extract stage writes them, the claims step narrows them to the rows this run
delivers, and the mapping stage reads them batch by batch (bounded memory).
"""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from include.datafly_fullstory.state import RunStore

FOLDER = "validated"


def part_path(number: int) -> str:
    """The run-folder path of part `number`."""
    return f"{FOLDER}/part-{number:05d}.parquet"


def write_part(store: RunStore, number: int, table: pa.Table) -> str:
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


def read_part(store: RunStore, name: str, columns: list[str] | None = None) -> pa.Table:
    return store.read_table(FOLDER, name, columns=columns)


def replace_part(store: RunStore, name: str, table: pa.Table) -> None:
    store.write_table(table, FOLDER, name)


def clear(store: RunStore) -> None:
    store.remove(FOLDER)


def iter_frames(store: RunStore, batch_rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """The validated rows as frames, one per record batch of at most `batch_rows` rows (only `columns`)."""
    for name in parts(store):
        with store.fs.open(store.path(FOLDER, name), "rb") as fh:
            for record_batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=columns):
                yield record_batch.to_pandas()
