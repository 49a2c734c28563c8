"""Deletion requests end to end: the DAG's real tasks (sync_driver.py, plus the `deletions` task before
mapping) against the real emulator over HTTP, with the real hook and ledger.

A user deleted by request is deleted in FullStory once (the DELETE reaches the emulator once, a second run
does not send it again), and no later run sends anything about them or about a suppressed anonymous id:
their rows are `filtered`, "deleted by request". A DELETE that fails is recorded, fails the run's summary
with a clear problem, does not hold back anyone else's rows, and the next run sends it again.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from fullstory_provider.connection import destination_of
from fullstory_provider.exceptions import FullStoryAuthError
from fullstory_provider.hooks import FullStoryHook
from fullstory_provider.ledger_db import ledger_url
from fullstory_provider.retry import RetryPolicy
from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory import pipeline
from include.datafly_fullstory.deletions import deletions_stage
from include.datafly_fullstory.sample import LandingSpec, generate_table, write_landing
from tests.integration.sync_driver import SyncDriver

H10 = datetime(2026, 11, 20, 10, tzinfo=UTC)
HOUR = timedelta(hours=1)
FAST = RetryPolicy(max_attempts=2, backoff_base=0.01, backoff_max=0.05)


class DeletionDriver(SyncDriver):
    """The sync driver with the DAG's `deletions` task after `plan` and its figures passed to the summary."""

    deletions_uri: str | None = None

    def tasks(self, run):
        names = super().tasks(run)
        return [names[0], "deletions", *names[1:]]

    def execute(self, run, name):
        url = ledger_url(run.plan["ledger"]) if "plan" in run.xcom else None
        if name == "deletions":
            hook = FullStoryHook(run.plan["fullstory_conn_id"], retry=FAST)
            try:
                return deletions_stage(
                    run.plan,
                    url,
                    hook,
                    source_uri=self.deletions_uri,
                    user_ids=run.params.get("delete_user_ids"),
                    anonymous_ids=run.params.get("delete_anonymous_ids"),
                    client_destination=destination_of(hook.settings.org_id, hook.settings.data_region),
                )
            finally:
                hook.close()
        if name == "summarise":
            stats = [v for k, v in run.xcom.items() if k.startswith("deliver_")]
            run_stats = pipeline.summarise_run(
                run.plan,
                run.xcom["extract"],
                run.xcom["map"],
                stats,
                url,
                deletions=run.xcom.get("deletions"),
            )
            return {"stats": run_stats.asdict(), "problems": run_stats.problems}
        return super().execute(run, name)


@pytest.fixture(scope="module")
def landing_table():
    return generate_table(LandingSpec(rows=900, start=H10, end=H10 + 3 * HOUR, seed=5, bad_fraction=0.0))


@pytest.fixture
def driver(tmp_path, landing_table, fullstory_emulator, monkeypatch):
    write_landing(landing_table, tmp_path / "landing")
    for name in ("AIRFLOW_CONN_FULLSTORY_DEFAULT", "AIRFLOW_CONN_DFFS_LEDGER"):
        monkeypatch.delenv(name, raising=False)
    d = DeletionDriver(
        landing=tmp_path / "landing",
        state=tmp_path / "state",
        airflow_home=tmp_path,
        emulator=fullstory_emulator,
    )
    yield d
    lg.dispose_engines()


def window(table, start):
    ts = table.column("timestamp")
    return table.filter(pc.and_(pc.greater_equal(ts, start), pc.less(ts, start + HOUR)))


def people(table, start):
    """A user with rows in the three windows, and an anonymous id of another user's rows in the second."""
    rows = [window(table, start + i * HOUR).to_pandas() for i in range(3)]
    both = set(rows[0].user_id.dropna()) & set(rows[1].user_id.dropna()) & set(rows[2].user_id.dropna())
    gone = sorted(both)[0]
    others = rows[1][rows[1].user_id.notna() & (rows[1].user_id != gone)]
    anon = others.anonymous_id.value_counts().index[0]
    return gone, anon


def about(table, start, gone, anon) -> set[str]:
    df = window(table, start).to_pandas()
    return set(df.event_id[(df.user_id == gone) | (df.anonymous_id == anon)])


def sent_ids(emulator) -> set[str]:
    return {e["properties"]["datafly_event_id"] for e in emulator.events()}


def deletes(emulator) -> dict:
    return emulator.requests()["by_path"].get("DELETE /v2/users", {})


def outcomes_of(driver, run, event_ids) -> dict[str, tuple[str, str]]:
    table = pq.read_table(driver.store(run).path("outcomes.parquet")).to_pandas()
    table = table[table.event_id.isin(event_ids)]
    return {e: (o, r) for e, o, r in zip(table.event_id, table.outcome, table.reason, strict=True)}


