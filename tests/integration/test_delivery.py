"""FullStoryHook and FullStoryDeliveryOperator against the real FullStory emulator over HTTP.

No mocks of the code under test: the operator's `execute(context)` runs with the connection from an
`AIRFLOW_CONN_FULLSTORY_DEFAULT` env var, talks to the emulator subprocess, and the assertions read
what the emulator saw (`/_emulator/...`) and what the run folder holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from fullstory_provider.hooks import (
    FullStoryAuthError,
    FullStoryConfigError,
    FullStoryHook,
    FullStoryNotFoundError,
    FullStoryRetryError,
    RetryPolicy,
)
from fullstory_provider.links import XCOM_APP_URL
from fullstory_provider.operators import FullStoryDeliveryOperator
from include.datafly_fullstory.ledger import Ledger
from include.datafly_fullstory.state import RunStore

ROOT = Path(__file__).resolve().parents[2]
RUN_ID = "manual__2026-03-01T10:00:00+00:00"


# ---- helpers -------------------------------------------------------------------------------------------


class RecordingTI:
    """The one thing the operator asks of the task instance: xcom_push (before it starts waiting)."""

    def __init__(self):
        self.pushed: dict[str, object] = {}

    def xcom_push(self, key, value):
        self.pushed[key] = value


def use_connection(monkeypatch, emu, *, key=None, org=None, region=None, **extra):
    conn = {
        "conn_type": "http",
        "host": emu.base_url,
        "password": key or emu.api_key,
        "extra": {"org_id": org or emu.org_id, "data_region": region or emu.region, **extra},
    }
    monkeypatch.setenv("AIRFLOW_CONN_FULLSTORY_DEFAULT", json.dumps(conn))
    return conn


def write_chunk(store: RunStore, name: str, items: list[dict], first_row: int = 0) -> dict:
    data = b"".join(orjson.dumps(item) + b"\n" for item in items)
    store.write_bytes(data, "payloads", f"{name}.jsonl")
    rows = list(range(first_row, first_row + len(items)))
    index = pa.table(
        {
            "item_index": pa.array(range(len(items)), pa.int32()),
            "row": pa.array(rows, pa.int64()),
            "event_id": pa.array([f"ev-{r}" for r in rows], pa.string()),
        }
    )
    store.write_table(index, "payloads", f"{name}.index.parquet")
    kind = name.split("-")[0]
    return {
        "name": name,
        "kind": kind,
        "items": len(items),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def make_run(tmp_path, events_per_chunk=(50,), users=5, bad=0) -> tuple[RunStore, list[str]]:
    """A run folder as the mapping stage leaves it: users-00000, events-0000N, manifest.json last."""
    store = RunStore(str(tmp_path / "state"), RUN_ID)
    entries, row = [], 0
    if users:
        entries.append(
            write_chunk(
                store, "users-00000", [{"uid": f"u{i}", "properties": {"plan": "pro"}} for i in range(users)]
            )
        )
        row += users
    for c, n in enumerate(events_per_chunk):
        items = [
            {"name": "Order Completed", "user": {"uid": f"u{i % 5}"}, "properties": {"order_id": f"c{c}-{i}"}}
            for i in range(n)
        ]
        items += [{"name": "Rejected Thing", "user": {"uid": "u0"}, "properties": {"k": 1}}] * bad
        entries.append(write_chunk(store, f"events-{c:05d}", items, first_row=row))
        row += len(items)
    store.write_json({"chunks": entries}, "payloads", "manifest.json")
    return store, [e["name"] for e in entries]


def operator(store, chunks, **kwargs):
    kwargs.setdefault("poll_interval", 0.05)
    kwargs.setdefault("timeout", 60)
    return FullStoryDeliveryOperator(
        task_id="deliver", state_uri=store.state_uri, run_id=store.run_id, chunks=chunks, **kwargs
    )


def deliver(store, chunks, **kwargs):
    ti = RecordingTI()
    stats = operator(store, chunks, **kwargs).execute({"ti": ti})
    return stats, ti


def outcomes(store, chunk):
    return store.read_table("outcomes", f"delivery-{chunk}.parquet").to_pylist()


def api_posts(emu, route="POST /v2/events/batch") -> int:
    return sum(emu.requests()["by_path"].get(route, {}).values())


# ---- success -------------------------------------------------------------------------------------------


def test_delivers_users_then_events(fullstory_emulator, monkeypatch, tmp_path):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    store, chunks = make_run(tmp_path, events_per_chunk=(40, 30, 20))
    stats, ti = deliver(store, chunks, max_in_flight=2)
    assert emu.state()["events"] == 90 and len(emu.users()) == 5
    assert stats["events"] == {"delivered": 90, "rejected": 0}
    assert stats["users"] == {"delivered": 5, "rejected": 0}
    assert stats["batches"] == 4 and stats["bytes_sent"] > 0
    assert stats["http"]["status_counts"]["200"] == stats["http"]["requests"]
    assert ti.pushed[XCOM_APP_URL] == f"https://app.fullstory.com/ui/{emu.org_id}/home"
    assert [j["kind"] for j in emu.jobs()] == ["users", "events", "events", "events"]  # creation order
    for name in chunks:
        record = Ledger(store).get(name)
        assert record.status == "completed" and record.job_id and record.idempotency_key.startswith("dffs-")
        assert {o["outcome"] for o in outcomes(store, name)} == {"delivered"}
    json.dumps(stats)  # an XCom value


def test_per_item_rejections_become_dead_letters_and_outcomes(fullstory_emulator, monkeypatch, tmp_path):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    emu.set_faults(reject_event_names=["Rejected Thing"], reject_code="invalid_argument")
    store, chunks = make_run(tmp_path, events_per_chunk=(10,), users=0, bad=2)  # two identical bad items
    stats, _ = deliver(store, chunks)
    assert stats["events"] == {"delivered": 10, "rejected": 2}
    dead = store.read_table("dead_letters", "events-00000.parquet").to_pylist()
    assert [d["item_index"] for d in dead] == [10, 11]  # duplicates matched to both lines, in order
    assert (
        dead[0]["rows"] == [10]
        and dead[0]["event_ids"] == ["ev-10"]
        and dead[0]["code"] == "invalid_argument"
    )
    assert orjson.loads(dead[0]["item"])["name"] == "Rejected Thing"
    out = outcomes(store, "events-00000")
    assert [o["outcome"] for o in out].count("rejected") == 2
    assert out[11]["reason"].startswith("invalid_argument: ")
    assert Ledger(store).get("events-00000").job_status == "FAILED"  # FullStory's word for partial failure


# ---- retries -------------------------------------------------------------------------------------------


def test_429_storm_honours_retry_after(fullstory_emulator, monkeypatch, tmp_path):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    emu.set_faults(throttle_next=2, retry_after=1)
    store, chunks = make_run(tmp_path, users=0)
    started = time.monotonic()
    stats, _ = deliver(store, chunks)
    assert time.monotonic() - started >= 2.0  # two waits of Retry-After: 1
    assert stats["http"]["status_counts"]["429"] == 2 and stats["http"]["retries"] == 2
    assert emu.state()["events"] == 50


def test_5xx_then_success(fullstory_emulator, monkeypatch, tmp_path):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    emu.set_faults(error_next=3, error_status=503)
    store, chunks = make_run(tmp_path, users=0)
    stats, _ = deliver(store, chunks)
    assert stats["http"]["status_counts"]["503"] == 3 and stats["http"]["retries"] == 3
    assert emu.state()["events"] == 50 and emu.state()["jobs"]["total"] == 1


def test_slow_answer_times_out_and_the_retry_is_replayed(fullstory_emulator, monkeypatch, tmp_path):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu, read_timeout=0.5)
    emu.set_faults(slow_next=1, slow_seconds=1.5)  # the first POST is processed, its answer comes too late
    store, chunks = make_run(tmp_path, users=0)
    stats, _ = deliver(store, chunks)
    assert stats["http"]["transport_errors"] == 1 and stats["http"]["retries"] >= 1
    state = emu.state()
    assert state["events"] == 50 and state["jobs"]["total"] == 1  # same key: replayed, not duplicated
    assert state["idempotency"]["replays"] == 1


def test_retries_are_bounded(fullstory_emulator, monkeypatch):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    emu.set_faults(error_rate=1.0)
    hook = FullStoryHook(retry=RetryPolicy(max_attempts=3, backoff_base=0.01))
    with pytest.raises(FullStoryRetryError, match="gave up after 3 attempt"):
        hook.whoami()
    assert hook.http_stats()["requests"] == 3


def test_dropped_connection_is_retried(fullstory_emulator, monkeypatch, tmp_path):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    emu.set_faults(drop_next=1, drop_after_processing=True)  # the job is created, the answer is lost
    store, chunks = make_run(tmp_path, users=0)
    deliver(store, chunks)
    assert emu.state()["events"] == 50 and emu.state()["jobs"]["total"] == 1


# ---- refusals ------------------------------------------------------------------------------------------


def test_401_fails_without_airflow_retries(fullstory_emulator, monkeypatch, tmp_path):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu, key="na1.not-a-real-key/zz")
    store, chunks = make_run(tmp_path, users=0)
    with pytest.raises(FullStoryAuthError) as info:
        deliver(store, chunks)
    assert isinstance(info.value, AirflowFailException)
    assert "Invalid API key: regenerate the Server API key in Settings > API Keys" in str(info.value)
    assert api_posts(emu) == 1  # a 401 is final: no retries
    assert Ledger(store).get("events-00000") is None  # nothing recorded, a fixed key re-runs cleanly


def test_404_points_at_the_data_region(fullstory_emulator, monkeypatch, tmp_path):
    emu = fullstory_emulator  # serves na1; the connection consistently says eu1
    use_connection(monkeypatch, emu, key="eu1.some-key/zz", org="o-LOCAL-eu1", region="eu1")
    store, chunks = make_run(tmp_path, users=0)
    with pytest.raises(FullStoryNotFoundError, match=r"data_region \(eu1.*na1 vs eu1"):
        deliver(store, chunks)


def test_region_mismatch_is_refused_before_sending(fullstory_emulator, monkeypatch, tmp_path):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu, region="eu1")  # key na1., org -na1, data_region eu1
    store, chunks = make_run(tmp_path, users=0)
    with pytest.raises(FullStoryConfigError, match="data region mismatch: extra.data_region says eu1"):
        deliver(store, chunks)
    assert emu.requests()["total"] == 0


def test_events_wait_for_users_of_the_same_run(fullstory_emulator, monkeypatch, tmp_path):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    store, chunks = make_run(tmp_path)
    with pytest.raises(AirflowException, match="users chunks of run .* not delivered yet: users-00000"):
        deliver(store, ["events-00000"])
    assert emu.requests()["total"] == 0
    deliver(store, ["users-00000"])
    deliver(store, ["events-00000"])
    assert emu.state()["events"] == 50


# ---- re-runs -------------------------------------------------------------------------------------------


def test_rerun_sends_nothing_and_force_replays(fullstory_emulator, monkeypatch, tmp_path):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    store, chunks = make_run(tmp_path, events_per_chunk=(30, 20))
    first, _ = deliver(store, chunks)
    before = emu.requests()["total"]
    again, _ = deliver(store, chunks)
    assert emu.requests()["total"] == before and again["http"]["requests"] == 0
    assert again["events"] == first["events"]  # the counts describe the chunks, as the outcomes do
    forced, _ = deliver(store, chunks, force=True)
    state = emu.state()
    assert forced["batches"] == 3 and state["idempotency"]["replays"] == 3
    assert state["events"] == 50 and state["jobs"]["total"] == 3 and len(emu.users()) == 5
    assert {Ledger(store).get(c).submissions for c in chunks} == {2}


_CHILD = """
import sys
sys.path[:0] = [{root!r}, {plugins!r}]
from fullstory_provider.operators import FullStoryDeliveryOperator
class TI:
    def xcom_push(self, key, value):
        pass
