"""The ledger's runs and scans: a run's window and outcome counts (`dffs_runs`), and which landing files
a run has read (`dffs_scans`), so the look-back re-reads only files that changed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from include.datafly_fullstory.ledger.engine import LedgerBase, _batches
from include.datafly_fullstory.ledger.schema import runs, scans


class RunOps(LedgerBase):
    """Operations on `dffs_runs` and `dffs_scans`."""

    def start_run(self, destination: str, run_id: str, *, window: tuple[str, str], scan_start: str) -> None:
        now = self._now()
        stmt = self._insert(runs).values(
            destination=destination,
            run_id=run_id,
            window_start=window[0],
            window_end=window[1],
            scan_start=scan_start,
            started_at=now,
        )
        with self._tx() as conn:
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[runs.c.destination, runs.c.run_id],
                    set_={"window_start": window[0], "window_end": window[1], "scan_start": scan_start},
                )
            )

    def finish_run(
        self,
        destination: str,
        run_id: str,
        *,
        counts: dict[str, int],
        late_rows: int,
        problems: Sequence[str],
    ) -> None:
        values = {
            k: int(counts.get(k, 0))
            for k in ("delivered", "rejected", "unknown", "quarantined", "filtered", "skipped", "pending")
        }
        with self._tx() as conn:
            conn.execute(
                runs.update()
                .where(runs.c.destination == destination, runs.c.run_id == run_id)
                .values(
                    finished_at=self._now(),
                    rows_read=int(counts.get("read", 0)),
                    late_rows=late_rows,
                    problems="; ".join(problems) or None,
                    **values,
                )
            )

    def last_run_started(self, destination: str, *, before_run: str) -> float | None:
        query = sa.select(sa.func.max(runs.c.started_at)).where(
            runs.c.destination == destination, runs.c.run_id != before_run
        )
        with self.engine.connect() as conn:
            return conn.execute(query).scalar()

    def scans(self, destination: str, uris: Sequence[str]) -> dict[str, Any]:
        out = {}
        with self.engine.connect() as conn:
            for part in _batches(list(uris)):
                query = sa.select(scans).where(scans.c.destination == destination, scans.c.file_uri.in_(part))
                out.update({r.file_uri: r for r in conn.execute(query)})
        return out

    def record_scans(
        self,
        destination: str,
        run_id: str,
        files: Sequence[tuple[str, int, float]],
        covered: tuple[float, float],
    ) -> None:
        """Files (uri, size, mtime) read over the time range `covered`: an unchanged file whose range was
        read before is not read again by the look-back."""
        now = self._now()
        known = self.scans(destination, [f[0] for f in files])
        with self._tx() as conn:
            for uri, size, mtime in files:
                old = known.get(uri)
                start, end = covered
                if (
                    old is not None
                    and old.size == size
                    and old.mtime == mtime
                    and old.covered_start <= end
                    and old.covered_end >= start
                ):
                    start, end = min(start, old.covered_start), max(end, old.covered_end)
                stmt = self._insert(scans).values(
                    destination=destination,
                    file_uri=uri,
                    size=size,
                    mtime=mtime,
                    covered_start=start,
                    covered_end=end,
                    run_id=run_id,
                    scanned_at=now,
                )
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[scans.c.destination, scans.c.file_uri],
                        set_={
                            "size": size,
                            "mtime": mtime,
                            "covered_start": start,
                            "covered_end": end,
                            "run_id": run_id,
                            "scanned_at": now,
                        },
                    )
                )
