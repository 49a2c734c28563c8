"""The ledger's database API (include/datafly_fullstory/ledger/) on a real SQLite file and a real Postgres.

Most tests run twice through `ledger_url` (tests/db_servers.py, a pytest plugin tests/conftest.py lists): on
a fresh SQLite file and on a fresh database of the session's Postgres server.
Races are real threads or spawned processes against one database.
"""

from __future__ import annotations

import multiprocessing
import re
import sqlite3
import threading
import uuid

import pytest
import sqlalchemy as sa

from include.datafly_fullstory import ledger as L
from include.datafly_fullstory.ledger import ClaimLost, Ledger, LedgerError, NewItem

DEST = "o-LOCAL-na1@na1"
OTHER_DEST = "o-OTHER-eu1@eu1"
WINDOW = ("2026-11-20T10:00:00+00:00", "2026-11-20T11:00:00+00:00")
T0 = 1_800_000_000.0  # the moved wall clock starts here
EVENT_TIME = 1_790_000_000.0


def eids(n: int, start: int = 0, prefix: str = "ev") -> list[str]:
    return [f"{prefix}-{i:06d}" for i in range(start, start + n)]


def new(event_ids, event_time: float | None = EVENT_TIME) -> list[NewItem]:
    return [NewItem(e, "event", uid=f"u-{e}", event_time=event_time) for e in event_ids]


def register(led: Ledger, run: str, name: str, event_ids, *, key: str | None = None):
    return led.register_chunk(
        DEST,
        run,
        name=name,
        kind="events",
        idempotency_key=key or f"{run}/{name}",
        payload_uri=f"file:///payloads/{run}/{name}.jsonl",
        sha256="ab" * 32,
        items_count=len(event_ids),
        size=100 * len(event_ids),
        event_ids=event_ids,
    )


def owners(led: Ledger, event_ids) -> dict[str, str]:
    return {e: row.run_id for e, row in led.lookup(DEST, event_ids).items()}


def backend(url: str) -> str:
    return sa.engine.make_url(url).get_backend_name()


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def led(ledger_url) -> Ledger:
    return Ledger(ledger_url)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock(T0)
    monkeypatch.setattr(L, "wall_clock", c)
    return c


# ---- items ----------------------------------------------------------------------------------------------


def test_claims_are_exclusive_and_never_overwritten(led, clock):
    led.insert_claims(DEST, "run-a", new(eids(100)), window=WINDOW)
    clock.now += 10
    led.insert_claims(DEST, "run-b", new(eids(100, 50)), window=WINDOW)
    led.insert_claims(OTHER_DEST, "run-b", new(eids(10)), window=WINDOW)  # another org: its own rows

    rows = led.lookup(DEST, eids(200))
    assert len(rows) == 150
    assert {e for e, r in rows.items() if r.run_id == "run-a"} == set(eids(100))
    assert {e for e, r in rows.items() if r.run_id == "run-b"} == set(eids(50, 100))
    assert all(r.state == L.CLAIMED and r.chunk_id is None and r.chunk_status is None for r in rows.values())
    assert rows["ev-000060"].claimed_at == T0  # run-b's claim left run-a's row alone
    assert owners(led, eids(10)) == dict.fromkeys(eids(10), "run-a")
    assert led.known(DEST, [*eids(5, 145), "ev-999999"]) == set(eids(5, 145))
    assert led.known(OTHER_DEST, eids(20)) == set(eids(10))


