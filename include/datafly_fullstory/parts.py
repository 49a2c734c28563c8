"""The parts of a window: groups of landing files that extract, validate and map as separate tasks.

A window is planned into parts of at most `max_rows` window rows each (`plan_parts`): consecutive landing
files in path order (the order that numbers the rows), a file never split. Each part knows the first
`_row` of its rows, counted before anything is read from the time columns alone (landing/count.py), so
parts can run on different workers in any order and still number the window's rows 0..n-1 exactly as one
task reading them all would. The plan is written to `extract/parts.json` in the run folder (this module
owns that file); the extract tasks read their part from it, so XCom carries only part numbers.

A part checks, when it reads, that its files still have the size and modification time they were planned
with and give the rows counted: a landing rewritten between planning and reading stops the part with a
message saying to re-plan, instead of numbering rows twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import timedelta

from include.datafly_fullstory.errors import LandingInputError
from include.datafly_fullstory.landing import DEFAULT_PARTITION_SLACK, LandingFile, plan_window
from include.datafly_fullstory.landing.count import count_window_rows
from include.datafly_fullstory.run import DEFAULT_PART_ROWS
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.window import Window

FILE = ("extract", "parts.json")


@dataclass(frozen=True)
class PartFile:
    uri: str
    size: int
    mtime: float
    rows: int  # rows of this window the file holds

    def matches(self, file: LandingFile) -> bool:
        return file.uri == self.uri and file.size == self.size and file.mtime == self.mtime


@dataclass(frozen=True)
class Part:
    number: int
    first_row: int
    rows: int
    files: tuple[PartFile, ...]

    @property
    def uris(self) -> frozenset[str]:
        return frozenset(f.uri for f in self.files)

    def as_dict(self) -> dict:
        return {**asdict(self), "files": [asdict(f) for f in self.files]}

    @classmethod
    def from_dict(cls, data: dict) -> Part:
        return cls(
            number=int(data["number"]),
            first_row=int(data["first_row"]),
            rows=int(data["rows"]),
            files=tuple(PartFile(**f) for f in data["files"]),
        )

    def select(self, candidates: list[LandingFile]) -> list[LandingFile]:
        """This part's files among a listing of the window's, checked unchanged since planning."""
        by_uri = {f.uri: f for f in candidates}
        changed = [p.uri for p in self.files if p.uri not in by_uri or not p.matches(by_uri[p.uri])]
        if changed:
            raise LandingInputError(
                f"part {self.number}: landing file(s) changed or vanished since the window was planned "
                f"into parts: {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}. Clear the run's "
                "plan_parts task (and what follows) so the window is planned again; nothing was sent."
            )
        return [by_uri[p.uri] for p in self.files]


def group(files: Iterable[PartFile], max_rows: int) -> list[Part]:
    """Consecutive files in parts of at most `max_rows` rows (a larger file is a part alone). A file
    without rows of the window (a neighbouring hour's, opened for clock skew) goes with the part it is next to:
    it is still read (its footer) and recorded as read. A window without files has one empty part, so the
    extract task still runs and writes the window's (empty) outputs."""
    parts: list[Part] = []
    current: list[PartFile] = []
    first = rows = 0

    def close() -> None:
        nonlocal current, first, rows
        parts.append(Part(len(parts), first, rows, tuple(current)))
        first, current, rows = first + rows, [], 0

    for f in files:
        if rows and f.rows and rows + f.rows > max_rows:
            close()
        current.append(f)
        rows += f.rows
    if current or not parts:
        close()
    return parts


def plan_parts(
    landing_uri: str,
    window: Window,
    store: RunStore,
    *,
    max_rows: int = DEFAULT_PART_ROWS,
    partition_slack: timedelta = DEFAULT_PARTITION_SLACK,
    storage_options: dict | None = None,
    filesystem=None,
) -> list[Part]:
    """Plan the window into parts and write `extract/parts.json`. Opens every file's footer first (a corrupt
    file or a bad schema stops the run here, before anything is read or sent)."""
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows}: a part holds at least one row")
    plans = plan_window(
        landing_uri,
        window,
        partition_slack=partition_slack,
        storage_options=storage_options,
        filesystem=filesystem,
    )
    files = [PartFile(p.file.uri, p.file.size, p.file.mtime, count_window_rows(p, window)) for p in plans]
    parts = group(files, max_rows)
    write(store, parts)
    return parts


def write(store: RunStore, parts: list[Part]) -> None:
    store.write_json({"parts": [p.as_dict() for p in parts]}, *FILE)


def read(store: RunStore) -> list[Part]:
    if not store.exists(*FILE):
        raise LandingInputError(
            f"{store.uri(*FILE)} is missing: the window was not planned into parts. Clear the run's "
            "plan_parts task (and what follows) to plan it."
        )
    return [Part.from_dict(p) for p in store.read_json(*FILE)["parts"]]


def window_rows(parts: Iterable[Part]) -> int:
    return sum(p.rows for p in parts)
