"""Landing files: `write_landing` writes a landing table as Parquet in the `hive` or `flat` layout, and
`generate_landing` generates a landing (table.py) and writes it in one call."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from include.datafly_fullstory.sample.spec import LandingSpec
from include.datafly_fullstory.sample.table import generate_table


def write_landing(
    table: pa.Table,
    out_dir: str | Path,
    *,
    layout: str = "hive",
    files_per_hour: int = 1,
    row_group_size: int = 64_000,
) -> list[Path]:
    """Write a landing table as Parquet: `hive` (dt=YYYY-MM-DD/hour=HH/part-N.parquet) or `flat`
    (part-N.parquet, one file per hour and split). Returns the files written, sorted."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hours = pc.floor_temporal(table.column("timestamp"), unit="hour")
    written = []
    for hour in pc.unique(hours).to_pylist():
        part = table.filter(pc.equal(hours, pa.scalar(hour, type=hours.type)))
        for k, piece in enumerate(_split(part, files_per_hour)):
            if layout == "hive":
                folder = out / f"dt={hour:%Y-%m-%d}" / f"hour={hour:%H}"
                path = folder / f"part-{k:05d}.parquet"
            elif layout == "flat":
                folder = out
                path = folder / f"events-{hour:%Y%m%dT%H}-{k:05d}.parquet"
            else:
                raise ValueError(f"layout {layout!r}: use 'hive' or 'flat'")
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(piece, path, row_group_size=row_group_size, compression="zstd")
            written.append(path)
    return sorted(written)


def _split(table: pa.Table, parts: int) -> list[pa.Table]:
    size = max(1, -(-table.num_rows // max(1, parts)))
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


def generate_landing(
    out_dir: str | Path,
    rows: int,
    start: datetime,
    hours: int = 1,
    *,
    seed: int = 7,
    layout: str = "hive",
    bad_fraction: float = 0.004,
    files_per_hour: int = 1,
) -> list[Path]:
    """Generate and write a landing of `rows` rows spread over `hours` hours from `start`."""
    spec = LandingSpec(
        rows=rows, start=start, end=start + timedelta(hours=hours), seed=seed, bad_fraction=bad_fraction
    )
    return write_landing(generate_table(spec), out_dir, layout=layout, files_per_hour=files_per_hour)
