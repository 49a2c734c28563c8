import json
from datetime import UTC, datetime, timedelta

import pytest

from include.datafly_fullstory.errors import InputError
from include.datafly_fullstory.pipeline import group_chunks
from include.datafly_fullstory.run import RunPlan, plan_run, resolve_uri
from include.datafly_fullstory.stats import RunStats

H = datetime(2026, 11, 26, 7, tzinfo=UTC)


def _plan(destination="o-1A2B3C-na1@na1", executor=None, ledger_conn_id=None, state_uri=None, **params):
    plan = plan_run(
        params=params,
        run_id="scheduled__2026-11-26T07:00:00+00:00",
        landing_uri="demo/landing",
        state_uri=state_uri,
        airflow_home="/opt/af",
        data_interval_start=H,
        data_interval_end=H + timedelta(hours=1),
        destination=destination,
        executor=executor,
        ledger_conn_id=ledger_conn_id,
    )
    xcom = plan.to_xcom()
    assert RunPlan.from_xcom(xcom) == plan and json.loads(json.dumps(xcom)) == xcom  # XCom carries it whole
    return xcom


def test_plan_defaults_and_relative_uris_under_airflow_home():
    plan = _plan()
    assert plan["window"] == {"start": H.isoformat(), "end": (H + timedelta(hours=1)).isoformat()}
    assert plan["landing_uri"] == "/opt/af/demo/landing" and plan["state_uri"] == "/opt/af/state"
    assert (plan["dry_run"], plan["force"], plan["replay_dead_letters"]) == (False, False, False)
    assert (
        plan["fullstory_conn_id"] == "fullstory_default" and plan["thresholds"]["max_rejected_ratio"] == 0.05
    )
    assert plan["mapping"] == {"event_types": [], "require_explicit_consent": False}
    # Scheduled runs look back 24 h for late rows; the ledger is a SQLite file beside the local state.
    assert plan["lookback_hours"] == 24 and plan["scan_start"] == (H - timedelta(hours=24)).isoformat()
    assert plan["ledger"] == {"url": "sqlite:////opt/af/state/ledger.sqlite"}
    assert plan["destination"] == "o-1A2B3C-na1@na1" and plan["allow_duplicates"] is False
    assert plan["thresholds"]["max_unknown_rows"] == 0 and plan["thresholds"]["max_skipped_ratio"] == 0.6


def test_plan_ledger_location_and_misconfiguration():
    assert _plan(state_uri="s3://b/state")["ledger"] == {
        "url": "sqlite:////opt/af/datafly_fullstory/ledger.sqlite"
    }
    # Celery with a local landing or state is refused (tests/unit/test_run_locations.py); the ledger stays.
    assert _plan(ledger_conn_id="ledger_pg", executor="LocalExecutor")["ledger"] == {"conn_id": "ledger_pg"}
    with pytest.raises(ValueError, match="CeleryExecutor.*datafly_fullstory_ledger_conn_id"):
        _plan(state_uri="s3://b/state", executor="airflow.providers.celery.executors.CeleryExecutor")
    with pytest.raises(ValueError, match="destination"):
        _plan(destination=None)
    assert _plan(destination=None, dry_run=True)["destination"] is None
    assert (
        _plan(window_start="2026-11-20T10:00:00Z", window_end="2026-11-20T11:00:00Z")["lookback_hours"] == 0
    )
    assert _plan(lookback_hours=6)["scan_start"] == (H - timedelta(hours=6)).isoformat()
    with pytest.raises(ValueError, match="lookback_hours"):
        _plan(lookback_hours=-1)


def test_plan_takes_manual_params():
    plan = _plan(
        window_start="2026-11-20T10:00:00Z",
        window_end="2026-11-20T12:00:00Z",
        dry_run=True,
        event_types=["purchase", " "],
        fullstory_conn_id="fs_eu",
        max_rejected_ratio=0.2,
    )
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
        {"name": f"events-{i:05d}", "kind": "events"} for i in range(5)
    ]
    assert group_chunks(chunks, "users", 4) == [["users-00000", "users-00001"]]
    assert group_chunks(chunks, "events", 2) == [
        ["events-00000", "events-00001"],
        ["events-00002", "events-00003"],
        ["events-00004"],
    ]
    assert group_chunks([], "events", 4) == []


