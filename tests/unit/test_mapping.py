"""Golden tests of the mapping: every row of the seed's event-mapping and identity tables and each rule of
docs/mapping.md. The bodies against FullStory's schema: test_bodies_contract.py."""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml

from include.datafly_fullstory.blueprint import load_blueprint
from include.datafly_fullstory.mapping.verdicts import NO_IDENTITY
from tests.mapping_rows import BLUEPRINT_PATH, GA4_ORDER, NOW, OLD, SID, fate, one, row, run

# ---- the seed's event mapping table -----------------------------------------------------------------


def test_page_becomes_page_view_with_page_properties_and_browser_url():
    page = {
        "url": "https://shop.example.com/sale?x=1",
        "title": "Sale",
        "referrer": "https://google.com/",
        "path": "/sale",
        "search": "?x=1",
    }
    body = one(row("page", properties=page, name="Sale", context={"page": {"url": "https://other/"}}))
    assert body["name"] == "page_view"
    assert {k: body["properties"][k] for k in (*page, "name")} == {**page, "name": "Sale"}
    assert body["context"]["browser"]["url"] == "https://other/"


def test_page_properties_fall_back_to_context_page():
    ctx = {"page": {"url": "https://shop.example.com/cart", "title": "Cart", "referrer": "", "path": "/cart"}}
    body = one(row("page", properties={}, context=ctx))
    props = body["properties"]
    assert (props["url"], props["title"], props["referrer"], props["path"]) == (
        "https://shop.example.com/cart",
        "Cart",
        "",
        "/cart",
    )
    assert "search" not in props and "name" not in props
    assert body["context"]["browser"]["url"] == "https://shop.example.com/cart"


@pytest.mark.parametrize("spelling", ["Product Viewed", "product_viewed", "view_item"])
def test_product_viewed_in_every_spelling(spelling):
    segment = {
        "product_id": "P1",
        "sku": "SKU-1",
        "name": "Boot",
        "category": "Shoes",
        "price": 99.5,
        "currency": "USD",
        "position": 3,
    }
    ga4 = {
        "currency": "EUR",
        "value": 99.5,
        "items": [
            {"item_id": "P1", "item_name": "Boot", "item_category": "Shoes", "price": 99.5, "quantity": 1}
        ],
    }
    body = one(row(event=spelling, properties=ga4 if spelling == "view_item" else segment))
    props = body["properties"]
    assert body["name"] == "product_viewed"
    assert (props["product_id"], props["name"], props["category"], props["price"]) == (
        "P1",
        "Boot",
        "Shoes",
        99.5,
    )
    if spelling == "view_item":  # the GA4 item is lifted to the Segment names and kept as arrays
        assert props["item_ids"] == ["P1"] and props["item_count"] == 1
        assert body["schema"]["properties"]["item_prices"] == "reals"
    else:
        assert props["position"] == 3 and body["schema"]["properties"]["position"] == "int"


ORDER = {
    "order_id": "ORD-1",
    "checkout_id": "CHK-1",
    "total": 130.5,
    "revenue": 100.0,
    "tax": 20.0,
    "shipping": 4.95,
    "discount": 5.0,
    "coupon": "WELCOME5",
    "currency": "USD",
    "products": [
        {"product_id": "P1", "sku": "S1", "name": "Boot", "category": "Shoes", "price": 60, "quantity": 1},
        {"product_id": 2, "name": "Hat", "price": "20.0", "quantity": 2.0},
    ],
}


@pytest.mark.parametrize("spelling", ["Order Completed", "order_completed", "purchase"])
def test_order_completed_in_every_spelling_becomes_purchase(spelling):
    body = one(row(event=spelling, properties=GA4_ORDER if spelling == "purchase" else ORDER))
    props = body["properties"]
    assert body["name"] == "purchase"
    assert (props["order_id"], props["revenue"], props["tax"], props["shipping"]) == (
        "ORD-1",
        100.0,
        20.0,
        4.95,
    )
    assert "transaction_id" not in props and "value" not in props
    assert "products" not in props and "items" not in props
    assert props["item_ids"] == ["P1", "2"]
    assert props["item_names"] == ["Boot", "Hat"]
    assert props["item_categories"] == ["Shoes", ""]
    assert props["item_prices"] == [60.0, 20.0] and all(type(p) is float for p in props["item_prices"])
    assert props["item_quantities"] == [1, 2] and all(type(q) is int for q in props["item_quantities"])
    assert props["item_count"] == 2
    assert {
        k: body["schema"]["properties"][k]
        for k in ("item_ids", "item_prices", "item_quantities", "item_count")
    } == {"item_ids": "strs", "item_prices": "reals", "item_quantities": "ints", "item_count": "int"}
    if spelling != "purchase":
        assert (props["total"], props["discount"], props["coupon"], props["currency"]) == (
            130.5,
            5.0,
            "WELCOME5",
            "USD",
        )


