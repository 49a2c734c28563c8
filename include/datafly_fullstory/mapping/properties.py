"""FullStory's property rules: names, reserved names, limits on paths, values and counts, declared types,
and item lists as typed parallel arrays. A row that would break one ends as `Reject`."""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

import orjson

from include.datafly_fullstory.blueprint import Blueprint, ItemField


class Reject(Exception):  # noqa: N818  (a row's fate, not a program error)
    """A row that would break a FullStory rule; `reason` goes to its outcome."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_VALID_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_INVALID_RUN = re.compile(r"[^A-Za-z0-9_]+")
_PLAN_CACHE_CAP = 100_000


class PropertyCleaner:
    """FullStory's property rules: names `[A-Za-z][A-Za-z0-9_]*`, reserved names renamed, dotted paths and
    values within limits, no nulls, no arrays of objects. The renaming plan of a key set is computed once
    and cached: Datafly payloads repeat the same few key sets millions of times."""

    def __init__(self, blueprint: Blueprint):
        self.reserved = blueprint.reserved_names
        self.suffixes = blueprint.reserved_suffixes
        self.max_value = blueprint.limits["value_bytes"]
        self.max_path = blueprint.limits["property_path"]
        self.max_count = blueprint.limits["properties"]
        self.item_keys = blueprint.item_source_keys
        self.item_fields = blueprint.item_fields
        self.item_fills = {f.property: _coerce_item(f.fill, f.type, None) for f in blueprint.item_fields}
        self.count_property = blueprint.item_count_property
        self._plans: dict[tuple, tuple[tuple[tuple[str, str], ...], int]] = {}
        self._item_plans: dict[tuple, tuple[tuple[int, str], ...]] = {}

    # names

    def plan(self, keys: tuple, top: bool) -> tuple[tuple[tuple[str, str], ...], int]:
        """(source key, FullStory name) pairs and the longest name. Valid names keep theirs; the others are
        cleaned in sorted order and numbered on collision (`_2`, `_3`), so the result never depends on key order."""
        cached = self._plans.get((top, keys))
        if cached is not None:
            return cached
        if len(self._plans) > _PLAN_CACHE_CAP:
            self._plans.clear()
        names = {k: k for k in keys if self._keeps_name(k, top)}
        taken = set(names)
        for key in sorted(set(keys) - taken):
            base = name = self.clean_name(key, top)
            number = 2
            while name in taken:
                name, number = f"{base}_{number}", number + 1
            names[key] = name
            taken.add(name)
        pairs = tuple((k, names[k]) for k in keys)
        result = (pairs, max((len(n) for n in names.values()), default=0))
        self._plans[(top, keys)] = result
        return result

    def _keeps_name(self, key: str, top: bool) -> bool:
        return (
            _VALID_NAME.fullmatch(key) is not None
            and not key.endswith(self.suffixes)
            and not (top and key in self.reserved)
        )

    def clean_name(self, key: str, top: bool = True) -> str:
        """'Video Length (s)' -> 'Video_Length_s'; '1st' -> 'p_1st'; reserved 'uid' -> the blueprint's rename."""
        ascii_key = unicodedata.normalize("NFKD", key).encode("ascii", "ignore").decode()
        name = _INVALID_RUN.sub("_", ascii_key).strip("_") or "property"
        if not name[0].isalpha():
            name = f"p_{name}"
        if top and name in self.reserved:
            name = self.reserved[name]
        if name.endswith(self.suffixes):
            name = f"{name}_value"
        return name

    # values

    def clean(self, obj: dict, where: str = "properties", parent: str = "") -> tuple[dict, int]:
        """A cleaned copy of `obj` and its number of leaf properties (nested objects count their leaves)."""
        pairs, longest = self.plan(tuple(obj), not parent)
        if len(parent) + 1 + longest > self.max_path:
            raise Reject(
                f"{where}: a property path under {parent or 'the top level'} is longer than "
                f"{self.max_path} characters"
            )
        out: dict = {}
        count = 0
        for key, name in pairs:
            value = obj[key]
            kind = type(value)
            if value is None:
                continue
            if kind is list:
                value = self._array(value, where, f"{parent}.{name}" if parent else name)
                kind = type(value)
            if kind is dict:
                value, leaves = self.clean(value, where, f"{parent}.{name}" if parent else name)
                if value:
                    out[name] = value
                    count += leaves
                continue
            if kind is str and len(value) > self.max_value // 4:
                self.checked_value(value, f"{parent}.{name}" if parent else name, where)
            out[name] = value
            count += 1
        return out, count

    def _array(self, values: list, where: str, path: str) -> list | dict:
        """Arrays of primitives pass (nulls dropped, mixed types as text); an array of objects becomes an
        object of arrays, one per field, which FullStory can index."""
        kinds = {type(v) for v in values}
        if dict in kinds:
            elements = [v for v in values if type(v) is dict]
            fields_ = dict.fromkeys(k for e in elements for k in e)
            return {k: [e[k] for e in elements if type(e.get(k)) in _PRIMITIVES] for k in fields_}
        if list in kinds or dict in kinds:
            values = [orjson.dumps(v).decode() if type(v) in (list, dict) else v for v in values]
            kinds = {type(v) for v in values}
        if type(None) in kinds:
            values = [v for v in values if v is not None]
            kinds.discard(type(None))
        if len(kinds - {int, float}) > 0 and len(kinds) > 1:
            values = [v if type(v) is str else orjson.dumps(v).decode() for v in values]
        if len(values) > 64 or str in kinds:
            size = len(orjson.dumps(values))
            if size > self.max_value:
                raise Reject(
                    f"{where}.{path} is {size} bytes; FullStory rejects values over {self.max_value} bytes"
                )
        return values

    def checked_value(self, value: Any, path: str, where: str = "properties") -> Any:
        if type(value) is str and len(value) > self.max_value // 4 and len(value.encode()) > self.max_value:
            raise Reject(
                f"{where}.{path} is {len(value.encode())} bytes; FullStory rejects values over "
                f"{self.max_value} bytes"
            )
        return value

    def checked_text(self, text: str, field: str, limit: int) -> str:
        if len(text) > limit:
            raise Reject(f"{field} is {len(text)} characters; FullStory allows {limit}")
        return text

    def check_count(self, count: int, where: str) -> None:
        if count > self.max_count:
            raise Reject(
                f"{where} has {count} properties after flattening; FullStory allows {self.max_count}"
            )

    # schema and items

    def take_items(self, props: dict) -> list | None:
        """Remove and return the first item list (products / items) holding objects."""
        for key in self.item_keys:
            value = props.get(key)
            if type(value) is list and any(type(v) is dict for v in value):
                del props[key]
                return [v for v in value if type(v) is dict]
        return None

    def add_items(self, properties: dict, schema: dict, items: list[dict], *, lift: bool) -> int:
        """Items as typed parallel arrays (one entry per item, `fill` where an item lacks the field) plus
        the item count; `lift` copies the first item's fields to the top level where absent.
        Returns the number of properties added."""
        n = len(items)
        columns: list[list] = [[None] * n for _ in self.item_fields]
        for j, item in enumerate(items):
            for field_index, key in self._item_plan(tuple(item)):
                columns[field_index][j] = item[key]
        added = 0
        for item_field, raw in zip(self.item_fields, columns, strict=True):
            if raw.count(None) == n:
                continue
            values = _ITEM_COERCE[item_field.type](raw, self.item_fills[item_field.property])
            self._check_item_size(values, item_field)
            added += item_field.property not in properties
            properties[item_field.property] = values
            schema[item_field.property] = item_field.type
            if lift:
                added += self._lift(properties, schema, item_field, raw[0], values[0])
        added += self.count_property not in properties
        properties[self.count_property] = n
        schema[self.count_property] = "int"
        return added

    def _item_plan(self, keys: tuple) -> tuple[tuple[int, str], ...]:
        """(item field, source key) pairs for an item's key set: the first alias present wins. Cached."""
        plan = self._item_plans.get(keys)
        if plan is None:
            present = set(keys)
            plan = tuple(
                (i, next(s for s in f.sources if s in present))
                for i, f in enumerate(self.item_fields)
                if present.intersection(f.sources)
            )
            if len(self._item_plans) > _PLAN_CACHE_CAP:
                self._item_plans.clear()
            self._item_plans[keys] = plan
        return plan

    def _check_item_size(self, values: list, item_field: ItemField) -> None:
        # Numbers serialise to at most ~24 bytes: only long arrays or long texts can pass 8 KB.
        if item_field.type == "strs":
            if sum(map(len, values)) + 3 * len(values) <= self.max_value // 4:
                return
        elif len(values) * 24 <= self.max_value:
            return
        self._array(values, "properties", item_field.property)

    @staticmethod
    def _lift(properties: dict, schema: dict, item_field: ItemField, raw: Any, value: Any) -> int:
        if item_field.lift_as is None or raw is None or properties.get(item_field.lift_as) is not None:
            return 0
        properties[item_field.lift_as] = value
        if item_field.type != "strs":
            schema[item_field.lift_as] = item_field.type[:-1]
        return 1


_PRIMITIVES = (str, int, float, bool)


_ITEM_COERCE = {  # the common case (already the right type) without a function call per value
    "strs": lambda raw, fill: [v if type(v) is str else _coerce_item(v, "strs", fill) for v in raw],
    "reals": lambda raw, fill: [
        float(v) if type(v) is float or type(v) is int else _coerce_item(v, "reals", fill) for v in raw
    ],
    "ints": lambda raw, fill: [v if type(v) is int else _coerce_item(v, "ints", fill) for v in raw],
}


def _coerce_item(value: Any, type_name: str, fill: Any) -> Any:
    """A value as the declared array element type (`strs`, `ints`, `reals`, ...), else `fill`."""
    kind = type(value)
    if type_name == "strs":
        if kind is str:
            return value
        return str(value).lower() if kind is bool else (str(value) if kind in (int, float) else fill)
    if type_name in ("ints", "reals"):
        if kind is str:
            try:
                value, kind = float(value), float
            except ValueError:
                return fill
        if kind not in (int, float) or (kind is float and not math.isfinite(value)):
            return fill
        return int(round(value)) if type_name == "ints" else float(value)
    if type_name == "bools":
        return value if kind is bool else fill
    return value if kind is str else fill
