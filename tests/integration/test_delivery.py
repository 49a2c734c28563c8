"""FullStoryHook and FullStoryDeliveryOperator against the real FullStory emulator over HTTP.

No mocks of the code under test: the operator's `execute(context)` runs with the connection from an
`AIRFLOW_CONN_FULLSTORY_DEFAULT` env var and the delivery ledger on a SQLite file, talks to the emulator
subprocess, and the assertions read what the emulator holds (`/_emulator/...`, events counted by their
`datafly_event_id`), what the ledger says and what the run folder holds. A task killed at a given step is
`delivery.fault_point` raising there (in-process) or SIGKILL (a child process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from fullstory_provider.exceptions import (
    FullStoryAuthError,
    FullStoryConfigError,
    FullStoryNotFoundError,
    FullStoryRetryError,
)
from fullstory_provider.hooks import FullStoryHook
from fullstory_provider.links import XCOM_APP_URL
from fullstory_provider.operators import FullStoryDeliveryOperator
from fullstory_provider.retry import RetryPolicy
from include.datafly_fullstory import dead_letters
from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory.delivery import loop, stops
from include.datafly_fullstory.state import RunStore
from tests.run_helpers import DESTINATION, sqlite_ledger, write_run

ROOT = Path(__file__).resolve().parents[2]
RUN_ID = "manual__2026-03-01T10:00:00+00:00"


# ---- helpers -------------------------------------------------------------------------------------------


class RecordingTI:
    """The one thing the operator asks of the task instance: xcom_push (before it starts waiting)."""

    def __init__(self):
        self.pushed: dict[str, object] = {}

    def xcom_push(self, key, value):
        self.pushed[key] = value


class Killed(Exception):
    """The task died at a fault point."""


@pytest.fixture
def ledger(tmp_path):
    return sqlite_ledger(tmp_path)


def use_connection(monkeypatch, emu, *, key=None, org=None, region=None, **extra):
    conn = {
        "conn_type": "http",
        "host": emu.base_url,
        "password": key or emu.api_key,
        "extra": {"org_id": org or emu.org_id, "data_region": region or emu.region, **extra},
    }
    monkeypatch.setenv("AIRFLOW_CONN_FULLSTORY_DEFAULT", json.dumps(conn))
    return conn


def make_run(
    tmp_path,
    ledger,
    events_per_chunk=(50,),
    users=5,
    bad=0,
    *,
    destination=DESTINATION,
    run_id=RUN_ID,
    first_row=0,
) -> tuple[RunStore, list[str]]:
    """A run folder and its ledger records as the mapping stage leaves them: users-00000 (rows 0..users-1,
    `ev-<row>`), then events-0000N, each event carrying `datafly_event_id` = `ev-<row>`."""
    store = RunStore(str(tmp_path / "state"), run_id)
    chunks = {}
    if users:
        chunks["users-00000"] = [{"uid": f"u{i}", "properties": {"plan": "pro"}} for i in range(users)]
    for c, n in enumerate(events_per_chunk):
        items = [
            {"name": "Order Completed", "user": {"uid": f"u{i % 5}"}, "properties": {"order_id": f"c{c}-{i}"}}
            for i in range(n)
        ]
        items += [{"name": "Rejected Thing", "user": {"uid": "u0"}, "properties": {"k": 1}}] * bad
        chunks[f"events-{c:05d}"] = items
    entries = write_run(store, ledger, chunks, destination=destination, first_row=first_row)
    return store, [e["name"] for e in entries]


def operator(store, ledger, chunks, **kwargs):
    kwargs.setdefault("poll_interval", 0.05)
    kwargs.setdefault("timeout", 60)
    kwargs.setdefault("destination", DESTINATION)
    return FullStoryDeliveryOperator(
        task_id="deliver",
        state_uri=store.state_uri,
        run_id=store.run_id,
        chunks=chunks,
        ledger={"url": ledger.url},
        **kwargs,
    )


def deliver(store, ledger, chunks, **kwargs):
    ti = RecordingTI()
    stats = operator(store, ledger, chunks, **kwargs).execute({"ti": ti})
    return stats, ti


def outcomes(store, chunk) -> list[tuple[int, str, str]]:
    return [
        (o["row"], o["event_id"], o["outcome"])
        for o in store.read_table("outcomes", f"delivery-{chunk}.parquet").to_pylist()
    ]


def all_delivered(rows) -> list[tuple[int, str, str]]:
    return [(r, f"ev-{r}", "delivered") for r in rows]


def imported(emu) -> Counter:
    """How often FullStory holds each of our events, by datafly_event_id."""
    return Counter((e["properties"] or {}).get("datafly_event_id") for e in emu.events())


def once(rows) -> Counter:
    return Counter({f"ev-{r}": 1 for r in rows})


def api_posts(emu, route="POST /v2/events/batch") -> int:
    return sum(emu.requests()["by_path"].get(route, {}).values())


def chunk_row(ledger, name, run_id=RUN_ID, destination=DESTINATION) -> lg.ChunkRow:
    (row,) = [c for c in ledger.chunks_of_run(destination, run_id) if c.name == name]
    return row


def states(ledger, rows) -> set[str]:
    return {r.state for r in ledger.lookup(DESTINATION, [f"ev-{r}" for r in rows]).values()}


def kill_at(monkeypatch, point: str) -> None:
    def fault(name):
        if name == point:
            raise Killed(name)

    monkeypatch.setattr(loop, "fault_point", fault)


# ---- success -------------------------------------------------------------------------------------------


def test_delivers_users_then_events(fullstory_emulator, monkeypatch, tmp_path, ledger):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    store, chunks = make_run(tmp_path, ledger, events_per_chunk=(40, 30, 20))
    stats, ti = deliver(store, ledger, chunks, max_in_flight=2)
    assert imported(emu) == once(range(5, 95))
    assert sorted(u["uid"] for u in emu.users()) == ["u0", "u1", "u2", "u3", "u4"]
    assert stats["events"] == {"delivered": 90, "rejected": 0}
    assert stats["users"] == {"delivered": 5, "rejected": 0}
    assert stats["batches"] == 4 and stats["bytes_sent"] > 0 and stats["delivery"]["submitted"] == 4
    assert stats["http"]["status_counts"]["200"] == stats["http"]["requests"]
    assert ti.pushed[XCOM_APP_URL] == f"https://app.fullstory.com/ui/{emu.org_id}/home"
    assert [j["kind"] for j in emu.jobs()] == ["users", "events", "events", "events"]  # creation order
    row = 0
    for name, n in zip(chunks, (5, 40, 30, 20), strict=True):
        record = chunk_row(ledger, name)
        assert (record.status, record.job_status, record.submissions, record.delivered_items) == (
            "completed",
            "COMPLETED",
            1,
            n,
        )
        assert record.job_id and record.idempotency_key.startswith(f"dffs-{name.split('-')[0]}-")
        assert outcomes(store, name) == all_delivered(range(row, row + n))
        row += n
    assert states(ledger, range(95)) == {"delivered"}
    assert stops.read_stops(store) == []
    json.dumps(stats)  # an XCom value


def test_per_item_rejections_become_dead_letters_and_outcomes(
    fullstory_emulator, monkeypatch, tmp_path, ledger
):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    emu.set_faults(
        reject_event_names=["Rejected Thing"], reject_user_uids=["u3"], reject_code="invalid_argument"
    )
    store, chunks = make_run(tmp_path, ledger, events_per_chunk=(10,), bad=2)  # two bad items, same content
    stats, _ = deliver(store, ledger, chunks)
    assert stats["users"] == {"delivered": 4, "rejected": 1}
    assert stats["events"] == {"delivered": 10, "rejected": 2}
    assert imported(emu) == once(range(5, 15))
    assert sorted(u["uid"] for u in emu.users()) == ["u0", "u1", "u2", "u4"]
    dead = dead_letters.read_chunk(store, "events-00000").to_pylist()
    assert [(d["item_index"], d["rows"], d["event_ids"], d["code"]) for d in dead] == [
        (10, [15], ["ev-15"], "invalid_argument"),
        (11, [16], ["ev-16"], "invalid_argument"),
    ]
    assert orjson.loads(dead[1]["item"])["properties"] == {"k": 1, "datafly_event_id": "ev-16"}  # as sent
    record = chunk_row(ledger, "events-00000")
    assert {d["job_id"] for d in dead} == {record.job_id} and record.job_status == "FAILED"  # partial failure
    assert outcomes(store, "events-00000") == all_delivered(range(5, 15)) + [
        (15, "ev-15", "rejected"),
        (16, "ev-16", "rejected"),
    ]
    reason = store.read_table("outcomes", "delivery-events-00000.parquet").to_pylist()[11]["reason"]
    assert reason.startswith("invalid_argument: ")
    (user_dead,) = dead_letters.read_chunk(store, "users-00000").to_pylist()
    assert (user_dead["item_index"], user_dead["rows"], user_dead["kind"]) == (3, [3], "user")
    assert [o[2] for o in outcomes(store, "users-00000")] == ["delivered"] * 3 + ["rejected", "delivered"]
    assert states(ledger, [3, 15, 16]) == {"rejected"} and states(ledger, [0, 1, 2, 4, *range(5, 15)]) == {
        "delivered"
    }


def test_the_emulators_own_validation_errors_are_matched_by_event_id(
    fullstory_emulator, monkeypatch, tmp_path, ledger
):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    store = RunStore(str(tmp_path / "state"), RUN_ID)
    good = {"name": "Fine", "user": {"uid": "u1"}}
    write_run(
        store,
        ledger,
        {
            "events-00000": [
                good,
                {**good, "properties": {"bad-name": 1}},
                good,
                {**good, "timestamp": "yesterday"},
            ]
        },
    )
    stats, _ = deliver(store, ledger, ["events-00000"])
    assert stats["events"] == {"delivered": 2, "rejected": 2}
    assert imported(emu) == once([0, 2])
    assert [o[2] for o in outcomes(store, "events-00000")] == [
        "delivered",
        "rejected",
        "delivered",
        "rejected",
    ]
    dead = dead_letters.read_chunk(store, "events-00000").to_pylist()
    assert [(d["item_index"], d["rows"]) for d in dead] == [(1, [1]), (3, [3])]
    assert "bad-name" in dead[0]["message"] and "timestamp" in dead[1]["message"]


# ---- retries -------------------------------------------------------------------------------------------


def test_429_storm_honours_retry_after(fullstory_emulator, monkeypatch, tmp_path, ledger):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    emu.set_faults(throttle_next=2, retry_after=1)
    store, chunks = make_run(tmp_path, ledger, users=0)
    started = time.monotonic()
    stats, _ = deliver(store, ledger, chunks)
    assert time.monotonic() - started >= 2.0  # two waits of Retry-After: 1
    assert stats["http"]["status_counts"]["429"] == 2 and stats["http"]["retries"] == 2
    assert imported(emu) == once(range(50))


def test_5xx_then_success(fullstory_emulator, monkeypatch, tmp_path, ledger):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    emu.set_faults(error_next=3, error_status=503)
    store, chunks = make_run(tmp_path, ledger, users=0)
    stats, _ = deliver(store, ledger, chunks)
    assert stats["http"]["status_counts"]["503"] == 3 and stats["http"]["retries"] == 3
    assert imported(emu) == once(range(50)) and emu.state()["jobs"]["total"] == 1
    assert chunk_row(ledger, "events-00000").submissions == 1  # the hook's retries are one POST to the ledger


def test_slow_answer_times_out_and_the_retry_is_replayed(fullstory_emulator, monkeypatch, tmp_path, ledger):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu, read_timeout=0.5)
    emu.set_faults(slow_next=1, slow_seconds=1.5)  # the first POST is processed, its answer comes too late
    store, chunks = make_run(tmp_path, ledger, users=0)
    stats, _ = deliver(store, ledger, chunks)
    assert stats["http"]["transport_errors"] == 1 and stats["http"]["retries"] >= 1
    state = emu.state()
    assert imported(emu) == once(range(50)) and state["jobs"]["total"] == 1  # same key: replayed
    assert state["idempotency"]["replays"] == 1
    assert outcomes(store, "events-00000") == all_delivered(range(50))


def test_retries_are_bounded(fullstory_emulator, monkeypatch):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    emu.set_faults(error_rate=1.0)
    hook = FullStoryHook(retry=RetryPolicy(max_attempts=3, backoff_base=0.01))
    with pytest.raises(FullStoryRetryError, match="gave up after 3 attempt"):
        hook.whoami()
    assert hook.http_stats()["requests"] == 3


def test_dropped_connection_is_retried(fullstory_emulator, monkeypatch, tmp_path, ledger):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    emu.set_faults(drop_next=1, drop_after_processing=True)  # the job is created, the answer is lost
    store, chunks = make_run(tmp_path, ledger, users=0)
    stats, _ = deliver(store, ledger, chunks)
    assert imported(emu) == once(range(50)) and emu.state()["jobs"]["total"] == 1
    assert emu.state()["idempotency"]["replays"] == 1 and stats["events"] == {"delivered": 50, "rejected": 0}


# ---- refusals ------------------------------------------------------------------------------------------


def test_401_fails_without_airflow_retries_and_a_fixed_key_resends(
    fullstory_emulator, monkeypatch, tmp_path, ledger
):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu, key="na1.not-a-real-key/zz")
    store, chunks = make_run(tmp_path, ledger, users=0)
    with pytest.raises(FullStoryAuthError) as info:
        deliver(store, ledger, chunks)
    assert isinstance(info.value, AirflowFailException)
    assert "Invalid API key: regenerate the Server API key in Settings > API Keys" in str(info.value)
    assert api_posts(emu) == 1  # a 401 is final: no retries
    # FullStory answered that it took nothing: the chunk is unsent again (no key age to run out).
    record = chunk_row(ledger, "events-00000")
    assert (record.status, record.job_id, record.submissions, record.first_post_at) == (
        "claimed",
        None,
        0,
        None,
    )
    assert stops.read_stops(store)[0].startswith("FullStoryAuthError: Invalid API key")
    use_connection(monkeypatch, emu)
    stats, _ = deliver(store, ledger, chunks)  # sent as a first POST, under the same recorded key
    assert stats["delivery"]["submitted"] == 1 and api_posts(emu) == 2
    assert emu.state()["idempotency"]["replays"] == 0 and imported(emu) == once(range(50))
    assert chunk_row(ledger, "events-00000").idempotency_key == record.idempotency_key
    assert stops.read_stops(store) == []


def test_404_points_at_the_data_region(fullstory_emulator, monkeypatch, tmp_path, ledger):
    emu = fullstory_emulator  # serves na1; the connection consistently says eu1
    use_connection(monkeypatch, emu, key="eu1.some-key/zz", org="o-LOCAL-eu1", region="eu1")
    store, chunks = make_run(tmp_path, ledger, users=0, destination="o-LOCAL-eu1@eu1")
    with pytest.raises(FullStoryNotFoundError, match=r"data_region \(eu1.*na1 vs eu1"):
        deliver(store, ledger, chunks, destination="o-LOCAL-eu1@eu1")
    assert imported(emu) == Counter()


def test_region_mismatch_is_refused_before_sending(fullstory_emulator, monkeypatch, tmp_path, ledger):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu, region="eu1")  # key na1., org -na1, data_region eu1
    store, chunks = make_run(tmp_path, ledger, users=0)
    with pytest.raises(FullStoryConfigError, match="data region mismatch: extra.data_region says eu1"):
        deliver(store, ledger, chunks)
    assert emu.requests()["total"] == 0
    assert (chunk_row(ledger, "events-00000").status, chunk_row(ledger, "events-00000").submissions) == (
        "claimed",
        0,
    )


def test_a_connection_naming_another_org_is_refused_before_sending(
    fullstory_emulator, monkeypatch, tmp_path, ledger
):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu, org="o-OTHER-na1")  # the run claimed its rows for o-LOCAL-na1@na1
    store, chunks = make_run(tmp_path, ledger, users=0)
    with pytest.raises(
        AirflowFailException,
        match="now names o-OTHER-na1@na1, but this run claimed its rows for "
        "o-LOCAL-na1@na1; nothing was sent",
    ):
        deliver(store, ledger, chunks)
    assert emu.requests()["total"] == 0 and chunk_row(ledger, "events-00000").status == "claimed"


def test_events_wait_for_users_of_the_same_run(fullstory_emulator, monkeypatch, tmp_path, ledger):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    store, chunks = make_run(tmp_path, ledger)
    with pytest.raises(AirflowException, match="users chunks of run .* not delivered yet: users-00000"):
        deliver(store, ledger, ["events-00000"])
    assert emu.requests()["total"] == 0 and chunk_row(ledger, "events-00000").status == "claimed"
    deliver(store, ledger, ["users-00000"])
    stats, _ = deliver(store, ledger, ["events-00000"])
    assert stats["events"] == {"delivered": 50, "rejected": 0} and stats["users"] == {
        "delivered": 0,
        "rejected": 0,
    }
    assert imported(emu) == once(range(5, 55)) and [j["kind"] for j in emu.jobs()] == ["users", "events"]


def test_a_refused_batch_rejects_every_row(fullstory_emulator, monkeypatch, tmp_path, ledger):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    store, chunks = make_run(tmp_path, ledger, users=0, events_per_chunk=(4,))
    key = chunk_row(ledger, "events-00000").idempotency_key
    # Something else used the chunk's key for other bytes: FullStory refuses the chunk as a whole.
    FullStoryHook().create_batch("events", {"requests": [{"name": "Squatter", "user": {"uid": "x"}}]}, key)
    stats, _ = deliver(store, ledger, chunks)
    assert stats["delivery"]["refused"] == 1 and stats["events"] == {"delivered": 0, "rejected": 4}
    record = chunk_row(ledger, "events-00000")
    assert record.status == "failed" and record.error.startswith("HTTP 400 idempotency_key_mismatch: ")
    assert outcomes(store, "events-00000") == [(r, f"ev-{r}", "rejected") for r in range(4)]
    out = store.read_table("outcomes", "delivery-events-00000.parquet").to_pylist()
    assert all(o["reason"].startswith("idempotency_key_mismatch: ") for o in out)
    dead = dead_letters.read_chunk(store, "events-00000").to_pylist()
    assert [(d["item_index"], d["rows"], d["code"]) for d in dead] == [
        (i, [i], "idempotency_key_mismatch") for i in range(4)
    ]
    assert imported(emu) == Counter({None: 1})  # the squatter's event only
    before = emu.requests()["total"]
    again, _ = deliver(store, ledger, chunks)
    assert emu.requests()["total"] == before and again["delivery"]["already_complete"] == 1


# ---- re-runs -------------------------------------------------------------------------------------------


def test_a_rerun_sends_nothing_and_rewrites_outcomes_from_the_ledger(
    fullstory_emulator, monkeypatch, tmp_path, ledger
):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    store, chunks = make_run(tmp_path, ledger, events_per_chunk=(30, 20))
    first, _ = deliver(store, ledger, chunks)
    before = emu.requests()["total"]
    kept = {c: store.read_table("outcomes", f"delivery-{c}.parquet") for c in chunks}
    again, _ = deliver(store, ledger, chunks)
    assert emu.requests()["total"] == before and again["http"]["requests"] == 0
    assert again["events"] == first["events"] and again["users"] == first["users"]  # the chunks' counts
    assert again["delivery"]["already_complete"] == 3 and again["batches"] == 0
    store.remove("outcomes")
    deliver(store, ledger, chunks)
    assert emu.requests()["total"] == before
    assert all(store.read_table("outcomes", f"delivery-{c}.parquet").equals(kept[c]) for c in chunks)
    assert imported(emu) == once(range(5, 55)) and {chunk_row(ledger, c).submissions for c in chunks} == {1}


@pytest.mark.parametrize(
    ("point", "posts", "replays", "counter"),
    [
        ("before_post", 1, 0, "reposted"),  # the POST never went out: re-sent under its key, a new job
        ("after_post", 2, 1, "reposted"),  # it went through, its job id was lost: FullStory replays
        ("while_polling", 1, 0, "resumed"),  # job id recorded: polled, never re-sent
        ("after_job", 1, 0, "resumed"),  # the job ended but its results were not recorded
    ],
)
def test_a_task_killed_mid_delivery_resumes_from_the_ledger(
    fullstory_emulator, monkeypatch, tmp_path, ledger, point, posts, replays, counter
):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    store, chunks = make_run(tmp_path, ledger, users=0, events_per_chunk=(20,))
    kill_at(monkeypatch, point)
    with pytest.raises(Killed):
        deliver(store, ledger, chunks)
    assert stops.read_stops(store)[0] == f"Killed: {point}"
    record = chunk_row(ledger, "events-00000")
    assert (
        record.status
        == {
            "before_post": "posting",
            "after_post": "posting",
            "while_polling": "submitted",
            "after_job": "processing",
        }[point]
    )
    assert (record.job_id is None) == point.endswith("_post") and record.submissions == 1
    assert states(ledger, range(20)) == {"claimed"}
    monkeypatch.setattr(loop, "fault_point", lambda name: None)
    stats, _ = deliver(store, ledger, chunks)
    assert api_posts(emu) == posts and emu.state()["idempotency"]["replays"] == replays
    assert stats["delivery"][counter] == 1 and stats["delivery"]["submitted"] == 0
    assert emu.state()["jobs"]["total"] == 1 and imported(emu) == once(range(20))
    assert outcomes(store, "events-00000") == all_delivered(range(20))
    assert chunk_row(ledger, "events-00000").status == "completed" and states(ledger, range(20)) == {
        "delivered"
    }
    assert stops.read_stops(store) == []


def test_a_lost_answer_older_than_23_hours_is_not_resent(fullstory_emulator, monkeypatch, tmp_path, ledger):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    store, chunks = make_run(tmp_path, ledger, users=0, events_per_chunk=(20,))
    kill_at(monkeypatch, "after_post")
    with pytest.raises(Killed):
        deliver(store, ledger, chunks)
    monkeypatch.setattr(loop, "fault_point", lambda name: None)
    monkeypatch.setattr(lg, "wall_clock", lambda: time.time() + 25 * 3600)
    emu.advance_clock(25 * 3600)  # FullStory has forgotten the key too
    stats, _ = deliver(store, ledger, chunks)
    assert api_posts(emu) == 1 and imported(emu) == once(range(20))  # the first POST only
    assert stats["delivery"]["unknown_items"] == 20 and stats["events"] == {"delivered": 0, "rejected": 0}
    assert outcomes(store, "events-00000") == [(r, f"ev-{r}", "unknown") for r in range(20)]
    record = chunk_row(ledger, "events-00000")
    assert (record.status, record.unknown_items, record.job_id) == ("unknown", 20, None)
    assert states(ledger, range(20)) == {"unknown"}
    reason = store.read_table("outcomes", "delivery-events-00000.parquet").to_pylist()[0]["reason"]
    assert f"Idempotency-Key {record.idempotency_key}" in reason and "allow_duplicates" in reason


def test_an_abandoned_chunk_sends_nothing(fullstory_emulator, monkeypatch, tmp_path, ledger):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    store, chunks = make_run(tmp_path, ledger, events_per_chunk=(10,))
    assert ledger.abandon_unsent_chunks(DESTINATION, RUN_ID) == []  # another run takes the rows over
    stats, _ = deliver(store, ledger, ["events-00000"])  # abandoned users do not hold events back
    assert emu.requests()["total"] == 0 and stats["delivery"]["abandoned"] == 1
    assert outcomes(store, "events-00000") == [(r, f"ev-{r}", "pending") for r in range(5, 15)]
    assert chunk_row(ledger, "events-00000").status == "abandoned" and states(ledger, range(15)) == {
        "claimed"
    }


def test_a_changed_payload_file_is_refused(fullstory_emulator, monkeypatch, tmp_path, ledger):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    store, chunks = make_run(tmp_path, ledger, users=0, events_per_chunk=(10,))
    original = store.read_bytes("payloads", "events-00000.jsonl")
    store.write_bytes(original.replace(b'"c0-3"', b'"c0-X"'), "payloads", "events-00000.jsonl")
    with pytest.raises(AirflowException, match="events-00000.jsonl changed after it was recorded"):
        deliver(store, ledger, chunks)
    assert emu.requests()["total"] == 0 and states(ledger, range(10)) == {"claimed"}
    assert "changed after it was recorded" in stops.read_stops(store)[0]
    store.write_bytes(original, "payloads", "events-00000.jsonl")
    deliver(store, ledger, chunks)
    assert imported(emu) == once(range(10)) and api_posts(emu) == 1


_CHILD = """
import sys
sys.path[:0] = [{root!r}, {plugins!r}]
from fullstory_provider.operators import FullStoryDeliveryOperator
class TI:
    def xcom_push(self, key, value):
        pass
