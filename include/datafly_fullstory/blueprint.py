"""The FullStory blueprint: the versioned mapping from Datafly events to FullStory bodies, kept as data.

`load_blueprint()` reads `blueprints/fullstory/<variant>.yaml` (or any path), checks every key and returns
a frozen `Blueprint`. A bad file fails with a `BlueprintError` naming the file and the key, so a mapping
change is a YAML edit whose mistakes show at load time, not halfway through a run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from include.datafly_fullstory.errors import BlueprintError
from include.datafly_fullstory.landing import EVENT_TYPES

BLUEPRINT_DIR = Path(__file__).resolve().parent / "blueprints" / "fullstory"
SCHEMA_TYPES = frozenset({"str", "strs", "int", "ints", "real", "reals", "bool", "bools", "date", "dates"})
ITEM_TYPES = frozenset({"strs", "ints", "reals"})
LIMIT_KEYS = ("event_name", "properties", "property_path", "value_bytes", "uid", "display_name", "email")
_VALID_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def normalise_event_name(name: str) -> str:
    """The spelling-independent form of an event name: 'Order Completed' == 'order_completed'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@dataclass(frozen=True)
class EventMapping:
    """One Datafly event (all its spellings) -> one FullStory event name and its property rules."""

    fullstory_name: str
    datafly_type: str
    events: tuple[str, ...] = ()
    renames: dict[str, str] = field(default_factory=dict)
    from_context: dict[str, tuple[str, ...]] = field(default_factory=dict)
    from_row: dict[str, str] = field(default_factory=dict)
    schema: dict[str, str] = field(default_factory=dict)
    lift_first_item: bool = False


@dataclass(frozen=True)
class ItemField:
    """One typed parallel array built from an item list (`item_prices` from `price`, ...)."""

    property: str
    sources: tuple[str, ...]
    type: str
    fill: Any
    lift_as: str | None = None


@dataclass(frozen=True)
class Blueprint:
    name: str
    variant: str
    version: str
    events: tuple[EventMapping, ...]
    unmapped_types: frozenset[str]
    item_source_keys: tuple[str, ...]
    item_count_property: str
    item_fields: tuple[ItemField, ...]
    identity: dict[str, tuple[tuple[str, ...], ...]]
    anonymous_id_property: str
    locale_property: str
    event_id_property: str
    user_fields: dict[str, tuple[str, ...]]
    consent_category: str
    consent_paths: tuple[tuple[str, ...], ...]
    consent_values: dict[str, bool]  # normalised (`consent_key`) value -> granted
    reserved_names: dict[str, str]
    reserved_suffixes: tuple[str, ...]
    limits: dict[str, int]
    source: str = "<dict>"
    consent_categories_path: tuple[str, ...] | None = None  # raw CMP codes: the granted categories
    consent_cmp_codes: dict[str, str] = field(default_factory=dict)  # normalised CMP code -> purpose
    property_types: dict[str, str] = field(default_factory=dict)  # every event; an event's schema adds
    trait_types: dict[str, str] = field(default_factory=dict)  # user traits (identify)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.variant} {self.version}"

    def track_names(self) -> dict[str, EventMapping]:
        """Normalised track event name -> mapping, for every spelling."""
        return {
            normalise_event_name(e): m for m in self.events if m.datafly_type == "track" for e in m.events
        }

    def type_mappings(self) -> dict[str, EventMapping]:
        """Datafly type -> mapping, for mappings matched on the type alone (page)."""
        return {m.datafly_type: m for m in self.events if not m.events}


