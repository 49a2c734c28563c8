"""Hand-written validators of FullStory's v2 request bodies.

Two layers, both enforced here:
- the spec layer (Swagger request definitions): field names (unknown fields are errors, the gateway is
  protobuf-generated), JSON types, int32 ranges, maxLength, maxProperties, required fields;
- FullStory's documented rules: one form of identification per event, property naming and size limits,
  event name length, schema type names, shared.context conflicts.

No spec text is shipped: the field tables and limits come from the project's own schema (schema.py,
written from docs/fullstory-api.md); the checks themselves are hand-written. Every check raises
`ItemError(code, message)` naming the field; callers turn it into a 400 or a per-item error.
The code is flat on purpose: a batch of 50,000 items is validated on the request path.
"""

from __future__ import annotations

import re
from datetime import datetime

import orjson

from .schema import (
    DEFINITIONS,
    INT32_MAX,
    INT32_MIN,
    MAX_BATCH_ITEMS,
    MAX_DISPLAY_NAME,
    MAX_EMAIL,
    MAX_EVENT_NAME,
    MAX_PROPERTIES,
    MAX_PROPERTY_PATH,
    MAX_UID,
    MAX_VALUE_BYTES,
    PROPERTY_NAME,
    SCHEMA_TYPES,
    field_types,
    fields,
)

# Identification kinds stored with each accepted event.
ID_USER_UID, ID_USER_ID, ID_SESSION_ID = 1, 2, 3
ID_KIND_NAMES = {ID_USER_UID: "user.uid", ID_USER_ID: "user.id", ID_SESSION_ID: "session.id"}
MOST_RECENT_FLAG = 0x10  # or-ed into the kind when session.use_most_recent is true

_NAME_RE = re.compile(PROPERTY_NAME)
# Property names repeat across items; a set lookup is much cheaper than the regex.
_good_names: set[str] = set()
_GOOD_NAMES_CAP = 200_000

# Field tables of the request definitions (schema.py names them).
_EVENT_FIELDS = fields("event")
_USER_ID_FIELDS = fields("event_user")
_SESSION_FIELDS = fields("event_session")
_BATCH_EVENTS_FIELDS = fields("events_batch")
_SHARED_FIELDS = fields("shared")
_BATCH_USERS_FIELDS = fields("users_batch")
_CREATE_USER_FIELDS = fields("new_user")
_BATCH_USER_FIELDS = fields("user")
_SCHEMA_FIELDS = fields("declared_types")

# Context sub-objects: field -> JSON type (int means int32, float means double).
_CONTEXT_PARTS = {part: field_types(part) for part in DEFINITIONS["context"]["properties"]}