def test_take_over_is_a_compare_and_set(led, clock):
    ids = eids(10)
    led.insert_claims(DEST, "run-a", new(ids), window=WINDOW)
    posted = register(led, "run-a", "events-0", ids[:3])
    assert led.begin_post(posted.id)
    dropped = register(led, "run-a", "events-1", ids[3:6])
    assert led.abandon_stale_chunks([dropped.id], updated_before=T0 + 1) == {dropped.id}
    pending = register(led, "run-a", "events-2", ids[6:8])  # registered, may still be POSTed
    clock.now = T0 + 100
    take = dict(from_states=[L.CLAIMED], window=WINDOW)

    assert led.take_over(DEST, "run-b", ids, **{**take, "from_states": [L.DELIVERED]}) == set()
    assert led.take_over(DEST, "run-b", ids, from_run="run-z", **take) == set()
    assert led.take_over(DEST, "run-b", ids, claimed_before=T0, **take) == set()  # claimed at T0: not before
    assert set(owners(led, ids).values()) == {"run-a"}

    got = led.take_over(
        DEST, "run-b", ids, from_run="run-a", claimed_before=T0 + 1, unsent_chunk_only=True, **take
    )
    assert got == set(ids[3:6] + ids[8:])  # in no chunk or an abandoned one: not a POSTed or claimed one
    rows = led.lookup(DEST, ids)
    assert all(
        rows[e].run_id == "run-b" and rows[e].chunk_id is None and rows[e].claimed_at == T0 + 100 for e in got
    )
    assert all(rows[e].run_id == "run-a" and rows[e].chunk_id == posted.id for e in ids[:3])
    assert all(rows[e].run_id == "run-a" and rows[e].chunk_id == pending.id for e in ids[6:8])
    clock.now += 1
    assert led.take_over(DEST, "run-c", ids, from_run="run-a", unsent_chunk_only=True, **take) == set()

    # A final state can be taken over too (a re-run of rejected items); code and message are cleared.
    led.finish_chunk(
        posted.id, L.C_COMPLETED, [(ids[0], L.REJECTED, "bad", "no"), (ids[1], L.DELIVERED, None, None)]
    )
    assert led.take_over(DEST, "run-c", ids, from_states=[L.REJECTED], window=WINDOW) == {ids[0]}
    row = led.lookup(DEST, [ids[0]])[ids[0]]
    assert (row.state, row.run_id, row.chunk_id, row.code, row.message) == (
        L.CLAIMED,
        "run-c",
        None,
        None,
        None,
    )
    assert led.lookup(DEST, [ids[1]])[ids[1]].state == L.DELIVERED


def test_settle_unsent_and_record_unclaimed(led, clock):
    ids = eids(6)
    led.insert_claims(DEST, "run-a", new(ids), window=WINDOW)
    led.insert_claims(DEST, "run-b", new(["ev-other"]), window=WINDOW)
    chunk = register(led, "run-a", "events-0", ids[:2])
    clock.now += 5
    led.settle_unsent(
        DEST,
        "run-a",
        [
            (ids[0], L.FILTERED, "by a rule"),
            (ids[2], L.SKIPPED, None),
            (ids[3], L.QUARANTINED, "x" * 5000),
            ("ev-other", L.INVALID, "not mine"),
        ],
    )
    rows = led.lookup(DEST, [*ids, "ev-other"])
    assert (rows[ids[0]].state, rows[ids[0]].message, rows[ids[0]].chunk_id) == (
        L.FILTERED,
        "by a rule",
        None,
    )
    assert (rows[ids[2]].state, rows[ids[2]].message, rows[ids[2]].updated_at) == (L.SKIPPED, "", T0 + 5)
    assert rows[ids[3]].state == L.QUARANTINED and len(rows[ids[3]].message) == 2000
    assert rows[ids[1]].state == L.CLAIMED and rows[ids[1]].chunk_id == chunk.id
    assert rows["ev-other"].state == L.CLAIMED  # another run's claim is not ours to settle
    with pytest.raises(LedgerError):
        led.settle_unsent(DEST, "run-a", [(ids[4], L.FILTERED, None), (ids[5], L.DELIVERED, None)])
    assert led.lookup(DEST, [ids[4]])[ids[4]].state == L.CLAIMED  # nothing written

    led.record_unclaimed(DEST, "run-a", new(["ev-q1", ids[5]]), L.QUARANTINED, window=WINDOW)
    rows = led.lookup(DEST, ["ev-q1", ids[5]])
    assert rows["ev-q1"].state == L.QUARANTINED and rows[ids[5]].state == L.CLAIMED
    with pytest.raises(LedgerError):
        led.record_unclaimed(DEST, "run-a", new(["ev-q2"]), L.CLAIMED, window=WINDOW)
    assert led.known(DEST, ["ev-q2"]) == set()


