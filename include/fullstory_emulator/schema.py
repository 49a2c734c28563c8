"""The request bodies FullStory's v2 Server API accepts, as JSON Schema (2020-12) held by the project.

Written here from the facts in docs/fullstory-api.md, not copied from FullStory's Swagger: the field names,
JSON types, required fields and length limits are those the Swagger definitions declare (a test checks
that they agree whenever the verbatim specs are at hand), and FullStory's documented rules that the Swagger
leaves to prose are added on top:

- objects are closed (the API gateway refuses unknown fields), except the free-form `properties`;
- an event is identified in exactly one way: `user.uid`, `user.id` or `session.id` (an empty string
  counts as absent); `session.id` looks like `<deviceId>:<sessionId>` and is not combined with
  `session.use_most_recent: true`;
- event names are 1..250 characters; a batch holds 1..50,000 items; int32 fields stay in range;
- properties: at most 500, names `[A-Za-z][A-Za-z0-9_]*` of at most 512 characters, values are
  primitives, arrays of primitives or nested objects; declared types are one of `SCHEMA_TYPES`;
- a batch item carries no `context` of its own when `shared.context` is set.

Three limits are only approximated, because JSON Schema counts otherwise than FullStory does: a
property value may hold at most 8192 *bytes* (the schema caps each string at 8192 characters), the
512-character limit applies to the whole dotted path of a nested property (the schema caps each name),
and the 500-property limit counts nested leaves (the schema counts the top level).
The emulator (validation.py) checks all three exactly, and takes its field tables and limits from here.

`REQUEST_SCHEMAS[name]` is a standalone schema for one body; `validator(name)` a ready jsonschema
validator (date-time formats checked); `ENDPOINT_BODIES` says which body each endpoint takes.
"""

from __future__ import annotations

from functools import cache

DRAFT = "https://json-schema.org/draft/2020-12/schema"

# ---- limits (docs/fullstory-api.md §3, §4) ----------------------------------------------------------

MAX_BATCH_ITEMS = 50_000
MAX_EVENT_NAME = 250
MAX_PROPERTIES = 500
MAX_PROPERTY_PATH = 512
MAX_VALUE_BYTES = 8192
MAX_UID = 256
MAX_DISPLAY_NAME = 256
MAX_EMAIL = 128
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
SCHEMA_TYPES = frozenset({"str", "strs", "int", "ints", "real", "reals", "bool", "bools", "date", "dates"})

PROPERTY_NAME = "[A-Za-z][A-Za-z0-9_]*"

# ---- small builders --------------------------------------------------------------------------------


def _whole(regex: str) -> str:
    """Anchored at both ends. Not `$`: Python's `re` (used by jsonschema) lets `$` match before a final
    newline."""
    return f"^(?:{regex})(?![\\s\\S])"


def ref(name: str) -> dict:
    return {"$ref": f"#/$defs/{name}"}


def string(max_length: int | None = None, *, min_length: int | None = None, **extra) -> dict:
    node = {"type": "string", **extra}
    if min_length is not None:
        node["minLength"] = min_length
    if max_length is not None:
        node["maxLength"] = max_length
    return node


def int32() -> dict:
    return {"type": "integer", "minimum": INT32_MIN, "maximum": INT32_MAX}


def number() -> dict:
    return {"type": "number"}


def boolean() -> dict:
    return {"type": "boolean"}


def closed(fields: dict, *, required: tuple[str, ...] = (), **extra) -> dict:
    """An object holding only the named fields."""
    node = {"type": "object", "properties": fields, "additionalProperties": False}
    if required:
        node["required"] = list(required)
    return {**node, **extra}


def batch_of(item: str) -> dict:
    return {"type": "array", "minItems": 1, "maxItems": MAX_BATCH_ITEMS, "items": ref(item)}


def present(*path: str) -> dict:
    """Holds when the string at `path` is there and not empty (FullStory treats "" as absent)."""
    node = string(min_length=1)
    for name in reversed(path):
        node = {"type": "object", "required": [name], "properties": {name: node}}
    return node


# ---- the pieces ------------------------------------------------------------------------------------

_PRIMITIVE = {
    "anyOf": [string(MAX_VALUE_BYTES), {"type": ["number", "boolean", "null"]}],
}

