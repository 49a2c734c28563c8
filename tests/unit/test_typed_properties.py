"""Typed properties: the blueprint's declared types (property_types, trait_types, an event's schema), the
coercion rules of mapping/types.py, the `schema` declarations in the bodies (valid for the project schema
and the emulator), and the values that cannot take their type: dropped from the body, the row still
delivered, each reported in type_problems.parquet with its row, field, value and declared type."""

from __future__ import annotations

import math

import orjson
import pyarrow as pa
import pytest
import yaml

from include.datafly_fullstory import validated
from include.datafly_fullstory.blueprint import load_blueprint
from include.datafly_fullstory.errors import BlueprintError
from include.datafly_fullstory.mapping import BatchMapper, MappingSettings, run_mapping, type_report
from include.datafly_fullstory.mapping.types import BAD, coerce
from include.datafly_fullstory.state import RunStore
from include.fullstory_emulator import schema
from include.fullstory_emulator import validation as emulator
from tests.mapping_rows import BLUEPRINT, BLUEPRINT_PATH, NOW, frame, one, row, run

# ---- coercion rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "type_name", "expected"),
    [
        ("90.00", "real", 90.0),
        (90, "real", 90.0),
        (12.5, "real", 12.5),
        ("-1.5e2", "real", -150.0),
        (".5", "real", 0.5),
        ("3", "int", 3),
        (3, "int", 3),
        (2.0, "int", 2),
        ("3.0", "int", 3),
        ("-7", "int", -7),
        (1001, "str", "1001"),
        (1001.0, "str", "1001"),
        (12.25, "str", "12.25"),
        ("SKU-1", "str", "SKU-1"),
        (True, "str", "true"),
        (True, "bool", True),
        ("false", "bool", False),
        ("TRUE", "bool", True),
        ("2025-03-15T10:00:00Z", "date", "2025-03-15T10:00:00Z"),
        ("2025-03-15", "date", "2025-03-15"),
        (["1", 2], "ints", [1, 2]),
        ([1, "2.5"], "reals", [1.0, 2.5]),
        ([1, "a"], "strs", ["1", "a"]),
    ],
)
def test_values_that_can_take_their_type_are_coerced(value, type_name, expected):
    result = coerce(value, type_name)
    assert result == expected and type(result) is type(expected)
    if type(expected) is list:
        assert [type(v) for v in result] == [type(v) for v in expected]


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ("12abc", "real"),
        ("1,5", "real"),
        ("nan", "real"),
        (math.inf, "real"),
        (True, "real"),
        ({"amount": 1}, "real"),
        (2.5, "int"),
        ("2.5", "int"),
        ("five", "int"),
        (False, "int"),
        ("1_000", "int"),
        (2**70, "int"),
        ({"id": 1}, "str"),
        ([1], "str"),
        (1, "bool"),
        ("yes", "bool"),
        (1700000000, "date"),
        ("next tuesday", "date"),
        ("3", "ints"),
        ([1, 2.5], "ints"),
    ],
)
def test_values_that_would_change_meaning_are_refused(value, type_name):
    assert coerce(value, type_name) is BAD


# ---- the blueprint --------------------------------------------------------------------------------------


def test_the_retail_blueprint_declares_the_retail_properties_and_traits():
    assert BLUEPRINT.property_types == {
        "revenue": "real",
        "price": "real",
        "value": "real",
        "total": "real",
        "quantity": "int",
        "order_id": "str",
        "product_id": "str",
        "sku": "str",
    }
    assert BLUEPRINT.trait_types["seats"] == "int" and BLUEPRINT.trait_types["plan"] == "str"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("property_types", {"revenue": "float"}, r"property_types\.revenue: type 'float' is not one of"),
        ("property_types", {"1st": "int"}, r"property_types\.1st: is not a FullStory property name"),
        ("property_types", ["revenue"], r"property_types: must be a mapping"),
        ("trait_types", {"seats": "integer"}, r"trait_types\.seats: type 'integer' is not one of"),
        ("trait_types", {"seats": None}, r"trait_types\.seats: type None"),
    ],
)
def test_a_bad_type_declaration_fails_naming_the_key(tmp_path, key, value, message):
    doc = yaml.safe_load(BLUEPRINT_PATH.read_text())
    doc[key] = value
    path = tmp_path / "retail.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(BlueprintError, match=rf"retail\.yaml: {message}"):
        load_blueprint(path)


def test_type_declarations_are_optional(tmp_path):
    doc = yaml.safe_load(BLUEPRINT_PATH.read_text())
    del doc["property_types"], doc["trait_types"]
    path = tmp_path / "retail.yaml"
    path.write_text(yaml.safe_dump(doc))
    bp = load_blueprint(path)
    body = one(row(event="Order Completed", properties={"revenue": "90.00"}), blueprint=bp)
    assert body["properties"]["revenue"] == "90.00" and "schema" not in body


# ---- bodies -------------------------------------------------------------------------------------------


def test_retail_properties_are_coerced_and_declared_in_every_event():
    order = one(
        row(
            event="Order Completed",
            properties={"order_id": 1001, "revenue": "90.00", "total": 95, "quantity": "3", "coupon": "X"},
        )
    )
    props, declared = order["properties"], order["schema"]["properties"]
    assert props["order_id"] == "1001" and props["revenue"] == 90.0 and props["total"] == 95.0
    assert type(props["total"]) is float and props["quantity"] == 3 and props["coupon"] == "X"
    assert declared == {"order_id": "str", "revenue": "real", "total": "real", "quantity": "int"}
    # a pass-through track event gets the global declarations too
    added = one(row(event="Product Added", properties={"price": "19.90", "product_id": 7}))
    assert added["properties"]["price"] == 19.9 and added["properties"]["product_id"] == "7"
    assert added["schema"]["properties"] == {"price": "real", "product_id": "str"}