def test_stale_claims_and_orphaned_chunks_follow_the_clock(led, clock):
    lease = L.DEFAULT_CLAIM_LEASE_S
    recent, old = eids(10), eids(4, prefix="old")
    led.insert_claims(DEST, "run-a", new(recent, event_time=1000.0), window=WINDOW)
    led.insert_claims(DEST, "run-a", new(old, event_time=10.0), window=WINDOW)
    posted = register(led, "run-a", "events-0", recent[:3])
    assert led.begin_post(posted.id)
    register(led, "run-a", "events-1", recent[3:5])  # registered, never POSTed
    dropped = register(led, "run-a", "events-2", recent[5:6])
    led.abandon_stale_chunks([dropped.id], updated_before=T0 + 1)
    done = register(led, "run-a", "events-3", recent[9:])
    assert led.begin_post(done.id)
    led.finish_chunk(done.id, L.C_COMPLETED, [(recent[9], L.DELIVERED, None, None)])
    old_posted = register(led, "run-a", "events-4", old[:1])
    assert led.begin_post(old_posted.id)

    assert led.stale_claims(DEST, since=500.0, claimed_before=T0) == 0  # claimed at T0 exactly
    assert led.orphaned_chunks(DEST, since=500.0, idle_before=T0) == []

    clock.now = T0 + lease + 60
    # recent[3:9]: in an unsent chunk (claimed or abandoned) or in none; not recent[:3] (POSTed) nor recent[9]
    assert led.stale_claims(DEST, since=500.0, claimed_before=clock.now - lease) == 6
    assert led.stale_claims(DEST, since=0.0, claimed_before=clock.now - lease) == 9  # + old[1:]
    assert led.stale_claims(OTHER_DEST, since=0.0, claimed_before=clock.now) == 0
    assert [c.id for c in led.orphaned_chunks(DEST, since=500.0, idle_before=clock.now - lease)] == [
        posted.id
    ]
    assert {c.id for c in led.orphaned_chunks(DEST, since=0.0, idle_before=clock.now - lease)} == {
        posted.id,
        old_posted.id,
    }

    led.update_chunk(posted.id, job_id="job-1", status=L.C_SUBMITTED)  # it moves again: not idle
    assert led.orphaned_chunks(DEST, since=500.0, idle_before=clock.now - lease) == []
    clock.now += lease + 1
    orphans = led.orphaned_chunks(DEST, since=500.0, idle_before=clock.now - lease)
    assert [(c.id, c.status, c.job_id) for c in orphans] == [(posted.id, L.C_SUBMITTED, "job-1")]


# ---- chunks ---------------------------------------------------------------------------------------------


def test_register_chunk_assigns_its_items(led, clock):
    ids = eids(10)
    led.insert_claims(DEST, "run-a", new(ids), window=WINDOW)
    chunk = register(led, "run-a", "events-0", ids)
    assert (chunk.status, chunk.items, chunk.bytes, chunk.submissions, chunk.first_post_at) == (
        L.C_CLAIMED,
        10,
        1000,
        0,
        None,
    )
    assert sorted(i.event_id for i in led.items_of_chunk(chunk.id)) == ids
    assert led.chunk(chunk.id) == chunk
    assert led.chunks_by_id([chunk.id, chunk.id]) == {chunk.id: chunk}
    assert led.chunks_of_run(DEST, "run-a") == [chunk]
    assert led.chunks_of_run(DEST, "run-b") == []
    row = led.lookup(DEST, ids[:1])[ids[0]]
    assert (row.chunk_id, row.chunk_status) == (chunk.id, L.C_CLAIMED)
    with pytest.raises(LedgerError):
        led.chunk(chunk.id + 1000)


