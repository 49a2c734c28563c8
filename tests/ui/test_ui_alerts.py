"""Run alerts: what they say, that they reach a real SMTP server on 127.0.0.1 and plugged-in notifiers, that
no key is ever in them, and the finish deadline's settings.

The whole path under a real scheduler (task callbacks, the DAG processor's failure callback, the executor's
deadline callback): tests/integration/test_ui_airflow.py.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from fullstory_provider.alerts import (
    RunFacts,
    WindowEndDeadline,
    deadline_alert,
    failure_alert,
    failure_text,
    finish_deadline,
    finish_within,
    overdue_alert,
    plugged_notifiers,
    recipients,
    run_overdue,
    send_alert,
)
from include.datafly_fullstory.stats import RunStats
from tests.ui.local_smtp import LocalSmtp, body_text

KEY = "na1.SECRET-key-0123456789/abcd"
BASE = "https://airflow.example.com"
RUN_ID = "scheduled__2026-11-20T10:00:00+00:00"
REPORT = f"{BASE}/datafly-fullstory/runs/scheduled__2026-11-20T10%3A00%3A00%2B00%3A00/report.html"
THRESHOLD = (
    "400 of 1000 rows (40.0%) rejected (by FullStory or before sending): above max_rejected_ratio=5.0%. "
    "See dead_letters.parquet in /state/runs/x"
)


def _stats(problems=(THRESHOLD,)) -> dict:
    stats = RunStats(
        dag_run_id=RUN_ID,
        window_start="2026-11-20T09:00:00+00:00",
        window_end="2026-11-20T10:00:00+00:00",
        problems=list(problems),
    )
    stats.rows.update(read=1000, delivered=560, rejected=400, skipped=40)
    return stats.asdict()


def test_a_threshold_failure_says_the_summary_the_problem_and_the_link():
    stats = _stats()
    facts = RunFacts(
        RUN_ID,
        stats=stats,
        # summarise raises the same problem; a failed delivery task says something of its own.
        failures=[
            f"summarise: AirflowFailException: {THRESHOLD}",
            "deliver_events: FullStoryRetryError: gave up",
        ],
    )
    alert = failure_alert(facts, reason="task_failure", last_task="summarise", base_url=BASE)
    summary = RunStats.from_dict(stats).asstr()
    assert alert.subject.startswith(f"[Airflow] datafly_fullstory_sync run {RUN_ID} failed: 400 of 1000 rows")
    text = alert.text()
    assert f"Summary: {summary}" in text
    assert "Window: 2026-11-20T09:00:00+00:00 -> 2026-11-20T10:00:00+00:00" in text
    assert alert.problems == (THRESHOLD, "deliver_events: FullStoryRetryError: gave up")
    assert text.endswith(f"Report: {REPORT}")
    page = alert.html()
    assert f'<a href="{REPORT}">' in page and "-&gt;" in page  # escaped, not markup


def test_a_run_that_stopped_early_says_which_task_failed_and_why():
    facts = RunFacts(
        RUN_ID,
        failures=["extract_and_validate: AirflowFailException: landing file x.parquet: no column event_id"],
    )
    alert = failure_alert(facts, reason="task_failure", last_task="summarise", base_url=BASE)
    assert "no stats.json: the run stopped before summarise wrote it" in alert.text()
    assert alert.problems == (
        "extract_and_validate: AirflowFailException: landing file x.parquet: no column event_id",
    )
    bare = failure_alert(RunFacts(RUN_ID), reason="task_failure", last_task="plan", base_url=BASE)
    assert bare.problems == (
        "the run failed (task_failure); the last task to fail was plan: its log says why",
    )


def test_the_key_never_reaches_an_alert():
    leaky = f"deliver_users: ValueError: header 'Basic {KEY}' and its escape {KEY.encode('unicode_escape').decode()}"
    facts = RunFacts(RUN_ID, stats=_stats([f"stopped: Basic {KEY}"]), failures=[leaky], secrets=[KEY])
    alert = failure_alert(facts, reason="task_failure", last_task=None, base_url=BASE)
    for text in (alert.subject, alert.text(), alert.html(), str(alert.as_context())):
        assert KEY not in text and "SECRET-key" not in text
    assert "***" in alert.text()


def test_failure_texts_are_one_bounded_line():
    assert failure_text(ValueError("a\nb  c")) == "ValueError: a b c"
    assert len(failure_text("x" * 10_000)) == 2000
    assert failure_text(None) == "failed (no exception was given)"


def test_recipients():
    assert recipients(" a@x.org, b@x.org;a@x.org\nc@x.org ") == ["a@x.org", "b@x.org", "c@x.org"]
    assert recipients(None) == [] and recipients("  ") == []


def test_the_alert_email_reaches_a_local_smtp_server(monkeypatch):
    alert = failure_alert(
        RunFacts(RUN_ID, stats=_stats(), failures=[f"deliver_users: boom {KEY}"], secrets=[KEY]),
        reason="task_failure",
        last_task="deliver_users",
        base_url=BASE,
    )
    with LocalSmtp() as smtp:
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp.connection_json())
        sent = send_alert(alert, {}, emails=["oncall@example.com", "lead@example.com"])
        assert sent == ["e-mail to 2 recipient(s)"]
        message = smtp.wait_for(lambda m: True, 10)
    assert smtp.envelopes == [("airflow@example.com", ["oncall@example.com", "lead@example.com"])]
    assert str(message["Subject"]) == alert.subject
    body = body_text(message)
    assert RunStats.from_dict(_stats()).asstr() in body
    assert THRESHOLD in body and "deliver_users: boom ***" in body and REPORT in body
    raw = message.as_string()
    assert KEY not in raw and "SECRET-key" not in raw


def test_jinja_in_a_message_is_not_rendered(monkeypatch):
    facts = RunFacts(RUN_ID, failures=["map_payloads: KeyError: '{{ conn.fullstory_default.password }}'"])
    alert = failure_alert(facts, reason="task_failure", last_task=None, base_url=BASE)
    with LocalSmtp() as smtp:
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp.connection_json())
        send_alert(alert, {}, emails=["oncall@example.com"])
        message = smtp.wait_for(lambda m: True, 10)
    assert "{{ conn.fullstory_default.password }}" in body_text(message)


def test_plugged_notifiers_render_the_alert(tmp_path, monkeypatch):
    capture = tmp_path / "alerts.txt"
    monkeypatch.setenv("DFFS_ALERT_CAPTURE_FILE", str(capture))
    notifiers = plugged_notifiers(" tests.ui.alert_capture.capture , ")
    assert len(notifiers) == 1
    alert = failure_alert(RunFacts(RUN_ID), reason="task_failure", last_task="plan", base_url=BASE)
    assert send_alert(alert, {}, emails=[], notifiers=notifiers) == ["LineNotifier"]
    assert capture.read_text() == f"failed {RUN_ID} {REPORT}\n"
    with pytest.raises(ImportError, match=r"alert_notifiers: cannot import 'tests.ui.nowhere.capture'"):
        plugged_notifiers("tests.ui.nowhere.capture")


def test_one_channel_failing_does_not_stop_the_others(tmp_path, monkeypatch):
    capture = tmp_path / "alerts.txt"
    monkeypatch.setenv("DFFS_ALERT_CAPTURE_FILE", str(capture))
    with LocalSmtp() as smtp:
        closed = smtp.connection_json()
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", closed)  # the server is stopped: nothing listens
    alert = failure_alert(RunFacts(RUN_ID), reason="task_failure", last_task="plan", base_url=BASE)
    with pytest.raises(RuntimeError, match=f"alert for run {re.escape(RUN_ID)} not sent through: e-mail: "):
        send_alert(
            alert,
            {},
            emails=["oncall@example.com"],
            notifiers=plugged_notifiers("tests.ui.alert_capture.capture"),
        )
    assert capture.read_text().startswith("failed ")


def test_an_alert_with_no_channel_goes_nowhere_quietly():
    alert = failure_alert(RunFacts(RUN_ID), reason=None, last_task=None, base_url=BASE)
    assert send_alert(alert, {}, emails=[]) == []


# ---- the finish deadline --------------------------------------------------------------------------------


def test_finish_within_comes_from_airflow_config(monkeypatch):
    monkeypatch.delenv("AIRFLOW__DATAFLY_FULLSTORY__FINISH_WITHIN_MINUTES", raising=False)
    assert finish_within() == timedelta(minutes=120)
    monkeypatch.setenv("AIRFLOW__DATAFLY_FULLSTORY__FINISH_WITHIN_MINUTES", "45.5")
    assert finish_within() == timedelta(minutes=45.5)
    for bad in ("soon", "-5"):
        monkeypatch.setenv("AIRFLOW__DATAFLY_FULLSTORY__FINISH_WITHIN_MINUTES", bad)
        with pytest.raises(ValueError, match="finish_within_minutes"):
            finish_within()


def test_the_deadline_alert():
    from airflow.sdk import DeadlineAlert, SyncCallback

    alert = deadline_alert(timedelta(minutes=90))
    assert isinstance(alert, DeadlineAlert) and isinstance(alert.reference, WindowEndDeadline)
    assert alert.interval == timedelta(minutes=90)
    assert isinstance(alert.callback, SyncCallback)
    assert alert.callback.path == "fullstory_provider.alerts.run_overdue"
    assert alert.callback.kwargs == {"minutes": 90.0}


def test_an_in_process_parse_gets_no_deadline(monkeypatch):
    """dag.test() / `airflow dags test` parse the DAG in-process, where Airflow 3.3.2 cannot finish a
    successful run of a DAG with a deadline (see finish_deadline); the DAG processor, which has its
    supervisor channel, gets it (tests/integration/test_ui_airflow.py sees the deadline fire)."""
    from airflow.sdk.execution_time import task_runner

    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", None, raising=False)
    assert finish_deadline() is None
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", object(), raising=False)
    assert finish_deadline().interval == timedelta(minutes=120)
    monkeypatch.setenv("AIRFLOW__DATAFLY_FULLSTORY__FINISH_WITHIN_MINUTES", "soon")
    with pytest.raises(ValueError, match="finish_within_minutes"):
        finish_deadline()  # a bad setting fails every parse


def test_the_deadline_reference_is_the_window_end_or_the_runs_creation(airflow_db):
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunTriggeredByType, DagRunType

    now = datetime.now(UTC)
    recent_end = now + timedelta(minutes=5)  # a window ending after the run's creation (clock skew)
    old_end = datetime(2026, 11, 20, 10, tzinfo=UTC)  # a backfill's window: long over
    with create_session() as session:
        for run_id, end in (("deadline_recent", recent_end), ("deadline_old", old_end)):
            session.add(
                DagRun(
                    dag_id="dffs_deadline_probe",
                    run_id=run_id,
                    run_type=DagRunType.MANUAL,
                    logical_date=end - timedelta(hours=1),
                    data_interval=(end - timedelta(hours=1), end),
                    run_after=end,
                    triggered_by=DagRunTriggeredByType.TEST,
                )
            )
        session.flush()
        reference = WindowEndDeadline()
        probe = {"dag_id": "dffs_deadline_probe"}
        assert reference._evaluate_with(session=session, run_id="deadline_recent", **probe) == recent_end
        later = reference._evaluate_with(session=session, run_id="deadline_old", **probe)
        assert now - timedelta(seconds=1) <= later <= datetime.now(UTC)
        assert reference._evaluate_with(session=session, run_id="no_such_run", **probe) is None
        session.rollback()


def test_a_run_that_finished_before_its_deadline_gets_no_overdue_alert(monkeypatch):
    # Nothing is read or sent: the callback returns before reaching any channel (none is configured).
    context = {
        "dag_run": {"dag_run_id": RUN_ID, "state": "failed", "end_date": "2026-11-20T10:20:00+00:00"},
        "deadline": {"deadline_time": "2026-11-20T12:00:00+00:00"},
    }
    assert run_overdue(context=context, minutes=120) is None


def test_the_overdue_alert_says_how_late_and_what_to_check():
    alert = overdue_alert(
        RunFacts(RUN_ID),
        state="running",
        window_end="2026-11-20T10:00:00+00:00",
        deadline="2026-11-20T12:00:00+00:00",
        finish_within=timedelta(minutes=120),
        base_url=BASE,
    )
    assert alert.subject.startswith(
        f"[Airflow] datafly_fullstory_sync run {RUN_ID} has not finished in time: "
    )
    (problem,) = alert.problems
    assert problem == (
        "the run has not finished 120 minutes after its window ended (2026-11-20T10:00:00+00:00); deadline "
        "2026-11-20T12:00:00+00:00; it is running. Check its queued and running tasks and the fullstory_api "
        "pool's slots"
    )
    assert alert.report_url == REPORT
