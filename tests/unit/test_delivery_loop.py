"""The delivery loop (include/datafly_fullstory/delivery.py) against the delivery ledger on a SQLite file.

The loop is driven by `RecordingFullStory`, an in-memory stand-in for FullStory's batch API that records
every call and, like FullStory, answers a repeated Idempotency-Key with its first answer. Run folders and
ledger records are made by tests/run_helpers.write_run (the real format owners). The real hook against
the real emulator is in tests/integration/test_delivery.py.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import orjson
import pytest

from include.datafly_fullstory import chunks as chunk_files
from include.datafly_fullstory import dead_letters
from include.datafly_fullstory import ledger as lg
from include.datafly_fullstory.delivery import jobs, loop, order
from include.datafly_fullstory.errors import DeliveryError, DeliveryTimeout
from include.datafly_fullstory.state import RunStore
from tests.run_helpers import DESTINATION, sqlite_ledger, write_run

RUN_ID = "manual__2026-03-01T10:00:00+00:00"
TS = "2026-03-01T10:15:00Z"
NO_FAULT = loop.fault_point


# ---- the FullStory stand-in ----------------------------------------------------------------------------


def ident(item: dict, kind: str) -> str:
    """Which item a test means: its datafly_event_id (events) or uid (users)."""
    return item["properties"]["datafly_event_id"] if kind == "events" else item["uid"]


class Refused(Exception):
    """What this client raises when it refuses a batch as a whole (its `refused_error`)."""


def refusal(status: int, code: str, message: str) -> Refused:
    error = Refused(message)
    error.status, error.code, error.message = status, code, message
    return error


class RecordingFullStory:
    """Batch jobs that end after `polls_to_finish` status calls. Items named in `reject` fail and are
    listed in the job's errors (echoed through `echo`); items named in `silent` fail but are only counted.
    Imported items are listed by `iter_batch_imports` (echoed too) unless `list_imports` is False."""

    refused_error = Refused

    def __init__(
        self,
        polls_to_finish=1,
        reject=(),
        silent=(),
        refuse=None,
        echo=None,
        list_imports=True,
        unnamed_errors=0,
    ):
        self.polls_to_finish = polls_to_finish
        self.reject, self.silent = set(reject), set(silent)
        self.refuse = (
            refuse  # an exception for every create_batch, or a callable(kind, key) -> exception | None
        )
        self.echo = echo or copy.deepcopy
        self.list_imports = list_imports
        self.unnamed_errors = unnamed_errors  # listed errors whose echoed item names no line
        self.calls: list[tuple] = []
        self.bodies: list[tuple[str, str, bytes]] = []  # (kind, key, body) of every POST
        self.jobs: dict[str, dict] = {}
        self.by_key: dict[str, tuple[str, bytes]] = {}
        self.replays = 0
        self.in_flight_peak = 0

    def create_batch(self, kind, body, idempotency_key):
        self.calls.append(("create", kind, idempotency_key))
        self.bodies.append((kind, idempotency_key, body))
        refuse = self.refuse(kind, idempotency_key) if callable(self.refuse) else self.refuse
        if refuse:
            raise refuse
        if idempotency_key in self.by_key:  # FullStory replays the first answer for a key
            job_id, first = self.by_key[idempotency_key]
            if body != first:
                raise refusal(400, "idempotency_key_mismatch", "same key, different body")
            self.replays += 1
            return {"id": job_id, "status": "PROCESSING"}
        items = orjson.loads(body)["requests"]
        job_id = f"job-{len(self.jobs)}"
        self.jobs[job_id] = {
            "kind": kind,
            "items": items,
            "polls": 0,
            "failed": [i for i in items if ident(i, kind) in self.reject],
            "silent": [i for i in items if ident(i, kind) in self.silent],
        }
        self.by_key[idempotency_key] = (job_id, body)
        running = sum(1 for j in self.jobs.values() if j["polls"] < self.polls_to_finish)
        self.in_flight_peak = max(self.in_flight_peak, running)
        return {"id": job_id, "status": "PROCESSING"}

    def get_batch_status(self, kind, job_id):
        self.calls.append(("status", kind, job_id))
        job = self.jobs[job_id]
        job["polls"] += 1
        if job["polls"] < self.polls_to_finish:
            return {"imports": 0, "errors": 0, "job": {"id": job_id, "status": "PROCESSING"}}
        errors = len(job["failed"]) + len(job["silent"]) + self.unnamed_errors
        return {
            "imports": len(job["items"]) - len(job["failed"]) - len(job["silent"]),
            "errors": errors,
            "job": {"id": job_id, "status": "FAILED" if errors else "COMPLETED"},
        }

    def iter_batch_errors(self, kind, job_id):
        self.calls.append(("errors", kind, job_id))
        field = "event" if kind == "events" else "user"
        for item in self.jobs[job_id]["failed"]:
            yield {
                "code": "invalid_argument",
                "message": f"rejected {ident(item, kind)}",
                field: self.echo(item),
            }
        for n in range(self.unnamed_errors):
            yield {"code": "internal", "message": "lost", field: {"name": f"mystery-{n}"}}

    def iter_batch_imports(self, kind, job_id):
        self.calls.append(("imports", kind, job_id))
        if not self.list_imports:
            return
        job = self.jobs[job_id]
        gone = {id(i) for i in job["failed"] + job["silent"]}
        for item in job["items"]:
            if id(item) not in gone:
                yield self.echo(item) if kind == "events" else {"id": f"fs-{item['uid']}", **self.echo(item)}

    def http_stats(self):
        return {"requests": len(self.calls), "retries": 0, "status_counts": {}}

    def creates(self):
        return [c for c in self.calls if c[0] == "create"]


def reformat(item: dict) -> dict:
    """FullStory's echo is not our bytes: timestamps come back reformatted, unset fields as null."""
    out = copy.deepcopy(item)
    if "timestamp" in out:
        out["timestamp"] = out["timestamp"].replace("Z", ".000+00:00")
    out["schema"] = None
    return dict(reversed(list(out.items())))