def test_register_chunk_raises_claim_lost_and_writes_nothing(led, clock):
    mine, theirs = eids(5), eids(5, 5)
    led.insert_claims(DEST, "run-a", new(mine), window=WINDOW)
    led.insert_claims(DEST, "run-b", new(theirs), window=WINDOW)
    with pytest.raises(ClaimLost):
        register(led, "run-a", "events-0", mine + theirs)
    assert led.chunks_of_run(DEST, "run-a") == []
    with led.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(L.chunks)).scalar_one() == 0
    rows = led.lookup(DEST, mine + theirs)
    assert all(r.chunk_id is None for r in rows.values())
    assert {e for e, r in rows.items() if r.run_id == "run-b"} == set(theirs)

    # A re-registration that loses a claim leaves the registered chunk as it was.
    chunk = register(led, "run-a", "events-0", mine, key="k1")
    with pytest.raises(ClaimLost):
        register(led, "run-a", "events-0", mine + theirs[:1], key="k2")
    assert led.chunk(chunk.id) == chunk
    assert sorted(i.event_id for i in led.items_of_chunk(chunk.id)) == mine


def test_reregistering_a_claimed_chunk_replaces_it(led, clock):
    ids = eids(10)
    led.insert_claims(DEST, "run-a", new(ids), window=WINDOW)
    first = register(led, "run-a", "events-0", ids[:6], key="k1")
    clock.now += 1
    second = register(led, "run-a", "events-0", ids[3:], key="k2")
    assert second.id == first.id
    assert (second.idempotency_key, second.items, second.status, second.updated_at) == (
        "k2",
        7,
        L.C_CLAIMED,
        T0 + 1,
    )
    assert sorted(i.event_id for i in led.items_of_chunk(first.id)) == ids[3:]
    assert all(led.lookup(DEST, ids[:3])[e].chunk_id is None for e in ids[:3])
    assert len(led.chunks_of_run(DEST, "run-a")) == 1


@pytest.mark.parametrize("status", [L.C_POSTING, L.C_SUBMITTED, L.C_COMPLETED])
def test_reregistering_a_posted_chunk_raises(led, clock, status):
    ids = eids(4)
    led.insert_claims(DEST, "run-a", new(ids), window=WINDOW)
    chunk = register(led, "run-a", "events-0", ids, key="k1")
    assert led.begin_post(chunk.id)
    if status != L.C_POSTING:
        led.update_chunk(chunk.id, status=status, job_id="job-1")
    with pytest.raises(LedgerError, match="sent already"):
        register(led, "run-a", "events-0", ids, key="k2")
    after = led.chunk(chunk.id)
    assert (after.status, after.idempotency_key) == (status, "k1")
    assert sorted(i.event_id for i in led.items_of_chunk(chunk.id)) == ids


def test_begin_post_is_true_once(led, clock):
    ids = eids(4)
    led.insert_claims(DEST, "run-a", new(ids), window=WINDOW)
    chunk = register(led, "run-a", "events-0", ids[:2])
    clock.now += 7
    assert led.begin_post(chunk.id) is True
    assert led.begin_post(chunk.id) is False
    row = led.chunk(chunk.id)
    assert (row.status, row.first_post_at, row.last_post_at, row.submissions) == (
        L.C_POSTING,
        T0 + 7,
        T0 + 7,
        1,
    )
    assert row.is_posted and row.key_age(T0 + 10) == 3
    clock.now += 5
    led.note_post(chunk.id)
    row = led.chunk(chunk.id)
    assert (row.first_post_at, row.last_post_at, row.submissions) == (T0 + 7, T0 + 12, 2)

    dropped = register(led, "run-a", "events-1", ids[2:])
    assert led.abandon_stale_chunks([dropped.id, chunk.id], updated_before=clock.now + 1) == {dropped.id}
    assert led.begin_post(dropped.id) is False
    assert led.chunk(dropped.id).status == L.C_ABANDONED
    assert led.abandon_stale_chunks([dropped.id], updated_before=0.0) == {dropped.id}  # "or before"
    assert led.begin_post(10_000) is False


