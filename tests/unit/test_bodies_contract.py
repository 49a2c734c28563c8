"""Contract of the bodies we send: every body the mapping generates validates against the project's own
schema of FullStory's request bodies (include/fullstory_emulator/schema.py), and the emulator accepts them.

These run in every checkout. Where FullStory's verbatim Swagger specs are at hand (../shared, or
DATAFLY_SHARED_DIR), two more checks run: the project schema agrees with the Swagger request definitions
(fields, types, required fields, length and size limits; the rules we add from FullStory's docs are
listed in BEYOND_SWAGGER), and the same bodies validate against the Swagger itself. Without the specs
those skip, saying so; in CI (CI=true) they fail instead.
"""

from __future__ import annotations

import copy
import json
from datetime import timedelta

import jsonschema
import numpy as np
import orjson
import pytest

from include.datafly_fullstory import sample
from include.datafly_fullstory.mapping import BatchMapper, MappingSettings
from include.fullstory_emulator import schema
from include.fullstory_emulator import validation as emulator
from tests.mapping_rows import BLUEPRINT, GA4_ORDER, NOW, SID, row, run


@pytest.fixture(scope="module")
def generated() -> dict:
    """Every body kind the mapping produces: 4,000 sample rows plus edge rows (session id, GA4 order,
    traits holding an array of objects); and the batch envelopes around them."""
    spec = sample.LandingSpec(rows=4000, start=NOW - timedelta(minutes=45), end=NOW, seed=11)
    df = sample.generate_table(spec).to_pandas()
    df["_row"] = np.arange(len(df), dtype=np.int64)
    df["_file"] = "part-0.parquet"
    mapper = BatchMapper(BLUEPRINT, MappingSettings(), NOW)
    batch = mapper.map_batch(df)
    user_lines, _, _ = mapper.fold_users(batch.identify)
    edge_bodies, _, edge_users = run(
        [
            row("page", context={"fullstory": {"session_id": SID}}, user_id=None),
            row(event="purchase", properties=GA4_ORDER, ts=NOW),
            row("identify", traits={"name": "N", "tags": [{"a": 1}]}),
        ]
    )
    events = [orjson.loads(line) for line in batch.lines] + list(edge_bodies.values())
    users = [orjson.loads(line) for line in user_lines] + [u for u, _ in edge_users]
    assert len(events) > 1000 and len(users) > 50
    assert {e["name"] for e in events} >= {"page_view", "product_viewed", "purchase", "Product Added"}
    assert any("session" in e and "id" in e["session"] for e in events)
    assert any(e.get("session") == {"use_most_recent": True} for e in events)
    return {
        "event": events,
        "user": users,
        "events_batch": [orjson.loads(b'{"requests":[' + b",".join(batch.lines[:500]) + b"]}")],
        "users_batch": [{"requests": users}],
    }


# ---- the project schema: always ---------------------------------------------------------------------


def test_every_generated_body_validates_against_the_project_schema(generated):
    for name, bodies in generated.items():
        check = schema.validator(name)
        for body in bodies:
            errors = sorted(check.iter_errors(body), key=str)
            assert not errors, (name, body, errors[0].message)


def test_the_emulator_accepts_every_generated_body(generated):
    for body in generated["event"]:
        emulator.check_event(body)
    for body in generated["user"]:
        emulator.check_user(body, batch_item=True)
    for body in generated["events_batch"]:
        emulator.check_events_batch(body)
    for body in generated["users_batch"]:
        emulator.check_users_batch(body)


