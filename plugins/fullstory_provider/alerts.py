"""Run alerts: a failed run (a task failed, or `summarise` failed it for a tripped threshold) and a run that
has not finished in time after its window ended notify the people who look after the sync.

Wiring (the DAG's `@dag(...)` arguments; nothing here runs at parse time):
  on_failure_callback=RunAlert()                 the failure alert, once per failed run (DAG processor)
  default_args["on_failure_callback"]=record_failure
                                                 each failed task records its error (XCom `dffs_failure`)
                                                 for that alert; secrets are scrubbed first
  deadline=finish_deadline()                     the finish deadline (scheduler; the alert through the
                                                 executor: `run_overdue`)

Where alerts go, read when an alert is sent (never at parse time):
  Variable `datafly_fullstory_alert_emails`      e-mail recipients (comma, semicolon or whitespace separated),
                                                 sent through the SMTP provider's SmtpNotifier and the
                                                 `[email] email_conn_id` connection (default `smtp_default`);
                                                 sender: `[email] from_email`, else the connection's
  `[datafly_fullstory] alert_notifiers`          Airflow config (env AIRFLOW__DATAFLY_FULLSTORY__ALERT_NOTIFIERS):
                                                 comma-separated import paths of notifiers to call as well;
                                                 each names a BaseNotifier instance, or a callable returning
                                                 one or a list. Their templates see the alert as
                                                 `{{ fullstory_alert.text }}`, `.subject`, `.report_url`, ...
The finish deadline: `[datafly_fullstory] finish_within_minutes` (env
AIRFLOW__DATAFLY_FULLSTORY__FINISH_WITHIN_MINUTES, default 120) after the run's window ends, read from
Airflow's configuration when the DAG is parsed (in memory: no I/O).

Every alert holds the run's summary line (`RunStats.asstr()` from its stats.json, when the run got that
far), the problem (stats.json's `problems`, each failed task's error, or the deadline), and the link to the
run's report in the Airflow UI (`[api] base_url`). The FullStory API key never appears in one: messages are
built from texts that never hold it, and are scrubbed with the run connection's key all the same.
"""

from __future__ import annotations

import html
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import BaseDeadlineReference, BaseNotifier

from fullstory_provider.reports import DAG_ID, STATE_URI_VARIABLE, report_url

log = logging.getLogger(__name__)

ALERT_EMAILS_VARIABLE = "datafly_fullstory_alert_emails"
FAILURE_XCOM = "dffs_failure"
CONFIG_SECTION = "datafly_fullstory"
FINISH_WITHIN_OPTION = "finish_within_minutes"
NOTIFIERS_OPTION = "alert_notifiers"
DEFAULT_FINISH_WITHIN_MINUTES = 120.0
MAX_FAILURE_TEXT = 2000
_FINISHED = ("success", "failed")


# ---- the message ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    """One alert about one run, in words: `text()` for plain channels, `html()` for e-mail."""

    kind: str  # "failed" or "overdue"
    run_id: str
    headline: str
    problems: tuple[str, ...]
    summary: str | None
    report_url: str
    window: str | None = None
    details: tuple[str, ...] = ()

    @property
    def subject(self) -> str:
        what = "failed" if self.kind == "failed" else "has not finished in time"
        first = _one_line(self.problems[0], 140) if self.problems else self.headline
        return f"[Airflow] {DAG_ID} run {self.run_id} {what}: {first}"

    def text(self) -> str:
        lines = [self.headline, ""]
        if self.window:
            lines.append(f"Window: {self.window}")
        lines.append(f"Summary: {self.summary or 'no stats.json: the run stopped before summarise wrote it'}")
        lines += ["", "Problem:" if len(self.problems) == 1 else "Problems:"]
        lines += [f"- {p}" for p in self.problems]
        if self.details:
            lines += ["", *self.details]
        lines += ["", f"Report: {self.report_url}"]
        return "\n".join(lines)

    def html(self) -> str:
        e = html.escape
        parts = [f"<p>{e(self.headline)}</p>"]
        if self.window:
            parts.append(f"<p><b>Window:</b> {e(self.window)}</p>")
        summary = self.summary or "no stats.json: the run stopped before summarise wrote it"
        parts.append(f"<p><b>Summary:</b> {e(summary)}</p>")
        parts.append(f"<p><b>{'Problem' if len(self.problems) == 1 else 'Problems'}:</b></p><ul>")
        parts += [f"<li>{e(p)}</li>" for p in self.problems]
        parts.append("</ul>")
        parts += [f"<p>{e(d)}</p>" for d in self.details]
        parts.append(f'<p><b>Report:</b> <a href="{e(self.report_url)}">{e(self.report_url)}</a></p>')
        return "\n".join(parts)

    def as_context(self) -> dict[str, Any]:
        """What plugged-in notifiers' templates see as `fullstory_alert`."""
        return {
            "kind": self.kind,
            "run_id": self.run_id,
            "subject": self.subject,
            "text": self.text(),
            "html": self.html(),
            "summary": self.summary,
            "problems": list(self.problems),
            "report_url": self.report_url,
            "window": self.window,
        }

    def scrubbed(self, secrets: Iterable[str]) -> Alert:
        """The same alert with every secret (and its parts, as connection.scrub_key finds them) replaced."""
        from fullstory_provider.connection import scrub_key

        def clean(text: str | None) -> str | None:
            for secret in secrets:
                text = scrub_key(text, secret) if text else text
            return text

        return Alert(
            kind=self.kind,
            run_id=self.run_id,
            headline=clean(self.headline),
            problems=tuple(clean(p) for p in self.problems),
            summary=clean(self.summary),
            report_url=self.report_url,
            window=clean(self.window),
            details=tuple(clean(d) for d in self.details),
        )


