"""The delivery's poll schedule (delivery/loop.py `PollSchedule`): once a job of the delivery has ended, the
first status poll of a job waits for the time jobs took per item, so a job costs a POST and one poll (two
when it runs longer than the last ones) however long FullStory takes; before that, one job probes with
waits growing 1.5x from `poll_interval` while the others wait for what it teaches."""

from __future__ import annotations

import time

import orjson
import pytest

from include.datafly_fullstory import chunks as chunk_files
from include.datafly_fullstory.delivery import loop
from include.datafly_fullstory.state import RunStore
from tests.run_helpers import DESTINATION, sqlite_ledger, write_run

RUN_ID = "manual__2026-03-01T10:00:00+00:00"


def settings(**kw) -> loop.DeliverySettings:
    return loop.DeliverySettings(**{"poll_interval": 2.0, "max_poll_interval": 30.0, **kw})


def flight(items: int, posted: float | None) -> loop._Flight:
    return loop._Flight(None, "job-1", 0.0, 2.0, items=items, posted=posted)


def test_the_first_poll_waits_for_what_jobs_took_per_item():
    schedule = loop.PollSchedule(settings())
    assert schedule.first_wait(10_000) == 2.0  # nothing learned yet: poll_interval
    schedule.ended(flight(10_000, posted=100.0), now=120.0)  # found ended at its first poll: <= 20 s
    assert schedule.first_wait(10_000) == pytest.approx(20.0)
    assert schedule.first_wait(20_000) == pytest.approx(40.0)  # a job twice the size, twice the time
    assert schedule.first_wait(10) == 2.0  # never sooner than poll_interval
    assert schedule.first_wait(10**9) == 300.0  # never later than 10 x max_poll_interval
    job = flight(10_000, posted=200.0)
    job.processing_at = 206.0  # found processing 6 s in, ended by 14 s: about 10 s
    schedule.ended(job, now=214.0)
    assert schedule.first_wait(10_000) == pytest.approx(15.0)  # the average of 20 and 10


def test_new_jobs_are_polled_after_the_expected_time_then_a_tenth_of_it(monkeypatch):
    monkeypatch.setattr(loop.random, "uniform", lambda a, b: 1.0)
    schedule = loop.PollSchedule(settings())
    first = schedule.flight(None, "job-1", 50.0, 10_000, posted=50.0)
    assert (first.next_poll, first.interval) == (52.0, 2.0)  # nothing learned: poll_interval
    schedule.ended(flight(10_000, posted=0.0), now=40.0)  # 4 ms per item
    job = schedule.flight(None, "job-2", 100.0, 10_000, posted=100.0)
    assert job.next_poll == pytest.approx(140.0)
    schedule.still_processing(job, 140.0)
    assert job.next_poll == pytest.approx(144.0)  # a tenth of the expected 40 s
    schedule.still_processing(job, 144.0)
    assert job.next_poll == pytest.approx(150.0)  # then 1.5x
    resumed = schedule.flight(None, "job-3", 500.0, 10_000, posted=None)
    assert resumed.next_poll == 500.0  # a job resumed from the ledger is polled at once


def test_before_anything_is_learned_one_job_probes_and_the_others_wait_for_it(monkeypatch):
    monkeypatch.setattr(loop.random, "uniform", lambda a, b: 1.0)
    schedule = loop.PollSchedule(settings())
    probe = schedule.flight(None, "job-1", 0.0, 10_000, posted=0.0)
    others = [
        schedule.flight(None, f"job-{i}", 0.5, items, posted=0.5) for i, items in ((2, 10_000), (3, 20_000))
    ]
    assert probe.next_poll == 2.0 and schedule.probe is probe
    assert [o.next_poll for o in others] == [30.5, 30.5]  # every max_poll_interval until the probe ends
    schedule.still_processing(probe, 2.0)
    probe.next_poll = 40.0
    schedule.ended(probe, now=40.0)  # ended between 2 s and 40 s: 21 s for 10,000 items
    assert schedule.first_wait(10_000) == pytest.approx(21.0)
    # expected 21 s / 42 s after they were posted: the first is overdue (polled at once), the second not yet
    assert [o.next_poll for o in others] == pytest.approx([40.0, 42.5])
    assert schedule.probe is None and schedule.waiting == []
    late = schedule.flight(None, "job-4", 50.0, 10_000, posted=50.0)
    assert late.next_poll == pytest.approx(71.0)  # learned: no probe any more


def test_a_probe_that_teaches_nothing_hands_over_to_a_waiting_job():
    schedule = loop.PollSchedule(settings())
    probe = schedule.flight(None, "job-1", 0.0, 10_000, posted=0.0)
    waiting = schedule.flight(None, "job-2", 0.0, 10_000, posted=0.0)
    probe.posted = None  # (say) nothing to learn from
    schedule.ended(probe, now=5.0)
    assert schedule.probe is waiting and waiting.next_poll == 7.0