DEFINITIONS: dict[str, dict] = {
    # events: who the event belongs to
    "event_user": closed(
        {"uid": string(MAX_UID, examples=["user-42"]), "id": string(examples=["4000000001"])}
    ),
    "event_session": closed(
        {
            # "<deviceId>:<sessionId>"; an empty id counts as absent
            "id": string(
                anyOf=[{"maxLength": 0}, {"pattern": "^[^:]+:[\\s\\S]"}],
                examples=["5812340000000001:6723450000000002"],
            ),
            "use_most_recent": boolean(),
        }
    ),
    # events: where it happened
    "context": closed(
        {
            "browser": ref("browser"),
            "mobile": ref("mobile"),
            "device": ref("device"),
            "location": ref("location"),
        }
    ),
    "browser": closed({"url": string(), "user_agent": string(), "initial_referrer": string()}),
    "mobile": closed(
        {"app_id": string(), "app_version": string(), "app_name": string(), "build_variant": string()}
    ),
    "device": closed(
        {
            "manufacturer": string(),
            "model": string(),
            "screen_width": int32(),
            "screen_height": int32(),
            "viewport_width": int32(),
            "viewport_height": int32(),
        }
    ),
    "location": closed(
        {
            "country": string(examples=["DE"]),  # ISO 3166-1 alpha-2
            "region": string(examples=["DE-BE"]),  # ISO 3166-2
            "city": string(),
            "latitude": number(),
            "longitude": number(),
            "ip_address": string(examples=["203.0.113.7"]),
        }
    ),
    "shared": closed({"context": ref("context")}),
    # custom properties and their declared types, for events and users alike
    "properties": {
        "type": "object",
        "maxProperties": MAX_PROPERTIES,
        "propertyNames": {"pattern": _whole(PROPERTY_NAME), "maxLength": MAX_PROPERTY_PATH},
        "additionalProperties": ref("property_value"),
    },
    "property_value": {
        "anyOf": [
            _PRIMITIVE,
            {"type": "array", "items": _PRIMITIVE},
            {
                "type": "object",
                "propertyNames": {"pattern": _whole(PROPERTY_NAME), "maxLength": MAX_PROPERTY_PATH},
                "additionalProperties": ref("property_value"),
            },
        ]
    },
    "declared_types": closed(
        {
            "properties": {
                "type": "object",
                "propertyNames": {
                    "pattern": _whole(f"{PROPERTY_NAME}(?:\\.{PROPERTY_NAME})*"),
                    "maxLength": MAX_PROPERTY_PATH,
                },
                "additionalProperties": {"enum": sorted(SCHEMA_TYPES)},
            }
        }
    ),
    # POST /v2/events, and each item of POST /v2/events/batch
    "event": closed(
        {
            "name": string(MAX_EVENT_NAME, min_length=1, examples=["Order Completed"]),
            "timestamp": string(format="date-time"),
            "user": ref("event_user"),
            "session": ref("event_session"),
            "context": ref("context"),
            "properties": ref("properties"),
            "schema": ref("declared_types"),
        },
        required=("name",),
        # one form of identification
        oneOf=[present("user", "uid"), present("user", "id"), present("session", "id")],
        **{
            "not": {
                "allOf": [
                    present("session", "id"),
                    {
                        "required": ["session"],
                        "properties": {
                            "session": {
                                "required": ["use_most_recent"],
                                "properties": {"use_most_recent": {"const": True}},
                            }
                        },
                    },
                ]
            }
        },
    ),
    "events_batch": closed(
        {"requests": batch_of("event"), "shared": ref("shared")},
        required=("requests",),
        # with shared.context set, an item with its own context fails to import
        **{
            "if": {"required": ["shared"], "properties": {"shared": {"required": ["context"]}}},
            "then": {"properties": {"requests": {"items": {"not": {"required": ["context"]}}}}},
        },
    ),
    # POST /v2/users (create or update by uid)
    "new_user": closed(
        {
            "uid": string(MAX_UID, examples=["user-42"]),
            "display_name": string(MAX_DISPLAY_NAME),
            "email": string(MAX_EMAIL, examples=["ada@example.com"]),
            "properties": ref("properties"),
            "schema": ref("declared_types"),
        }
    ),
    "users_batch": closed({"requests": batch_of("user")}, required=("requests",)),
}
# each item of POST /v2/users/batch: a new user's fields, or FullStory's `id` of an existing user
DEFINITIONS["user"] = closed({"id": string(examples=["4000000001"]), **DEFINITIONS["new_user"]["properties"]})

ENDPOINT_BODIES = {
    "POST /v2/events": "event",
    "POST /v2/events/batch": "events_batch",
    "POST /v2/users": "new_user",
    "POST /v2/users/batch": "users_batch",
}


def _standalone(name: str) -> dict:
    return {"$schema": DRAFT, "$defs": DEFINITIONS, **ref(name)}


REQUEST_SCHEMAS = {
    name: _standalone(name) for name in ("event", "events_batch", "user", "users_batch", "new_user")
}


@cache
def validator(name: str):
    """A jsonschema validator for one request body (`REQUEST_SCHEMAS` key); formats are checked."""
    from jsonschema import Draft202012Validator

    return Draft202012Validator(REQUEST_SCHEMAS[name], format_checker=Draft202012Validator.FORMAT_CHECKER)


# ---- tables for hand-written checkers (the emulator's) ------------------------------------------------

_PYTHON_TYPES = {
    "string": str,
    "integer": int,
    "number": float,
    "boolean": bool,
    "object": dict,
    "array": list,
}


def fields(name: str) -> frozenset[str]:
    """The field names a closed object definition allows."""
    return frozenset(DEFINITIONS[name]["properties"])


def field_types(name: str) -> dict[str, type]:
    """Field -> Python type of a closed object whose fields are all JSON scalars (int means int32)."""
    return {field: _PYTHON_TYPES[node["type"]] for field, node in DEFINITIONS[name]["properties"].items()}