def _race(workers) -> list:
    """Run the callables at once (a barrier releases them together); their results in order."""
    barrier = threading.Barrier(len(workers))
    results: list = [None] * len(workers)
    errors: list = []

    def run(i, fn):
        try:
            barrier.wait(30)
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def test_begin_post_races_have_one_winner(led):
    ids = eids(40)
    led.insert_claims(DEST, "run-a", new(ids), window=WINDOW)
    for n in range(4):
        chunk = register(led, "run-a", f"events-{n}", ids[n * 10 : (n + 1) * 10])
        wins = _race([lambda cid=chunk.id: led.begin_post(cid)] * 6)
        assert wins.count(True) == 1, wins
        assert led.chunk(chunk.id).submissions == 1


def test_abandon_and_begin_post_race_has_one_winner(led):
    ids = eids(60)
    led.insert_claims(DEST, "run-a", new(ids), window=WINDOW)
    outcomes = set()
    for n in range(6):
        chunk = register(led, "run-a", f"events-{n}", ids[n * 10 : (n + 1) * 10])
        far = L.wall_clock() + 3600
        workers = [
            lambda cid=chunk.id: led.begin_post(cid),
            lambda cid=chunk.id, far=far: cid in led.abandon_stale_chunks([cid], updated_before=far),
        ] * 3
        results = _race(workers)
        posted, abandoned = results[0::2], results[1::2]
        status = led.chunk(chunk.id).status
        if status == L.C_POSTING:
            assert posted.count(True) == 1 and not any(abandoned), results
        else:
            assert status == L.C_ABANDONED and not any(posted) and all(abandoned), results
        outcomes.add(status)
    assert outcomes <= {L.C_POSTING, L.C_ABANDONED}


def test_finish_chunk_writes_items_and_status_in_one_transaction(led, clock):
    ids = eids(1500)  # more than one batch of item updates
    led.insert_claims(DEST, "run-a", new(ids), window=WINDOW)
    chunk = register(led, "run-a", "events-0", ids)
    assert led.begin_post(chunk.id)
    led.update_chunk(chunk.id, job_id="job-1", status=L.C_SUBMITTED)
    with pytest.raises(LedgerError):
        led.update_chunk(chunk.id, no_such_field=1)
    results = [(e, L.DELIVERED, None, None) for e in ids[:-2]]
    results += [(ids[-2], L.REJECTED, "invalid_field", "bad"), (ids[-1], L.UNKNOWN, None, "lost")]

    with pytest.raises(LedgerError):
        led.finish_chunk(chunk.id, L.C_PROCESSING, results)
    with pytest.raises(sa.exc.SQLAlchemyError):  # the chunk update fails after the item updates ran
        led.finish_chunk(chunk.id, L.C_COMPLETED, results, no_such_column=1)
    assert {r.state for r in led.lookup(DEST, ids).values()} == {L.CLAIMED}
    assert led.chunk(chunk.id).status == L.C_SUBMITTED

    clock.now += 30
    led.finish_chunk(
        chunk.id, L.C_COMPLETED, results, delivered_items=1498, rejected_items=1, unknown_items=1
    )
    rows = led.lookup(DEST, ids)
    assert sum(r.state == L.DELIVERED for r in rows.values()) == 1498
    assert (rows[ids[-2]].state, rows[ids[-2]].code, rows[ids[-2]].message) == (
        L.REJECTED,
        "invalid_field",
        "bad",
    )
    assert rows[ids[-1]].state == L.UNKNOWN
    row = led.chunk(chunk.id)
    assert (
        row.status,
        row.finished_at,
        row.job_id,
        row.delivered_items,
        row.rejected_items,
        row.unknown_items,
    ) == (L.C_COMPLETED, T0 + 30, "job-1", 1498, 1, 1)
    assert row.is_terminal


# ---- runs and scans -------------------------------------------------------------------------------------


