"""The delivery timeline (delivery/timeline.py) as the delivery loop records it, and its figures
(report/deliveries.py). The loop runs against the recording FullStory stand-in of the loop's unit tests
(tests/unit/test_delivery_loop.py), here with HTTP counters that retries and 429s move, and against the
SQLite ledger; a wall clock that ticks one second per reading makes every time exact.
"""

from __future__ import annotations

import itertools

import pytest

from include.datafly_fullstory import chunks as chunk_files
from include.datafly_fullstory.delivery import loop, timeline
from include.datafly_fullstory.report import deliveries
from include.datafly_fullstory.state import RunStore
from tests.run_helpers import DESTINATION, sqlite_ledger, write_run
from tests.unit.test_delivery_loop import RUN_ID, RecordingFullStory, events, fast, users


class CountingFullStory(RecordingFullStory):
    """The stand-in, with the hook's counters: the POSTs named in `throttle` met `n` 429s (retried)."""

    def __init__(self, throttle: dict[str, int] | None = None, **kw):
        super().__init__(**kw)
        self.throttle = throttle or {}
        self.retries, self.statuses = 0, {}

    def create_batch(self, kind, body, idempotency_key):
        job = super().create_batch(kind, body, idempotency_key)
        for _ in range(self.throttle.get(kind, 0)):
            self.retries += 1
            self.statuses["429"] = self.statuses.get("429", 0) + 1
        return job

    def http_stats(self):
        return {
            "requests": len(self.calls) + self.retries,
            "retries": self.retries,
            "status_counts": dict(self.statuses),
        }


class Killed(BaseException):
    """The task's process died here."""


@pytest.fixture
def store(tmp_path):
    return RunStore(str(tmp_path / "state"), RUN_ID)


@pytest.fixture
def ledger(tmp_path):
    return sqlite_ledger(tmp_path)


def ticking(start: float = 1_800_000_000.0):
    count = itertools.count()
    return lambda: start + next(count)


def deliver(store, ledger, client, names, wall):
    chunks = chunk_files.load_chunks(store, names)
    return loop.Delivery(store, client, ledger, DESTINATION, fast(), wall=wall).run(chunks)


def test_each_job_has_its_times_items_outcome_retries_and_429s(store, ledger):
    write_run(
        store,
        ledger,
        {"users-00000": users("u0", "u1"), "events-00000": events(3), "events-00001": events(4, 10)},
    )
    client = CountingFullStory(throttle={"events": 2}, reject={"ev-3"})
    names = ["users-00000", "events-00000", "events-00001"]
    deliver(store, ledger, client, names, ticking())
    assert store.list(timeline.FOLDER) == ["timeline-users-00000.json"]
    (entry,) = timeline.read_timelines(store).tries
    assert entry["ended"] == "finished" and entry["chunks"] == names
    jobs = {j["chunk"]: j for j in entry["jobs"]}
    assert [j["chunk"] for j in entry["jobs"]] == names  # in the order they were sent
    for name, items in (("users-00000", 2), ("events-00000", 3), ("events-00001", 4)):
        job = jobs[name]
        assert job["items"] == items and job["mode"] == "deliver" and job["job_id"].startswith("job-")
        assert entry["started_at"] < job["submitted_at"] < job["finished_at"] < entry["ended_at"]
        assert job["polls"] >= 1
    assert (jobs["events-00000"]["delivered"], jobs["events-00000"]["rejected"]) == (2, 1)
    assert jobs["events-00000"]["outcome"] == "failed" and jobs["users-00000"]["outcome"] == "completed"
    assert [(j["retries"], j["throttled"]) for j in entry["jobs"]] == [(0, 0), (2, 2), (2, 2)]
    assert [(c["chunk"], c["call"], c["retries"], c["throttled"]) for c in entry["calls"]] == [
        ("events-00000", "post", 2, 2),
        ("events-00001", "post", 2, 2),
    ]
    assert entry["http"] == {"requests": client.http_stats()["requests"], "retries": 4, "throttled": 4}


def test_a_killed_try_and_its_retry_are_both_on_the_timeline(store, ledger, monkeypatch):
    write_run(store, ledger, {"events-00000": events(3)})
    client = CountingFullStory(polls_to_finish=2)

    def killed_while_polling(name):
        if name == "while_polling":
            raise Killed(name)

    monkeypatch.setattr(loop, "fault_point", killed_while_polling)
    with pytest.raises(Killed):
        deliver(store, ledger, client, ["events-00000"], ticking(1_800_000_000.0))
    monkeypatch.setattr(loop, "fault_point", lambda name: None)
    deliver(store, ledger, client, ["events-00000"], ticking(1_800_000_100.0))
    first, second = timeline.read_timelines(store).tries
    assert first["ended"] == "Killed" and second["ended"] == "finished"
    (killed,) = first["jobs"]
    assert killed["mode"] == "deliver" and killed["finished_at"] is None and killed["outcome"] == "running"
    (resumed,) = second["jobs"]
    assert (
        resumed["mode"] == "resume" and resumed["submitted_at"] is None and resumed["outcome"] == "completed"
    )
    assert len(client.creates()) == 1  # the retry polled the recorded job

    d = deliveries.delivery_data(timeline.read_timelines(store))
    assert (d["tries"], d["jobs"], d["jobs_finished"], d["items_finished"]) == (2, 2, 1, 3)
    assert d["ended"] == ["Killed", "finished"]
    steps = d["series"]["in_flight"]
    assert max(n for _, n in steps) == 1 and steps[-1][1] == 0
    # in flight from the POST to the kill, then from the retry's start until its results were recorded
    begins = [t for (t, n), (_, before) in zip(steps[1:], steps, strict=False) if n > before]
    assert begins == [
        killed["submitted_at"] - first["started_at"],
        second["started_at"] - first["started_at"],
    ]


def test_a_timeline_that_cannot_be_written_does_not_stop_delivery(store, ledger, monkeypatch, caplog):
    write_run(store, ledger, {"events-00000": events(2)})
    original = RunStore.write_json

    def refuse_timeline(self, obj, *parts):
        if parts and parts[0] == timeline.FOLDER:
            raise OSError("disk full")
        return original(self, obj, *parts)

    monkeypatch.setattr(RunStore, "write_json", refuse_timeline)
    report = deliver(store, ledger, RecordingFullStory(), ["events-00000"], ticking())
    assert report.items["events"] == {"delivered": 2, "rejected": 0}
    assert store.exists("outcomes", "delivery-events-00000.parquet")
    assert not store.exists(timeline.FOLDER)
    assert "delivery timeline: could not write" in caplog.text


def test_unreadable_timeline_files_are_named_and_the_rest_is_read(store, ledger):
    write_run(store, ledger, {"events-00000": events(2)})
    deliver(store, ledger, RecordingFullStory(), ["events-00000"], ticking())
    store.write_bytes(b"{torn", timeline.FOLDER, "timeline-events-00009.json")
    files = timeline.read_timelines(store)
    assert len(files.tries) == 1 and files.unreadable == ["timeline-events-00009.json: JSONDecodeError"]


def test_bucket_widths_are_round_and_bounded():
    assert deliveries.bucket_width(0.5) == 0.01
    assert deliveries.bucket_width(59) == 1.0
    assert deliveries.bucket_width(3600) == 60.0
    for span in (0.001, 1.7, 42.0, 999.0, 86_400.0, 10**6):
        assert span / deliveries.bucket_width(span) <= deliveries.MAX_BUCKETS
