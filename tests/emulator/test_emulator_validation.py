"""FullStory's rules beyond the spec, on the validators directly (the HTTP tests show the wiring)."""

from __future__ import annotations

import pytest

from include.fullstory_emulator import validation as v


def event(**fields) -> dict:
    return {"name": "Order Completed", "user": {"uid": "u-1"}, **fields}


def refused(check, body, **kw) -> v.ItemError:
    with pytest.raises(v.ItemError) as caught:
        check(body, **kw)
    return caught.value


@pytest.mark.parametrize(
    "identification, kind",
    [
        ({"user": {"uid": "u-1"}}, v.ID_USER_UID),
        ({"user": {"id": "4000000001"}}, v.ID_USER_ID),
        ({"session": {"id": "123456789:987654321"}}, v.ID_SESSION_ID),
        ({"user": {"uid": "u-1"}, "session": {"use_most_recent": True}}, v.ID_USER_UID | v.MOST_RECENT_FLAG),
        ({"user": {"id": "4000000001"}, "session": {"use_most_recent": False}}, v.ID_USER_ID),
    ],
)
def test_one_form_of_identification_is_accepted(identification, kind):
    name, id_kind, ident, timestamp, props = v.check_event({"name": "x", **identification})
    assert (name, id_kind, timestamp, props) == ("x", kind, None, None)
    assert ident in ("u-1", "4000000001", "123456789:987654321")


@pytest.mark.parametrize(
    "identification, needle",
    [
        ({}, "no identification"),
        ({"user": {"uid": ""}}, "no identification"),
        ({"user": {"uid": "u", "id": "1"}}, "user.uid and user.id"),
        ({"user": {"uid": "u"}, "session": {"id": "1:2"}}, "session.id"),
        ({"session": {"id": "1:2", "use_most_recent": True}}, "session.id"),
        ({"session": {"use_most_recent": True}}, "use_most_recent"),
        ({"session": {"id": "123456789"}}, "session.id"),
    ],
)
def test_ambiguous_or_missing_identification_is_refused(identification, needle):
    error = refused(v.check_event, {"name": "x", **identification})
    assert error.code == "invalid_argument" and needle in error.message


@pytest.mark.parametrize(
    "props, needle",
    [
        ({"9lives": 1}, "9lives"),
        ({"has-dash": 1}, "has-dash"),
        ({"_private": 1}, "_private"),
        ({"ok": {"bad name": 1}}, "ok.bad name"),
        ({"a" * 513: 1}, "longer than 512"),
        ({"outer": {"i" * 510: 1}}, "longer than 512"),
        ({"big": "x" * 8193}, "properties.big value is larger than 8192 bytes"),
        ({"big": "é" * 4097}, "properties.big value is larger than 8192 bytes"),
        ({"nested": {"big": "x" * 8193}}, "properties.nested.big"),
        ({"items": [{"sku": 1}]}, "properties.items is an array of objects"),
        ({"grid": [[1, 2]]}, "properties.grid is an array of arrays"),
        ({f"p{i}": i for i in range(501)}, "more than 500 properties"),
        ({"n": {f"p{i}": i for i in range(501)}}, "more than 500 properties"),
    ],
)
def test_property_rules(props, needle):
    error = refused(v.check_event, event(properties=props))
    assert needle in error.message


def test_property_limits_are_inclusive():
    props = {"a" * 512: "x" * 8192, "tags": ["a", 1, True, None], "nested": {"deep": {"x": 1}}}
    props.update({f"p{i}": i for i in range(497)})
    assert v.check_event(event(properties=props))[4] is props
    v.check_user({"uid": "u" * 256, "email": "e" * 128, "display_name": "d" * 256, "properties": props})


@pytest.mark.parametrize(
    "name, ok", [("", False), ("x", True), ("x" * 250, True), ("x" * 251, False), (5, False)]
)
def test_event_name_length(name, ok):
    body = event()
    body["name"] = name
    if ok:
        v.check_event(body)
    else:
        assert "name" in refused(v.check_event, body).message


@pytest.mark.parametrize(
    "timestamp, ok",
    [
        ("2024-05-01T08:00:00Z", True),
        ("2024-05-01T08:00:00.123456+02:00", True),
        ("2024-05-01T08:00:00", False),  # no zone
        ("2024-05-01", False),
        ("yesterday", False),
        (1714550400, False),
    ],
)
def test_timestamp_must_be_a_zoned_date_time(timestamp, ok):
    if ok:
        assert v.check_event(event(timestamp=timestamp))[3] > 1.7e9
    else:
        assert "timestamp" in refused(v.check_event, event(timestamp=timestamp)).message


def test_schema_types_are_the_declarable_ones():
    for kind in sorted(v.SCHEMA_TYPES):
        v.check_event(event(schema={"properties": {"a.b": kind}}))
    error = refused(v.check_event, event(schema={"properties": {"amount": "float"}}))
    assert "schema.properties.amount" in error.message and "float" in error.message
    assert "9x" in refused(v.check_event, event(schema={"properties": {"a.9x": "int"}})).message


def test_item_context_conflicts_with_shared_context():
    item = event(context={"browser": {"url": "https://x.example"}})
    v.check_event(item)
    error = refused(v.check_event, item, shared_context=True)
    assert "shared.context" in error.message


def test_user_limits_name_the_field():
    assert "uid" in refused(v.check_user, {"uid": "u" * 257}).message
    assert "email" in refused(v.check_user, {"email": "e" * 129}).message
    assert "display_name" in refused(v.check_user, {"display_name": "d" * 257}).message
    assert "unknown field id" in refused(v.check_user, {"id": "1"}).message  # only batch items may
    v.check_user({"id": "1"}, batch_item=True)


@pytest.mark.parametrize(
    "body, code",
    [
        ([], "invalid_argument"),
        ({}, "required_field"),
        ({"requests": []}, "required_field"),
        ({"requests": {}}, "invalid_argument"),
        ({"requests": [{}], "extra": 1}, "invalid_argument"),
        ({"requests": [{}] * 50_001}, "invalid_argument"),
        ({"requests": [{}], "shared": {"context": {"browser": {"url": 5}}}}, "invalid_argument"),
    ],
)
def test_batch_envelope_defects_fail_the_whole_request(body, code):
    assert refused(v.check_events_batch, body).code == code


def test_batch_of_exactly_50000_items_is_a_valid_envelope():
    assert len(v.check_events_batch({"requests": [{}] * 50_000})[0]) == 50_000