def test_each_threshold_sees_rows_that_did_not_reach_fullstory_and_is_named():
    stats = RunStats()
    stats.rows.update(read=100, delivered=60, rejected=6, quarantined=4, skipped=30)
    problems = stats.threshold_problems({"max_rejected_ratio": 0.05})
    assert len(problems) == 1 and "6 of 100 rows" in problems[0] and "max_rejected_ratio" in problems[0]
    assert stats.threshold_problems({"max_rejected_ratio": 0.06}) == []
    tripped = stats.threshold_problems(
        {"max_quarantined_ratio": 0.03, "max_skipped_ratio": 0.2, "max_rejected_ratio": 0.5}
    )
    assert [p.split("above ")[1].split("=")[0] for p in tripped] == [
        "max_quarantined_ratio",
        "max_skipped_ratio",
    ]
    stats.rows["unknown"] = 1
    assert any("max_unknown_rows" in p for p in stats.threshold_problems({"max_rejected_ratio": 1}))
    assert not any(
        "max_unknown_rows" in p
        for p in stats.threshold_problems({"max_rejected_ratio": 1, "max_unknown_rows": 1})
    )


# ---- the blueprint is chosen per run ---------------------------------------------------------------------


def test_the_run_uses_the_blueprint_its_param_or_variable_names(tmp_path):
    """A param (or the Variable, passed as `blueprint`) chooses the blueprint file; the plan checks it, the
    mapping stage maps with it. Here a copy of retail whose page views are named `page_seen`."""
    from include.datafly_fullstory.blueprint import BLUEPRINT_DIR
    from include.datafly_fullstory.chunks import read_manifest
    from include.datafly_fullstory.pipeline import extract_stage, map_stage
    from include.datafly_fullstory.sample import generate_landing

    retail = (BLUEPRINT_DIR / "retail.yaml").read_text()
    custom = retail.replace("variant: retail", "variant: screens").replace(
        "  page_view:\n    match: {type: page}", "  page_seen:\n    match: {type: page}"
    )
    assert custom.count("page_seen") == 1
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "screens.yaml").write_text(custom)
    generate_landing(tmp_path / "landing", 600, H, hours=1, files_per_hour=1)

    def plan(**params):
        return plan_run(
            params={"dry_run": True, **params},
            run_id="r",
            landing_uri=str(tmp_path / "landing"),
            state_uri=str(tmp_path / "state"),
            airflow_home=str(tmp_path / "home"),
            data_interval_start=H,
            data_interval_end=H + timedelta(hours=1),
        )

    assert plan().blueprint == "retail"
    chosen = plan(blueprint="screens.yaml")  # relative: under AIRFLOW_HOME
    assert chosen.blueprint == str(tmp_path / "home" / "screens.yaml")
    assert RunPlan.from_xcom(chosen.to_xcom()).blueprint == chosen.blueprint
    assert (
        plan_run(
            params={"dry_run": True},
            run_id="r",
            landing_uri="l",
            state_uri="s",
            airflow_home=str(tmp_path / "home"),
            data_interval_start=H,
            data_interval_end=H + timedelta(hours=1),
            blueprint="screens.yaml",
        ).blueprint
        == chosen.blueprint
    )  # the Variable, when no param
    with pytest.raises(InputError, match="nothere.yaml not found"):
        plan(blueprint="nothere.yaml")
    with pytest.raises(InputError, match="blueprint file .*fashion.yaml not found"):
        plan(blueprint="fashion")

    map_stage(chosen, extract_stage(chosen))
    manifest = read_manifest(chosen.store)
    assert manifest["blueprint"]["variant"] == "screens"
    names = {
        json.loads(line)["name"]
        for c in manifest["chunks"]
        if c["kind"] == "events"
        for line in chosen.store.read_bytes("payloads", f"{c['name']}.jsonl").splitlines()
    }
    assert "page_seen" in names and "page_view" not in names
