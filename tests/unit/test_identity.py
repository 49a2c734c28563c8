"""Identity stitching: the mapping side (mapping/identity.py through `run_mapping` on real validated parts)
and the ledger's identity map and waits (ledger/identity_ops.py) on SQLite and Postgres."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pandas as pd
import pyarrow as pa

from include.datafly_fullstory import outcomes as outcome_files
from include.datafly_fullstory import validated
from include.datafly_fullstory.chunks import read_manifest
from include.datafly_fullstory.landing import FRAME_SCHEMA
from include.datafly_fullstory.ledger import IdentityPair, Ledger, NewItem, Wait
from include.datafly_fullstory.mapping import identity, run_mapping
from include.datafly_fullstory.mapping.verdicts import NO_IDENTITY
from include.datafly_fullstory.state import RunStore
from include.datafly_fullstory.stats import RunStats
from include.datafly_fullstory.window import Window

H = datetime(2026, 11, 20, 10, tzinfo=UTC)
WINDOW = Window(H, H + timedelta(hours=1))
SID = "5812340000000001:6723450000000002"
DEST = "o-LOCAL-na1@na1"


def landing_row(i, type_="page", *, anon=None, user=None, minute=0, context=None, traits=None) -> dict:
    return {
        "event_id": f"e{i}",
        "type": type_,
        "event": "Product Added" if type_ == "track" else None,
        "name": "Home" if type_ == "page" else None,
        "anonymous_id": anon,
        "user_id": user,
        "timestamp": H + timedelta(minutes=minute),
        "received_at": H + timedelta(minutes=minute),
        "sent_at": H + timedelta(minutes=minute),
        "context": orjson.dumps(context or {}).decode(),
        "properties": "{}",
        "traits": orjson.dumps(traits).decode() if traits else None,
        "source_id": "web-shop",
        "_row": i,
        "_file": "landing/part-0.parquet",
    }


def map_rows(tmp_path, rows: list[dict], **kwargs):
    """Write the rows as validated parts, run the mapping stage; returns (summary, {row: (outcome, reason)},
    {row: event body})."""
    store = RunStore(str(tmp_path / "state"), "r1")
    frame = pd.DataFrame.from_records(rows)
    validated.write_parts(store, pa.Table.from_pandas(frame, schema=FRAME_SCHEMA, preserve_index=False), 3)
    summary = run_mapping(store, None, None, reference_time=WINDOW.end, window=WINDOW, **kwargs)
    decided = outcome_files.read_partial(store, "mapping").to_pylist()
    bodies = {}
    for chunk in read_manifest(store)["chunks"]:
        if chunk["kind"] != "events":
            continue
        index = store.read_table("payloads", f"{chunk['name']}.index.parquet").to_pylist()
        lines = store.path("payloads", f"{chunk['name']}.jsonl")
        with open(lines, "rb") as fh:
            text = fh.read().splitlines()
        for entry in index:
            bodies[entry["row"]] = orjson.loads(text[entry["item_index"]])
    return store, summary, {d["row"]: (d["outcome"], d["reason"]) for d in decided}, bodies


def test_a_later_identify_of_the_window_stitches_earlier_anonymous_events(tmp_path):
    rows = [
        landing_row(0, anon="a1", minute=1),  # anonymous page view, before the identify
        landing_row(1, "track", anon="a1", minute=2),
        landing_row(2, anon="a2", minute=3),  # never identified
        landing_row(3, anon="a3", minute=4, context={"fullstory": {"session_id": SID}}),  # session wins
        landing_row(4, "identify", anon="a1", user="u-1", minute=30, traits={"email": "x@example.com"}),
        landing_row(5, "identify", anon="a3", user="u-3", minute=31, traits={"email": "y@example.com"}),
    ]
    store, summary, decided, bodies = map_rows(tmp_path, rows)
    assert bodies[0]["user"] == {"uid": "u-1"} and bodies[1]["user"] == {"uid": "u-1"}
    assert "session" not in bodies[0]
    assert bodies[3]["session"] == {"id": SID} and "user" not in bodies[3]
    assert decided[2] == ("skipped", NO_IDENTITY)
    assert summary["identity"] == {
        "stitched": 2,
        "stitched_late": 0,
        "conflicts": 0,
        "conflicted_rows": 0,
        "anonymous_unidentified": 1,
    }
    notes = identity.stitch_notes(store, [0, 1, 2, 3])
    assert notes == {
        0: "stitched: anonymous_id a1 -> user u-1 (learned from event e4)",
        1: "stitched: anonymous_id a1 -> user u-1 (learned from event e4)",
    }
    reasons = identity.annotate(store, [0, 1], ["delivered", "rejected"], [None, "400: bad"])
    assert reasons == [notes[0], "400: bad"]


def test_an_anonymous_id_seen_with_two_users_is_never_stitched(tmp_path):
    rows = [
        landing_row(0, anon="shared", minute=1),
        landing_row(1, "track", anon="shared", user="u-1", minute=2),
        landing_row(2, "track", anon="shared", user="u-2", minute=3),
        landing_row(3, anon="mine", minute=4),
        landing_row(4, "track", anon="mine", user="u-3", minute=5),
    ]
    _, summary, decided, bodies = map_rows(tmp_path, rows)
    outcome, reason = decided[0]
    assert outcome == "skipped"
    assert "anonymous_id shared is identified as two users (u-1, u-2)" in reason
    assert bodies[3]["user"] == {"uid": "u-3"}
    assert summary["identity"]["conflicts"] == 1 and summary["identity"]["conflicted_rows"] == 1
    assert summary["identity"]["anonymous_unidentified"] == 1 and summary["identity"]["stitched"] == 1


def test_a_stitched_user_id_over_the_uid_limit_is_rejected_not_stitched(tmp_path):
    long_uid = "u" * 257
    rows = [landing_row(0, anon="a1", minute=1), landing_row(1, "track", anon="a1", user=long_uid, minute=2)]
    _, summary, decided, bodies = map_rows(tmp_path, rows)
    assert decided[0][0] == "rejected" and "256-character uid limit" in decided[0][1]
    assert decided[1][0] == "rejected"
    assert summary["identity"]["stitched"] == 0 and not bodies


def test_a_row_denying_consent_identifies_nobody(tmp_path):
    denied = {"consent": {"analytics": False}}
    rows = [
        landing_row(0, anon="a1", minute=1),
        landing_row(1, "track", anon="a1", user="u-1", context=denied),
    ]
    _, summary, decided, _ = map_rows(tmp_path, rows)
    assert decided[0] == ("skipped", NO_IDENTITY) and decided[1][0] == "filtered"
    assert summary["identity"]["stitched"] == 0 and summary["identity"]["anonymous_unidentified"] == 1


def test_look_back_rows_count_as_stitched_late_and_a_given_map_is_used(tmp_path):
    rows = [landing_row(0, anon="a1", minute=1), landing_row(1, anon="a9", minute=2)]
    known = identity.IdentityMap(users={"a9": ("u-9", "e-earlier")})
    store, summary, _, bodies = map_rows(tmp_path, rows, identities=known, late_from=1)
    assert 0 not in bodies and bodies[1]["user"] == {"uid": "u-9"}
    assert summary["identity"]["stitched_late"] == 1 and summary["identity"]["stitched"] == 0
    waiting = identity.read(store, "unidentified").to_pylist()
    assert [(w["event_id"], w["anonymous_id"], w["file"]) for w in waiting] == [
        ("e0", "a1", "landing/part-0.parquet")
    ]


def test_fold_pairs_is_deterministic_and_keeps_the_earliest_user():
    pairs = pd.DataFrame(
        {
            "anonymous_id": ["a", "a", "b", "b"],
            "user_id": ["u2", "u1", "u3", "u3"],
            "ts": [20.0, 10.0, 5.0, 7.0],
            "event_id": ["e2", "e1", "e3", "e4"],
        }
    )
    folded = identity.fold_pairs(pairs)
    again = identity.fold_pairs(pairs.iloc[::-1])
    assert folded.equals(again)
    records = folded.to_dict("records")
    assert records[0] == {
        "anonymous_id": "a",
        "user_id": "u1",
        "other_user_id": "u2",
        "t1": 10.0,
        "t2": 20.0,
        "event_id": "e1",
    }
    assert (records[1]["anonymous_id"], records[1]["user_id"], records[1]["event_id"]) == ("b", "u3", "e3")
    assert pd.isna(records[1]["other_user_id"]) and (records[1]["t1"], records[1]["t2"]) == (5.0, 7.0)


# ---- the ledger's identity map and waits, on SQLite and Postgres ------------------------------------------


def test_identity_map_learns_idempotently_and_records_a_conflict_once(ledger_url):
    led = Ledger(ledger_url)
    pairs = [IdentityPair(f"a{i}", f"u{i}", None, 100.0 + i, 100.0 + i, f"e{i}") for i in range(3000)]
    assert led.record_identities(DEST, "r1", pairs) == 3000
    assert led.record_identities(DEST, "r1", pairs) == 0  # a retry learns nothing new
    # A later run: a1 seen again later with its user, a2 with another user (a conflict), a new one.
    later = [
        IdentityPair("a1", "u1", None, 500.0, 600.0, "e-x"),
        IdentityPair("a2", "someone-else", None, 50.0, 50.0, "e-y"),
        IdentityPair("new", "u-new", "u-other", 1.0, 2.0, "e-z"),
    ]
    assert led.record_identities(DEST, "r2", later) == 1
    assert led.record_identities(DEST, "r2", later) == 0
    rows = led.lookup_identities(DEST, ["a1", "a2", "new", "a2999", "unknown", None])
    assert set(rows) == {"a1", "a2", "new", "a2999"}
    a1, a2, fresh = rows["a1"], rows["a2"], rows["new"]
    assert (a1.user_id, a1.first_seen_at, a1.last_seen_at, a1.event_id, a1.run_id) == (
        "u1",
        101.0,
        600.0,
        "e1",
        "r1",
    )
    assert a1.stitchable
    assert (a2.user_id, a2.conflict_user_id, a2.first_seen_at) == ("u2", "someone-else", 50.0)
    assert not a2.stitchable
    assert (fresh.user_id, fresh.conflict_user_id) == ("u-new", "u-other")
    # Another user for a2 does not replace the first conflict recorded.
    led.record_identities(DEST, "r3", [IdentityPair("a2", "third", None, 60.0, 60.0, "e-w")])
    assert led.lookup_identities(DEST, ["a2"])["a2"].conflict_user_id == "someone-else"
    assert led.lookup_identities("o-OTHER-eu1@eu1", ["a1"]) == {}  # per destination


def test_stitchable_waits_are_skipped_rows_whose_anonymous_id_is_now_known(ledger_url):
    led = Ledger(ledger_url)
    window = ("2026-11-20T10:00:00+00:00", "2026-11-20T11:00:00+00:00")
    ids = ["w1", "w2", "w3", "w4", "w5"]
    led.insert_claims(DEST, "r1", [NewItem(e, "event", event_time=1000.0) for e in ids], window=window)
    led.settle_unsent(DEST, "r1", [(e, "skipped", NO_IDENTITY) for e in ids])
    waits = [
        Wait("w1", "a-known", "f1", 1000.0),
        Wait("w2", "a-unknown", "f1", 1000.0),
        Wait("w3", "a-conflict", "f2", 1000.0),
        Wait("w4", "a-known", "f3", 5000.0),  # outside the range asked
        Wait("w5", "a-known", "f4", 1000.0),
    ]
    led.record_waits(DEST, "r1", waits)
    led.record_waits(DEST, "r1", waits)  # idempotent
    assert led.stitchable_waits(DEST, since=0.0, until=2000.0) == {}
    led.record_identities(
        DEST,
        "r2",
        [
            IdentityPair("a-known", "u1", None, 1500.0, 1500.0, "e1"),
            IdentityPair("a-conflict", "u1", "u2", 1500.0, 1500.0, "e2"),
        ],
    )
    assert led.stitchable_waits(DEST, since=0.0, until=2000.0) == {"w1": "f1", "w5": "f4"}
    # Once a waiting row is claimed again (and then delivered), it waits no more.
    led.take_over(DEST, "r2", ["w5"], from_states=("skipped",), window=window)
    assert led.stitchable_waits(DEST, since=0.0, until=2000.0) == {"w1": "f1"}
    # The compare-and-set: a second run cannot take the same row.
    assert led.take_over(DEST, "r3", ["w5"], from_states=("skipped",), window=window) == set()


def test_the_stats_count_events_per_name_and_per_identification_mode(tmp_path):
    rows = [
        landing_row(0, anon="a1", context={"fullstory": {"session_id": SID}}),  # session id
        landing_row(1, anon="a2", user="u-2", minute=1),  # uid (early in the window)
        landing_row(2, "track", anon="a3", user="u-3", minute=59),  # uid, session may still be open
        landing_row(3, anon="a2", minute=2),  # stitched to u-2 by row 1
        landing_row(4, "track", anon="a9", minute=3),  # nobody: skipped
        landing_row(5, "identify", anon="a5", user="u-5", traits={"email": "u5@example.com"}),  # not an event
    ]
    _, summary, decided, bodies = map_rows(tmp_path, rows)
    assert summary["identification"] == {
        "session_id": 1,
        "uid": 1,
        "use_most_recent": 1,
        "stitched": 1,
        "skipped": 1,
    }
    assert summary["events_by_name"] == {"page_view": 3, "Product Added": 1}
    assert decided[4][0] == "skipped" and set(bodies) == {0, 1, 2, 3}
    stats = RunStats(events_by_name=summary["events_by_name"], identification=summary["identification"])
    assert "identified by 1 session id, 1 uid, 1 use most recent, 1 stitched, 1 skipped" in stats.asstr()
    assert "events page_view 3, Product Added 1;" in stats.asstr()
