"""The ledger and the pure delivery loop (include/datafly_fullstory/{ledger,delivery}.py).

The loop is driven here by `RecordingFullStory`, an in-memory stand-in for FullStory's batch API that
records every call (the dlt habit); the real hook against the real emulator is in tests/integration.
"""

from __future__ import annotations

import hashlib
import itertools
import os

import orjson
import pyarrow as pa
import pytest

from include.datafly_fullstory import delivery as dl
from include.datafly_fullstory.ledger import ChunkRecord, Ledger, LedgerError
from include.datafly_fullstory.payloads import batch_body
from include.datafly_fullstory.state import RunStore

# ---- fixtures: chunk files per docs/contracts.md --------------------------------------------------------


def write_chunk(store: RunStore, name: str, items: list[dict], rows_per_item: int = 1, first_row: int = 0):
    lines = [orjson.dumps(item) for item in items]
    store.write_bytes(b"\n".join(lines) + b"\n", "payloads", f"{name}.jsonl")
    index, rows = [], itertools.count(first_row)
    for i in range(len(items)):
        for _ in range(rows_per_item):
            row = next(rows)
            index.append({"item_index": i, "row": row, "event_id": f"ev-{row}"})
    table = pa.Table.from_pylist(
        index, schema=pa.schema([("item_index", pa.int32()), ("row", pa.int64()), ("event_id", pa.string())])
    )
    store.write_table(table, "payloads", f"{name}.index.parquet")
    return hashlib.sha256(b"\n".join(lines) + b"\n").hexdigest()


def write_manifest(store: RunStore, chunks: dict[str, str]):
    entries = [{"name": n, "kind": n.split("-")[0], "sha256": sha} for n, sha in chunks.items()]
    store.write_json({"chunks": entries}, "payloads", "manifest.json")


@pytest.fixture
def store(tmp_path):
    return RunStore(str(tmp_path), "manual__2026-01-01T00:00:00+00:00")


class RecordingFullStory:
    """Batch jobs that end after `polls_to_finish` status calls; items named in `reject` fail."""

    def __init__(self, polls_to_finish=1, reject=(), refuse=None):
        self.polls_to_finish = polls_to_finish
        self.reject = set(reject)
        self.refuse = refuse
        self.calls: list[tuple] = []
        self.jobs: dict[str, dict] = {}
        self.by_key: dict[str, str] = {}
        self.in_flight_peak = 0

    def create_batch(self, kind, body, idempotency_key):
        self.calls.append(("create", kind, idempotency_key))
        if self.refuse:
            raise self.refuse
        if idempotency_key in self.by_key:  # FullStory replays the first answer for a key
            return {"id": self.by_key[idempotency_key], "status": "PROCESSING"}
        items = orjson.loads(body)["requests"]
        job_id = f"job-{len(self.jobs)}"
        failures = [i for i in items if i.get("name") in self.reject or i.get("uid") in self.reject]
        self.jobs[job_id] = {"items": items, "failures": failures, "polls": 0}
        self.by_key[idempotency_key] = job_id
        running = sum(1 for j in self.jobs.values() if j["polls"] < self.polls_to_finish)
        self.in_flight_peak = max(self.in_flight_peak, running)
        return {"id": job_id, "status": "PROCESSING"}

    def get_batch_status(self, kind, job_id):
        self.calls.append(("status", kind, job_id))
        job = self.jobs[job_id]
        job["polls"] += 1
        done = job["polls"] >= self.polls_to_finish
        status = ("FAILED" if job["failures"] else "COMPLETED") if done else "PROCESSING"
        errors = len(job["failures"]) if done else 0
        return {
            "imports": len(job["items"]) - errors if done else 0,
            "errors": errors,
            "job": {"status": status},
        }

    def iter_batch_errors(self, kind, job_id):
        self.calls.append(("errors", kind, job_id))
        field = "event" if kind == "events" else "user"
        for item in self.jobs[job_id]["failures"]:
            yield {"code": "invalid_argument", "message": "rejected by test", field: item}

    def http_stats(self):
        return {"requests": len(self.calls), "retries": 0, "status_counts": {}}

    def creates(self):
        return [c for c in self.calls if c[0] == "create"]


