"""Consent that fails closed (mapping/consent.py, docs/mapping.md "Consent"): the value matrix, CMP codes,
precedence, revocation within a window (the real mapping stage over real Parquet parts) and the ledger's
consent table on SQLite and Postgres."""

from __future__ import annotations

from datetime import timedelta

import pytest

from include.datafly_fullstory import validated
from include.datafly_fullstory.blueprint import load_blueprint
from include.datafly_fullstory.errors import BlueprintError
from include.datafly_fullstory.ledger import Ledger
from include.datafly_fullstory.mapping import consent
from include.datafly_fullstory.mapping.stage import run_mapping
from include.datafly_fullstory.state import RunStore
from tests.mapping_rows import NOW, OLD, fate, frame, one, row, run

DENIED_VALUES = [False, "false", "FALSE", "Denied", "denied ", "0", 0, 0.0, "No", "no", "opt-out", "Rejected"]
GRANTED_VALUES = [True, "true", "TRUE", " Granted", "1", 1, 1.0, "Yes", "opt-in", "Accepted"]
UNRECOGNISED_VALUES = ["maybe", "", "2", 2, 0.5, {"x": 1}, [True], "granted-ish"]


@pytest.mark.parametrize("value", DENIED_VALUES)
@pytest.mark.parametrize("shape", ["canonical", "flat"])
def test_denied_values_in_any_case_or_type_are_filtered(value, shape):
    c = {"canonical": {"analytics": value}} if shape == "canonical" else {"analytics": value}
    for r in (
        row(event="x", context={"consent": c}),
        row("identify", traits={"a": 1}, context={"consent": c}),
    ):
        outcome, reason = fate(r)
        assert outcome == "filtered", reason
        assert "analytics consent denied" in reason and "context.consent." in reason


@pytest.mark.parametrize("value", GRANTED_VALUES)
def test_granted_values_in_any_case_or_type_pass(value):
    assert one(row(event="x", context={"consent": {"analytics": value}}))["name"] == "x"
    body = one(row(event="x", context={"consent": {"canonical": {"analytics": value}}}), settings=STRICT)
    assert body["name"] == "x"


STRICT = {"require_explicit_consent": True}


@pytest.mark.parametrize("value", UNRECOGNISED_VALUES)
def test_an_unrecognised_value_is_not_granted_and_the_reason_names_it(value):
    outcome, reason = fate(row(event="x", context={"consent": {"canonical": {"analytics": value}}}))
    assert outcome == "filtered"
    assert "neither granted nor denied" in reason and "context.consent.canonical.analytics" in reason
    if value == "maybe":
        assert "'maybe'" in reason


@pytest.mark.parametrize("ctx", [{}, {"consent": {}}, {"consent": {"analytics": None}}, {"consent": None}])
def test_no_consent_information_keeps_the_documented_default(ctx):
    assert one(row(event="x", context=ctx))["name"] == "x"  # granted by default
    outcome, reason = fate(row(event="x", context=ctx), settings=STRICT)
    assert outcome == "filtered" and "require_explicit_consent" in reason


@pytest.mark.parametrize(
    ("categories", "granted"),
    [
        (["C0001", "C0002"], True),  # OneTrust performance
        (["c0001", "c0002 "], True),  # case and spaces
        (["C0001", "C0004"], False),  # targeting only: analytics not granted
        ([], False),  # the list names the granted categories: none
        (["necessary", "statistics"], True),  # Cookiebot
        (["tcf:1", "tcf:8"], True),  # TCF purpose 8
        ([1, 8], True),  # bare TCF purpose ids
        ([1, 7], False),
        ("C0001:1,C0002:1,C0004:0", True),  # OneTrust groups string
        ("C0001:1,C0002:0", False),
    ],
)
def test_cmp_codes_map_to_purposes_through_the_blueprint(categories, granted):
    r = row(event="x", context={"consent": {"categories": categories}})
    if granted:
        assert one(r, settings=STRICT)["name"] == "x"
    else:
        outcome, reason = fate(r)
        assert outcome == "filtered" and "context.consent.categories" in reason


def test_categories_that_are_not_a_list_fail_closed():
    outcome, reason = fate(row(event="x", context={"consent": {"categories": {"C0002": True}}}))
    assert outcome == "filtered" and "not a list of CMP codes" in reason