@dataclass
class RunFacts:
    """What the alert says about a run, read from its plan (XCom), stats.json and failed tasks."""

    run_id: str
    stats: dict[str, Any] | None = None
    failures: list[str] = field(default_factory=list)  # "task_id: Error: message"
    secrets: list[str] = field(default_factory=list)


def failure_alert(
    facts: RunFacts, *, reason: str | None, last_task: str | None, base_url: str | None
) -> Alert:
    """The alert for a failed run: stats.json's problems first, then each failed task's error."""
    summary, window, problems = _from_stats(facts.stats)
    problems += [f for f in facts.failures if not any(_same_problem(f, p) for p in problems)]
    if not problems:
        problems = [
            f"the run failed ({reason or 'task_failure'})"
            + (f"; the last task to fail was {last_task}: its log says why" if last_task else "")
        ]
    headline = f"The {DAG_ID} run {facts.run_id} failed" + (f" ({reason})." if reason else ".")
    alert = Alert(
        "failed", facts.run_id, headline, tuple(problems), summary, report_url(facts.run_id, base_url), window
    )
    return alert.scrubbed(facts.secrets)


def overdue_alert(
    facts: RunFacts,
    *,
    state: str,
    window_end: str | None,
    deadline: str | None,
    finish_within: timedelta | None,
    base_url: str | None,
) -> Alert:
    """The alert for a run still unfinished when its finish deadline passed."""
    summary, window, problems = _from_stats(facts.stats)
    after = f"{finish_within.total_seconds() / 60:g} minutes " if finish_within is not None else ""
    problems.insert(
        0,
        f"the run has not finished {after}after its window ended"
        + (f" ({window_end})" if window_end else "")
        + (f"; deadline {deadline}" if deadline else "")
        + f"; it is {state}. Check its queued and running tasks and the fullstory_api pool's slots",
    )
    headline = f"The {DAG_ID} run {facts.run_id} has not finished in time."
    alert = Alert(
        "overdue",
        facts.run_id,
        headline,
        tuple(problems),
        summary,
        report_url(facts.run_id, base_url),
        window,
    )
    return alert.scrubbed(facts.secrets)


def _from_stats(stats: Mapping[str, Any] | None) -> tuple[str | None, str | None, list[str]]:
    if not stats:
        return None, None, []
    from include.datafly_fullstory.stats import RunStats

    window = None
    if stats.get("window_start"):
        window = f"{stats.get('window_start')} -> {stats.get('window_end')}"
    return RunStats.from_dict(stats).asstr(), window, [str(p) for p in stats.get("problems") or []]


def _same_problem(failure: str, problem: str) -> bool:
    """A task failure that only repeats a problem of stats.json (summarise raises its problems)."""
    _, _, said = failure.partition(": ")
    return bool(said) and (said in problem or problem in said)