def test_item_arrays_keep_one_type_whatever_the_source_types():
    bodies, _, _ = run(
        [row(event="Order Completed", properties=ORDER), row(event="purchase", properties=GA4_ORDER)]
    )
    for body in bodies.values():
        props = body["properties"]
        assert all(type(v) is str for v in props["item_ids"])
        assert all(type(v) is float for v in props["item_prices"])
        assert all(type(v) is int for v in props["item_quantities"])


def test_ga4_rename_keeps_an_existing_target():
    props = one(row(event="purchase", properties={"transaction_id": "T1", "order_id": "O1"}))["properties"]
    assert props["order_id"] == "O1" and props["transaction_id"] == "T1"


def test_custom_events_pass_through_under_their_own_name():
    body = one(row(event="Newsletter Subscribed", properties={"source": "web", "Video Length (s)": 30}))
    assert body["name"] == "Newsletter Subscribed"
    assert body["properties"]["source"] == "web" and body["properties"]["Video_Length_s"] == 30


def test_products_in_custom_events_are_flattened_the_same_way():
    body = one(row(event="Checkout Started", properties={"products": ORDER["products"]}))
    assert body["properties"]["item_ids"] == ["P1", "2"]
    assert body["schema"]["properties"]["item_quantities"] == "ints"


# ---- the seed's identity table ----------------------------------------------------------------------


def test_identity_fields_land_where_fullstory_takes_them():
    ctx = {"ip": "203.0.113.7", "userAgent": "Mozilla/5.0 A", "locale": "de-DE"}
    body = one(
        row(event="Search Performed", context=ctx, user_id="user-42", anonymous_id="dfid-9", event_id="msg-1")
    )
    assert body["user"] == {"uid": "user-42"} and "session" not in body
    assert body["properties"]["datafly_event_id"] == "msg-1"  # traces the FullStory event to its row
    assert body["context"] == {
        "browser": {"user_agent": "Mozilla/5.0 A"},
        "location": {"ip_address": "203.0.113.7"},
    }
    assert body["properties"]["anonymous_id"] == "dfid-9" and body["properties"]["locale"] == "de-DE"
    assert body["timestamp"] == "2026-11-26T08:00:00.000Z"


def test_snake_case_user_agent_is_read_too():
    body = one(row(event="x", context={"user_agent": "UA snake"}))
    assert body["context"]["browser"]["user_agent"] == "UA snake"


def test_fullstory_session_id_wins_and_no_user_is_sent():
    body = one(row(event="x", context={"fullstory": {"session_id": SID}}, user_id="user-1", ts=NOW))
    assert body["session"] == {"id": SID} and "user" not in body


def test_session_id_without_user_id_identifies_an_anonymous_visitor():
    body = one(row(event="x", context={"fullstory": {"session_id": SID}}, user_id=None))
    assert body["session"] == {"id": SID}


def test_malformed_session_id_falls_back_to_the_user():
    body = one(row(event="x", context={"fullstory": {"session_id": "12345"}}, user_id="user-1"))
    assert body["user"] == {"uid": "user-1"}


def test_malformed_session_id_without_user_is_skipped():
    outcome, reason = fate(row(event="x", context={"fullstory": {"session_id": "12345"}}, user_id=None))
    assert outcome == "skipped" and "deviceId:sessionId" in reason.replace("<", "").replace(">", "")


@pytest.mark.parametrize(
    ("age_minutes", "recent"), [(0, True), (29, True), (30, True), (31, False), (-10, True), (24 * 60, False)]
)
def test_use_most_recent_only_within_30_minutes_of_now(age_minutes, recent):
    body = one(row(event="x", ts=NOW - timedelta(minutes=age_minutes)))
    assert body["user"] == {"uid": "user-1"}
    assert body.get("session") == ({"use_most_recent": True} if recent else None)


def test_recent_session_window_is_a_setting():
    body = one(row(event="x", ts=NOW - timedelta(minutes=50)), settings={"recent_session_minutes": 60})
    assert body["session"] == {"use_most_recent": True}


def test_backfill_never_attaches_to_todays_session():
    bodies, _, _ = run([row(event="x", ts=NOW - timedelta(days=3, minutes=m)) for m in range(5)])
    assert all("session" not in b for b in bodies.values())


def test_event_with_neither_user_nor_session_is_skipped_with_the_fix():
    outcome, reason = fate(row(event="x", user_id=None, anonymous_id="dfid-1"))
    assert (outcome, reason) == ("skipped", NO_IDENTITY)
    assert "context.fullstory.session_id" in reason


def test_empty_user_id_counts_as_absent():
    assert fate(row(event="x", user_id=""))[0] == "skipped"