def fast(**kw):
    return dl.DeliverySettings(poll_interval=0.001, max_poll_interval=0.002, **kw)


def events(n, name="Order Completed", start=0):
    return [{"name": name, "user": {"uid": f"u{i}"}, "properties": {"n": i}} for i in range(start, start + n)]


# ---- ledger --------------------------------------------------------------------------------------------


def test_ledger_round_trip_and_atomic_writes(store):
    ledger = Ledger(store)
    assert ledger.get("events-00000") is None
    record = ChunkRecord(chunk="events-00000", kind="events", idempotency_key="dffs-events-x", job_id="j1")
    ledger.put(record)
    again = ledger.get("events-00000")
    assert again == record and again.is_in_flight and not again.is_terminal
    assert [n for n in os.listdir(store.path("ledger")) if ".tmp-" in n] == []  # no torn temp files
    assert list(ledger.all()) == ["events-00000"]


def test_ledger_refuses_bad_records(store):
    store.write_bytes(b"{not json", "ledger", "events-00000.json")
    with pytest.raises(LedgerError, match="unreadable"):
        Ledger(store).get("events-00000")
    store.write_json(
        {"chunk": "events-00009", "kind": "events", "idempotency_key": "k"}, "ledger", "events-00001.json"
    )
    with pytest.raises(LedgerError, match="holds the record"):
        Ledger(store).get("events-00001")
    store.write_json(
        {"chunk": "e", "kind": "events", "idempotency_key": "k", "status": "odd"}, "ledger", "e.json"
    )
    with pytest.raises(LedgerError, match="unknown status"):
        Ledger(store).get("e")


def test_ledger_reads_records_with_unknown_fields(store):
    store.write_json(
        {"chunk": "e", "kind": "events", "idempotency_key": "k", "new_field": 1}, "ledger", "e.json"
    )
    assert Ledger(store).get("e").idempotency_key == "k"


# ---- chunks, keys, bodies ------------------------------------------------------------------------------


def test_idempotency_key_without_a_manifest_key_is_a_pure_function_of_content():
    chunk = dl.Chunk("events-00000", "events")
    x, y = (hashlib.sha256(body).hexdigest() for body in (b'{"name":"x"}\n', b'{"name":"y"}\n'))
    a = dl.key_for(chunk, x)
    assert a == dl.key_for(chunk, x) and a != dl.key_for(chunk, y)
    assert a.startswith("dffs-events-") and len(a) == len("dffs-events-") + 40
    assert dl.key_for(dl.Chunk("events-00000", "events", idempotency_key="k"), x) == "k"


def test_manifest_key_wins_and_sha_is_checked(store):
    sha = write_chunk(store, "events-00000", events(2))
    store.write_json(
        {
            "chunks": [
                {"name": "events-00000", "kind": "events", "sha256": sha, "idempotency_key": "from-mapping"}
            ]
        },
        "payloads",
        "manifest.json",
    )
    (chunk,) = dl.load_chunks(store, ["events-00000"])
    lines, digest = dl.read_lines(store, chunk)
    assert dl.key_for(chunk, digest) == "from-mapping"
    write_chunk(store, "events-00000", events(3))  # changed after mapping
    with pytest.raises(dl.DeliveryError, match="changed after mapping"):
        dl.read_lines(store, chunk)
    with pytest.raises(dl.DeliveryError, match="not in"):
        dl.load_chunks(store, ["events-00042"])


def test_batch_body_joins_lines():
    lines = [orjson.dumps(e) for e in events(3)]
    assert orjson.loads(batch_body(lines)) == {"requests": events(3)}


def test_match_errors_on_content_with_duplicates_and_normalisation():
    items = [{"name": "a", "properties": {"v": 1}}, {"name": "b"}, {"name": "a", "properties": {"v": 1}}]
    lines = [orjson.dumps(i) for i in items]
    echoed = [
        {"code": "c1", "message": "m", "event": {"properties": {"v": 1.0}, "name": "a"}},  # reordered, 1.0
        {"code": "c2", "message": "m", "event": {"name": "a", "properties": {"v": 1}}},  # its duplicate
        {"code": "c3", "message": "m", "event": {"name": "zzz"}},  # matches nothing
    ]
    matched = dl.match_errors(lines, echoed, "events")
    assert [m.item_index for m in matched] == [0, 2, -1]
    assert matched[0].reason == "c1: m"