# ---- fixtures and helpers ------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    return RunStore(str(tmp_path / "state"), RUN_ID)


@pytest.fixture
def ledger(tmp_path):
    return sqlite_ledger(tmp_path)


class Killed(Exception):
    """The task died at a fault point."""


def kill_at(monkeypatch, point: str) -> None:
    def fault(name):
        if name == point:
            raise Killed(name)

    monkeypatch.setattr(loop, "fault_point", fault)


def lost_answer(store, ledger, monkeypatch, items: int):
    """A run whose one events chunk was POSTed, after which its task died before recording the job: the
    chunk is `posting` without a job id. Returns the stand-in FullStory that took the POST."""
    write_run(store, ledger, {"events-00000": events(items)})
    client = RecordingFullStory()
    kill_at(monkeypatch, "after_post")
    with pytest.raises(Killed):
        run(store, ledger, client, ["events-00000"])
    monkeypatch.setattr(loop, "fault_point", NO_FAULT)
    return client


def fast(**kw):
    return loop.DeliverySettings(poll_interval=0.001, max_poll_interval=0.002, **kw)


def delivery(store, ledger, client, destination=DESTINATION, **settings):
    return loop.Delivery(store, client, ledger, destination, fast(**settings))


def run(store, ledger, client, names, **settings):
    return delivery(store, ledger, client, **settings).run(chunk_files.load_chunks(store, names))


def events(n, start=0, name="Order Completed"):
    return [
        {"name": name, "user": {"uid": f"u{i}"}, "timestamp": TS, "properties": {"n": i}}
        for i in range(start, start + n)
    ]


def users(*uids):
    return [{"uid": u, "properties": {"plan": "pro"}} for u in uids]


def chunk_row(ledger, name) -> lg.ChunkRow:
    (row,) = [c for c in ledger.chunks_of_run(DESTINATION, RUN_ID) if c.name == name]
    return row


def outcomes(store, name) -> list[tuple[int, str, str]]:
    return [
        (o["row"], o["event_id"], o["outcome"])
        for o in store.read_table("outcomes", f"delivery-{name}.parquet").to_pylist()
    ]


def reasons(store, name) -> dict[str, str | None]:
    return {
        o["event_id"]: o["reason"]
        for o in store.read_table("outcomes", f"delivery-{name}.parquet").to_pylist()
    }


def states(ledger, event_ids) -> dict[str, str]:
    return {e: r.state for e, r in ledger.lookup(DESTINATION, list(event_ids)).items()}


def ev(*rows) -> list[str]:
    return [f"ev-{r}" for r in rows]


def expected(rows, outcome_of) -> list[tuple[int, str, str]]:
    return [(r, f"ev-{r}", outcome_of.get(r, "delivered")) for r in rows]