def test_project_schema_is_strict():
    event, user = schema.validator("event"), schema.validator("user")
    assert event.is_valid({"name": "x", "user": {"uid": "u"}})
    assert not event.is_valid({"name": "x", "user": {"uid": "u"}, "anonymous_id": "a"})  # unknown field
    assert not event.is_valid({"name": "x", "user": {"uid": "u", "anonymous_id": "a"}})
    assert not event.is_valid({"user": {"uid": "u"}})  # name is required
    assert not event.is_valid({"name": "x" * 251, "user": {"uid": "u"}})
    assert user.is_valid({"uid": "x" * 256})
    assert not user.is_valid({"uid": "x" * 257})
    assert not user.is_valid({"email": "e" * 129})
    assert not user.is_valid({"properties": {f"p{i}": i for i in range(501)}})
    assert not user.is_valid({"properties": {"tags": [{"a": 1}]}})  # arrays hold primitives only
    assert not user.is_valid({"schema": {"properties": {"seats": "integer"}}})
    device = {"name": "x", "user": {"uid": "u"}, "context": {"device": {"screen_width": 2**31 - 1}}}
    assert event.is_valid(device)
    device["context"]["device"]["screen_width"] = 2**31
    assert not event.is_valid(device)
    batch = schema.validator("events_batch")
    assert not batch.is_valid({"requests": []})
    assert not batch.is_valid({"requests": [{}] * (schema.MAX_BATCH_ITEMS + 1)})
    shared = {"context": {"browser": {"url": "https://shop.example.com/"}}}
    assert batch.is_valid({"requests": [{"name": "x", "user": {"uid": "u"}}], "shared": shared})
    assert not batch.is_valid(
        {"requests": [{"name": "x", "user": {"uid": "u"}, "context": {}}], "shared": shared}
    )


@pytest.mark.parametrize(
    "identification, valid",
    [
        ({"user": {"uid": "u-1"}}, True),
        ({"user": {"id": "4000000001"}}, True),
        ({"session": {"id": SID}}, True),
        ({"user": {"uid": "u-1"}, "session": {"use_most_recent": True}}, True),
        ({"user": {"id": "4000000001"}, "session": {"use_most_recent": False}}, True),
        ({"session": {"id": SID, "use_most_recent": False}}, True),
        ({"user": {"id": "4000000001"}, "session": {"id": ""}}, True),  # "" counts as absent
        ({}, False),
        ({"user": {"uid": ""}}, False),
        ({"user": {"uid": "u", "id": "1"}}, False),
        ({"user": {"uid": "u"}, "session": {"id": SID}}, False),
        ({"session": {"id": SID, "use_most_recent": True}}, False),
        ({"session": {"use_most_recent": True}}, False),
        ({"session": {"id": "123456789"}}, False),
        ({"session": {"id": ":123"}}, False),
    ],
)
def test_schema_and_emulator_agree_on_one_form_of_identification(identification, valid):
    body = {"name": "Order Completed", **identification}
    assert schema.validator("event").is_valid(body) is valid
    try:
        emulator.check_event(body)
        accepted = True
    except emulator.ItemError:
        accepted = False
    assert accepted is valid


# ---- against FullStory's verbatim Swagger specs, when present ------------------------------------------

SWAGGER_DEFINITIONS = {  # project schema name -> (spec file, Swagger request definition)
    "event": ("events.swagger.patched.json", "fullstory.v2.events.CreateEventRequest"),
    "events_batch": ("events.swagger.patched.json", "fullstory.v2.events.CreateBatchEventsImportJobRequest"),
    "new_user": ("users.sdk.swagger.patched.json", "fullstory.v2.users.CreateUserRequest"),
    "user": ("users.sdk.swagger.patched.json", "fullstory.v2.users.BatchUserImportRequest"),
    "users_batch": ("users.sdk.swagger.patched.json", "fullstory.v2.users.CreateBatchUserImportJobRequest"),
}

# What the project schema states beyond the Swagger, from FullStory's docs (docs/fullstory-api.md):
# keyed "<definition>.<field>" of the project schema.
BEYOND_SWAGGER = {
    "event.name": {"minLength": 1, "maxLength": schema.MAX_EVENT_NAME},
    "event.properties": {"maxProperties": schema.MAX_PROPERTIES},
    "events_batch.requests": {"minItems": 1, "maxItems": schema.MAX_BATCH_ITEMS},
    "users_batch.requests": {"minItems": 1, "maxItems": schema.MAX_BATCH_ITEMS},
}
_LIMITS = ("type", "minLength", "maxLength", "maxProperties", "minItems", "maxItems")