def load_blueprint(path_or_variant: str | Path = "retail") -> Blueprint:
    """A blueprint from a YAML path, or by variant name from the bundled `blueprints/fullstory/`."""
    path = Path(path_or_variant)
    if path.suffix not in (".yaml", ".yml"):
        path = BLUEPRINT_DIR / f"{path_or_variant}.yaml"
    if not path.is_file():
        raise BlueprintError(f"blueprint file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise BlueprintError(f"{path}: not valid YAML: {exc}") from exc
    return blueprint_from_dict(data, source=str(path))


def blueprint_from_dict(data: Any, source: str = "<dict>") -> Blueprint:
    """Check a parsed blueprint document and build the `Blueprint`."""
    doc = _Doc(data, source, "")
    events_doc = doc.child("events")
    items = doc.child("items")
    identity = doc.child("identity")
    consent = doc.child("consent")
    bp = Blueprint(
        name=doc.text("blueprint"),
        variant=doc.text("variant"),
        version=doc.text("version"),
        events=tuple(_event_mapping(events_doc.child(name), name) for name in events_doc.keys()),
        unmapped_types=frozenset(doc.names("unmapped_types")),
        item_source_keys=tuple(items.names("source_keys")),
        item_count_property=items.property_name("count_property"),
        item_fields=tuple(_item_field(items, i) for i in range(len(items.list("fields")))),
        identity={
            key: tuple(_path(p) for p in identity.names(key))
            for key in ("fullstory_session_id", "user_agent", "ip", "locale", "page_url")
        },
        anonymous_id_property=identity.property_name("anonymous_id_property"),
        locale_property=identity.property_name("locale_property"),
        event_id_property=identity.property_name("event_id_property"),
        user_fields={key: tuple(doc.child("user_fields").names(key)) for key in ("display_name", "email")},
        consent_category=consent.text("category"),
        consent_paths=tuple(_path(p) for p in consent.names("paths")),
        consent_values=_consent_values(consent),
        reserved_names={
            k: doc.child("reserved_names").property_name(k) for k in doc.child("reserved_names").keys()
        },
        reserved_suffixes=tuple(doc.names("reserved_suffixes")),
        limits={k: doc.child("limits").positive_int(k) for k in LIMIT_KEYS},
        source=source,
        consent_categories_path=_path(consent.text("categories_path"))
        if "categories_path" in consent.data
        else None,
        consent_cmp_codes={consent_key(k): str(v) for k, v in consent.optional_map("cmp_codes").items()},
        property_types=doc.type_map("property_types"),
        trait_types=doc.type_map("trait_types"),
    )
    _check_unique_names(bp, source)
    return bp


def consent_key(value: Any) -> str | None:
    """A consent value or CMP code in the form the blueprint's lists are matched in: trimmed lower-case text;
    booleans as "true"/"false", whole numbers without a fraction (1, 1.0 and "1" are one value). None for a
    value that has no such form (an object, an array, null)."""
    kind = type(value)
    if kind is str:
        return value.strip().lower()
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def _consent_values(consent: _Doc) -> dict[str, bool]:
    values: dict[str, bool] = {}
    for key, granted in (("denied_values", False), ("granted_values", True)):
        for value in consent.list(key):
            normal = consent_key(value)
            if not normal:
                raise consent.error(key, f"{value!r} is not a string, number or boolean")
            if values.get(normal, granted) != granted:
                raise consent.error(key, f"{value!r} is listed as both granted and denied")
            values[normal] = granted
    return values


def _event_mapping(doc: _Doc, name: str) -> EventMapping:
    if not _VALID_NAME.fullmatch(name):
        raise doc.error("", f"event name {name!r} must be letters, digits and '_' and start with a letter")
    match = doc.child("match")
    datafly_type = match.text("type")
    if datafly_type not in EVENT_TYPES:
        raise match.error("type", f"is {datafly_type!r}; a mapping matches 'page' or 'track'")
    events = tuple(match.names("events")) if datafly_type == "track" else ()
    if datafly_type == "track" and not events:
        raise match.error("events", "a track mapping needs at least one event name")
    schema = doc.optional_map("schema")
    for prop, type_name in schema.items():
        if type_name not in SCHEMA_TYPES:
            raise doc.error(f"schema.{prop}", f"type {type_name!r} is not one of {sorted(SCHEMA_TYPES)}")
    return EventMapping(
        fullstory_name=name,
        datafly_type=datafly_type,
        events=events,
        renames={str(k): doc.child("renames").property_name(k) for k in doc.optional_map("renames")},
        from_context={str(k): _path(str(v)) for k, v in doc.optional_map("from_context").items()},
        from_row={str(k): str(v) for k, v in doc.optional_map("from_row").items()},
        schema={str(k): str(v) for k, v in schema.items()},
        lift_first_item=bool(doc.data.get("lift_first_item", False)),
    )


def _item_field(items: _Doc, index: int) -> ItemField:
    entry = _Doc(items.list("fields")[index], items.source, f"{items.where}fields[{index}].")
    type_name = entry.text("type")
    if type_name not in ITEM_TYPES:
        raise entry.error("type", f"is {type_name!r}; item arrays are one of {sorted(ITEM_TYPES)}")
    lift_as = entry.data.get("lift_as")
    return ItemField(
        property=entry.property_name("property"),
        sources=tuple(entry.names("from")),
        type=type_name,
        fill=entry.data.get("fill"),
        lift_as=None if lift_as is None else str(lift_as),
    )


def _check_unique_names(bp: Blueprint, source: str) -> None:
    seen: dict[str, str] = {}
    for mapping in bp.events:
        for event in mapping.events:
            key = normalise_event_name(event)
            if seen.setdefault(key, mapping.fullstory_name) != mapping.fullstory_name:
                raise BlueprintError(
                    f"{source}: events.{mapping.fullstory_name}.match.events: {event!r} is "
                    f"already mapped by events.{seen[key]}"
                )
    types = [m.datafly_type for m in bp.events if not m.events]
    if len(types) != len(set(types)):
        raise BlueprintError(f"{source}: events: two mappings match the same Datafly type {types}")


def _path(text: str) -> tuple[str, ...]:
    return tuple(str(text).split("."))


class _Doc:
    """A mapping inside the YAML document, with typed getters whose errors name the file and key."""

    def __init__(self, data: Any, source: str, where: str):
        if not isinstance(data, dict):
            raise BlueprintError(f"{source}: {where.rstrip('.') or 'the document'} must be a mapping")
        self.data, self.source, self.where = data, source, where

    def error(self, key: str, message: str) -> BlueprintError:
        return BlueprintError(f"{self.source}: {self.where}{key}: {message}")

    def get(self, key: str) -> Any:
        if key not in self.data:
            raise self.error(key, "is missing")
        return self.data[key]

    def keys(self) -> list[str]:
        return [str(k) for k in self.data]

    def child(self, key: str) -> _Doc:
        value = self.get(key)
        if not isinstance(value, dict):
            raise self.error(key, "must be a mapping")
        return _Doc(value, self.source, f"{self.where}{key}.")

    def optional_map(self, key: str) -> dict:
        value = self.data.get(key) or {}
        if not isinstance(value, dict):
            raise self.error(key, "must be a mapping")
        return value

    def text(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str | int | float) or isinstance(value, bool) or str(value) == "":
            raise self.error(key, "must be a non-empty string")
        return str(value)

    def list(self, key: str) -> list:
        value = self.get(key)
        if not isinstance(value, list):
            raise self.error(key, "must be a list")
        return value

    def names(self, key: str) -> list[str]:
        values = self.list(key)
        if not all(isinstance(v, str) and v for v in values):
            raise self.error(key, "must be a list of non-empty strings")
        return values

    def property_name(self, key: str) -> str:
        value = self.text(key)
        if not _VALID_NAME.fullmatch(value):
            raise self.error(key, f"{value!r} is not a FullStory property name ([A-Za-z][A-Za-z0-9_]*)")
        return value

    def type_map(self, key: str) -> dict[str, str]:
        """An optional map of property name -> FullStory schema type (`revenue: real`)."""
        types = {}
        for name, type_name in self.optional_map(key).items():
            if not isinstance(name, str) or not _VALID_NAME.fullmatch(name):
                raise self.error(f"{key}.{name}", "is not a FullStory property name ([A-Za-z][A-Za-z0-9_]*)")
            if type_name not in SCHEMA_TYPES:
                raise self.error(f"{key}.{name}", f"type {type_name!r} is not one of {sorted(SCHEMA_TYPES)}")
            types[name] = type_name
        return types

    def positive_int(self, key: str) -> int:
        value = self.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise self.error(key, "must be a positive integer")
        return value