# ---- property names, values and limits --------------------------------------------------------------


def test_names_are_cleaned_and_collisions_resolved_deterministically():
    props = {"first name": "a", "first_name": "b", "first-name": "c", "1st": 1, "_id": 2, "prix€": 3}
    reordered = dict(reversed(list(props.items())))
    cleaned = [one(row(event="x", properties=p))["properties"] for p in (props, reordered)]
    assert cleaned[0] == cleaned[1]
    assert cleaned[0]["first_name"] == "b"  # a valid name keeps it
    assert (cleaned[0]["first_name_2"], cleaned[0]["first_name_3"]) == ("a", "c")  # sorted: ' ' < '-'
    assert cleaned[0]["p_1st"] == 1 and cleaned[0]["custom_id"] == 2 and cleaned[0]["prix"] == 3


def test_reserved_names_are_renamed_as_the_blueprint_says():
    props = one(row(event="x", properties={"uid": "u", "email": "e", "displayName": "d", "plan_str": "p"}))[
        "properties"
    ]
    assert props["custom_uid"] == "u" and props["custom_email"] == "e" and props["custom_displayName"] == "d"
    assert props["plan_str_value"] == "p"
    assert not {"uid", "email", "displayName", "plan_str"} & set(props)


def test_nested_objects_stay_nested_with_clean_names_and_no_nulls():
    props = one(
        row(
            event="x",
            properties={
                "shipping info": {"the city": "Berlin", "zip": None, "geo": {"lat": 1.5}},
                "empty": None,
                "tags": ["a", None, "b"],
            },
        )
    )["properties"]
    assert props["shipping_info"] == {"the_city": "Berlin", "geo": {"lat": 1.5}}
    assert "empty" not in props and props["tags"] == ["a", "b"]


def test_arrays_of_objects_become_objects_of_arrays():
    props = one(row(event="x", properties={"promos": [{"id": "A", "rank": 1}, {"id": "B"}]}))["properties"]
    assert props["promos"] == {"id": ["A", "B"], "rank": [1]}


def test_mixed_arrays_become_text():
    assert one(row(event="x", properties={"mix": [1, "a", True]}))["properties"]["mix"] == ["1", "a", "true"]


@pytest.mark.parametrize(
    "props", [{"note": "x" * 8193}, {"deep": {"note": "é" * 4097}}, {"tags": ["y" * 100] * 90}]
)
def test_values_over_8kb_reject_the_row(props):
    outcome, reason = fate(row(event="x", properties=props))
    assert outcome == "rejected" and "8192 bytes" in reason


def test_value_of_exactly_8kb_passes():
    assert len(one(row(event="x", properties={"note": "x" * 8192}))["properties"]["note"]) == 8192


def test_event_name_over_250_characters_is_rejected():
    outcome, reason = fate(row(event="E" * 251))
    assert outcome == "rejected" and "250" in reason
    assert one(row(event="E" * 250))["name"] == "E" * 250


def test_more_than_500_properties_is_rejected():
    # 498 custom properties + anonymous_id + datafly_event_id
    assert len(one(row(event="x", properties={f"p{i}": i for i in range(498)}))["properties"]) == 500
    outcome, reason = fate(row(event="x", properties={f"p{i}": i for i in range(499)}))
    assert outcome == "rejected" and "501 properties" in reason


def test_property_count_includes_nested_leaves():
    outcome, reason = fate(
        row(event="x", properties={f"p{i}": i for i in range(498)} | {"n": {"a": 1, "b": 2}})
    )
    assert outcome == "rejected" and "500" in reason


def test_uid_over_256_characters_is_rejected():
    outcome, reason = fate(row(event="x", user_id="u" * 257))
    assert outcome == "rejected" and "256" in reason


def test_property_path_over_512_characters_is_rejected():
    outcome, reason = fate(row(event="x", properties={"a" * 300: {"b" * 300: 1}}))
    assert outcome == "rejected" and "512" in reason


def test_bad_properties_json_is_rejected():
    df_row = row(event="x")
    df_row["properties"] = '{"price": 12.5'
    assert fate(df_row) == ("rejected", "properties is not valid JSON")


# ---- unmapped types, event_types, consent -------------------------------------------------------------


@pytest.mark.parametrize("type_", ["group", "screen", "alias"])
def test_known_but_unmapped_types_are_skipped(type_):
    outcome, reason = fate(row(type_))
    assert outcome == "skipped" and f"'{type_}'" in reason


