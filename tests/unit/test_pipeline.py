from datetime import UTC, datetime, timedelta

import pytest

from include.datafly_fullstory.pipeline import attention_needed, group_chunks, plan_run, resolve_uri
from include.datafly_fullstory.stats import empty

H = datetime(2026, 11, 26, 7, tzinfo=UTC)


def _plan(**params):
    return plan_run(params=params, run_id="scheduled__2026-11-26T07:00:00+00:00", landing_uri="demo/landing",
                    state_uri=None, airflow_home="/opt/af", data_interval_start=H,
                    data_interval_end=H + timedelta(hours=1))


def test_plan_defaults_and_relative_uris_under_airflow_home():
    plan = _plan()
    assert plan["window"] == {"start": H.isoformat(), "end": (H + timedelta(hours=1)).isoformat()}
    assert plan["landing_uri"] == "/opt/af/demo/landing" and plan["state_uri"] == "/opt/af/state"
    assert (plan["dry_run"], plan["force"], plan["replay_dead_letters"]) == (False, False, False)
    assert plan["fullstory_conn_id"] == "fullstory_default" and plan["max_rejected_ratio"] == 0.05
    assert plan["mapping"] == {"event_types": [], "require_explicit_consent": False}


def test_plan_takes_manual_params():
    plan = _plan(window_start="2026-11-20T10:00:00Z", window_end="2026-11-20T12:00:00Z", dry_run=True,
                 event_types=["purchase", " "], fullstory_conn_id="fs_eu", max_rejected_ratio=0.2)
    assert plan["window"]["start"] == "2026-11-20T10:00:00+00:00" and plan["dry_run"] is True
    assert plan["mapping"]["event_types"] == ["purchase"] and plan["fullstory_conn_id"] == "fs_eu"
    with pytest.raises(ValueError, match="max_rejected_ratio"):
        _plan(max_rejected_ratio=3)


def test_uris_and_missing_landing():
    assert resolve_uri("s3://bucket/landing", "/h") == "s3://bucket/landing"
    assert resolve_uri("/data/landing", "/h") == "/data/landing"
    with pytest.raises(ValueError, match="datafly_landing_uri"):
        resolve_uri(None, "/h")


def test_chunks_are_grouped_per_kind_in_order():
    chunks = [{"name": f"users-{i:05d}", "kind": "users"} for i in range(2)] + [
        {"name": f"events-{i:05d}", "kind": "events"} for i in range(5)]
    assert group_chunks(chunks, "users", 4) == [["users-00000", "users-00001"]]
    assert group_chunks(chunks, "events", 2) == [["events-00000", "events-00001"],
                                                  ["events-00002", "events-00003"], ["events-00004"]]
    assert group_chunks([], "events", 4) == []


def test_rejections_above_the_threshold_need_attention():
    stats = empty()
    stats["events"].update(mapped=90, rejected=5)
    stats["users"].update(mapped=10, rejected=1)
    assert attention_needed(stats, {"max_rejected_ratio": 0.05}) and "6 of 100 items" in attention_needed(
        stats, {"max_rejected_ratio": 0.05})[0]
    assert attention_needed(stats, {"max_rejected_ratio": 0.06}) == []