def test_an_events_own_schema_adds_to_the_global_types():
    body = one(row(event="Product Viewed", properties={"product_id": 12, "position": "3", "price": 5}))
    assert body["properties"]["position"] == 3 and body["properties"]["product_id"] == "12"
    assert body["schema"]["properties"] == {"product_id": "str", "price": "real", "position": "int"}


def test_a_value_that_cannot_take_its_type_is_dropped_reported_and_the_row_still_sent():
    mapper = BatchMapper(BLUEPRINT, MappingSettings(), NOW)
    batch = mapper.map_batch(
        frame(
            [
                row(event="Order Completed", properties={"order_id": "A1", "revenue": "12abc", "tax": 2}),
                row(event="Product Added", properties={"quantity": 2.5, "price": "9.5"}, event_id="e-2"),
                row(event="Product Added", properties={"quantity": 1}),
            ]
        )
    )
    assert sorted(batch.rows.tolist()) == [0, 1, 2]  # every row is still delivered
    assert len(batch.outcomes) == 0
    bodies = {int(r): orjson.loads(line) for r, line in zip(batch.rows, batch.lines, strict=True)}
    assert "revenue" not in bodies[0]["properties"] and bodies[0]["properties"]["tax"] == 2
    assert "revenue" not in bodies[0]["schema"]["properties"]
    assert "quantity" not in bodies[1]["properties"] and bodies[1]["properties"]["price"] == 9.5
    problems = type_report.table(mapper.events.types.take_problems()).to_pylist()
    assert problems == [
        {
            "kind": "event",
            "row": 0,
            "event_id": "evt-0",
            "uid": None,
            "field": "revenue",
            "value": '"12abc"',
            "declared_type": "real",
        },
        {
            "kind": "event",
            "row": 1,
            "event_id": "e-2",
            "uid": None,
            "field": "quantity",
            "value": "2.5",
            "declared_type": "int",
        },
    ]
    assert mapper.events.types.take_problems() == []  # taken once


def test_traits_are_typed_and_a_bad_trait_is_reported_with_the_user():
    traits = {"seats": "5", "plan": "pro", "createdAt": "2025-01-15T10:00:00Z", "is_subscribed": "true"}
    _, _, users = run([row("identify", traits=traits, user_id="u-1")])
    ((body, _),) = users
    assert body["properties"]["seats"] == 5 and body["properties"]["is_subscribed"] is True
    assert body["schema"]["properties"] == {
        "seats": "int",
        "plan": "str",
        "createdAt": "date",
        "is_subscribed": "bool",
    }
    mapper = BatchMapper(BLUEPRINT, MappingSettings(), NOW)
    batch = mapper.map_batch(frame([row("identify", traits={"seats": "five", "plan": "pro"}, user_id="u-2")]))
    lines, _, rejected = mapper.fold_users(batch.identify)
    assert len(lines) == 1 and len(rejected) == 0
    assert b"seats" not in lines[0]
    (problem,) = mapper.events.types.take_problems()
    assert problem == ("user", None, None, "u-2", "seats", '"five"', "int")


def test_typed_bodies_validate_against_the_project_schema_and_the_emulator():
    bodies, _, users = run(
        [
            row(event="Order Completed", properties={"order_id": 1001, "revenue": "90.00", "quantity": "2"}),
            row(event="Product Viewed", properties={"product_id": 5, "price": "1.5", "position": 2.0}),
            row("identify", traits={"seats": "5", "plan": "pro", "createdAt": "2025-01-15"}),
        ]
    )
    assert all("schema" in b for b in bodies.values()) and "schema" in users[0][0]
    for body in bodies.values():
        assert not list(schema.validator("event").iter_errors(body))
        emulator.check_event(body)
    for body, _ in users:
        assert not list(schema.validator("user").iter_errors(body))
        emulator.check_user(body, batch_item=True)


# ---- the stage's report -------------------------------------------------------------------------------


def test_the_stage_writes_type_problems_and_counts_them(tmp_path):
    rows = [
        row(event="Order Completed", properties={"order_id": "A", "revenue": "12abc"}),
        row(event="Order Completed", properties={"order_id": "B", "revenue": "90.00"}),
        row("identify", traits={"seats": "3"}, user_id="u-1", ts=NOW.replace(hour=7)),
        row("identify", traits={"seats": "five"}, user_id="u-1", ts=NOW.replace(hour=8)),
    ]
    store = RunStore(str(tmp_path), "manual__t")
    validated.write_parts(store, pa.Table.from_pandas(frame(rows), preserve_index=False), 10)
    summary = run_mapping(store, None, None, reference_time=NOW)
    assert summary["type_problems"] == {
        "values": 2,
        "events": 1,
        "users": 1,
        "fields": {"event:revenue": 1, "user:seats": 1},
    }
    report = type_report.read(store).to_pylist()
    assert [(p["kind"], p["row"], p["event_id"], p["uid"], p["field"], p["value"]) for p in report] == [
        ("event", 0, "evt-0", None, "revenue", '"12abc"'),
        ("user", 3, "evt-3", "u-1", "seats", '"five"'),  # the user's latest identify row
    ]
    # a clean re-run removes the earlier report
    validated.clear(store)
    validated.write_parts(store, pa.Table.from_pandas(frame([rows[1]]), preserve_index=False), 10)
    assert run_mapping(store, None, None, reference_time=NOW)["type_problems"]["values"] == 0
    assert not store.exists(type_report.FILE)
