"""The report's parts on run folders written through their format owners (outcomes.py, stats.py, state.py):
reasons grouped in bounded memory, previous runs found, ordered and bounded, broken files named, a failed
rendering recorded instead of raised.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from include.datafly_fullstory import outcomes
from include.datafly_fullstory import report as run_report
from include.datafly_fullstory.report import history, page, reasons
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.stats import RunStats, read_stats, write_stats
from tests.report.report_html import parse_report, shown

H0 = datetime(2026, 11, 1, 0, tzinfo=UTC)


def write_outcome_rows(store: RunStore, outcome: list[str], reason: list[str | None], event_id=None) -> int:
    n = len(outcome)
    ids = event_id if event_id is not None else [f"ev-{i}" for i in range(n)]
    outcomes.write_outcomes(store, "mapping", outcomes.frame(np.arange(n), ids, outcome, reason, "event"))
    outcomes.merge_outcomes(store, n)
    return n


def stats_for(store: RunStore, start: datetime, **rows) -> RunStats:
    stats = RunStats(
        dag_run_id=store.run_id,
        window_start=start.isoformat(),
        window_end=(start + timedelta(hours=1)).isoformat(),
        artifacts=store.uri(),
        duration_s=12.5,
    )
    stats.rows = {"read": sum(rows.values()), **dict.fromkeys(outcomes.OUTCOMES, 0), **rows}
    return stats


# ---- reasons -------------------------------------------------------------------------------------------


def test_reasons_naming_a_run_time_row_or_id_are_grouped():
    raw = [
        "delivered earlier by run scheduled__2026-11-20T10:00:00+00:00 (not sent again)",
        "delivered earlier by run manual__2026-11-21T08:00:00+00:00 (not sent again)",
        "analytics consent revoked at 2026-11-20T12:40:36.512Z (row evt-11-805): a newer row denies it",
        "stitched: anonymous_id dfid-7 -> user user-1 (learned from event evt-11-231)",
        "deleted by request (user_id u-42)",
        "chunk events-00003 was taken over by another run after its claim lease ran out",
        None,
        "another run took them over",
    ]
    assert reasons.pattern_of(pa.array(raw)).to_pylist() == [
        "delivered earlier by run <run> (not sent again)",
        "delivered earlier by run <run> (not sent again)",
        "analytics consent revoked at <time> (row <row>): a newer row denies it",
        "stitched: anonymous_id <anonymous_id> -> user <user> (learned from event <event>)",
        "deleted by request (user_id <id>)",
        "chunk <chunk> was taken over by another run after its claim lease ran out",
        "(no reason recorded)",
        "another run took them over",
    ]


def test_reasons_are_counted_exactly_across_batches_with_a_few_examples(tmp_path):
    store = RunStore(str(tmp_path), "r")
    outcome = ["delivered"] * 5000 + ["skipped"] * 3000 + ["rejected"] * 7
    reason = (
        [None] * 4000
        + [
            f"delivered earlier by run manual__2026-11-0{i % 9 + 1}T00:00:00+00:00 (not sent again)"
            for i in range(1000)
        ]
        + ["no FullStory identification"] * 2999
        + ["Datafly 'alias' calls have no FullStory mapping"]
        + ["invalid_argument: bad value"] * 7
    )
    ids = [f"ev-{i}" if i % 10 else None for i in range(len(outcome))]  # some rows have no event id
    write_outcome_rows(store, outcome, reason, ids)
    found = reasons.outcome_reasons(store, batch_size=777)
    assert {o: e.rows for o, e in found.items()} == {"delivered": 5000, "skipped": 3000, "rejected": 7}
    groups = {(o, g.reason): g for o, e in found.items() for g in e.groups.values()}
    assert groups[("delivered", "(no reason recorded)")].rows == 4000
    earlier = groups[("delivered", "delivered earlier by run <run> (not sent again)")]
    assert earlier.rows == 1000 and earlier.example_reason.startswith(
        "delivered earlier by run manual__2026-11-0"
    )
    assert groups[("skipped", "no FullStory identification")].rows == 2999
    for group in groups.values():
        assert 1 <= len(group.examples) <= reasons.EXAMPLES
        assert all(e.startswith("ev-") or e.startswith("row ") for e in group.examples)
    assert groups[("delivered", "(no reason recorded)")].examples == ["row 0", "ev-1", "ev-2"]
    data = reasons.as_data(found, 8007, top=1)
    assert data["skipped"]["reasons"][0]["rows"] == 2999 and data["skipped"]["more_reasons"] == 1
    assert data["skipped"]["more_reasons_rows"] == 1 and data["skipped"]["share"] == pytest.approx(
        3000 / 8007
    )


def test_too_many_distinct_reasons_are_folded_with_exact_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(reasons, "MAX_GROUPS", 40)
    store = RunStore(str(tmp_path), "r")
    # 30 frequent reasons, then 2,000 that occur once each (no id pattern catches them)
    reason = [f"common reason {chr(65 + i % 26)}{chr(65 + i // 26)}" for i in range(30) for _ in range(20)]
    reason += [
        f"rare reason {chr(65 + i % 26)}{chr(65 + (i // 26) % 26)}{chr(65 + i // 676)}" for i in range(2000)
    ]
    write_outcome_rows(store, ["rejected"] * len(reason), reason)
    (entry,) = reasons.outcome_reasons(store, batch_size=500).values()
    assert entry.rows == 2600 and len(entry.groups) <= 40
    assert sum(g.rows for g in entry.groups.values()) + entry.other_rows == 2600
    assert entry.other_groups > 0
    top = entry.top(30)
    assert all(g.reason.startswith("common reason") and g.rows == 20 for g in top)


# ---- previous runs -------------------------------------------------------------------------------------


def test_previous_runs_are_the_24_latest_earlier_windows_and_broken_ones_are_named(tmp_path):
    state = str(tmp_path)
    for hour in range(30):
        start = H0 + timedelta(hours=hour)
        store = RunStore(state, f"scheduled__{start.isoformat()}")
        write_stats(store, stats_for(store, start, delivered=100 + hour, rejected=hour))
    current_start = H0 + timedelta(hours=30)
    current = RunStore(state, f"scheduled__{current_start.isoformat()}")
    rerun = RunStore(
        state, f"manual__{(current_start + timedelta(minutes=30)).isoformat()}"
    )  # same window, earlier
    write_stats(rerun, stats_for(rerun, current_start, delivered=5))
    later = RunStore(state, f"scheduled__{(current_start + timedelta(hours=1)).isoformat()}")
    write_stats(later, stats_for(later, current_start + timedelta(hours=1), delivered=1))
    RunStore(state, "manual__2026-11-01T05:30:00+00:00").write_bytes(b'{"rows": ', "stats.json")  # torn
    RunStore(state, "scheduled__2026-11-01T06:30:00+00:00").write_json([1, 2], "stats.json")  # not an object
    RunStore(state, "manual__in_progress").makedirs("outcomes")  # no stats.json yet
    write_outcome_rows(current, ["delivered"] * 10, [None] * 10)
    stats = stats_for(current, current_start, delivered=10)
    write_stats(current, stats)

    found = history.previous_runs(current, stats.asdict())
    ids = [r["run_id"] for r in found.runs]
    assert len(ids) == 24 and ids[-1] == rerun.run_id
    assert ids[:-1] == [f"scheduled__{(H0 + timedelta(hours=h)).isoformat()}" for h in range(7, 30)]
    assert found.later == 1 and found.missing == ["manual__in_progress"] and found.missing_count == 1
    assert found.unreadable_count == 2
    assert any(u.startswith("manual__2026-11-01T05_30_00+00_00: JSONDecodeError") for u in found.unreadable)
    assert any("holds a JSON list, not an object" in u for u in found.unreadable)
    last = found.runs[-2]
    assert (last["read"], last["rejected"], last["rejected_share"]) == (158, 29, pytest.approx(29 / 158))

    # the page says so, and draws this run after the 24
    assert run_report.write_report(current, stats) == {"path": current.uri("report.html"), "error": None}
    html = current.read_bytes(run_report.REPORT_FILE).decode()
    parsed = parse_report(html)
    assert parsed.data["errors"] == {}
    assert parsed.figure("history.runs") == "24"
    assert "1 run folder(s) have no stats.json" in html and "2 stats.json file(s) could not be read" in html
    assert "1 run(s) of later windows are left out" in html


def test_with_many_run_folders_only_a_bounded_number_of_stats_is_read(tmp_path, monkeypatch):
    state = str(tmp_path)
    for hour in range(history.MAX_READS + 40):
        start = H0 + timedelta(hours=hour)
        store = RunStore(state, f"scheduled__{start.isoformat()}")
        write_stats(store, stats_for(store, start, delivered=1))
    RunStore(state, "custom-run-id").makedirs("outcomes")
    current_start = H0 + timedelta(hours=history.MAX_READS + 40)
    current = RunStore(state, f"scheduled__{current_start.isoformat()}")
    reads = []
    original = history.read_stats
    monkeypatch.setattr(history, "read_stats", lambda store: reads.append(store.run_id) or original(store))
    found = history.previous_runs(current, stats_for(current, current_start, delivered=1).asdict())
    assert len(reads) == history.MAX_READS and found.read == history.MAX_READS
    assert found.folders == history.MAX_READS + 41 and found.not_read == 41
    assert len(found.runs) == history.MAX_RUNS
    assert found.runs[-1]["window_start"] == (current_start - timedelta(hours=1)).isoformat()
    write_outcome_rows(current, ["delivered"], [None])
    run_report.write_report(current, stats_for(current, current_start, delivered=1))
    html = current.read_bytes("report.html").decode()
    assert f"41 older run folder(s) were not looked at (the report reads at most {history.MAX_READS}" in html


# ---- the report never fails the run ---------------------------------------------------------------------


def test_a_failed_rendering_is_logged_and_recorded_not_raised(tmp_path, monkeypatch, caplog):
    store = RunStore(str(tmp_path), "scheduled__2026-11-02T00:00:00+00:00")
    write_outcome_rows(store, ["delivered", "skipped"], [None, "no FullStory identification"])
    stats = stats_for(store, H0 + timedelta(days=1), delivered=1, skipped=1)
    write_stats(store, stats)

    def broken(data):
        raise RuntimeError("the chart broke")

    monkeypatch.setattr(page, "render", broken)
    result = run_report.write_report(store, stats)
    assert result == {"path": store.uri("report.html"), "error": "RuntimeError: the chart broke"}
    assert read_stats(store)["report"] == result  # stats.json says so
    html = store.read_bytes("report.html").decode()
    assert "The report could not be rendered" in html and "the chart broke" in html
    assert "read 2, delivered 1" in html  # the summary line stands in
    assert "run report: could not write" in caplog.text


def test_a_part_that_cannot_be_read_is_drawn_as_such(tmp_path):
    store = RunStore(str(tmp_path), "scheduled__2026-11-02T00:00:00+00:00")
    write_outcome_rows(store, ["delivered"], [None])
    store.remove("outcomes.parquet")  # say, a store that lost the file: the other parts still draw
    stats = stats_for(store, H0, delivered=1)
    assert run_report.write_report(store, stats)["error"] is None
    parsed = parse_report(store.read_bytes("report.html").decode())
    assert parsed.data["outcomes"] is None and parsed.data["errors"]["reasons"].startswith(
        "FileNotFoundError"
    )
    assert parsed.figure("rows.delivered") == shown(1)
    assert "This part could not be drawn: FileNotFoundError" in store.read_bytes("report.html").decode()


def test_a_dry_run_report_says_nothing_was_sent(tmp_path):
    store = RunStore(str(tmp_path), "manual__2026-11-02T00:00:00+00:00")
    write_outcome_rows(
        store, ["dry_run"] * 3 + ["skipped"], ["dry run: nothing was sent"] * 3 + ["no identification"]
    )
    stats = stats_for(store, H0, dry_run=3, skipped=1)
    stats.dry_run = True
    assert run_report.write_report(store, stats)["error"] is None
    html = store.read_bytes("report.html").decode()
    parsed = parse_report(html)
    assert parsed.figure("rows.dry_run") == "3" and parsed.data["run"]["dry_run"] is True
    assert "A dry run sends nothing." in html and ">dry run</span>" in html
    assert parsed.data["delivery"]["jobs"] == 0 and parsed.data["errors"] == {}
