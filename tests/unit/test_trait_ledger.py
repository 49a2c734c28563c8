"""The ledger's user traits (`dffs_traits`, ledger/trait_ops.py) on a real SQLite file and a real Postgres:
an update counts as unchanged only when the uid's latest registered update was delivered with the same
hash; a rejected, unknown or in-flight update is sent again."""

from __future__ import annotations

import pytest

from include.datafly_fullstory import ledger as L
from include.datafly_fullstory.ledger import Ledger, NewItem
from include.datafly_fullstory.mapping.trait_diff import drop_unchanged, uid_and_hash
from tests.unit.test_ledger_db import DEST, OTHER_DEST, T0, WINDOW, Clock

H1, H2 = "1" * 64, "2" * 64


@pytest.fixture
def led(ledger_url) -> Ledger:
    return Ledger(ledger_url)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock(T0)
    monkeypatch.setattr(L, "wall_clock", c)
    return c


def users_chunk(led: Ledger, run: str, name: str, calls: dict[str, list[str]], hashes: dict[str, str]):
    """A users chunk of `run`: one line per uid (in `calls` order), carrying that uid's identify calls
    (event ids), registered with its trait hash."""
    ids = [e for events in calls.values() for e in events]
    led.insert_claims(
        DEST, run, [NewItem(e, "user", uid=u) for u, events in calls.items() for e in events], window=WINDOW
    )
    chunk = led.register_chunk(
        DEST,
        run,
        name=name,
        kind="users",
        idempotency_key=f"{run}/{name}",
        payload_uri=f"file:///payloads/{run}/{name}.jsonl",
        sha256="ab" * 32,
        items_count=len(calls),
        size=100,
        event_ids=ids,
    )
    led.register_traits(DEST, run, chunk.id, [(i, u, hashes[u]) for i, u in enumerate(calls)])
    return chunk


def finish(led: Ledger, chunk, exceptions=()) -> int:
    led.finish_chunk(chunk.id, L.C_COMPLETED, list(exceptions))
    return led.mark_traits_delivered(chunk.id)


def test_only_a_delivered_update_with_the_same_hash_is_unchanged(led, clock):
    chunk = users_chunk(led, "run-a", "users-0", {"u1": ["a1", "a2"], "u2": ["a3"]}, {"u1": H1, "u2": H1})
    assert led.unchanged_traits(DEST, ["u1", "u2"], [H1, H1]) == {}  # registered, not delivered yet
    clock.now += 10
    assert finish(led, chunk) == 2
    assert finish(led, chunk) == 0  # idempotent: already marked
    assert led.unchanged_traits(DEST, ["u1", "u2", "u3"], [H1, H2, H1]) == {"u1": "run-a"}
    assert led.unchanged_traits(OTHER_DEST, ["u1"], [H1]) == {}  # per org
    (registration,) = led.traits_of(DEST, "u1")
    assert (registration["traits_hash"], registration["run_id"], registration["delivered_at"]) == (
        H1,
        "run-a",
        T0 + 10,
    )


@pytest.mark.parametrize("state", [L.REJECTED, L.UNKNOWN])
def test_a_rejected_or_unknown_update_is_not_current(led, clock, state):
    chunk = users_chunk(led, "run-a", "users-0", {"u1": ["a1"], "u2": ["a2"]}, {"u1": H1, "u2": H1})
    assert finish(led, chunk, [("a2", state, "invalid", "bad")]) == 1
    assert led.unchanged_traits(DEST, ["u1", "u2"], [H1, H1]) == {"u1": "run-a"}


def test_a_newer_registration_in_flight_or_failed_hides_the_older_delivery(led, clock):
    first = users_chunk(led, "run-a", "users-0", {"u1": ["a1"]}, {"u1": H1})
    finish(led, first)
    clock.now += 3600
    second = users_chunk(led, "run-b", "users-0", {"u1": ["b1"]}, {"u1": H2})
    # run-b's update (H2) may still reach FullStory: an update equal to H1 must be sent again
    assert led.unchanged_traits(DEST, ["u1"], [H1]) == {}
    finish(led, second, [("b1", L.REJECTED, "invalid", "bad")])
    assert led.unchanged_traits(DEST, ["u1"], [H1]) == {}
    assert led.unchanged_traits(DEST, ["u1"], [H2]) == {}
    clock.now += 3600
    third = users_chunk(led, "run-c", "users-0", {"u1": ["c1"]}, {"u1": H2})
    finish(led, third)
    assert led.unchanged_traits(DEST, ["u1"], [H2]) == {"u1": "run-c"}


def test_registering_a_chunk_again_replaces_its_lines(led, clock):
    chunk = users_chunk(led, "run-a", "users-0", {"u1": ["a1"], "u2": ["a2"]}, {"u1": H1, "u2": H1})
    led.register_traits(DEST, "run-a", chunk.id, [(0, "u2", H2)])
    finish(led, chunk)
    assert [r["item_index"] for r in led.traits_of(DEST, "u2")] == [0]
    assert led.traits_of(DEST, "u1") == []
    assert led.unchanged_traits(DEST, ["u2"], [H2]) == {"u2": "run-a"}


def test_many_uids_are_looked_up_in_batches(led, clock):
    uids = [f"u{i}" for i in range(4500)]
    chunk = users_chunk(led, "run-a", "users-0", {u: [f"e-{u}"] for u in uids}, dict.fromkeys(uids, H1))
    finish(led, chunk)
    assert len(led.unchanged_traits(DEST, uids, [H1] * len(uids))) == len(uids)


def test_drop_unchanged_removes_lines_and_skips_their_rows():
    lines = [
        b'{"uid":"u1","properties":{"plan":"pro","seats":5}}',
        b'{"uid":"u2","properties":{"plan":"free"}}',
        b'{"uid":"u3","display_name":"Ada"}',
    ]
    # the same body in another key order hashes the same
    assert uid_and_hash(lines[0]) == uid_and_hash(b'{"properties":{"seats":5,"plan":"pro"},"uid":"u1"}')
    unchanged = {"u1": "run-a", "u3": "run-b"}
    line_of, rows, event_ids = [0, 0, 1, 2], [10, 11, 12, 13], ["e10", "e11", "e12", "e13"]
    kept, index, skipped, n = drop_unchanged(lines, (line_of, rows, event_ids), lambda u, h: unchanged)
    assert kept == [lines[1]] and n == 2
    assert [list(a) for a in index] == [[0], [12], ["e12"]]
    assert skipped["row"].tolist() == [10, 11, 13] and set(skipped["outcome"]) == {"skipped"}
    assert (
        skipped["reason"].tolist()[0] == "traits unchanged since delivered by run run-a: no user update sent"
    )
    assert skipped["reason"].tolist()[2].startswith("traits unchanged since delivered by run run-b")
    assert set(skipped["kind"]) == {"user"}
    # without a lookup (dry run) nothing is dropped
    assert drop_unchanged(lines, (line_of, rows, event_ids), None)[0] == lines
