"""The run report of a demo run (`report_demo` in conftest.py: the sample landing, the DAG's real tasks
against the real emulator over HTTP, three hourly windows, the last with two 429s and rejected purchases).

The report's figures are checked against `stats.json` and `outcomes.parquet` (read here with pyarrow),
both in its JSON data block and in the numbers the page shows; its delivery timeline against the run's
HTTP figures; its trends against the two earlier runs. The API key appears nowhere in it, and it fetches
nothing.
"""

from __future__ import annotations

import os
import re
from collections import Counter

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from include.datafly_fullstory.report import REPORT_FILE
from include.datafly_fullstory.stats import read_stats
from tests.report.report_html import parse_report, shown


@pytest.fixture
def demo(report_demo):
    return report_demo


def report_of(driver, run):
    store = driver.store(run)
    html = store.read_bytes(REPORT_FILE).decode("utf-8")
    return store, html, parse_report(html)


def test_the_report_is_in_the_run_folder_and_stats_name_it(demo):
    driver, runs, _ = demo
    for run in runs:
        store = driver.store(run)
        stats = read_stats(store)
        assert stats["report"] == {"path": store.uri(REPORT_FILE), "error": None}
        assert os.path.getsize(store.path(REPORT_FILE)) > 10_000
        assert run.xcom["summarise"]["stats"]["report"] == stats["report"]


def test_rows_and_reasons_match_stats_and_outcomes(demo):
    driver, runs, _ = demo
    store, _, page = report_of(driver, runs[-1])
    stats = read_stats(store)
    data = page.data
    assert data["stats"] == stats
    outcomes = pq.read_table(store.path("outcomes.parquet"))
    counts = Counter(outcomes.column("outcome").to_pylist())
    assert counts["rejected"] > 0 and counts["quarantined"] > 0 and counts["skipped"] > 0
    rows = stats["rows"]
    assert page.figure("rows.read") == shown(rows["read"]) == shown(outcomes.num_rows)
    for outcome in (
        "delivered",
        "rejected",
        "quarantined",
        "filtered",
        "skipped",
        "dry_run",
        "pending",
        "unknown",
    ):
        assert rows[outcome] == counts[outcome]
        assert page.figure(f"rows.{outcome}") == shown(counts[outcome])
        assert page.figure(f"share.{outcome}") == f"{counts[outcome] / outcomes.num_rows:.1%}"
        if not counts[outcome]:
            assert outcome not in data["outcomes"]
            continue
        entry = data["outcomes"][outcome]
        assert entry["rows"] == counts[outcome] and page.figure(f"outcome.{outcome}") == shown(
            counts[outcome]
        )
        assert sum(r["rows"] for r in entry["reasons"]) + entry["more_reasons_rows"] == counts[outcome]
        of_outcome = outcomes.filter(pc.equal(outcomes.column("outcome"), outcome))
        reason_counts = Counter(of_outcome.column("reason").to_pylist())
        ids = set(of_outcome.column("event_id").to_pylist())
        for r in entry["reasons"]:
            assert 1 <= len(r["examples"]) <= 3
            assert all(e in ids or e.startswith("row ") for e in r["examples"])
            if "<" not in r["reason"]:  # a reason naming no run, row or id: its own group, counted exactly
                key = None if r["reason"] == "(no reason recorded)" else r["reason"]
                assert r["rows"] == reason_counts[key]
            else:  # a grouped one: its example is one of its rows' reasons
                assert r["example_reason"] in reason_counts
    # FullStory's refusals of the purchases, with its code, are the top reason for rejected rows
    top = data["outcomes"]["rejected"]["reasons"][0]
    assert top["reason"].startswith("invalid_argument") and top["rows"] == stats["events"]["rejected"]
    # the reason rows the page shows are the data's
    shown_rows = page.figures["reason.rows"]
    assert shown_rows == [shown(r["rows"]) for o in _page_order(data) for r in data["outcomes"][o]["reasons"]]


def _page_order(data):
    order = ["rejected", "quarantined", "filtered", "skipped", "dry_run", "pending", "unknown", "delivered"]
    return [o for o in order if o in data["outcomes"]]