def test_resumed_jobs_teach_nothing():
    schedule = loop.PollSchedule(settings())
    schedule.ended(flight(10_000, posted=None), now=500.0)  # resumed from the ledger: posted unknown
    schedule.ended(flight(0, posted=1.0), now=500.0)
    assert schedule.first_wait(10_000) == 2.0


def test_still_processing_backs_off_from_poll_interval(monkeypatch):
    monkeypatch.setattr(loop.random, "uniform", lambda a, b: 1.0)
    schedule = loop.PollSchedule(settings())
    job = flight(10_000, posted=0.0)
    waits = []
    for now in range(6):
        schedule.still_processing(job, float(now))
        waits.append(job.next_poll - now)
    assert waits == pytest.approx([3.0, 4.5, 6.75, 10.125, 15.1875, 22.78125])
    assert job.processing_at == 5.0
    schedule.still_processing(job, 0.0)
    assert job.next_poll == 30.0  # capped at max_poll_interval


class TimedFullStory:
    """Batch jobs that end `seconds` after they were created (monotonic time); records every call."""

    refused_error = RuntimeError

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.jobs: dict[str, tuple[float, int]] = {}
        self.calls: list[tuple[str, str]] = []

    def create_batch(self, kind, body, idempotency_key):
        job_id = f"job-{len(self.jobs)}"
        self.jobs[job_id] = (time.monotonic(), len(orjson.loads(body)["requests"]))
        self.calls.append(("create", job_id))
        return {"id": job_id, "status": "PROCESSING"}

    def get_batch_status(self, kind, job_id):
        self.calls.append(("status", job_id))
        created, items = self.jobs[job_id]
        if time.monotonic() - created < self.seconds:
            return {"imports": 0, "errors": 0, "job": {"id": job_id, "status": "PROCESSING"}}
        return {"imports": items, "errors": 0, "job": {"id": job_id, "status": "COMPLETED"}}

    def iter_batch_errors(self, kind, job_id):
        self.calls.append(("errors", job_id))
        return iter(())

    def iter_batch_imports(self, kind, job_id):
        self.calls.append(("imports", job_id))
        return iter(())

    def http_stats(self):
        return {"requests": len(self.calls), "retries": 0, "status_counts": {}}


def test_after_the_first_job_a_job_costs_a_post_and_one_or_two_polls(tmp_path):
    store, ledger = RunStore(str(tmp_path / "state"), RUN_ID), sqlite_ledger(tmp_path)
    names = [f"events-{c:05d}" for c in range(8)]
    write_run(
        store,
        ledger,
        {
            name: [
                {"name": "Viewed", "user": {"uid": f"u{i}"}, "properties": {"n": i}} for i in range(c, c + 10)
            ]
            for c, name in zip(range(0, 80, 10), names, strict=True)
        },
    )
    client = TimedFullStory(seconds=0.15)
    fast = settings(poll_interval=0.01, max_poll_interval=0.05, max_in_flight=1, timeout=60)
    report = loop.Delivery(store, client, ledger, DESTINATION, fast).run(
        chunk_files.load_chunks(store, names)
    )
    assert report.items["events"]["delivered"] == 80
    polls = [sum(1 for c in client.calls if c == ("status", job)) for job in client.jobs]
    assert polls[0] >= 4  # nothing learned yet: 0.01 s, then 1.5x per poll, until 0.15 s passed
    assert sum(polls[1:]) <= 2 * len(polls[1:])  # then one poll per job, or two when it ran long
    assert all(c[0] in ("create", "status") for c in client.calls)  # no error pages for clean jobs


def test_jobs_posted_together_cost_a_post_and_about_one_poll_but_the_probe(tmp_path):
    """A delivery task's chunks, all in flight at once: the probe pays the backoff, the others one poll."""
    store, ledger = RunStore(str(tmp_path / "state"), RUN_ID), sqlite_ledger(tmp_path)
    names = [f"events-{c:05d}" for c in range(4)]
    write_run(
        store,
        ledger,
        {
            name: [
                {"name": "Viewed", "user": {"uid": f"u{i}"}, "properties": {"n": i}} for i in range(c, c + 10)
            ]
            for c, name in zip(range(0, 40, 10), names, strict=True)
        },
    )
    client = TimedFullStory(seconds=0.15)
    fast = settings(poll_interval=0.01, max_poll_interval=0.5, max_in_flight=4, timeout=60)
    report = loop.Delivery(store, client, ledger, DESTINATION, fast).run(
        chunk_files.load_chunks(store, names)
    )
    assert report.items["events"]["delivered"] == 40
    polls = [sum(1 for c in client.calls if c == ("status", job)) for job in client.jobs]
    assert polls[0] >= 4  # the probe: 0.01 s, then 1.5x per poll, until 0.15 s passed
    assert all(p <= 2 for p in polls[1:]), polls  # the others waited for it: polled once (twice if late)