def test_a_deleted_user_is_deleted_once_and_nothing_about_them_is_sent_again(
    driver, fullstory_emulator, landing_table, tmp_path
):
    emu = fullstory_emulator
    gone, anon = people(landing_table, H10)
    first = driver.go(driver.new_run("r10", window=(H10, H10 + HOUR)))
    assert first.error is None, first.error
    assert emu.events(ident=gone), "the user's events reached FullStory before the request"
    assert first.xcom["deletions"]["requested"] == 0 and deletes(emu) == {}

    second = driver.go(
        driver.new_run(
            "r11", window=(H10 + HOUR, H10 + 2 * HOUR), delete_user_ids=[gone], delete_anonymous_ids=[anon]
        )
    )
    assert second.error is None, second.error
    assert deletes(emu) == {"200": 1}
    assert emu.events(ident=gone) == [] and emu.users(uid=gone) == []  # FullStory deleted them
    figures = second.xcom["summarise"]["stats"]["deletions"]
    assert (figures["requested"], figures["recorded"], figures["deleted"], figures["failed"]) == (2, 2, 1, 0)
    assert (figures["suppressed_ids"], figures["outstanding"]) == (1, 0)
    assert second.xcom["summarise"]["problems"] == []

    # A third run, the request now in a CSV file (the Variable) and the params again: nothing re-sent.
    source = tmp_path / "deletions.csv"
    source.write_text(f"user_id,anonymous_id\n{gone},\n,{anon}\n")
    driver.deletions_uri = str(source)
    third = driver.go(driver.new_run("r12", window=(H10 + 2 * HOUR, H10 + 3 * HOUR), delete_user_ids=[gone]))
    assert third.error is None, third.error
    assert deletes(emu) == {"200": 1}  # the DELETE was sent once
    figures = third.xcom["summarise"]["stats"]["deletions"]
    assert (figures["requested"], figures["recorded"], figures["deleted"], figures["already_deleted"]) == (
        2,
        0,
        0,
        1,
    )

    sent = sent_ids(emu)
    for run, start in ((second, H10 + HOUR), (third, H10 + 2 * HOUR)):
        suppressed = about(landing_table, start, gone, anon)
        assert suppressed, "the window has rows of the deleted people"
        assert not suppressed & sent, "rows of a deleted person reached FullStory"
        outcomes = outcomes_of(driver, run, suppressed)
        assert set(outcomes) == suppressed
        assert {o for o, _ in outcomes.values()} == {"filtered"}
        assert all(r.startswith("deleted by request") for _, r in outcomes.values())
        everyone_else = set(window(landing_table, start).column("event_id").to_pylist()) - suppressed
        assert sent & everyone_else, "other people's rows are still delivered"
    assert emu.users(uid=gone) == []  # no user update re-created the deleted user
    states = {
        (r.person_kind, r.person_key): r.status
        for r in lg.Ledger(driver.ledger_db_url).deletion_rows(driver.destination)
    }
    assert states == {("user_id", gone): "deleted", ("anonymous_id", anon): "suppressed"}


def test_a_failed_delete_is_recorded_reported_and_sent_by_the_next_run(
    driver, fullstory_emulator, landing_table
):
    emu = fullstory_emulator
    gone, _ = people(landing_table, H10)
    emu.set_faults(error_next=2, error_status=503)  # the DELETE and its one retry
    run = driver.go(driver.new_run("r10", window=(H10, H10 + HOUR), delete_user_ids=[gone]))
    assert deletes(emu) == {"503": 2}
    (row,) = lg.Ledger(driver.ledger_db_url).deletion_rows(driver.destination)
    assert (row.status, row.attempts) == ("failed", 1) and "503" in row.last_error
    problems = run.xcom["summarise"]["problems"]
    assert len(problems) == 1 and problems[0].startswith("1 deletion request(s) failed at FullStory")
    others = set(window(landing_table, H10).column("event_id").to_pylist()) - about(
        landing_table, H10, gone, "-"
    )
    assert sent_ids(emu) & others, "a failed deletion does not hold back other people's rows"
    assert not sent_ids(emu) & about(landing_table, H10, gone, "-"), "the person stays suppressed"

    again = driver.go(driver.new_run("r11", window=(H10 + HOUR, H10 + 2 * HOUR)))
    assert deletes(emu) == {"503": 2, "200": 1}
    assert again.xcom["summarise"]["stats"]["deletions"]["deleted"] == 1
    assert again.xcom["summarise"]["problems"] == []
    (row,) = lg.Ledger(driver.ledger_db_url).deletion_rows(driver.destination)
    assert (row.status, row.attempts, row.last_error) == ("deleted", 2, None)


def test_hook_delete_user_retries_and_raises_typed_errors(fullstory_emulator, monkeypatch):
    emu = fullstory_emulator
    monkeypatch.setenv(
        "AIRFLOW_CONN_FULLSTORY_DEFAULT",
        json.dumps(
            {
                "conn_type": "http",
                "host": emu.base_url,
                "password": emu.api_key,
                "extra": {"org_id": emu.org_id, "data_region": emu.region},
            }
        ),
    )
    hook = FullStoryHook(retry=RetryPolicy(max_attempts=3, backoff_base=0.01))
    emu.set_faults(throttle_next=1, retry_after=1)
    assert hook.delete_user("u-1") == {}
    assert deletes(emu) == {"429": 1, "200": 1} and hook.retries == 1
    with pytest.raises(ValueError, match="non-empty uid"):
        hook.delete_user("")
    monkeypatch.setenv(
        "AIRFLOW_CONN_FULLSTORY_DEFAULT",
        f'{{"conn_type": "http", "host": "{emu.base_url}", "password": "na1.wrong/key", '
        f'"extra": {{"org_id": "{emu.org_id}", "data_region": "na1"}}}}',
    )
    with pytest.raises(FullStoryAuthError):
        FullStoryHook().delete_user("u-1")