def test_start_run_twice_is_an_upsert(led, clock):
    assert led.last_run_started(DEST, before_run="run-a") is None
    led.start_run(DEST, "run-a", window=WINDOW, scan_start="2026-11-20T09:00:00+00:00")
    clock.now += 60
    led.start_run(DEST, "run-a", window=("w0", "w1"), scan_start="s1")
    clock.now += 60
    led.start_run(DEST, "run-b", window=WINDOW, scan_start="s2")
    led.finish_run(
        DEST,
        "run-a",
        counts={"read": 10, "delivered": 7, "rejected": 1, "quarantined": 2},
        late_rows=3,
        problems=["p1", "p2"],
    )
    with led.engine.connect() as conn:
        rows = conn.execute(sa.select(L.runs).where(L.runs.c.run_id == "run-a")).all()
    assert len(rows) == 1
    row = rows[0]
    assert (row.window_start, row.window_end, row.scan_start) == ("w0", "w1", "s1")
    assert (row.rows_read, row.delivered, row.rejected, row.quarantined, row.unknown, row.late_rows) == (
        10,
        7,
        1,
        2,
        0,
        3,
    )
    assert row.problems == "p1; p2" and row.finished_at == T0 + 120
    assert led.last_run_started(DEST, before_run="run-c") == T0 + 120
    assert led.last_run_started(DEST, before_run="run-b") in (T0, T0 + 60)
    assert led.last_run_started(OTHER_DEST, before_run="run-c") is None


def test_record_scans_merges_ranges_of_an_unchanged_file(led, clock):
    f1, f2 = "s3://landing/dt=2026-11-20/hour=10/a.parquet", "s3://landing/dt=2026-11-20/hour=10/b.parquet"
    led.record_scans(DEST, "run-a", [(f1, 100, 5.0), (f2, 200, 6.0)], (1000.0, 2000.0))
    led.record_scans(DEST, "run-b", [(f1, 100, 5.0)], (1500.0, 3000.0))  # overlaps: merged
    got = led.scans(DEST, [f1, f2, "s3://landing/none"])
    assert set(got) == {f1, f2}
    assert (got[f1].covered_start, got[f1].covered_end, got[f1].run_id) == (1000.0, 3000.0, "run-b")
    assert (got[f2].covered_start, got[f2].covered_end, got[f2].run_id) == (1000.0, 2000.0, "run-a")

    led.record_scans(DEST, "run-c", [(f1, 150, 5.0), (f2, 200, 7.5)], (1200.0, 1300.0))  # both changed
    got = led.scans(DEST, [f1, f2])
    assert (got[f1].size, got[f1].covered_start, got[f1].covered_end) == (150, 1200.0, 1300.0)
    assert (got[f2].mtime, got[f2].covered_start, got[f2].covered_end) == (7.5, 1200.0, 1300.0)
    assert led.scans(OTHER_DEST, [f1]) == {}


def test_repr_hides_the_password(postgres_server):
    # The session server trusts local connections, so a URL with any password connects.
    name = f"ledger_repr_{uuid.uuid4().hex[:8]}"
    url = sa.engine.make_url(postgres_server.new_database(name)).set(password="s3cret-pw")
    led = Ledger(url.render_as_string(hide_password=False))
    assert "s3cret-pw" not in repr(led)
    assert repr(led).startswith("Ledger(postgresql") and ":***@" in repr(led)
    assert led.backend == "postgresql"
    L.dispose_engines()
    postgres_server.drop_database(name)


# ---- two processes on one database ----------------------------------------------------------------------


def _claim_in_process(url: str, run_id: str, ids: list[str], barrier, out) -> None:
    """A spawned process: wait for the other, claim `ids`, read back which of them this run owns."""
    try:
        led = Ledger(url)
        barrier.wait(60)
        led.insert_claims(DEST, run_id, new(ids), window=WINDOW)
        owned = sum(1 for row in led.lookup(DEST, ids).values() if row.run_id == run_id)
        out.put((run_id, owned, None))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        out.put((run_id, -1, f"{type(exc).__name__}: {str(exc)[:400]}"))