def test_an_explicit_value_takes_precedence_over_the_categories():
    denied = {"canonical": {"analytics": False}, "categories": ["C0002"]}
    assert fate(row(event="x", context={"consent": denied}))[0] == "filtered"
    granted = {"canonical": {"analytics": True}, "categories": ["C0001"]}
    assert one(row(event="x", context={"consent": granted}))["name"] == "x"
    # canonical before flat, and an unrecognised canonical value does not fall through to a granted flat one
    assert fate(row(event="x", context={"consent": {"canonical": {"analytics": "?"}, "analytics": True}}))
    assert one(row(event="x", context={"consent": {"canonical": {"analytics": "yes"}, "analytics": False}}))


def test_the_blueprint_refuses_a_value_listed_both_ways():
    data = __import__("yaml").safe_load(open(load_blueprint().source, encoding="utf-8"))
    data["consent"]["granted_values"].append("No")
    from include.datafly_fullstory.blueprint import blueprint_from_dict

    with pytest.raises(BlueprintError, match="consent.granted_values: 'No' is listed as both"):
        blueprint_from_dict(data)


# ---- revocation ------------------------------------------------------------------------------------------


def test_revocations_filter_earlier_rows_of_the_person_only():
    bp = load_blueprint()
    rows = [
        row(event="a", ts=OLD, user_id="u1", anonymous_id="x1"),  # 0: before the denial: revoked
        row(
            event="b", ts=OLD + timedelta(minutes=5), user_id=None, anonymous_id="x1"
        ),  # 1: same anon: revoked
        row(event="c", ts=OLD + timedelta(minutes=9), user_id="u1", context={"consent": {"analytics": "No"}}),
        row(event="d", ts=OLD + timedelta(minutes=20), user_id="u1", anonymous_id="x1"),  # 3: later: sent
        row(event="e", ts=OLD, user_id="u2", anonymous_id="x2"),  # 4: another person: sent
        row("identify", ts=OLD, user_id="u1", anonymous_id="x9", traits={"a": 1}),  # 5: revoked (user key)
    ]
    rows[2]["anonymous_id"] = "x1"
    df = frame(rows)
    revoked = consent.revocations([df], bp)
    assert len(revoked) == 2  # user:u1 and anon:x1
    from include.datafly_fullstory.mapping import BatchMapper, MappingSettings

    mapper = BatchMapper(bp, MappingSettings(), NOW, revocations=revoked)
    batch = mapper.map_batch(df)
    fates = {int(r.row): (r.outcome, r.reason) for r in batch.outcomes.itertuples()}
    assert sorted(int(r) for r in batch.rows) == [3, 4]
    for r in (0, 1, 5):
        assert (
            fates[r][0] == "filtered"
            and "consent revoked at " in fates[r][1]
            and "(row evt-2)" in fates[r][1]
        )
    assert "analytics consent denied" in fates[2][1]


def test_a_later_grant_lifts_a_revocation_and_a_tie_is_a_denial():
    bp = load_blueprint()
    rules = consent.ConsentRules(bp)
    deny = row(event="d", ts=OLD + timedelta(minutes=10), context={"consent": {"analytics": False}})
    grant = row(event="g", ts=OLD + timedelta(minutes=20), context={"consent": {"analytics": True}})
    latest = consent.latest_states(frame([deny, grant]), rules)
    assert set(latest["state"]) == {"granted"}
    tie = dict(grant, timestamp=deny["timestamp"])
    latest = consent.latest_states(frame([tie, deny]), rules)
    assert set(latest["state"]) == {"denied"}


def _store(tmp_path, name: str) -> RunStore:
    return RunStore(str(tmp_path / "runs"), name)


def test_revocation_spans_the_mapping_stages_batches(tmp_path):
    """The denial is in the second validated part and batch; the first part's rows of that person stop."""
    store = _store(tmp_path, "run-1")
    early = [
        row(event=f"e{i}", ts=OLD + timedelta(seconds=i), user_id="u1", anonymous_id="a1") for i in range(5)
    ]
    others = [
        row(event=f"o{i}", ts=OLD + timedelta(seconds=i), user_id="u2", anonymous_id="a2") for i in range(5)
    ]
    deny = row(
        event="bye", ts=OLD + timedelta(minutes=30), user_id="u1", context={"consent": {"analytics": "0"}}
    )
    deny["anonymous_id"] = "a1"
    df = frame(early + others + [deny])
    import pyarrow as pa

    validated.write_parts(store, pa.Table.from_pandas(df, preserve_index=False), part_rows=6)
    assert len(validated.parts(store)) == 2
    summary = run_mapping(store, "retail", {"batch_rows": 3}, reference_time=NOW)
    assert summary["events_mapped"] == 5  # u2's rows only
    assert summary["rows"]["filtered"] == 6
    from include.datafly_fullstory import outcomes

    table = outcomes.read_partial(store, "mapping", columns=["event_id", "outcome", "reason"]).to_pylist()
    revoked = [t for t in table if "consent revoked" in (t["reason"] or "")]
    assert sorted(t["event_id"] for t in revoked) == [f"evt-{i}" for i in range(5)]