class ItemError(Exception):
    """One refused request body or batch item: `code` (snake_case) and a message naming the field."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> ItemError:
    return ItemError("invalid_argument", message)


def _type_name(value) -> str:
    if value is None:
        return "null"
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
    }.get(type(value), type(value).__name__)


def _expect_object(value, field: str) -> dict:
    if type(value) is not dict:
        raise _invalid(f"{field} must be an object, got {_type_name(value)}")
    return value


def _expect_str(value, field: str, max_len: int | None = None) -> str:
    if type(value) is not str:
        raise _invalid(f"{field} must be a string, got {_type_name(value)}")
    if max_len is not None and len(value) > max_len:
        raise _invalid(f"{field} is longer than {max_len} characters ({len(value)})")
    return value


def _reject_unknown(obj: dict, allowed: frozenset, where: str) -> None:
    for key in obj:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise _invalid(f"unknown field {prefix}{key}")


def parse_timestamp(value, field: str = "timestamp") -> float:
    """RFC 3339 date-time with a zone (what protobuf's Timestamp JSON accepts) -> epoch seconds."""
    if type(value) is not str:
        raise _invalid(f"{field} must be a string, got {_type_name(value)}")
    try:
        if len(value) < 20 or value[10] not in "Tt":
            raise ValueError
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _invalid(f"{field} is not an ISO 8601 date-time with a time zone: {value[:64]!r}") from None
    if parsed.tzinfo is None:
        raise _invalid(f"{field} has no time zone: {value[:64]!r}")
    return parsed.timestamp()


# ---- properties and schema -------------------------------------------------------------------------


def _check_name(name, parent: str) -> str:
    if name in _good_names:
        return name
    path = f"{parent}.{name}" if parent else name
    if not _NAME_RE.fullmatch(name):
        raise _invalid(
            f"property name {path!r} is invalid: use letters, digits and '_' and start with a letter"
        )
    if len(path) > MAX_PROPERTY_PATH:
        raise _invalid(f"property name {path[:64]!r}... is longer than {MAX_PROPERTY_PATH} characters")
    if len(_good_names) < _GOOD_NAMES_CAP:
        _good_names.add(name)
    return name


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _check_array(value: list, path: str) -> None:
    if not _SCALARS.issuperset(map(type, value)):
        element = next(e for e in value if type(e) not in _SCALARS)
        raise _invalid(f"{path} is an array of {_type_name(element)}s: arrays may hold only primitives")
    if len(value) * 4 > MAX_VALUE_BYTES and len(orjson.dumps(value)) > MAX_VALUE_BYTES:
        raise _invalid(f"{path} value is larger than {MAX_VALUE_BYTES} bytes")


def _check_properties(props: dict, where: str, parent: str) -> int:
    """Walk (nested) properties; returns the number of leaf properties."""
    if not _good_names.issuperset(props):
        for name in props:
            _check_name(name, parent)
    if parent:  # the dotted path counts against the name limit
        room = MAX_PROPERTY_PATH - len(parent) - 1
        for name in props:
            if len(name) > room:
                raise _invalid(
                    f"{where}.{parent}.{name[:32]}... is longer than {MAX_PROPERTY_PATH} characters"
                )
    count = len(props)
    for name, value in props.items():
        kind = type(value)
        if kind is str:
            # at most 4 bytes a character: only long strings need encoding to be measured
            if len(value) > MAX_VALUE_BYTES // 4 and len(value.encode()) > MAX_VALUE_BYTES:
                path = f"{parent}.{name}" if parent else name
                raise _invalid(f"{where}.{path} value is larger than {MAX_VALUE_BYTES} bytes")
        elif kind is dict:
            count += _check_properties(value, where, f"{parent}.{name}" if parent else name) - 1
        elif kind is list:
            _check_array(value, f"{where}.{parent + '.' if parent else ''}{name}")
    return count


def check_properties(props, where: str = "properties") -> dict:
    _expect_object(props, where)
    if len(props) > MAX_PROPERTIES:
        raise _invalid(f"{where} has more than {MAX_PROPERTIES} properties ({len(props)})")
    count = _check_properties(props, where, "")
    if count > MAX_PROPERTIES:
        raise _invalid(f"{where} has more than {MAX_PROPERTIES} properties ({count}, nested included)")
    return props


def check_schema(schema, where: str = "schema") -> dict:
    _expect_object(schema, where)
    _reject_unknown(schema, _SCHEMA_FIELDS, where)
    declared = schema.get("properties")
    if declared is None:
        if "properties" in schema:
            raise _invalid(f"{where}.properties must be an object, got null")
        return schema
    _expect_object(declared, f"{where}.properties")
    for path, type_name in declared.items():
        for part in path.split("."):
            _check_name(part, "")
        if len(path) > MAX_PROPERTY_PATH:
            raise _invalid(f"{where}.properties path {path[:64]!r}... is longer than {MAX_PROPERTY_PATH}")
        if type_name not in SCHEMA_TYPES:
            raise _invalid(
                f"{where}.properties.{path} type {type_name!r} is not one of {', '.join(sorted(SCHEMA_TYPES))}"
            )
    return schema


# ---- events ----------------------------------------------------------------------------------------


def _check_context_part(value, fields: dict, where: str) -> None:
    _expect_object(value, where)
    if not value.keys() <= fields.keys():
        raise _invalid(f"unknown field {where}.{sorted(value.keys() - fields.keys())[0]}")
    for field, x in value.items():
        kind = fields[field]
        if type(x) is kind:
            if kind is int and not INT32_MIN <= x <= INT32_MAX:
                raise _invalid(f"{where}.{field} is out of the int32 range")
        elif kind is float and type(x) is int:
            pass  # a JSON number without a fraction is still a double
        else:
            expected = {str: "a string", int: "an integer", float: "a number"}[kind]
            raise _invalid(f"{where}.{field} must be {expected}, got {_type_name(x)}")


def check_context(context, where: str = "context") -> dict:
    _expect_object(context, where)
    for part, value in context.items():
        fields = _CONTEXT_PARTS.get(part)
        if fields is None:
            raise _invalid(f"unknown field {where}.{part}")
        _check_context_part(value, fields, f"{where}.{part}")
    return context


def _user_identification(user, event: dict) -> tuple[str | None, str | None]:
    if user is None:
        if "user" in event:
            raise _invalid("user must be an object, got null")
        return None, None
    _expect_object(user, "user")
    if not user.keys() <= _USER_ID_FIELDS:
        _reject_unknown(user, _USER_ID_FIELDS, "user")
    uid = user.get("uid")
    if uid is not None or "uid" in user:
        uid = _expect_str(uid, "user.uid", MAX_UID) or None
    user_id = user.get("id")
    if user_id is not None or "id" in user:
        user_id = _expect_str(user_id, "user.id") or None
    return uid, user_id


def _session_identification(session, event: dict) -> tuple[str | None, bool]:
    if session is None:
        if "session" in event:
            raise _invalid("session must be an object, got null")
        return None, False
    _expect_object(session, "session")
    _reject_unknown(session, _SESSION_FIELDS, "session")
    session_id = None
    if "id" in session:
        session_id = _expect_str(session["id"], "session.id") or None
    use_most_recent = session.get("use_most_recent", False)
    if type(use_most_recent) is not bool:
        raise _invalid(f"session.use_most_recent must be a boolean, got {_type_name(use_most_recent)}")
    return session_id, use_most_recent


def _identification(event: dict) -> tuple[int, str]:
    """FullStory's rule: exactly one of user.uid, user.id, session.id; use_most_recent needs one user field.
    Empty strings count as absent (protobuf's default value)."""
    uid, user_id = _user_identification(event.get("user"), event)
    session = event.get("session")
    if session is None and "session" not in event:
        session_id, use_most_recent = None, False
    else:
        session_id, use_most_recent = _session_identification(session, event)
    if session_id is not None:
        if uid is not None or user_id is not None or use_most_recent:
            raise _invalid(
                "session.id was given with user or session.use_most_recent: use one form of identification"
            )
        device, sep, sess = session_id.partition(":")
        if not sep or not device or not sess:
            raise _invalid(f"session.id {session_id[:64]!r} is not of the form '<deviceId>:<sessionId>'")
        return ID_SESSION_ID, session_id
    if uid is not None and user_id is not None:
        raise _invalid("user.uid and user.id were both given: use one form of identification")
    flag = MOST_RECENT_FLAG if use_most_recent else 0
    if uid is not None:
        return ID_USER_UID | flag, uid
    if user_id is not None:
        return ID_USER_ID | flag, user_id
    if use_most_recent:
        raise _invalid("session.use_most_recent requires exactly one of user.uid or user.id")
    raise _invalid("the event has no identification: give one of user.uid, user.id or session.id")


def check_event(event, *, shared_context: bool = False) -> tuple:
    """A CreateEventRequest (single or batch item) ->
    (name, id kind, ident, timestamp or None, properties or None)."""
    if type(event) is not dict:
        raise _invalid(f"the event must be an object, got {_type_name(event)}")
    if not event.keys() <= _EVENT_FIELDS:
        raise _invalid(f"unknown field {sorted(event.keys() - _EVENT_FIELDS)[0]}")
    if "name" not in event:
        raise ItemError("required_field", "name is required")
    name = event["name"]
    if type(name) is not str:
        raise _invalid(f"name must be a string, got {_type_name(name)}")
    if not name:
        raise ItemError("required_field", "name is required (empty)")
    if len(name) > MAX_EVENT_NAME:
        raise _invalid(f"name is longer than {MAX_EVENT_NAME} characters ({len(name)})")
    timestamp = parse_timestamp(event["timestamp"]) if "timestamp" in event else None
    id_kind, ident = _identification(event)
    if "context" in event:
        check_context(event["context"])
        if shared_context:
            raise _invalid("context is set on the item while shared.context is set: send one or the other")
    props = check_properties(event["properties"]) if "properties" in event else None
    if "schema" in event:
        check_schema(event["schema"])
    return name, id_kind, ident, timestamp, props


def check_batch_envelope(body, fields: frozenset) -> list:
    """The part of a batch body that fails the whole request: returns the `requests` list."""
    if type(body) is not dict:
        raise _invalid(f"the request body must be an object, got {_type_name(body)}")
    _reject_unknown(body, fields, "")
    requests = body.get("requests")
    if requests is None:
        raise ItemError("required_field", "requests is required")
    if type(requests) is not list:
        raise _invalid(f"requests must be an array, got {_type_name(requests)}")
    if not requests:
        raise ItemError("required_field", "requests is required (empty)")
    if len(requests) > MAX_BATCH_ITEMS:
        raise _invalid(f"requests has {len(requests)} items: at most {MAX_BATCH_ITEMS} per batch")
    return requests


def check_events_batch(body) -> tuple[list, dict | None]:
    requests = check_batch_envelope(body, _BATCH_EVENTS_FIELDS)
    shared = body.get("shared")
    if shared is None and "shared" not in body:
        return requests, None
    _expect_object(shared, "shared")
    _reject_unknown(shared, _SHARED_FIELDS, "shared")
    if "context" in shared:
        check_context(shared["context"], "shared.context")
    return requests, shared


# ---- users -----------------------------------------------------------------------------------------


def check_user(user, *, batch_item: bool = False) -> dict:
    """CreateUserRequest, or BatchUserImportRequest (which may also carry the FullStory `id`)."""
    if type(user) is not dict:
        raise _invalid(f"the user must be an object, got {_type_name(user)}")
    allowed = _BATCH_USER_FIELDS if batch_item else _CREATE_USER_FIELDS
    _reject_unknown(user, allowed, "")
    if "id" in user:
        _expect_str(user["id"], "id")
    if "uid" in user:
        _expect_str(user["uid"], "uid", MAX_UID)
    if "display_name" in user:
        _expect_str(user["display_name"], "display_name", MAX_DISPLAY_NAME)
    if "email" in user:
        _expect_str(user["email"], "email", MAX_EMAIL)
    if "properties" in user:
        check_properties(user["properties"])
    if "schema" in user:
        check_schema(user["schema"])
    return user


def check_users_batch(body) -> list:
    return check_batch_envelope(body, _BATCH_USERS_FIELDS)