def _open_in_process(urls: list[str], barrier, out) -> None:
    """A spawned process: open a ledger on each fresh database at the same moment as the other process."""
    errors = []
    for url in urls:
        barrier.wait(60)
        try:
            Ledger(url)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
    out.put(errors)


def _run_processes(target, argsets) -> list:
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(len(argsets)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, out)) for args in argsets]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    return results


def test_two_processes_claiming_overlapping_ids_own_each_id_once(ledger_url):
    ids = eids(30_000)
    a, b = ids[:20_000], ids[10_000:]
    Ledger(ledger_url)  # the schema exists before the race (see the next tests)
    results = _run_processes(_claim_in_process, [(ledger_url, "run-a", a), (ledger_url, "run-b", b)])
    assert [r[2] for r in results] == [None, None]
    owned = dict((r[0], r[1]) for r in results)

    rows = Ledger(ledger_url).lookup(DEST, ids)
    assert len(rows) == 30_000
    by_run = {run: {e for e, r in rows.items() if r.run_id == run} for run in ("run-a", "run-b")}
    assert by_run["run-a"] | by_run["run-b"] == set(ids) and not by_run["run-a"] & by_run["run-b"]
    assert set(a[:10_000]) <= by_run["run-a"] and set(b[10_000:]) <= by_run["run-b"]
    assert owned == {run: len(got) for run, got in by_run.items()}
    assert sum(owned.values()) == 30_000


def test_two_processes_claiming_in_opposite_orders(ledger_url):
    """Claims taken in the caller's order would deadlock on Postgres (DeadlockDetected): the ledger sorts."""
    ids = eids(20_000)
    Ledger(ledger_url)
    results = _run_processes(
        _claim_in_process, [(ledger_url, "run-a", ids), (ledger_url, "run-b", ids[::-1])]
    )
    assert [r[2] for r in results] == [None, None]
    assert sum(r[1] for r in results) == 20_000


def test_two_processes_opening_a_fresh_postgres_ledger(postgres_server):
    """Two workers creating the tables at once would collide on the catalog (UniqueViolation on
    pg_type_typname_nsp_index)."""
    names = [f"fresh_{uuid.uuid4().hex[:12]}" for _ in range(4)]
    urls = [postgres_server.new_database(name) for name in names]
    try:
        results = _run_processes(_open_in_process, [(urls,), (urls,)])
    finally:
        for name in names:
            postgres_server.drop_database(name)
    assert results == [[], []]


def test_opening_a_fresh_sqlite_ledger_waits_for_a_writer(tmp_path):
    """SQLite does not call the busy handler for the switch to WAL: without a wait, a worker opening a fresh
    ledger while another writes it fails at once with 'database is locked' (two workers opening a fresh
    ledger at once hit that about one time in three; this pins the mechanism, not the race)."""
    path = tmp_path / "ledger.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("CREATE TABLE busy (x)")  # a transaction in flight, as another worker's first one
    release = threading.Timer(0.5, writer.execute, ["COMMIT"])
    release.start()
    try:
        led = Ledger(f"sqlite:///{path}")  # waits for the writer (busy timeout), then opens
        assert led.known(DEST, ["ev-1"]) == set()
    finally:
        release.join()
        writer.close()
        L.dispose_engines()


def test_items_taken_over_cannot_be_posted_by_their_old_chunk(led, clock):
    """A run taking over stale work abandons the unsent chunk first, then takes its items; the old run, alive
    after all, may re-register the chunk in between. Only one of the two may then send the items."""
    ids = eids(5)
    led.insert_claims(DEST, "run-a", new(ids), window=WINDOW)
    chunk = register(led, "run-a", "events-0", ids)
    clock.now = T0 + L.DEFAULT_CLAIM_LEASE_S + 60
    stale = clock.now - L.DEFAULT_CLAIM_LEASE_S
    assert led.abandon_stale_chunks([chunk.id], updated_before=stale) == {chunk.id}
    register(led, "run-a", "events-0", ids)  # allowed: the chunk is `abandoned`, its items still run-a's
    taken = led.take_over(
        DEST,
        "run-b",
        ids,
        from_states=[L.CLAIMED],
        from_run="run-a",
        claimed_before=stale,
        unsent_chunk_only=True,
        window=WINDOW,
    )
    posted = led.begin_post(chunk.id)
    assert not (taken and posted), f"run-b owns {len(taken)} items and run-a may still POST chunk {chunk.id}"
    assert posted and set(owners(led, ids).values()) == {"run-a"}