# ---- chunks, bodies, matching --------------------------------------------------------------------------


def test_load_chunks_reads_the_manifest_and_the_recorded_bytes(store, ledger):
    entries = write_run(store, ledger, {"events-00000": events(3)})
    (chunk,) = chunk_files.load_chunks(store, ["events-00000"])
    row = ledger.chunk(chunk.ledger_chunk_id)
    assert (chunk.kind, chunk.mode, chunk.sha256, row.sha256) == (
        "events",
        "deliver",
        entries[0]["sha256"],
        entries[0]["sha256"],
    )
    lines = chunk_files.read_lines(chunk, row.sha256)
    assert [orjson.loads(line)["properties"]["datafly_event_id"] for line in lines] == ev(0, 1, 2)
    assert orjson.loads(chunk_files.batch_body(lines)) == {"requests": [orjson.loads(line) for line in lines]}
    with pytest.raises(DeliveryError, match="not in"):
        chunk_files.load_chunks(store, ["events-00042"])
    store.remove("payloads", "manifest.json")
    with pytest.raises(DeliveryError, match="run the mapping task first"):
        chunk_files.load_chunks(store, ["events-00000"])


def test_match_errors_by_event_id_and_uid_not_by_bytes():
    lines = [
        orjson.dumps({"name": "a", "timestamp": TS, "properties": {"datafly_event_id": e}})
        for e in ev(0, 1, 2)
    ]
    keys = jobs.line_keys(lines, "events")
    assert keys == {"ev-0": 0, "ev-1": 1, "ev-2": 2}
    echoed = [
        {"code": "c1", "message": "m1", "event": reformat(orjson.loads(lines[2]))},
        {"code": "c2", "message": "m2", "event": {"name": "a", "properties": {"v": 1}}},  # names no line
        {"code": "c3", "message": "m3", "event": "not an object"},
    ]
    matched = jobs.match_errors(keys, echoed, "events")
    assert [(m.item_index, m.reason) for m in matched] == [(2, "c1: m1"), (-1, "c2: m2"), (-1, "c3: m3")]
    user_lines = [orjson.dumps(u) for u in users("a", "b")]
    ukeys = jobs.line_keys(user_lines, "users")
    assert ukeys == {"a": 0, "b": 1}
    (m,) = jobs.match_errors(
        ukeys, [{"code": "c", "message": "m", "user": {"schema": None, "uid": "b", "id": "9"}}], "users"
    )
    assert m.item_index == 1


# ---- the loop ------------------------------------------------------------------------------------------


def test_delivers_users_before_events_within_the_in_flight_cap(store, ledger):
    chunks = {"users-00000": users("u0", "u1")}
    chunks |= {f"events-0000{i}": events(3, start=10 * i) for i in range(5)}
    entries = write_run(store, ledger, chunks)
    client = RecordingFullStory(polls_to_finish=3)
    report = run(store, ledger, client, [e["name"] for e in reversed(entries)], max_in_flight=2)
    creates = client.creates()
    assert [c[1] for c in creates] == ["users"] + ["events"] * 5
    last_users_poll = max(i for i, c in enumerate(client.calls) if c[:2] == ("status", "users"))
    assert last_users_poll < client.calls.index(creates[1])  # the users job ended before any events POST
    assert client.in_flight_peak == 2
    assert (report.submitted, report.done, report.batches) == (6, 6, 6)
    assert report.items == {
        "users": {"delivered": 2, "rejected": 0},
        "events": {"delivered": 15, "rejected": 0},
    }
    # Every POST carried the chunk's recorded bytes under its recorded key.
    sent = {key: body for _, key, body in client.bodies}
    row = 0
    for entry in entries:
        record = chunk_row(ledger, entry["name"])
        assert record.status == "completed" and record.job_status == "COMPLETED" and record.submissions == 1
        assert (record.delivered_items, record.rejected_items, record.unknown_items) == (entry["items"], 0, 0)
        lines = chunk_files.read_lines(chunk_files.load_chunks(store, [entry["name"]])[0], record.sha256)
        assert sent[record.idempotency_key] == chunk_files.batch_body(lines)
        rows = range(row, row + entry["items"])
        assert outcomes(store, entry["name"]) == expected(rows, {})
        assert set(states(ledger, ev(*rows)).values()) == {"delivered"}
        row += entry["items"]
    assert report.bytes_sent == sum(len(body) for _, _, body in client.bodies)


