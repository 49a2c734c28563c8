"""The files of a landing: listing them (`list_landing_files`) and their partitions.

Layouts: flat folders and hive partitions (`dt=YYYY-MM-DD[/hour=HH]`, `date=` and `hr=` also work),
on local paths or object stores (`s3://`, `gs://`, any fsspec URI; `storage_options` go to fsspec).

Which files a window reads (partition pruning): a partitioned file is read only when its partition
interval overlaps `[start - slack, end + slack)`; `slack` (default one hour) covers clock skew, i.e.
rows whose skew-corrected `timestamp` falls in the window but which landed in a neighbouring hour's
partition. Those neighbours are opened (footer only) and their row groups skipped by the `timestamp`
statistics (predicate push-down), so the cost is small and no such row is lost. Files outside that
range are never opened. Unpartitioned files are always opened and filtered by push-down.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath

import fsspec
import pyarrow.fs as pafs

from include.datafly_fullstory.errors import LandingInputError
from include.datafly_fullstory.window import Window

DEFAULT_PARTITION_SLACK = timedelta(hours=1)

_DAY_KEY = re.compile(r"^(?:dt|date)=(\d{4})-?(\d{2})-?(\d{2})$")
_HOUR_KEY = re.compile(r"^(?:hour|hr)=(\d{1,2})$")


@dataclass(frozen=True)
class LandingFile:
    path: str  # on the pyarrow filesystem
    uri: str  # what users see (`_file`, errors)
    partition: tuple[datetime, datetime] | None  # [start, end) from dt=/hour= keys; None when flat
    size: int = -1  # bytes, and modification time (epoch seconds; 0 when the store gives none): together
    mtime: float = 0.0  # they tell the look-back whether a file changed since it was last read


@dataclass(frozen=True)
class _Landing:
    fs: pafs.FileSystem
    root: str
    prefix: str  # "s3://" etc. for URIs, "" for local paths

    def uri(self, path: str) -> str:
        return f"{self.prefix}{path}"


# -- finding the files ---------------------------------------------------------------------------------


def _open_landing(landing_uri: str, storage_options: dict | None, filesystem) -> _Landing:
    scheme, sep, rest = landing_uri.partition("://")
    remote = bool(sep) and scheme != "file"
    prefix = f"{scheme}://" if remote else ""
    if isinstance(filesystem, pafs.FileSystem):
        return _Landing(filesystem, rest.rstrip("/") if sep else landing_uri, prefix)
    if filesystem is None and not remote:
        return _Landing(pafs.LocalFileSystem(), os.path.abspath(rest if sep else landing_uri), "")
    if filesystem is None:
        filesystem, root = fsspec.core.url_to_fs(landing_uri, **(storage_options or {}))
    else:
        root = filesystem._strip_protocol(landing_uri)
    return _Landing(pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), root.rstrip("/"), prefix)


def _partition_span(relative: str) -> tuple[datetime, datetime] | None:
    day = hour = None
    for part in PurePosixPath(relative).parts[:-1]:
        if m := _DAY_KEY.match(part):
            day = datetime(int(m[1]), int(m[2]), int(m[3]), tzinfo=UTC)
        elif m := _HOUR_KEY.match(part):
            hour = int(m[1])
    if day is None:
        return None
    if hour is None:
        return day, day + timedelta(days=1)
    start = day + timedelta(hours=hour)
    return start, start + timedelta(hours=1)


def _hidden(relative: str) -> bool:
    # pyarrow's convention: _SUCCESS, _metadata, .crc and the like are not data files
    return any(part.startswith((".", "_")) for part in PurePosixPath(relative).parts)


def list_landing_files(
    landing_uri: str, *, storage_options: dict | None = None, filesystem=None
) -> list[LandingFile]:
    """Every data file under the landing, sorted by path (this order defines `_row`)."""
    landing = _open_landing(landing_uri, storage_options, filesystem)
    info = landing.fs.get_file_info(landing.root)
    if info.type == pafs.FileType.NotFound:
        raise LandingInputError(
            f"landing {landing_uri} does not exist: check the Airflow Variable "
            "datafly_landing_uri (and the credentials in storage_options)"
        )
    if info.type == pafs.FileType.File:
        return [LandingFile(landing.root, landing.uri(landing.root), None, *_size_mtime(info))]
    infos = landing.fs.get_file_info(pafs.FileSelector(landing.root, recursive=True))
    files = []
    for item in infos:
        relative = item.path[len(landing.root) :].lstrip("/")
        if item.type == pafs.FileType.File and not _hidden(relative):
            files.append(
                LandingFile(item.path, landing.uri(item.path), _partition_span(relative), *_size_mtime(item))
            )
    return sorted(files, key=lambda f: f.path)


def _size_mtime(info: pafs.FileInfo) -> tuple[int, float]:
    mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
    return (info.size if info.size is not None else -1), mtime


def _window_files(landing_uri: str, window: Window, slack: timedelta, storage_options, filesystem):
    low, high = window.start - slack, window.end + slack
    files = list_landing_files(landing_uri, storage_options=storage_options, filesystem=filesystem)
    return [f for f in files if f.partition is None or (f.partition[0] < high and f.partition[1] > low)]


def list_window_files(
    landing_uri: str,
    window: Window,
    *,
    partition_slack: timedelta = DEFAULT_PARTITION_SLACK,
    storage_options: dict | None = None,
    filesystem=None,
) -> list[str]:
    """The URIs of the files a window reads, after partition pruning, in `_row` order."""
    return [f.uri for f in _window_files(landing_uri, window, partition_slack, storage_options, filesystem)]