# ---- the ledger's consent table ---------------------------------------------------------------------------


def test_the_consent_table_keeps_the_latest_state(ledger_url):
    led = Ledger(ledger_url)
    d = "o-1@na1"
    assert led.record_consent(
        d, "r1", [("user:u1", "denied", 100.0, "e1"), ("user:u2", "granted", 100.0, "e2")]
    )
    led.record_consent(d, "r2", [("user:u1", "granted", 50.0, "e0")])  # older: ignored
    assert led.consent_of(d, "user:u1") == ("denied", 100.0, "e1", "r1")
    led.record_consent(d, "r3", [("user:u2", "denied", 100.0, "e3")])  # same time: a denial wins
    assert led.consent_of(d, "user:u2")[0] == "denied"
    led.record_consent(d, "r4", [("user:u2", "granted", 100.0, "e4")])  # same time: a grant does not
    assert led.consent_of(d, "user:u2")[0] == "denied"
    assert sorted(led.consent_denials(d, since=0)) == [("user:u1", 100.0, "e1"), ("user:u2", 100.0, "e3")]
    assert led.consent_denials(d, since=100.0) == []
    assert led.consent_denials("o-2@na1", since=0) == []  # per destination
    led.record_consent(d, "r5", [("user:u1", "granted", 150.0, "e5")])  # newer grant lifts it
    assert [p for p, *_ in led.consent_denials(d, since=0)] == ["user:u2"]
    with pytest.raises(ValueError, match="consent state"):
        led.record_consent(d, "r6", [("user:u1", "maybe", 1.0, None)])


def test_revocation_crosses_runs_through_the_ledger(tmp_path, ledger_url):
    """Run 2 (a later window) records the denial; run 1's window mapped afterwards (a retry, a back-fill, the
    look-back's late rows) stops the person's earlier rows, naming the row that revoked."""
    import pyarrow as pa

    led = Ledger(ledger_url)
    d = "o-1@na1"
    later = _store(tmp_path, "run-2")
    deny = row(
        event="bye", ts=NOW, user_id="u1", event_id="deny-1", context={"consent": {"analytics": "Denied"}}
    )
    validated.write_parts(later, pa.Table.from_pandas(frame([deny]), preserve_index=False), 100)
    run_mapping(
        later, "retail", None, reference_time=NOW, consent_history=consent.ledger_history(led, d, "r2")
    )
    assert led.consent_of(d, "user:u1")[:3] == ("denied", NOW.timestamp(), "deny-1")

    earlier = _store(tmp_path, "run-1")
    rows = [row(event="a", ts=OLD, user_id="u1"), row(event="b", ts=OLD, user_id="u2", anonymous_id="a2")]
    validated.write_parts(earlier, pa.Table.from_pandas(frame(rows), preserve_index=False), 100)
    summary = run_mapping(
        earlier, "retail", None, reference_time=OLD, consent_history=consent.ledger_history(led, d, "r1")
    )
    assert summary["events_mapped"] == 1
    from include.datafly_fullstory import outcomes

    (filtered,) = outcomes.read_partial(earlier, "mapping", columns=["event_id", "reason"]).to_pylist()
    assert filtered["event_id"] == "evt-0"
    assert "consent revoked at 2026-11-26T10:00:00.000Z (row deny-1)" in filtered["reason"]
    # the same mapping without the ledger does not know: run 1's window alone has no denial
    assert run_mapping(earlier, "retail", None, reference_time=OLD)["events_mapped"] == 2


def test_unit_run_helper_still_maps_without_revocations():
    bodies, outcomes_, _ = run([row(event="x")])
    assert list(bodies) == [0] and outcomes_ == {}
