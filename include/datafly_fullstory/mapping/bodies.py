"""Building and serialising bodies: one FullStory event per mapped row (`EventBuilder.build`) and one
user per folded uid (`EventBuilder.user_body`), with the blueprint's renames, fills and browser context."""

from __future__ import annotations

from typing import Any

import orjson

from include.datafly_fullstory.blueprint import Blueprint, EventMapping
from include.datafly_fullstory.mapping.columns import _dig, _getter
from include.datafly_fullstory.mapping.properties import PropertyCleaner, Reject
from include.datafly_fullstory.mapping.types import TypeChecker


class EventBuilder:
    """Builds and serialises one body per row; the only per-row Python besides JSON parsing."""

    def __init__(self, blueprint: Blueprint, cleaner: PropertyCleaner, largest_line: int):
        self.bp, self.cleaner, self.largest_line = blueprint, cleaner, largest_line
        self.mappings: tuple[EventMapping, ...] = blueprint.events
        self.max_name = blueprint.limits["event_name"]
        self.anon_prop, self.locale_prop = blueprint.anonymous_id_property, blueprint.locale_property
        self.event_id_prop = blueprint.event_id_property
        # declared types: the blueprint's property_types, then each mapping's own schema (types.py)
        self.types = TypeChecker()
        self.declared = tuple({**blueprint.property_types, **m.schema} for m in self.mappings)
        self.declared_default = dict(blueprint.property_types)
        self.locale, self.page_url, self.user_agent, self.ip = (
            _getter(blueprint.identity[key], "text") for key in ("locale", "page_url", "user_agent", "ip")
        )

    def build(
        self,
        m: int,
        name: str,
        props_text: str | None,
        ctx: dict | None,
        ts: str | None,
        uid: str | None,
        sid: str | None,
        recent: bool,
        anon: str | None,
        event_id: str | None,
        row_fills: tuple | None,
        row: int | None = None,
    ) -> bytes | Reject:
        if len(name) > self.max_name:
            return Reject(f"event name is {len(name)} characters; FullStory allows {self.max_name}")
        try:
            props = orjson.loads(props_text) if props_text is not None else {}
        except orjson.JSONDecodeError:
            return Reject("properties is not valid JSON")
        if type(props) is not dict:
            return Reject("properties is not a JSON object")
        mapping = self.mappings[m] if m >= 0 else None
        try:
            properties, schema = self._properties(
                mapping, props, ctx, row_fills, anon, self.locale(ctx), event_id
            )
            schema = self._declare(m, properties, schema, row, event_id)
        except Reject as reject:
            return reject
        body: dict[str, Any] = {"name": name}
        if ts is not None:
            body["timestamp"] = ts
        if sid is not None:
            body["session"] = {"id": sid}
        else:
            body["user"] = {"uid": uid}
            if recent:
                body["session"] = {"use_most_recent": True}
        context = _event_context(self.page_url(ctx), self.user_agent(ctx), self.ip(ctx))
        if context:
            body["context"] = context
        body["properties"] = properties
        if schema:
            body["schema"] = {"properties": schema}
        line = orjson.dumps(body)
        if len(line) > self.largest_line:
            return Reject(f"the event body is {len(line)} bytes, more than one request may carry (max_bytes)")
        return line

    def _properties(
        self,
        mapping: EventMapping | None,
        props: dict,
        ctx: dict | None,
        row_fills: tuple | None,
        anon: str | None,
        locale: str | None,
        event_id: str | None,
    ) -> tuple[dict, dict]:
        items = self.cleaner.take_items(props)
        if mapping is not None:
            _apply_renames(props, mapping.renames)
            _fill_from_context(props, mapping.from_context, ctx)
            if row_fills:
                for prop, value in row_fills:
                    if props.get(prop) is None and value is not None:
                        props[prop] = value
        properties, count = self.cleaner.clean(props)
        schema: dict[str, str] = {}
        if items is not None:
            count += self.cleaner.add_items(
                properties, schema, items, lift=mapping is not None and mapping.lift_first_item
            )
        for prop, value in (
            (self.anon_prop, anon),
            (self.locale_prop, locale),
            (self.event_id_prop, event_id),
        ):
            if value is not None:
                count += prop not in properties
                properties[prop] = self.cleaner.checked_value(value, prop)
        self.cleaner.check_count(count, "properties")
        return properties, schema

    def _declare(self, m: int, properties: dict, schema: dict, row: int | None, event_id: str | None) -> dict:
        """Declared types (after items and identity properties: a lifted product_id is declared too)."""
        declared = self.declared[m] if m >= 0 else self.declared_default
        if declared:
            typed, _ = self.types.declare(properties, declared, row=row, event_id=event_id)
            return {**schema, **typed} if schema else typed
        return schema

    def user_body(self, uid: str, traits: dict) -> bytes | Reject:
        """One `BatchUserImportRequest` from folded traits."""
        body: dict[str, Any] = {"uid": uid}
        try:
            for field, sources in self.bp.user_fields.items():
                for source in sources:
                    value = traits.get(source)
                    if value is not None and type(value) is not dict and type(value) is not list:
                        body[field] = self.cleaner.checked_text(str(value), field, self.bp.limits[field])
                        del traits[source]
                        break
            if len(uid) > self.bp.limits["uid"]:
                raise Reject(
                    f"user_id is longer than FullStory's {self.bp.limits['uid']}-character uid limit"
                )
            properties, count = self.cleaner.clean(traits, where="traits")
            self.cleaner.check_count(count, "traits")
        except Reject as reject:
            return reject
        schema, _ = self.types.declare(properties, self.bp.trait_types, kind="user", uid=uid)
        if properties:
            body["properties"] = properties
        if schema:
            body["schema"] = {"properties": schema}
        return orjson.dumps(body)


def _apply_renames(props: dict, renames: dict[str, str]) -> None:
    """GA4 names onto the blueprint's (transaction_id -> order_id); an existing target keeps its value."""
    for source, target in renames.items():
        if source in props and target not in props:
            props[target] = props.pop(source)


def _fill_from_context(props: dict, from_context: dict[str, tuple[str, ...]], ctx: dict | None) -> None:
    if not from_context or ctx is None:
        return
    for prop, path in from_context.items():
        if props.get(prop) is None:
            value = _dig(ctx, path)
            if value is not None:
                props[prop] = value


def _event_context(url: str | None, user_agent: str | None, ip: str | None) -> dict:
    context: dict[str, dict] = {}
    if url is not None or user_agent is not None:
        browser = context["browser"] = {}
        if url is not None:
            browser["url"] = url
        if user_agent is not None:
            browser["user_agent"] = user_agent
    if ip is not None:
        context["location"] = {"ip_address": ip}
    return context