class _Explained(Exception):
    pass


class ItemPlans:
    """The plans of the ledger's UPDATEs of dffs_items by event_id, explained on the executing connection (the
    ledger's temporary tables live there) just before they run; with stop=True the first one is not run."""

    def __init__(self, led: Ledger, *, stop: bool = False):
        self.engine, self.stop, self.plans = led.engine, stop, []
        self.postgres = led.backend == "postgresql"

    def __enter__(self):
        sa.event.listen(self.engine, "before_cursor_execute", self.explain)
        return self

    def __exit__(self, exc_type, *exc):
        sa.event.remove(self.engine, "before_cursor_execute", self.explain)
        return exc_type is _Explained

    def explain(self, conn, cursor, statement, parameters, context, executemany):
        text = " ".join(statement.split())
        if not (text.upper().startswith("UPDATE DFFS_ITEMS") and "event_id" in text.split(" WHERE ")[-1]):
            return
        raw = cursor.connection.cursor()
        raw.execute(
            ("EXPLAIN " if self.postgres else "EXPLAIN QUERY PLAN ") + statement,
            parameters[0] if executemany else parameters,
        )
        self.plans.append((text, " / ".join(" ".join(str(row[-1]).split()) for row in raw.fetchall())))
        raw.close()
        if self.stop:
            raise _Explained

    def assert_linear(self):
        """No plan compares every candidate row with every id: each item is found through an index on
        event_id (Postgres may also hash the batch table; a nested-loop join filter is what it must not do)."""
        assert self.plans
        for text, plan in self.plans:
            where = text.split(" WHERE ")[-1][:100]
            if not self.postgres:
                assert "event_id=?" in plan, f"{where}: {plan}"
            elif "dffs_batch" in text:
                assert "Join Filter" not in plan, f"{where}: {plan}"
            else:
                assert re.search(r"Index Cond: [^/]*event_id", plan), f"{where}: {plan}"


def test_finish_chunk_finds_each_item_by_its_key(led, clock):
    ids = eids(3000)
    led.insert_claims(DEST, "run-a", new(ids), window=WINDOW)
    chunk = register(led, "run-a", "events-0", ids[:1000])
    assert led.begin_post(chunk.id)
    with ItemPlans(led) as plans:
        led.finish_chunk(chunk.id, L.C_COMPLETED, [(e, L.REJECTED, "bad", None) for e in ids[:1000]])
    assert {r.state for r in led.lookup(DEST, ids[:1000]).values()} == {L.REJECTED}
    plans.assert_linear()


def test_register_chunk_finds_its_items_by_key(led, clock):
    ids = eids(6000)
    led.insert_claims(DEST, "run-a", new(ids), window=WINDOW)  # no statistics yet
    with ItemPlans(led, stop=True) as plans:  # explained, not run (a bad plan takes seconds on Postgres)
        register(led, "run-a", "events-0", ids[:5000])
    plans.assert_linear()


def test_items_of_a_posted_chunk_cannot_move_to_another_chunk(led, clock):
    """An item the run sent in one chunk is never handed to a second chunk (both could then be POSTed)."""
    ids = eids(3)
    led.insert_claims(DEST, "run-a", new(ids), window=WINDOW)
    first = register(led, "run-a", "events-0", ids)
    assert led.begin_post(first.id)
    with pytest.raises(L.ClaimLost):
        register(led, "run-a", "events-1", ids)
    assert {r.chunk_id for r in led.lookup(DEST, ids).values()} == {first.id}
    assert [c.name for c in led.chunks_of_run(DEST, "run-a")] == ["events-0"]