def test_event_types_setting_filters_the_rest():
    rows = [
        row("page"),
        row(event="Order Completed", properties=ORDER),
        row(event="x"),
        row("identify", traits={"email": "a@b.c"}),
    ]
    bodies, outcomes, users = run(rows, settings={"event_types": ["page", "purchase"]})
    assert sorted(bodies) == [0, 1] and users == []
    assert outcomes[2][0] == outcomes[3][0] == "filtered" and "event_types" in outcomes[2][1]
    _, _, users = run(rows, settings={"event_types": ["identify"]})
    assert len(users) == 1
    assert len(run(rows, settings={"event_types": []})[0]) == 3  # empty = all


@pytest.mark.parametrize(
    "consent",
    [{"canonical": {"analytics": False, "marketing": True}}, {"analytics": False}, {"analytics": "denied"}],
)
def test_denied_analytics_consent_filters_events_and_identify(consent):
    for r in (
        row(event="x", context={"consent": consent}),
        row("identify", traits={"email": "a@b.c"}, context={"consent": consent}),
    ):
        outcome, reason = fate(r)
        assert outcome == "filtered" and "analytics consent denied" in reason


@pytest.mark.parametrize("consent", [{"canonical": {"analytics": True}}, {"analytics": True}, None])
def test_granted_or_absent_consent_passes_by_default(consent):
    assert one(row(event="x", context={"consent": consent} if consent else {}))["name"] == "x"


def test_explicit_consent_setting_filters_rows_without_consent():
    settings = {"require_explicit_consent": True}
    outcome, reason = fate(row(event="x", context={"ip": "1.2.3.4"}), settings=settings)
    assert outcome == "filtered" and "require_explicit_consent" in reason
    assert one(row(event="x", context={"consent": {"analytics": True}}), settings=settings)


# ---- users ------------------------------------------------------------------------------------------


def test_identify_traits_become_a_user_update():
    traits = {
        "displayName": "Ada Lovelace",
        "email": "ada@example.com",
        "plan": "pro",
        "first name": "Ada",
        "company": {"name": "Acme", "size": 40},
        "orders": [{"id": "O1"}, {"id": "O2"}],
    }
    _, _, users = run([row("identify", traits=traits, user_id="user-42")])
    ((body, rows),) = users
    assert body == {
        "uid": "user-42",
        "display_name": "Ada Lovelace",
        "email": "ada@example.com",
        "properties": {
            "plan": "pro",
            "first_name": "Ada",
            "company": {"name": "Acme", "size": 40},
            "orders": {"id": ["O1", "O2"]},
        },
        "schema": {"properties": {"plan": "str"}},  # the blueprint's trait_types
    }
    assert rows == [0]


@pytest.mark.parametrize("key", ["displayName", "display_name", "name"])
def test_display_name_in_every_casing(key):
    _, _, users = run([row("identify", traits={key: "Grace Hopper"})])
    assert users[0][0]["display_name"] == "Grace Hopper"


def test_identify_calls_fold_per_uid_in_timestamp_order():
    rows = [
        row("identify", traits={"plan": "pro", "email": "new@x.io"}, ts=OLD + timedelta(minutes=5)),
        row("identify", traits={"plan": "free", "email": "old@x.io", "city": "Oslo"}, ts=OLD),
        row("identify", traits={"plan": "x"}, user_id="user-2"),
    ]
    _, outcomes, users = run(rows)
    by_uid = {body["uid"]: (body, r) for body, r in users}
    body, folded_rows = by_uid["user-1"]
    assert body["email"] == "new@x.io" and body["properties"] == {"plan": "pro", "city": "Oslo"}
    assert folded_rows == [0, 1] and by_uid["user-2"][1] == [2]
    assert not outcomes


def test_identify_without_user_id_is_skipped():
    outcome, reason = fate(row("identify", traits={"email": "a@b.c"}, user_id=None))
    assert outcome == "skipped" and "anonymous user" in reason


def test_over_long_email_rejects_every_folded_call():
    rows = [row("identify", traits={"email": "e" * 129}), row("identify", traits={"plan": "pro"}, ts=NOW)]
    _, outcomes, users = run(rows)
    assert users == [] and outcomes[0][0] == outcomes[1][0] == "rejected" and "128" in outcomes[0][1]


# ---- adding a mapping is a YAML edit ----------------------------------------------------------------


def test_an_extra_mapping_in_a_modified_blueprint(tmp_path):
    doc = yaml.safe_load(BLUEPRINT_PATH.read_text())
    doc["events"]["coupon_applied"] = {
        "match": {"type": "track", "events": ["Coupon Applied", "select_promotion"]},
        "renames": {"promotion_id": "coupon_id"},
    }
    path = tmp_path / "retail.yaml"
    path.write_text(yaml.safe_dump(doc))
    body = one(
        row(event="select_promotion", properties={"promotion_id": "C1"}), blueprint=load_blueprint(path)
    )
    assert body["name"] == "coupon_applied" and body["properties"]["coupon_id"] == "C1"