# ---- results -------------------------------------------------------------------------------------------


def test_write_results_one_outcome_per_row_and_dead_letters(store):
    users = [{"uid": "u1"}, {"uid": "bad"}, {"uid": "u3"}]
    write_chunk(store, "users-00000", users, rows_per_item=2)  # folded identify calls: 2 rows per item
    (chunk,) = dl.load_chunks(store, ["users-00000"])
    lines, _ = dl.read_lines(store, chunk)
    record = ChunkRecord("users-00000", "users", "k", job_id="j")
    errors = dl.match_errors(
        lines, [{"code": "invalid_argument", "message": "no", "user": {"uid": "bad"}}], "users"
    )
    result = dl.write_results(store, chunk, record, lines, errors)
    assert (result.delivered_items, result.rejected_items, result.delivered_rows, result.rejected_rows) == (
        2,
        1,
        4,
        2,
    )
    out = store.read_table("outcomes", "delivery-users-00000.parquet").to_pylist()
    assert [o["outcome"] for o in out] == ["delivered"] * 2 + ["rejected"] * 2 + ["delivered"] * 2
    assert out[2]["reason"] == "invalid_argument: no" and out[2]["kind"] == "user"
    (dead,) = store.read_table("dead_letters", "users-00000.parquet").to_pylist()
    assert dead["item_index"] == 1 and dead["rows"] == [2, 3] and dead["event_ids"] == ["ev-2", "ev-3"]
    assert orjson.loads(dead["item"]) == {"uid": "bad"} and dead["job_id"] == "j"


# ---- the loop ------------------------------------------------------------------------------------------


def test_delivers_users_before_events_within_the_in_flight_cap(store):
    shas = {
        f"events-0000{i}": write_chunk(store, f"events-0000{i}", events(3, start=10 * i)) for i in range(5)
    }
    shas["users-00000"] = write_chunk(store, "users-00000", [{"uid": "u0"}], first_row=100)
    write_manifest(store, shas)
    client = RecordingFullStory(polls_to_finish=3)
    report = dl.Delivery(store, client, fast(max_in_flight=2)).run(dl.load_chunks(store, sorted(shas)))
    creates = client.creates()
    assert creates[0][1] == "users" and all(c[1] == "events" for c in creates[1:])
    assert client.in_flight_peak <= 2
    assert report.submitted == 6 and report.items["events"]["delivered"] == 15
    assert {r.status for r in Ledger(store).all().values()} == {"completed"}


def test_rerun_sends_nothing_and_force_resubmits_with_the_same_keys(store):
    write_manifest(store, {"events-00000": write_chunk(store, "events-00000", events(4))})
    chunks = dl.load_chunks(store, ["events-00000"])
    client = RecordingFullStory()
    dl.Delivery(store, client, fast()).run(chunks)
    first_key = client.creates()[0][2]
    client.calls.clear()
    report = dl.Delivery(store, client, fast()).run(chunks)
    assert client.calls == [] and report.already_complete == 1
    assert report.items["events"]["delivered"] == 4  # counts still reflect the chunk, as the outcomes do
    dl.Delivery(store, client, fast(force=True)).run(chunks)
    assert [c[2] for c in client.creates()] == [first_key]
    assert Ledger(store).get("events-00000").submissions == 2


def test_resume_polls_a_recorded_job_instead_of_submitting(store):
    write_manifest(store, {"events-00000": write_chunk(store, "events-00000", events(2))})
    chunks = dl.load_chunks(store, ["events-00000"])
    client = RecordingFullStory(polls_to_finish=50)
    with pytest.raises(dl.DeliveryTimeout, match="re-run polls them"):
        dl.Delivery(store, client, dl.DeliverySettings(poll_interval=0.001, timeout=0.05)).run(chunks)
    assert Ledger(store).get("events-00000").status in ("submitted", "processing")
    client.polls_to_finish = 0
    client.calls.clear()
    report = dl.Delivery(store, client, fast()).run(chunks)
    assert client.creates() == [] and report.resumed == 1
    assert Ledger(store).get("events-00000").status == "completed"