def test_a_rerun_sends_nothing_and_rewrites_missing_outcomes_from_the_ledger(store, ledger):
    write_run(store, ledger, {"events-00000": events(4)})
    client = RecordingFullStory(reject=ev(2))
    first = run(store, ledger, client, ["events-00000"])
    assert (first.submitted, first.items["events"]) == (1, {"delivered": 3, "rejected": 1})
    before_outcomes = store.read_table("outcomes", "delivery-events-00000.parquet")
    before_dead = dead_letters.read_chunk(store, "events-00000")
    client.calls.clear()
    again = run(store, ledger, client, ["events-00000"])
    assert client.calls == [] and (again.already_complete, again.submitted, again.batches) == (1, 0, 0)
    assert again.items["events"] == {"delivered": 3, "rejected": 1}  # the counts describe the chunk
    store.remove("outcomes")
    dead_letters.clear(store)
    third = run(store, ledger, client, ["events-00000"])
    assert client.calls == [] and third.already_complete == 1
    assert store.read_table("outcomes", "delivery-events-00000.parquet").equals(before_outcomes)
    assert dead_letters.read_chunk(store, "events-00000").equals(before_dead)
    assert chunk_row(ledger, "events-00000").submissions == 1


def test_a_forced_replay_sends_the_recorded_bytes_and_key(store, ledger, monkeypatch):
    write_run(store, ledger, {"events-00000": events(2)})
    client = RecordingFullStory()
    run(store, ledger, client, ["events-00000"])
    (chunk,) = chunk_files.load_chunks(store, ["events-00000"])
    replay = dataclasses.replace(
        chunk, name=f"events-c{chunk.ledger_chunk_id:08d}", mode="replay", origin_run=RUN_ID
    )  # as claims.py describes a `force` replay
    report = delivery(store, ledger, client).run([replay])
    (first, again) = client.bodies
    assert again == first and client.replays == 1 and report.replayed == 1 and len(client.jobs) == 1
    assert report.items["events"] == {"delivered": 0, "rejected": 0}  # counted by the run that sent it
    assert [o[2] for o in outcomes(store, replay.name)] == ["delivered"] * 2
    assert reasons(store, replay.name)["ev-0"].startswith("force: chunk events-00000 of run")
    record = chunk_row(ledger, "events-00000")
    assert record.status == "completed" and record.submissions == 2 and record.job_id == "job-0"
    monkeypatch.setattr(lg, "wall_clock", lambda: time.time() + 25 * 3600)
    with pytest.raises(DeliveryError, match="force: .*forgets a key after 24 h"):
        delivery(store, ledger, client).run([replay])
    assert len(client.bodies) == 2


def test_resume_polls_a_recorded_job_instead_of_submitting(store, ledger):
    write_run(store, ledger, {"events-00000": events(2)})
    client = RecordingFullStory(polls_to_finish=10**6)
    with pytest.raises(DeliveryTimeout, match="re-run polls them instead of submitting"):
        run(store, ledger, client, ["events-00000"], timeout=0.05)
    record = chunk_row(ledger, "events-00000")
    assert record.status in ("submitted", "processing") and record.job_id == "job-0"
    assert set(states(ledger, ev(0, 1)).values()) == {"claimed"}
    client.polls_to_finish = 0
    client.calls.clear()
    report = run(store, ledger, client, ["events-00000"])
    assert client.creates() == [] and report.resumed == 1 and report.submitted == 0
    assert chunk_row(ledger, "events-00000").status == "completed"
    assert outcomes(store, "events-00000") == expected(range(2), {})


def test_stop_leaves_a_resumable_ledger(store, ledger):
    write_run(store, ledger, {"events-00000": events(2)})
    client = RecordingFullStory(polls_to_finish=10**6)
    loop = delivery(store, ledger, client)
    original = client.get_batch_status

    def status_then_kill(kind, job_id):  # on_kill arrives while the job is being polled
        loop.stop()
        return original(kind, job_id)

    client.get_batch_status = status_then_kill
    with pytest.raises(DeliveryError, match="kept in the ledger for a re-run: events-00000 \\(job job-0\\)"):
        loop.run(chunk_files.load_chunks(store, ["events-00000"]))
    record = chunk_row(ledger, "events-00000")
    assert record.status == "processing" and record.job_id == "job-0" and record.job_status == "PROCESSING"
    assert not store.exists("outcomes", "delivery-events-00000.parquet")
    client.get_batch_status, client.polls_to_finish = original, 0
    report = run(store, ledger, client, ["events-00000"])
    assert len(client.creates()) == 1 and report.resumed == 1
    assert outcomes(store, "events-00000") == expected(range(2), {})


