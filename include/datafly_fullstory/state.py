"""The state store: where each run's artifacts live (local folder or an fsspec URI such as s3://).

Every stage reads and writes its run folder through `RunStore`, so any stage can run on any worker and
be re-run alone. Writes are atomic on local disks (write to a temporary name, then rename) and single-PUT
on object stores, so a killed task never leaves half a file behind.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import fsspec
import orjson

_SAFE_RUN_ID = re.compile(r"[^A-Za-z0-9_.+-]")


def safe_run_id(run_id: str) -> str:
    """A dag_run_id as a folder name: Airflow run ids contain ':' and '+', which some stores dislike."""
    return _SAFE_RUN_ID.sub("_", run_id)


@dataclass(frozen=True)
class RunStore:
    """The folder `<area>/<run_id>/` under a state URI: `runs/<dag_run_id>/` for a run's artifacts;
    other areas (the delivery registry) use the same atomic reads and writes."""

    state_uri: str
    run_id: str
    area: str = "runs"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs, _ = fsspec.core.url_to_fs(self.state_uri)
        return fs

    @property
    def root(self) -> str:
        _, base = fsspec.core.url_to_fs(self.state_uri)
        return str(PurePosixPath(base, self.area, safe_run_id(self.run_id)))

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def path(self, *parts: str) -> str:
        """The store path of a file in the run folder (no protocol prefix; use with `self.fs`)."""
        return str(PurePosixPath(self.root, *parts))

    def uri(self, *parts: str) -> str:
        """A full URI of a file in the run folder, usable by pyarrow / pandas / fsspec directly."""
        path = self.path(*parts)
        if self.is_local:
            return path
        return f"{_protocols(self.fs)[0]}://{path}"

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def list(self, *parts: str, suffix: str = "") -> list[str]:
        """File names (not paths) in a sub-folder of the run, sorted; empty when the folder is absent."""
        folder = self.path(*parts)
        if not self.fs.exists(folder):
            return []
        names = [PurePosixPath(p).name for p in self.fs.ls(folder, detail=False)]
        return sorted(n for n in names if n.endswith(suffix))

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open(self.path(*parts), "rb") as fh:
            return fh.read()

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole file atomically: readers see the old file or the new one, never a torn one."""
        target = self.path(*parts)
        self.fs.makedirs(str(PurePosixPath(target).parent), exist_ok=True)
        if not self.is_local:
            self.fs.pipe_file(target, data)
            return
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)

    def read_json(self, *parts: str):
        return orjson.loads(self.read_bytes(*parts))

    def write_json(self, obj, *parts: str) -> None:
        self.write_bytes(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS), *parts)

    def write_table(self, table, *parts: str) -> None:
        """Write a pyarrow Table as Parquet, atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(sink.getvalue().to_pybytes(), *parts)

    def read_table(self, *parts: str, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        with self.fs.open(self.path(*parts), "rb") as fh:
            return pq.read_table(fh, columns=columns)

    def iter_lines(self, *parts: str) -> Iterator[bytes]:
        with self.fs.open(self.path(*parts), "rb") as fh:
            for line in fh:
                line = line.rstrip(b"\n")
                if line:
                    yield line

    def remove(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