op = FullStoryDeliveryOperator(task_id="deliver", state_uri={state!r}, run_id={run!r}, chunks={chunks!r},
                               poll_interval=0.05, max_in_flight=2, timeout=60)
op.execute({{"ti": TI()}})
"""


def test_kill_mid_job_and_resume_without_duplicates(fullstory_emulator, monkeypatch, tmp_path):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    emu.set_faults(job_seconds=1.5)
    store, chunks = make_run(tmp_path, events_per_chunk=(25, 25, 25, 25), users=0)
    code = _CHILD.format(
        root=str(ROOT), plugins=str(ROOT / "plugins"), state=store.state_uri, run=RUN_ID, chunks=chunks
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not Ledger(store).all():
            assert child.poll() is None, "the delivery ended before it could be killed"
            time.sleep(0.02)
        records = Ledger(store).all()
        assert records and all(not r.is_terminal for r in records.values()), "no job was in flight"
        os.kill(child.pid, signal.SIGKILL)  # no on_kill, no clean-up: the worst case
    finally:
        child.kill()
        child.wait(10)
    stats, _ = deliver(store, chunks, max_in_flight=2)
    assert stats["delivery"]["resumed"] >= 1
    assert stats["delivery"]["resumed"] + stats["delivery"]["submitted"] == 4
    events = emu.events()
    order_ids = [e["properties"]["order_id"] for e in events]
    assert len(order_ids) == 100 and len(set(order_ids)) == 100  # each event exactly once
    assert emu.state()["jobs"]["total"] == 4


def test_hook_typed_calls_page_and_wait_out_202(fullstory_emulator_factory, monkeypatch):
    emu = fullstory_emulator_factory(page_size=7, job_seconds=0.5)
    use_connection(monkeypatch, emu)
    hook = FullStoryHook()
    body = {"requests": [{"name": "Paged", "user": {"uid": f"u{i}"}} for i in range(20)]}
    job = hook.create_events_batch(body, idempotency_key="paging-test")
    assert job["status"] == "PROCESSING"
    imported = list(hook.iter_events_batch_imports(job["id"]))  # 202 while processing, then 3 pages
    assert len(imported) == 20 and hook.http_stats()["status_counts"].get("202", 0) >= 1
    assert hook.get_events_batch_status(job["id"])["job"]["status"] == "COMPLETED"
    assert list(hook.iter_events_batch_errors(job["id"])) == []
    assert hook.upsert_user({"uid": "solo", "display_name": "Solo"})["id"]
    assert hook.create_event({"name": "Single", "user": {"uid": "solo"}}) == {}
    assert hook.whoami()["orgId"] == emu.org_id


# ---- dry run, connection test, TLS ---------------------------------------------------------------------


def test_dry_run_sends_nothing(fullstory_emulator, monkeypatch, tmp_path):
    emu = fullstory_emulator
    monkeypatch.delenv("AIRFLOW_CONN_FULLSTORY_DEFAULT", raising=False)  # a dry run needs no connection
    store, chunks = make_run(tmp_path)
    stats, _ = deliver(store, chunks, dry_run="True")  # templated flags arrive as strings
    assert emu.requests()["total"] == 0 and not store.exists("ledger")
    assert stats["delivery"]["dry_run_rows"] == 55 and stats["batches"] == 0
    assert {o["outcome"] for o in outcomes(store, "events-00000")} == {"dry_run"}


def test_connection_test_button(fullstory_emulator, monkeypatch):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    ok, message = FullStoryHook().test_connection()
    assert ok and emu.org_id in message
    use_connection(monkeypatch, emu, key="na1.wrong/zz")
    ok, message = FullStoryHook().test_connection()
    assert not ok and message.startswith("Invalid API key")


def test_eu1_over_tls_with_a_ca_bundle(fullstory_emulator_factory, monkeypatch, tmp_path):
    emu = fullstory_emulator_factory(region="eu1", tls=True, job_seconds=0.05)
    assert emu.base_url.startswith("https://")
    use_connection(monkeypatch, emu, ca_bundle=emu.ca_bundle)
    store, chunks = make_run(tmp_path, events_per_chunk=(10,))
    _, ti = deliver(store, chunks)  # with REQUESTS_CA_BUNDLE set in the environment, as on this machine
    # EmulatorProcess's admin session sets Session.verify, which requests lets REQUESTS_CA_BUNDLE override;
    # clear those variables for the admin calls only (our hook passes verify per request).
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    assert emu.state()["events"] == 10
    assert ti.pushed[XCOM_APP_URL].startswith("https://app.eu1.fullstory.com/ui/o-LOCAL-eu1")


# ---- secrets -------------------------------------------------------------------------------------------


def test_the_api_key_never_leaks(fullstory_emulator, monkeypatch, tmp_path, caplog, capsys):
    emu = fullstory_emulator
    use_connection(monkeypatch, emu)
    key = emu.api_key
    caplog.set_level("DEBUG")
    emu.set_faults(reject_event_names=["Rejected Thing"], throttle_next=1, retry_after=1)
    store, chunks = make_run(tmp_path, events_per_chunk=(10,), bad=1)
    stats, ti = deliver(store, chunks)
    texts = [json.dumps(stats), json.dumps(ti.pushed), repr(FullStoryHook())]
    for path in Path(store.root).rglob("*"):
        if path.is_file() and path.suffix in (".json", ".parquet"):
            texts.append(path.read_bytes().decode("latin-1"))
    for bad_key, error in (
        ("na1.wrong-key-value/zz", FullStoryAuthError),
        ("eu1.eu-key-value/zz", FullStoryConfigError),
    ):
        use_connection(monkeypatch, emu, key=bad_key)
        with pytest.raises(error) as info:
            deliver(store, chunks, force=True)
        texts += [str(info.value), repr(info.value)]
        assert bad_key not in str(info.value)
    # Airflow's task SDK logs through structlog, rendered to stdout outside a task runner; stdlib records
    # (requests, urllib3, the secrets masker) land in caplog. Search both.
    logged = caplog.text + capsys.readouterr().out
    assert "retry 1/" in logged and "submitted" in logged, "nothing was captured: the check would be vacuous"
    texts.append(logged)
    for text in texts:
        assert key not in text
        assert "wrong-key-value" not in text and "eu-key-value" not in text