# ---- FullStory's verdicts ------------------------------------------------------------------------------


def test_rejections_are_matched_by_event_id_when_the_echo_differs_in_bytes(store, ledger):
    same = [{"name": "Same", "user": {"uid": "u"}, "timestamp": TS}] * 4  # identical but for datafly_event_id
    write_run(store, ledger, {"events-00000": same + events(2)})
    client = RecordingFullStory(reject=ev(1, 3, 5), echo=reformat)
    report = run(store, ledger, client, ["events-00000"])
    assert report.items["events"] == {"delivered": 3, "rejected": 3} and report.unmatched_errors == 0
    assert report.unknown_items == 0
    assert outcomes(store, "events-00000") == expected(
        range(6), {1: "rejected", 3: "rejected", 5: "rejected"}
    )
    assert reasons(store, "events-00000")["ev-3"] == "invalid_argument: rejected ev-3"
    assert states(ledger, ev(*range(6))) == dict(
        zip(ev(*range(6)), ["delivered", "rejected"] * 3, strict=True)
    )
    rejected = ledger.lookup(DESTINATION, ev(5))["ev-5"]
    assert (rejected.code, rejected.message) == ("invalid_argument", "rejected ev-5")
    dead = dead_letters.read_chunk(store, "events-00000").to_pylist()
    assert [(d["item_index"], d["rows"], d["event_ids"]) for d in dead] == [
        (1, [1], ev(1)),
        (3, [3], ev(3)),
        (5, [5], ev(5)),
    ]
    record = chunk_row(ledger, "events-00000")
    assert {d["job_id"] for d in dead} == {"job-0"} and {d["idempotency_key"] for d in dead} == {
        record.idempotency_key
    }
    assert orjson.loads(dead[0]["item"]) == {**same[0], "properties": {"datafly_event_id": "ev-1"}}  # as sent
    assert (record.status, record.job_status, record.delivered_items, record.rejected_items) == (
        "completed",
        "FAILED",
        3,
        3,
    )
    assert client.calls.count(("imports", "events", "job-0")) == 0  # every counted error was matched


def test_user_rejections_are_matched_by_uid_for_every_folded_row(store, ledger):
    write_run(store, ledger, {"users-00000": users("u1", "bad", "u3")}, rows_per_item=2)
    echo = lambda item: {"id": "fs-1", **reformat(item)}  # noqa: E731 - FullStory adds its own user id
    report = run(store, ledger, RecordingFullStory(reject={"bad"}, echo=echo), ["users-00000"])
    assert report.items["users"] == {"delivered": 2, "rejected": 1}
    assert outcomes(store, "users-00000") == [
        (r, f"ev-{r}", "rejected" if r in (2, 3) else "delivered") for r in range(6)
    ]
    out = store.read_table("outcomes", "delivery-users-00000.parquet").to_pylist()
    assert {o["kind"] for o in out} == {"user"} and out[2]["reason"] == "invalid_argument: rejected bad"
    (dead,) = dead_letters.read_chunk(store, "users-00000").to_pylist()
    assert (dead["item_index"], dead["rows"], dead["event_ids"], dead["kind"]) == (
        1,
        [2, 3],
        ev(2, 3),
        "user",
    )
    assert orjson.loads(dead["item"]) == users("bad")[0]


def test_more_errors_than_listed_makes_unlisted_rows_unknown_unless_imported(store, ledger):
    write_run(store, ledger, {"events-00000": events(5)})
    client = RecordingFullStory(reject=ev(0), silent=ev(3), echo=reformat)  # counts 2 errors, lists 1
    report = run(store, ledger, client, ["events-00000"])
    assert ("imports", "events", "job-0") in client.calls
    assert outcomes(store, "events-00000") == expected(range(5), {0: "rejected", 3: "unknown"})
    assert reasons(store, "events-00000")["ev-3"].startswith(
        "FullStory's job job-0 counted 2 failed item(s) but "
        "only 1 could be matched to a line by datafly_event_id"
    )
    assert states(ledger, ev(*range(5))) == {
        "ev-0": "rejected",
        "ev-1": "delivered",
        "ev-2": "delivered",
        "ev-3": "unknown",
        "ev-4": "delivered",
    }
    assert ledger.lookup(DESTINATION, ev(3))["ev-3"].code == "unmatched_error"
    record = chunk_row(ledger, "events-00000")
    assert (record.delivered_items, record.rejected_items, record.unknown_items, record.errors) == (
        3,
        1,
        1,
        2,
    )
    assert report.items["events"] == {"delivered": 3, "rejected": 1} and report.unknown_items == 1
    assert len(dead_letters.read_chunk(store, "events-00000")) == 1  # unknown is no dead letter