def test_events_by_name_and_identification_are_the_stats(demo):
    driver, runs, _ = demo
    store, _, page = report_of(driver, runs[-1])
    stats = read_stats(store)
    assert stats["events_by_name"] and stats["identification"]
    for name, n in stats["events_by_name"].items():
        assert page.figure(f"events_by_name.{name}") == shown(n)
    for mode, n in stats["identification"].items():
        assert page.figure(f"identification.{mode}") == shown(n)
    for what in ("events", "users"):
        for k in ("mapped", "delivered", "rejected"):
            assert page.figure(f"{what}.{k}") == shown(stats[what][k])
    assert {"rows-by-outcome", "outcome-shares", "events-by-name", "identification"} <= set(page.charts)


def test_the_delivery_timeline_accounts_for_the_runs_traffic(demo):
    driver, runs, _ = demo
    store, _, page = report_of(driver, runs[-1])
    stats = read_stats(store)
    d = page.data["delivery"]
    assert d["tries"] == len([n for n in runs[-1].done if n.startswith("deliver_")])
    assert d["jobs"] == stats["batches"] > 0 and d["jobs_finished"] == d["jobs"]
    items = {k: stats["events"][k] + stats["users"][k] for k in ("delivered", "rejected")}
    assert (d["delivered"], d["rejected"], d["unknown"]) == (items["delivered"], items["rejected"], 0)
    assert d["throttled"] == stats["http"]["status_counts"]["429"] == 2
    assert (
        d["retries"] == stats["http"]["retries"] == 2 and d["http"]["requests"] == stats["http"]["requests"]
    )
    assert page.figure("delivery.jobs") == shown(d["jobs"]) and page.figure("delivery.throttled") == "2"
    series = d["series"]
    assert sum(series["throttled"]) == 2 and sum(series["retries"]) == 2
    assert max(n for _, n in series["in_flight"]) == d["max_in_flight"] >= 1
    assert series["in_flight"][-1][1] == 0  # every job ended
    per_bucket = sum(v * series["bucket_s"] for v in series["items_per_s"])
    assert per_bucket == pytest.approx(d["items_finished"], rel=1e-3)
    assert "delivery-timeline" in page.charts
    # the earlier windows met no 429
    _, _, first = report_of(driver, runs[0])
    assert first.data["delivery"]["throttled"] == 0 and first.data["delivery"]["jobs"] > 0


def test_trends_show_the_earlier_runs_by_window(demo):
    driver, runs, _ = demo
    store, _, page = report_of(driver, runs[-1])
    history = page.data["history"]
    assert [r["run_id"] for r in history["runs"]] == [runs[0].run_id, runs[1].run_id]
    assert history["missing_count"] == history["unreadable_count"] == history["later"] == 0
    for run, summary in zip(runs[:2], history["runs"], strict=True):
        stats = read_stats(driver.store(run))
        assert summary["read"] == stats["rows"]["read"]
        assert summary["delivered_share"] == pytest.approx(stats["rows"]["delivered"] / stats["rows"]["read"])
    stats = read_stats(store)
    current = page.data["current"]
    assert current["rejected_share"] == pytest.approx(stats["rows"]["rejected"] / stats["rows"]["read"])
    assert page.figure("trend.rejected_share") == f"{current['rejected_share']:.1%}"
    assert page.figure("history.runs") == "2"
    trend_charts = [c for c in page.charts if c.startswith("trend-")]
    assert len(trend_charts) == 10
    # the first run has no earlier run and says so; a later window is not an earlier run
    _, html0, first = report_of(driver, runs[0])
    assert first.data["history"]["runs"] == [] and first.data["history"]["later"] == 0
    assert "No earlier run of this DAG was found" in html0


def test_the_report_holds_no_secret_and_fetches_nothing(demo):
    driver, runs, api_key = demo
    for run in runs:
        _, html, page = report_of(driver, run)
        assert api_key and api_key not in html
        assert [s.get("type") for s in page.scripts] == ["application/json"]
        for tag, attrs in page.tags:
            assert tag not in ("link", "img", "iframe", "object", "embed"), tag
            assert "src" not in attrs and "srcset" not in attrs
            href = attrs.get("href")
            assert href is None or not re.match(r"^[a-z]+:|^//", href), href
        assert "@import" not in html and "url(" not in html and "@font-face" not in html