op = FullStoryDeliveryOperator(task_id="deliver", state_uri={state!r}, run_id={run!r}, chunks={chunks!r},
                               ledger={{"url": {url!r}}}, destination={dest!r},
                               poll_interval=0.05, max_in_flight=2, timeout=60)
op.execute({{"ti": TI()}})
"""


def test_kill_mid_job_and_resume_without_duplicates(fullstory_emulator, monkeypatch, tmp_path, ledger):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    emu.set_faults(job_seconds=1.5)
    store, chunks = make_run(tmp_path, ledger, events_per_chunk=(25, 25, 25, 25), users=0)
    code = _CHILD.format(
        root=str(ROOT),
        plugins=str(ROOT / "plugins"),
        state=store.state_uri,
        run=RUN_ID,
        chunks=chunks,
        url=ledger.url,
        dest=DESTINATION,
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 30
        in_flight: list[lg.ChunkRow] = []
        while time.monotonic() < deadline and not in_flight:
            assert child.poll() is None, "the delivery ended before it could be killed"
            in_flight = [c for c in ledger.chunks_of_run(DESTINATION, RUN_ID) if c.job_id]
            time.sleep(0.02)
        assert in_flight and not any(c.is_terminal for c in in_flight), "no job was in flight"
        os.kill(child.pid, signal.SIGKILL)  # no on_kill, no clean-up: the worst case
    finally:
        child.kill()
        child.wait(10)
    statuses = {c.name: c.status for c in ledger.chunks_of_run(DESTINATION, RUN_ID)}
    stats, _ = deliver(store, ledger, chunks, max_in_flight=2)
    delivery = stats["delivery"]
    assert delivery["resumed"] == sum(s in ("submitted", "processing") for s in statuses.values()) >= 1
    assert delivery["reposted"] == sum(s == "posting" for s in statuses.values())
    assert delivery["submitted"] == sum(s == "claimed" for s in statuses.values())
    assert (
        delivery["resumed"] + delivery["reposted"] + delivery["submitted"] + delivery["already_complete"] == 4
    )
    assert imported(emu) == once(range(100))  # each event exactly once
    assert emu.state()["jobs"]["total"] == 4
    assert {c.status for c in ledger.chunks_of_run(DESTINATION, RUN_ID)} == {"completed"}


def test_hook_typed_calls_page_and_wait_out_202(fullstory_emulator_factory, monkeypatch):
    emu = fullstory_emulator_factory(page_size=7, job_seconds=0.5)
    use_connection(monkeypatch, emu)
    hook = FullStoryHook()
    body = {"requests": [{"name": "Paged", "user": {"uid": f"u{i}"}} for i in range(20)]}
    job = hook.create_batch("events", body, idempotency_key="paging-test")
    assert job["status"] == "PROCESSING"
    imports = list(hook.iter_batch_imports("events", job["id"]))  # 202 while processing, then 3 pages
    assert len(imports) == 20 and hook.http_stats()["status_counts"].get("202", 0) >= 1
    assert [i["user"]["uid"] for i in imports] == [f"u{i}" for i in range(20)]
    assert hook.get_batch_status("events", job["id"])["job"]["status"] == "COMPLETED"
    assert list(hook.iter_batch_errors("events", job["id"])) == []
    assert hook.upsert_user({"uid": "solo", "display_name": "Solo"})["id"]
    assert hook.create_event({"name": "Single", "user": {"uid": "solo"}}) == {}
    assert hook.whoami()["orgId"] == emu.org_id


# ---- dry run, connection test, TLS ---------------------------------------------------------------------


def test_dry_run_sends_nothing(fullstory_emulator, monkeypatch, tmp_path, ledger):
    emu = fullstory_emulator
    monkeypatch.delenv("AIRFLOW_CONN_FULLSTORY_DEFAULT", raising=False)  # a dry run needs no connection
    store, chunks = make_run(tmp_path, ledger)
    stats, _ = deliver(store, ledger, chunks, dry_run="True")  # templated flags arrive as strings
    assert emu.requests()["total"] == 0
    assert stats["delivery"]["dry_run_rows"] == 55 and stats["batches"] == 0
    assert outcomes(store, "events-00000") == [(r, f"ev-{r}", "dry_run") for r in range(5, 55)]
    assert {(c.status, c.submissions) for c in ledger.chunks_of_run(DESTINATION, RUN_ID)} == {("claimed", 0)}
    assert states(ledger, range(55)) == {"claimed"}


def test_connection_test_button(fullstory_emulator, monkeypatch):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    ok, message = FullStoryHook().test_connection()
    assert ok and emu.org_id in message
    use_connection(monkeypatch, emu, key="na1.wrong/zz")
    ok, message = FullStoryHook().test_connection()
    assert not ok and message.startswith("Invalid API key")


def test_eu1_over_tls_with_a_ca_bundle(fullstory_emulator_factory, monkeypatch, tmp_path, ledger):
    emu = fullstory_emulator_factory(region="eu1", tls=True, job_seconds=0.05)
    assert emu.base_url.startswith("https://")
    destination = f"{emu.org_id}@{emu.region}"
    use_connection(monkeypatch, emu, ca_bundle=emu.ca_bundle)
    store, chunks = make_run(tmp_path, ledger, events_per_chunk=(10,), destination=destination)
    # With REQUESTS_CA_BUNDLE set in the environment, as on this machine.
    stats, ti = deliver(store, ledger, chunks, destination=destination)
    # EmulatorProcess's admin session sets Session.verify, which requests lets REQUESTS_CA_BUNDLE override;
    # clear those variables for the admin calls only (our hook passes verify per request).
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    assert imported(emu) == once(range(5, 15)) and len(emu.users()) == 5
    assert stats["events"] == {"delivered": 10, "rejected": 0}
    assert ti.pushed[XCOM_APP_URL].startswith("https://app.eu1.fullstory.com/ui/o-LOCAL-eu1")
    assert {(c.destination, c.status) for c in ledger.chunks_of_run(destination, RUN_ID)} == {
        ("o-LOCAL-eu1@eu1", "completed")
    }


# ---- secrets -------------------------------------------------------------------------------------------


def test_the_api_key_never_leaks(fullstory_emulator, monkeypatch, tmp_path, ledger, caplog, capsys):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    key = emu.api_key
    caplog.set_level("DEBUG")
    emu.set_faults(reject_event_names=["Rejected Thing"], throttle_next=1, retry_after=1)
    store, chunks = make_run(tmp_path, ledger, events_per_chunk=(10,), bad=1)
    stats, ti = deliver(store, ledger, chunks)
    assert stats["events"] == {"delivered": 10, "rejected": 1}
    texts = [json.dumps(stats), json.dumps(ti.pushed), repr(FullStoryHook()), repr(ledger)]
    # A second run, so that the wrong keys below meet a chunk that still has to be sent.
    store2, chunks2 = make_run(
        tmp_path, ledger, users=0, events_per_chunk=(3,), run_id=RUN_ID + "-2", first_row=1000
    )
    for bad_key, error in (
        ("na1.wrong-key-value/zz", FullStoryAuthError),
        ("eu1.eu-key-value/zz", FullStoryConfigError),
    ):
        use_connection(monkeypatch, emu, key=bad_key)
        with pytest.raises(error) as info:
            deliver(store2, ledger, chunks2)
        texts += [str(info.value), repr(info.value)]
        assert bad_key not in str(info.value)
    assert api_posts(emu) == 2  # the first run's events chunk, then the 401
    for path in tmp_path.rglob("*"):  # run folders, outcome files, dead letters, stop records, the ledger
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    assert any("ledger.sqlite" in str(p) for p in tmp_path.rglob("*"))
    # Airflow's task SDK logs through structlog, rendered to stdout outside a task runner; stdlib records
    # (requests, urllib3, the secrets masker) land in caplog. Search both.
    logged = caplog.text + capsys.readouterr().out
    assert "retry 1/" in logged and "submitted" in logged, "nothing was captured: the check would be vacuous"
    texts.append(logged)
    for text in texts:
        assert key not in text
        assert "wrong-key-value" not in text and "eu-key-value" not in text