def test_without_an_imports_list_no_unmatched_row_counts_as_delivered(store, ledger):
    write_run(store, ledger, {"events-00000": events(4)})
    client = RecordingFullStory(reject=ev(1), list_imports=False, unnamed_errors=1)  # 2 errors, 1 named
    report = run(store, ledger, client, ["events-00000"])
    assert outcomes(store, "events-00000") == expected(
        range(4), {0: "unknown", 1: "rejected", 2: "unknown", 3: "unknown"}
    )
    assert report.unmatched_errors == 1 and report.unknown_items == 3
    assert report.items["events"] == {"delivered": 0, "rejected": 1}
    dead = dead_letters.read_chunk(store, "events-00000").to_pylist()
    assert [(d["item_index"], d["code"], d["rows"]) for d in dead] == [
        (1, "invalid_argument", [1]),
        (-1, "internal", []),
    ]
    assert orjson.loads(dead[1]["item"]) == {"name": "mystery-0"}


def test_a_refused_batch_rejects_every_row(store, ledger):
    write_run(store, ledger, {"events-00000": events(2), "events-00001": events(3)})
    report = run(
        store,
        ledger,
        RecordingFullStory(refuse=refusal(413, "payload_too_large", "too large")),
        ["events-00001"],
    )
    record = chunk_row(ledger, "events-00001")
    assert record.status == "failed" and record.error == "HTTP 413 payload_too_large: too large"
    assert report.refused == 1 and report.items["events"] == {"delivered": 0, "rejected": 3}
    assert outcomes(store, "events-00001") == expected(range(2, 5), dict.fromkeys(range(2, 5), "rejected"))
    assert set(reasons(store, "events-00001").values()) == {"payload_too_large: too large"}
    assert set(states(ledger, ev(2, 3, 4)).values()) == {"rejected"}
    dead = dead_letters.read_chunk(store, "events-00001").to_pylist()
    assert [(d["item_index"], d["rows"], d["code"]) for d in dead] == [
        (i, [i + 2], "payload_too_large") for i in range(3)
    ]
    assert chunk_row(ledger, "events-00000").status == "claimed"  # the other chunk was not asked for
    client = RecordingFullStory()
    assert run(store, ledger, client, ["events-00001"]).already_complete == 1 and client.calls == []


# ---- what the ledger says decides ----------------------------------------------------------------------


@pytest.mark.parametrize(("point", "replays", "jobs"), [("before_post", 0, 1), ("after_post", 1, 1)])
def test_a_chunk_posting_without_a_job_id_is_reposted_with_its_key(
    store, ledger, monkeypatch, point, replays, jobs
):
    write_run(store, ledger, {"events-00000": events(3)})
    client = RecordingFullStory()
    kill_at(monkeypatch, point)
    with pytest.raises(Killed):
        run(store, ledger, client, ["events-00000"])
    record = chunk_row(ledger, "events-00000")
    assert (record.status, record.job_id, record.submissions) == ("posting", None, 1)
    assert record.first_post_at is not None
    assert len(client.bodies) == (0 if point == "before_post" else 1)
    monkeypatch.setattr(loop, "fault_point", NO_FAULT)
    report = run(store, ledger, client, ["events-00000"])
    (chunk,) = chunk_files.load_chunks(store, ["events-00000"])
    assert {(k, b) for _, k, b in client.bodies} == {
        (record.idempotency_key, chunk_files.batch_body(chunk_files.read_lines(chunk, record.sha256)))
    }
    assert client.replays == replays and len(client.jobs) == jobs
    assert (report.reposted, report.submitted) == (1, 0)
    after = chunk_row(ledger, "events-00000")
    assert (after.status, after.job_id, after.submissions, after.first_post_at) == (
        "completed",
        "job-0",
        2,
        record.first_post_at,
    )
    assert outcomes(store, "events-00000") == expected(range(3), {})