def _one_line(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


# ---- where alerts go ------------------------------------------------------------------------------------


def recipients(value: str | None) -> list[str]:
    """The e-mail addresses in the Variable's value, in order, without repeats."""
    seen: dict[str, None] = {}
    for address in re.split(r"[,;\s]+", value or ""):
        if address:
            seen.setdefault(address, None)
    return list(seen)


def plugged_notifiers(paths: str | None) -> list[BaseNotifier]:
    """The notifiers `[datafly_fullstory] alert_notifiers` names (import paths, comma-separated)."""
    import importlib

    found: list[BaseNotifier] = []
    for path in (p.strip() for p in (paths or "").split(",")):
        if not path:
            continue
        module, _, name = path.rpartition(".")
        try:
            target = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ImportError(
                f"[{CONFIG_SECTION}] {NOTIFIERS_OPTION}: cannot import {path!r} ({exc})"
            ) from exc
        made = target if isinstance(target, BaseNotifier) else target()
        for notifier in made if isinstance(made, list | tuple) else [made]:
            if not callable(notifier):
                raise TypeError(
                    f"[{CONFIG_SECTION}] {NOTIFIERS_OPTION}: {path} gave {notifier!r}, not a notifier"
                )
            found.append(notifier)
    return found


def send_alert(
    alert: Alert,
    context: dict[str, Any],
    *,
    emails: Sequence[str],
    notifiers: Sequence[BaseNotifier] = (),
    from_email: str | None = None,
    smtp_conn_id: str | None = None,
) -> list[str]:
    """Send `alert` by e-mail (SmtpNotifier) and through each notifier; returns the channels it went to.
    One channel failing does not stop the others; the failures are raised together at the end."""
    sent, failed = [], []
    if emails:
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        mail = SmtpNotifier(
            to=list(emails),
            from_email=from_email,
            subject=alert.subject,
            html_content=alert.html(),
            smtp_conn_id=smtp_conn_id,
        )
        try:
            # notify(), not __call__: the message is final text and must not go through Jinja.
            mail.notify(context)
            sent.append(f"e-mail to {len(emails)} recipient(s)")
        except Exception as exc:
            failed.append(f"e-mail: {type(exc).__name__}: {exc}")
    context = {**context, "fullstory_alert": alert.as_context()}
    for notifier in notifiers:
        name = type(notifier).__name__
        try:
            notifier(context)
            sent.append(name)
        except Exception as exc:
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    if failed:
        raise RuntimeError(f"alert for run {alert.run_id} not sent through: " + "; ".join(failed))
    if not sent:
        log.warning(
            "alert for run %s went nowhere: set the Variable %s (e-mail) or [%s] %s",
            alert.run_id,
            ALERT_EMAILS_VARIABLE,
            CONFIG_SECTION,
            NOTIFIERS_OPTION,
        )
    return sent


def _channels() -> dict[str, Any]:
    """The alert channels as configured now (Variable and Airflow config, read at notify time)."""
    from airflow.configuration import conf
    from airflow.sdk import Variable

    return {
        "emails": recipients(Variable.get(ALERT_EMAILS_VARIABLE, default=None)),
        "notifiers": plugged_notifiers(conf.get(CONFIG_SECTION, NOTIFIERS_OPTION, fallback=None)),
        "from_email": conf.get("email", "from_email", fallback=None) or None,
        "smtp_conn_id": conf.get("email", "email_conn_id", fallback=None) or None,
    }


def base_url() -> str:
    """The UI's base URL for links in alerts: `[api] base_url`, else the API server's host and port."""
    from airflow.configuration import conf

    configured = conf.get("api", "base_url", fallback=None)
    if configured:
        return configured
    host = conf.get("api", "host", fallback="localhost")
    host = "localhost" if host in ("", "0.0.0.0", "::") else host
    return f"http://{host}:{conf.get('api', 'port', fallback='8080')}"


# ---- what the run left behind ---------------------------------------------------------------------------


def run_facts(
    run_id: str, task_ids: Iterable[str] = (), *, xcom: bool = True, conn_id: str | None = None
) -> RunFacts:
    """Read the run's plan (XCom), stats.json and its tasks' recorded failures, through the Task SDK. Each
    part is best effort: an alert with less is better than none.

    `xcom=False` where only Connections and Variables can be read (an executor's callback process, which
    would wait forever for an XCom answer): the state location is then the Variable's, and the
    connection is `conn_id`."""
    facts = RunFacts(run_id)

    def plan(key: str) -> Any:
        if not xcom:
            return None
        from airflow.sdk.execution_time.xcom import XCom

        try:
            return XCom.get_one(key=key, dag_id=DAG_ID, task_id="plan", run_id=run_id, map_index=-1)
        except Exception:
            log.warning("alert: could not read the plan's %s of run %s", key, run_id, exc_info=True)
            return None

    facts.secrets = _connection_secrets(plan("fullstory_conn_id") or conn_id)
    try:
        facts.stats = _read_stats(plan("state_uri"), run_id)
    except Exception:
        log.warning("alert: could not read stats.json of run %s", run_id, exc_info=True)
    if not xcom:
        return facts
    from airflow.sdk.execution_time.xcom import XCom

    for task_id in task_ids:
        try:
            values = XCom.get_all(key=FAILURE_XCOM, dag_id=DAG_ID, task_id=task_id, run_id=run_id) or []
        except Exception:
            log.warning("alert: could not read the failures of %s in run %s", task_id, run_id, exc_info=True)
            continue
        facts.failures += [f"{task_id}: {value}" for value in values if value]
    return facts


def _read_stats(planned_state_uri: str | None, run_id: str) -> dict[str, Any] | None:
    from airflow.configuration import AIRFLOW_HOME, conf
    from airflow.sdk import Variable

    from fullstory_provider.reports import state_location
    from include.datafly_fullstory.state import RunStore

    home = conf.get("core", "airflow_home", fallback=None) or os.environ.get("AIRFLOW_HOME") or AIRFLOW_HOME
    state = state_location(planned_state_uri, Variable.get(STATE_URI_VARIABLE, default=None), home)
    store = RunStore(state, run_id)
    return store.read_json("stats.json") if store.exists("stats.json") else None


def _connection_secrets(conn_id: str | None) -> list[str]:
    """The FullStory key of the run's connection, to scrub from alerts (none if it cannot be read)."""
    try:
        from airflow.sdk import BaseHook

        password = BaseHook.get_connection(conn_id or "fullstory_default").password
    except Exception:
        return []
    return [password.strip()] if password and password.strip() else []


# ---- the failure alert ----------------------------------------------------------------------------------


def failure_text(exc: BaseException | str | None) -> str:
    """A failed task's error as one bounded line."""
    if exc is None:
        return "failed (no exception was given)"
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return _one_line(text, MAX_FAILURE_TEXT)


def record_failure(context: dict[str, Any]) -> None:
    """A task's on_failure_callback (after its last try): keep the error for the run's failure alert, as
    the XCom `dffs_failure` (scrubbed of the run's FullStory key)."""
    ti = context.get("ti")
    if ti is None:
        return
    text = failure_text(context.get("exception"))
    from fullstory_provider.connection import scrub_key

    params = context.get("params") or {}
    for secret in _connection_secrets(params.get("fullstory_conn_id")):
        text = scrub_key(text, secret)
    ti.xcom_push(key=FAILURE_XCOM, value=text)


class RunAlert(BaseNotifier):
    """The DAG's on_failure_callback: one alert per failed run (a task failed, or `summarise` failed the
    run because a threshold tripped or delivery stopped)."""

    def notify(self, context: dict[str, Any]) -> None:
        dag = context.get("dag")
        dag_run = context.get("dag_run")
        run_id = context.get("run_id") or getattr(dag_run, "run_id", None)
        if not run_id:
            raise ValueError("failure alert: the callback context names no run")
        ti = context.get("ti")
        facts = run_facts(run_id, getattr(dag, "task_ids", ()) or ())
        alert = failure_alert(
            facts, reason=context.get("reason"), last_task=getattr(ti, "task_id", None), base_url=base_url()
        )
        sent = send_alert(alert, context, **_channels())
        log.info("failure alert for run %s sent: %s", run_id, ", ".join(sent) or "nowhere")


# ---- the finish deadline --------------------------------------------------------------------------------


class WindowEndDeadline(BaseDeadlineReference):
    """A run's deadline reference: the end of its window (the data interval's end; `run_after` for a manual
    run without one), or the run's creation when that is later (a backfill or a re-run of an old window
    gets its full allowance instead of an alert at once). Evaluated by the scheduler when it creates the
    run; the plugin registers the class so the scheduler can find it."""

    required_kwargs = {"dag_id", "run_id"}

    def _evaluate_with(self, *, session, **kwargs) -> datetime | None:
        from airflow.models.dagrun import DagRun
        from airflow.sdk.timezone import utcnow
        from sqlalchemy import select

        row = session.execute(
            select(DagRun.data_interval_end, DagRun.run_after).where(
                DagRun.dag_id == kwargs["dag_id"], DagRun.run_id == kwargs["run_id"]
            )
        ).first()
        if row is None:
            return None
        window_end = row.data_interval_end or row.run_after
        return max(window_end, utcnow()) if window_end else utcnow()


def finish_within() -> timedelta:
    """`[datafly_fullstory] finish_within_minutes`, from Airflow's configuration (in memory)."""
    from airflow.configuration import conf

    raw = conf.get(CONFIG_SECTION, FINISH_WITHIN_OPTION, fallback=None)
    try:
        minutes = DEFAULT_FINISH_WITHIN_MINUTES if raw in (None, "") else float(raw)
    except ValueError:
        raise ValueError(
            f"[{CONFIG_SECTION}] {FINISH_WITHIN_OPTION} (AIRFLOW__DATAFLY_FULLSTORY__FINISH_WITHIN_MINUTES) "
            f"must be a number of minutes, not {raw!r}"
        ) from None
    if minutes < 0:
        raise ValueError(f"[{CONFIG_SECTION}] {FINISH_WITHIN_OPTION} must be >= 0 minutes, not {raw!r}")
    return timedelta(minutes=minutes)


def finish_deadline():
    """The DAG's `deadline`: `deadline_alert(finish_within())` when an Airflow component parses the DAG
    (the DAG processor, whose serialized DAG the scheduler evaluates; a worker), None when it is parsed
    in-process for `dag.test()` / `airflow dags test`.

    Why: in Airflow 3.3.2, `dag.test()` of a DAG with a DeadlineAlert fails once the run has succeeded
    (DagRun.update_state prunes deadlines by the ids of the DAG's alerts, but dag.test's in-memory DAG holds
    their serialized form: `'dict' object has no attribute 'hex'`). A component process has its supervisor
    channel (SUPERVISOR_COMMS) set before it imports the DAG file; an in-process parse has not. The
    setting is checked either way, so a bad value fails every parse."""
    interval = finish_within()
    runner = sys.modules.get("airflow.sdk.execution_time.task_runner")
    if getattr(runner, "SUPERVISOR_COMMS", None) is None:
        return None
    return deadline_alert(interval)


def deadline_alert(interval: timedelta):
    """A run not finished `interval` after its window ended (WindowEndDeadline) alerts: `run_overdue`."""
    from airflow.sdk import DeadlineAlert, SyncCallback

    return DeadlineAlert(
        reference=WindowEndDeadline(),
        interval=interval,
        callback=SyncCallback(
            "fullstory_provider.alerts.run_overdue", kwargs={"minutes": interval.total_seconds() / 60}
        ),
        name="datafly_fullstory_finish",
    )


def run_overdue(context: dict[str, Any] | None = None, minutes: float | None = None) -> None:
    """The deadline's callback (run by the executor, in a process that can read Connections and Variables
    but no XCom): alert unless the run finished in time. A run that failed before its deadline has had its
    failure alert; one that succeeded in time has no deadline."""
    context = dict(context or {})
    dag_run = context.get("dag_run") or {}
    run_id = dag_run.get("dag_run_id") or dag_run.get("run_id")
    if not run_id:
        raise ValueError("overdue alert: the deadline context names no run")
    state = str(dag_run.get("state") or "unknown")
    deadline = (context.get("deadline") or {}).get("deadline_time")
    if state in _FINISHED and _not_after(dag_run.get("end_date"), deadline):
        log.info("run %s finished (%s) before its deadline %s: no overdue alert", run_id, state, deadline)
        return
    conf = dag_run.get("conf") if isinstance(dag_run.get("conf"), dict) else {}
    facts = run_facts(run_id, xcom=False, conn_id=conf.get("fullstory_conn_id"))
    alert = overdue_alert(
        facts,
        state=state,
        window_end=_text(dag_run.get("data_interval_end") or dag_run.get("run_after")),
        deadline=_text(deadline),
        finish_within=None if minutes is None else timedelta(minutes=float(minutes)),
        base_url=base_url(),
    )
    sent = send_alert(alert, context, **_channels())
    log.info("overdue alert for run %s sent: %s", run_id, ", ".join(sent) or "nowhere")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _not_after(end: Any, deadline: Any) -> bool:
    """end <= deadline, for datetimes or ISO-8601 texts; True when either is unknown."""
    try:
        end_at = end if isinstance(end, datetime) else datetime.fromisoformat(str(end))
        deadline_at = deadline if isinstance(deadline, datetime) else datetime.fromisoformat(str(deadline))
    except (TypeError, ValueError):
        return True
    return end_at <= deadline_at