def _facts(node: dict, int32: bool) -> dict:
    facts = {key: node[key] for key in _LIMITS if key in node}
    if node.get("required"):
        facts["required"] = sorted(node["required"])
    if node.get("type") == "object":
        facts["fields"] = sorted(node.get("properties", {}))
    if int32:
        facts["int32"] = True
    return facts


class _Agreement:
    """Walks a Swagger definition and the project schema side by side, field by field."""

    def __init__(self, swagger_definitions: dict) -> None:
        self.swagger = swagger_definitions
        self.problems: list[tuple] = []
        self.labels: set[str] = set()

    def _swagger(self, node: dict) -> dict:
        while "$ref" in node:
            node = self.swagger[node["$ref"].rsplit("/", 1)[1]]
        return node

    @staticmethod
    def _ours(node: dict, name: str | None) -> tuple[dict, str | None]:
        while "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[1]
            node = schema.DEFINITIONS[name]
        return node, name

    def compare(self, theirs: dict, ours: dict, label: str, owner: str | None = None) -> None:
        theirs = self._swagger(theirs)
        ours, owner = self._ours(ours, owner)
        self.labels.add(label)
        expected = _facts(theirs, theirs.get("format") == "int32")
        if theirs.get("type") == "object":  # closed, as FullStory's gateway is, unless free-form
            expected["closed"] = "properties" in theirs
        expected.update(BEYOND_SWAGGER.get(label, {}))
        int32 = (ours.get("minimum"), ours.get("maximum")) == (schema.INT32_MIN, schema.INT32_MAX)
        found = _facts(ours, int32)
        if ours.get("type") == "object":
            found["closed"] = ours.get("additionalProperties") is False
        problem = (label, {"project": found, "swagger": expected})
        if found != expected and problem not in self.problems:  # a definition may be reached twice
            self.problems.append(problem)
        for field in sorted(theirs.get("properties", {}).keys() & ours.get("properties", {}).keys()):
            self.compare(theirs["properties"][field], ours["properties"][field], f"{owner or label}.{field}")
        if "items" in theirs and "items" in ours:
            self.compare(theirs["items"], ours["items"], f"{label}[]")


@pytest.fixture(scope="module")
def swagger(shared_dir) -> dict:
    definitions = {}
    for name in {file for file, _ in SWAGGER_DEFINITIONS.values()}:
        definitions.update(
            json.loads((shared_dir / "reference" / "fullstory-api" / name).read_text())["definitions"]
        )
    return definitions


def test_project_schema_agrees_with_the_swagger_specs(swagger):
    agreement = _Agreement(swagger)
    for name, (_, definition) in SWAGGER_DEFINITIONS.items():
        agreement.compare({"$ref": f"#/definitions/{definition}"}, schema.ref(name), name, name)
    assert not agreement.problems, agreement.problems
    assert set(BEYOND_SWAGGER) <= agreement.labels  # no stale entries
    assert len(agreement.labels) > 40


def _strict(node):
    """Swagger declares no additionalProperties; FullStory's gateway refuses unknown fields (api §6b), so
    the test does too, except on the free-form `properties` objects."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if node.get("type") == "object" and "properties" in node and isinstance(node["properties"], dict):
            node.setdefault("additionalProperties", False)
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@pytest.fixture(scope="module")
def validators(shared_dir):
    def load(name, definition):
        spec = json.loads((shared_dir / "reference" / "fullstory-api" / name).read_text())
        root = {
            "definitions": _strict(copy.deepcopy(spec["definitions"])),
            "$ref": f"#/definitions/{definition}",
        }
        return jsonschema.Draft4Validator(root)

    return {name: load(*where) for name, where in SWAGGER_DEFINITIONS.items()}


def test_strict_validator_catches_an_unknown_field(validators):
    assert list(validators["event"].iter_errors({"name": "x", "anonymous_id": "a"}))
    assert list(validators["user"].iter_errors({"uid": "x" * 257}))


def test_every_generated_body_validates_against_the_swagger_spec(generated, validators):
    for name, bodies in generated.items():
        for body in bodies:
            validators[name].validate(body)