def test_a_posting_chunk_older_than_23_hours_is_not_sent_again(store, ledger, monkeypatch):
    client = lost_answer(store, ledger, monkeypatch, 3)
    monkeypatch.setattr(lg, "wall_clock", lambda: time.time() + 25 * 3600)
    report = run(store, ledger, client, ["events-00000"])
    assert len(client.bodies) == 1 and len(client.creates()) == 1  # the lost first POST only
    assert outcomes(store, "events-00000") == expected(range(3), dict.fromkeys(range(3), "unknown"))
    why = reasons(store, "events-00000")["ev-0"]
    assert (
        "FullStory forgets a key after 24 h" in why
        and chunk_row(ledger, "events-00000").idempotency_key in why
    )
    assert set(states(ledger, ev(0, 1, 2)).values()) == {"unknown"}
    assert ledger.lookup(DESTINATION, ev(0))["ev-0"].code == "key_expired"
    record = chunk_row(ledger, "events-00000")
    assert (record.status, record.unknown_items, record.job_id) == ("unknown", 3, None)
    assert report.unknown_items == 3 and report.items["events"] == {"delivered": 0, "rejected": 0}
    assert len(dead_letters.read_chunk(store, "events-00000")) == 0  # unknown is no dead letter
    client.calls.clear()
    assert run(store, ledger, client, ["events-00000"]).already_complete == 1 and client.calls == []


def test_a_posting_chunk_is_reposted_when_the_clock_has_not_moved(store, ledger, monkeypatch):
    """A key age of exactly 0 s is young: a chunk re-run within the same clock tick as its first POST (a
    coarse or frozen clock) is re-POSTed under its key, not declared expired."""
    monkeypatch.setattr(lg, "wall_clock", lambda: 1_800_000_000.0)
    client = lost_answer(store, ledger, monkeypatch, 2)
    report = run(store, ledger, client, ["events-00000"])
    assert report.unknown_items == 0 and report.reposted == 1
    assert outcomes(store, "events-00000") == expected(range(2), {})


def test_a_repost_answered_key_in_use_does_not_reject_the_rows(store, ledger, monkeypatch):
    """A re-POST of a `posting` chunk (the first POST may have been imported) that FullStory answers 409
    idempotency_key_in_use (the first request under the key still runs) rejects no row: the chunk stays
    `posting` for a later try, since rejecting the rows would let replay_dead_letters import them twice."""
    client = lost_answer(store, ledger, monkeypatch, 2)
    client.refuse = refusal(
        409, "idempotency_key_in_use", "a request with this Idempotency-Key is in progress"
    )
    try:
        run(store, ledger, client, ["events-00000"])
    except (DeliveryError, Refused):
        pass  # stopping is fine; rejecting rows FullStory may hold is not
    assert set(states(ledger, ev(0, 1)).values()) <= {"claimed", "delivered"}
    assert chunk_row(ledger, "events-00000").status != "failed"


def test_an_abandoned_chunk_sends_nothing(store, ledger):
    write_run(store, ledger, {"users-00000": users("u0"), "events-00000": events(2)})
    events_id = chunk_row(ledger, "events-00000").id
    assert ledger.abandon_stale_chunks([events_id], updated_before=float("inf")) == {events_id}
    client = RecordingFullStory()
    report = run(store, ledger, client, ["users-00000", "events-00000"])
    assert [c[1] for c in client.creates()] == ["users"]
    assert (report.abandoned, report.submitted, report.done) == (1, 1, 2)
    assert report.items["events"] == {"delivered": 0, "rejected": 0}
    assert outcomes(store, "events-00000") == expected(range(1, 3), dict.fromkeys(range(1, 3), "pending"))
    assert "taken over by another run" in reasons(store, "events-00000")["ev-1"]
    assert chunk_row(ledger, "events-00000").status == "abandoned"
    assert set(states(ledger, ev(1, 2)).values()) == {"claimed"}


def test_a_changed_payload_file_is_refused_and_never_sent(store, ledger):
    write_run(store, ledger, {"events-00000": events(2)})
    (chunk,) = chunk_files.load_chunks(store, ["events-00000"])
    original = store.read_bytes("payloads", "events-00000.jsonl")
    store.write_bytes(
        original.replace(b"Order Completed", b"Order Changed!!"), "payloads", "events-00000.jsonl"
    )
    client = RecordingFullStory()
    with pytest.raises(
        DeliveryError, match="changed after it was recorded .* cannot be sent. Restore the file"
    ):
        run(store, ledger, client, ["events-00000"])
    assert client.calls == [] and set(states(ledger, ev(0, 1)).values()) == {"claimed"}
    assert not store.exists("outcomes", "delivery-events-00000.parquet")
    store.write_bytes(original, "payloads", "events-00000.jsonl")  # restored: sent once, as recorded
    run(store, ledger, client, ["events-00000"])
    assert [b for _, _, b in client.bodies] == [
        chunk_files.batch_body(chunk_files.read_lines(chunk, chunk.sha256))
    ]
    assert outcomes(store, "events-00000") == expected(range(2), {})


