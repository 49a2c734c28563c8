"""The run report: `runs/<run_id>/report.html`, one self-contained page per run. This package owns it.

`write_report(store, run_stats)` is called by the summarise step right after `stats.json`. It reads the
run folder: `stats.json`'s figures (passed in), `outcomes.parquet` (rows by outcome, the top reasons per
outcome with example event ids: reasons.py, in record batches), the delivery timeline files
(delivery/timeline.py -> deliveries.py) and the previous runs' `stats.json` (history.py), then draws the
page (page.py, charts in svg.py). Nothing in it runs a script or fetches a file: it opens from disk.

Writing the report never fails the run. A part that cannot be read (say a corrupt timeline file) is drawn
as "could not be drawn" with the reason; an error in rendering the page leaves a short page saying why,
is logged, and is recorded in `stats.json` as `report.error` (`report.path` names the file, or is null
when not even that page could be written). No secret is read here: the figures are stats, outcome reasons
and timeline counts, none of which carries the API key.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from include.datafly_fullstory.state import RunStore

REPORT_FILE = "report.html"
FORMAT = 1
TOP_REASONS = 8  # reasons shown per outcome (the rest are counted)
# Files of the run folder the report links to, when present (relative links: they resolve beside it).
FILES = (
    ("stats.json", "the run's figures"),
    ("outcomes.parquet", "one outcome and reason per input row"),
    ("quarantine.parquet", "rows that failed validation, with the expectations they failed"),
    ("validation.json", "each expectation's unexpected count"),
    ("dead_letters.parquet", "items FullStory rejected, as sent, with its code and message"),
    ("type_problems.parquet", "values not sent: they cannot take their declared type"),
    ("identity.parquet", "identity stitching per anonymous event"),
)

log = logging.getLogger(__name__)

__all__ = ["REPORT_FILE", "build", "location", "write_report"]


def location(store: RunStore) -> dict[str, Any]:
    """`stats.report` before the report is written: where it will be."""
    return {"path": store.uri(REPORT_FILE), "error": None}


def build(store: RunStore, stats: dict[str, Any], *, now: datetime | None = None) -> dict[str, Any]:
    """The report's figures (the page's JSON block). A part that fails is None, its error in `errors`."""
    from include.datafly_fullstory.delivery.timeline import read_timelines
    from include.datafly_fullstory.report import deliveries, history, reasons

    errors: dict[str, str] = {}
    read = int((stats.get("rows") or {}).get("read") or 0)

    def part(name: str, compute):
        try:
            return compute()
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"[:400]
            log.warning("run report: the %s part could not be drawn: %s", name, errors[name])
            return None

    data = {
        "format": FORMAT,
        "generated_at": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
        "run": {
            "run_id": stats.get("dag_run_id") or store.run_id,
            "window_start": stats.get("window_start"),
            "window_end": stats.get("window_end"),
            "destination": stats.get("destination"),
            "dry_run": bool(stats.get("dry_run")),
            "duration_s": stats.get("duration_s"),
            "artifacts": stats.get("artifacts"),
        },
        "stats": stats,
        "current": history.run_summary(stats),
        "outcomes": part(
            "reasons", lambda: reasons.as_data(reasons.outcome_reasons(store), read, TOP_REASONS)
        ),
        "delivery": part("delivery", lambda: deliveries.delivery_data(read_timelines(store))),
        "history": part("history", lambda: history.previous_runs(store, stats).as_data()),
        "files": part("files", lambda: [[name, what] for name, what in FILES if store.exists(name)]),
    }
    data["errors"] = errors
    return data


def write_report(store: RunStore, run_stats) -> dict[str, Any]:
    """Write `report.html` for the run whose `stats.json` was just written; returns `run_stats.report`.
    Never raises: on an error the report's page says why, the error is logged and `stats.json` is written
    again with it (`report.error`)."""
    from include.datafly_fullstory.stats import write_stats

    run_stats.report = location(store)
    try:
        from include.datafly_fullstory.report.page import render

        html = render(build(store, run_stats.asdict()))
        store.write_bytes(html.encode("utf-8"), REPORT_FILE)
        return run_stats.report
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
        log.exception("run report: could not write %s; the run goes on", run_stats.report["path"])
    try:
        store.write_bytes(
            _fallback(run_stats.dag_run_id, error, run_stats.asstr()).encode("utf-8"), REPORT_FILE
        )
        run_stats.report = {**run_stats.report, "error": error}
    except Exception:
        log.exception("run report: not even the short page could be written")
        run_stats.report = {"path": None, "error": error}
    try:
        write_stats(store, run_stats)
    except Exception:
        log.exception("run report: could not record its error in stats.json")
    return run_stats.report


def _fallback(run_id: str | None, error: str, summary: str) -> str:
    """The page left in place of a report that could not be rendered (kept here, not in page.py, so that
    it is written whatever went wrong there): why, and the run's summary line."""
    from html import escape

    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Run report {escape(str(run_id))}: not rendered</title></head>"
        '<body style="font-family: system-ui, sans-serif; margin: 24px">'
        f"<h1>Run report {escape(str(run_id))}</h1>"
        f'<p id="report-error">The report could not be rendered: <code>{escape(error)}</code>. The run\'s '
        "figures are in stats.json beside this file.</p>"
        f'<p id="summary">{escape(summary)}</p></body></html>\n'
    )