def test_rejections_and_refused_batches(store):
    shas = {
        "events-00000": write_chunk(store, "events-00000", events(3) + events(1, name="bad")),
        "events-00001": write_chunk(store, "events-00001", events(2), first_row=4),
    }
    write_manifest(store, shas)
    dl.Delivery(store, RecordingFullStory(reject={"bad"}), fast()).run(
        dl.load_chunks(store, ["events-00000"])
    )
    assert Ledger(store).get("events-00000").rejected_items == 1
    refusal = dl.BatchRefused("too large")
    refusal.status, refusal.code, refusal.message = 413, "payload_too_large", "too large"
    report = dl.Delivery(store, RecordingFullStory(refuse=refusal), fast()).run(
        dl.load_chunks(store, ["events-00001"])
    )
    record = Ledger(store).get("events-00001")
    assert record.status == "failed" and "413" in record.error and report.refused == 1
    out = store.read_table("outcomes", "delivery-events-00001.parquet").to_pylist()
    assert {o["outcome"] for o in out} == {"rejected"} and out[0]["reason"].startswith("payload_too_large")


def test_dry_run_writes_outcomes_only(store):
    write_manifest(store, {"events-00000": write_chunk(store, "events-00000", events(2))})
    report = dl.Delivery(store, client=None).dry_run(dl.load_chunks(store, ["events-00000"]))
    assert report.dry_run_rows == 2 and not store.exists("ledger")
    out = store.read_table("outcomes", "delivery-events-00000.parquet").to_pylist()
    assert {o["outcome"] for o in out} == {"dry_run"}


def test_undelivered_users_blocks_events(store):
    shas = {"users-00000": write_chunk(store, "users-00000", [{"uid": "u"}])}
    shas["events-00000"] = write_chunk(store, "events-00000", events(1), first_row=1)
    write_manifest(store, shas)
    assert dl.undelivered_users(store, dl.load_chunks(store, ["events-00000"])) == ["users-00000"]
    assert dl.undelivered_users(store, dl.load_chunks(store, ["users-00000", "events-00000"])) == []
    dl.Delivery(store, RecordingFullStory(), fast()).run(dl.load_chunks(store, ["users-00000"]))
    assert dl.undelivered_users(store, dl.load_chunks(store, ["events-00000"])) == []


def test_stop_leaves_a_resumable_ledger(store):
    write_manifest(store, {"events-00000": write_chunk(store, "events-00000", events(2))})
    chunks = dl.load_chunks(store, ["events-00000"])
    client = RecordingFullStory(polls_to_finish=10**6)
    delivery = dl.Delivery(store, client, fast())
    original = client.get_batch_status

    def status_then_kill(kind, job_id):  # on_kill arrives while the job is being polled
        delivery.stop()
        return original(kind, job_id)

    client.get_batch_status = status_then_kill
    with pytest.raises(dl.DeliveryError, match="kept in the ledger"):
        delivery.run(chunks)
    record = Ledger(store).get("events-00000")
    assert record.is_in_flight and record.job_id == "job-0"


def test_changed_payloads_after_delivery_need_force(store):
    write_manifest(store, {"events-00000": write_chunk(store, "events-00000", events(2))})
    client = RecordingFullStory()
    dl.Delivery(store, client, fast()).run(dl.load_chunks(store, ["events-00000"]))
    write_manifest(store, {"events-00000": write_chunk(store, "events-00000", events(3))})  # mapping re-ran
    with pytest.raises(dl.DeliveryError, match="changed since it was sent as job job-0"):
        dl.Delivery(store, client, fast()).run(dl.load_chunks(store, ["events-00000"]))
    dl.Delivery(store, client, fast(force=True)).run(dl.load_chunks(store, ["events-00000"]))
    assert len(client.creates()) == 2 and client.creates()[0][2] != client.creates()[1][2]
    assert Ledger(store).get("events-00000").items == 3