def test_a_refused_changed_file_leaves_its_chunk_unsent(store, ledger, monkeypatch):
    """A chunk refused for a changed file is not recorded as POSTed (the sha256 is checked before the
    claimed -> posting compare-and-set): restored even 23 h later, it is sent, not declared `unknown`."""
    write_run(store, ledger, {"events-00000": events(2)})
    original = store.read_bytes("payloads", "events-00000.jsonl")
    store.write_bytes(original + original[:10], "payloads", "events-00000.jsonl")
    client = RecordingFullStory()
    with pytest.raises(DeliveryError, match="changed after it was recorded"):
        run(store, ledger, client, ["events-00000"])
    store.write_bytes(original, "payloads", "events-00000.jsonl")
    monkeypatch.setattr(lg, "wall_clock", lambda: time.time() + 25 * 3600)
    run(store, ledger, client, ["events-00000"])
    assert outcomes(store, "events-00000") == expected(range(2), {})
    assert len(client.bodies) == 1


def test_a_chunk_of_another_destination_is_not_sent(store, ledger):
    """A chunk the ledger holds for one FullStory org is never POSTed to another: the delivery checks
    the chunk's destination against its own before sending."""
    write_run(store, ledger, {"events-00000": events(2)})
    client = RecordingFullStory()
    with pytest.raises(DeliveryError):
        loop.Delivery(store, client, ledger, "o-OTHER-eu1@eu1", fast()).run(
            chunk_files.load_chunks(store, ["events-00000"])
        )
    assert client.calls == []


# ---- dry run, users first ------------------------------------------------------------------------------


def test_dry_run_writes_outcomes_only(store, ledger):
    write_run(store, ledger, {"users-00000": users("u0"), "events-00000": events(2)})
    report = loop.Delivery(store, None, None, None).dry_run(
        chunk_files.load_chunks(store, ["users-00000", "events-00000"])
    )
    assert (report.dry_run_rows, report.done, report.batches) == (3, 2, 0)
    assert outcomes(store, "events-00000") == expected(range(1, 3), dict.fromkeys(range(1, 3), "dry_run"))
    assert outcomes(store, "users-00000") == [(0, "ev-0", "dry_run")]
    assert {c.status for c in ledger.chunks_of_run(DESTINATION, RUN_ID)} == {"claimed"}
    assert {c.submissions for c in ledger.chunks_of_run(DESTINATION, RUN_ID)} == {0}
    assert set(states(ledger, ev(0, 1, 2)).values()) == {"claimed"}
    assert not store.exists(dead_letters.FOLDER)


def test_undelivered_users_blocks_events(store, ledger):
    write_run(
        store,
        ledger,
        {
            "users-00000": users("u"),
            "users-00001": users("v"),
            "users-00002": users("w"),
            "events-00000": events(1),
        },
    )
    just_events = chunk_files.load_chunks(store, ["events-00000"])
    assert order.undelivered_users(store, ledger, just_events) == [
        "users-00000",
        "users-00001",
        "users-00002",
    ]
    every = chunk_files.load_chunks(store, ["users-00000", "users-00001", "users-00002", "events-00000"])
    assert order.undelivered_users(store, ledger, every) == []
    assert (
        order.undelivered_users(store, ledger, chunk_files.load_chunks(store, ["users-00000"])) == []
    )  # no events asked for
    run(store, ledger, RecordingFullStory(), ["users-00000"])
    with pytest.raises(DeliveryTimeout):
        run(store, ledger, RecordingFullStory(polls_to_finish=10**6), ["users-00001"], timeout=0.02)
    w = chunk_row(ledger, "users-00002").id
    assert ledger.abandon_stale_chunks([w], updated_before=float("inf")) == {
        w
    }  # another run delivers those rows
    assert order.undelivered_users(store, ledger, just_events) == ["users-00001"]  # in flight: still waiting
