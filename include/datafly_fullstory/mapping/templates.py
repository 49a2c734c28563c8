"""A batch's event lines, built column-wise (`EventLines.build`): the same bytes as `EventBuilder.build`
row by row, at a fraction of the cost.

A body's `properties` (and its `schema`) depend on few inputs that repeat across rows: the mapping, the
properties text, the context values the mapping fills in and the landing values it fills in. Each
distinct combination, a *template*, is parsed, cleaned, typed and serialised once. Each row's line is then
joined by Arrow from byte fragments: the name, the timestamp, the identification, the browser context (once
per distinct context), the template, the row's own identity properties (`anonymous_id`, `locale`,
`datafly_event_id`) and the template's schema.

What the fragments cannot express goes through `EventBuilder.build`, one row at a time: a row whose
properties already hold an identity property (its value would replace the one in place), a mapping that
declares a type for one, an identity value long enough to need the size check, a value that is not text.
Type problems are recorded in row order either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from include.datafly_fullstory.mapping.bodies import (
    EventBuilder,
    _apply_renames,
    _event_context,
)
from include.datafly_fullstory.mapping.columns import Distinct, ParsedJson, _dig, _factorize
from include.datafly_fullstory.mapping.properties import Reject
from include.datafly_fullstory.mapping.types import TypeChecker

_NEEDS_ESCAPE = r'[\x00-\x1f"\\]'  # the only characters orjson escapes in a string


@dataclass(frozen=True)
class _Template:
    """`,"properties":` and the serialised properties without their closing brace; whether there are any;
    their count; the closing brace, the schema and the body's closing brace; and the declared-type problems
    of the values (field, value as JSON text, type)."""

    head: bytes
    has_properties: bool
    count: int
    tail: bytes
    problems: tuple[tuple[str, str, str], ...]


_SLOW = object()  # a template whose rows EventBuilder.build builds
_CACHE_BYTES = 32 * 1024 * 1024


class EventLines:
    """Builds a batch's event lines with one `EventBuilder`'s rules (see the module docstring)."""

    def __init__(self, builder: EventBuilder):
        self.builder = builder
        identity_props = (builder.anon_prop, builder.locale_prop, builder.event_id_prop)
        self.identity_props = frozenset(identity_props)
        distinct = len(self.identity_props) == 3
        # a declared type on an identity property changes the row's schema: such mappings go row by row
        self.fast = [distinct and not (self.identity_props & set(d)) for d in builder.declared]
        self.fast_default = distinct and not (self.identity_props & set(builder.declared_default))
        self.keys = [orjson.dumps(p) + b":" for p in identity_props]
        self.longest_plain = builder.cleaner.max_value // 4  # longer text needs the byte-size check
        self._cache: dict = {}  # (mapping, text) -> prepared; (mapping, text, fills, row fills) -> template
        self._cache_bytes = 0

    def build(self, *columns) -> list[bytes | Reject]:
        """Per row (parallel arrays, see `build_array`): its line, or `Reject`. Exactly `EventBuilder.build`
        of each row, type problems included."""
        return self.build_array(*columns)[0].tolist()

    def build_array(
        self,
        m: np.ndarray,
        names: np.ndarray,
        props_text: np.ndarray | Distinct,
        ctx: ParsedJson,
        ctx_codes: np.ndarray,
        ts: np.ndarray,
        uid: np.ndarray,
        sid: np.ndarray,
        recent: np.ndarray,
        anon: np.ndarray,
        event_id: np.ndarray,
        row_fills: np.ndarray | Distinct,
        rows: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(each row's line or `Reject` as an object array, which rows have a line). The arguments are
        parallel arrays, one value per row; `ctx_codes` are the rows' contexts in `ctx`."""
        k = len(m)
        out = np.empty(k, dtype=object)
        is_line = np.zeros(k, dtype=bool)
        if not k:
            return out, is_line
        b = self.builder
        objects = ctx.objects
        locale = ctx.each(b.locale)
        props = Distinct(props_text)  # once per distinct properties text
        row_fills = row_fills if isinstance(row_fills, Distinct) else Distinct(row_fills)
        tcodes, templates = self._templates(m, props, objects, ctx_codes, row_fills)
        # per row: which path
        name_len = _lengths(names)
        slow_template = np.fromiter((t is _SLOW for t in templates), dtype=bool, count=len(templates))
        rejected_template = np.fromiter(
            (type(t) is Reject for t in templates), dtype=bool, count=len(templates)
        )
        loc = locale[ctx_codes]
        plain = _plain_text(anon, self.longest_plain) & _plain_text(event_id, self.longest_plain)
        plain &= _plain_text(loc, self.longest_plain)
        slow = (name_len < 0) | slow_template[tcodes] | ~plain
        long_name = ~slow & (name_len > b.max_name)
        bad_props = ~slow & ~long_name & rejected_template[tcodes]
        counts = np.fromiter(
            (t.count if type(t) is _Template else 0 for t in templates), dtype=np.int64, count=len(templates)
        )[tcodes]
        present = [_present(anon), _present(loc), _present(event_id)]
        counts = counts + present[0] + present[1] + present[2]
        open_ = ~slow & ~long_name & ~bad_props
        too_many = open_ & (counts > b.cleaner.max_count)
        fast = open_ & ~too_many

        for i in np.flatnonzero(long_name).tolist():
            out[i] = Reject(f"event name is {name_len[i]} characters; FullStory allows {b.max_name}")
        for i in np.flatnonzero(bad_props).tolist():
            out[i] = templates[tcodes[i]]
        for i in np.flatnonzero(too_many).tolist():
            out[i] = Reject(
                f"properties has {counts[i]} properties after flattening; FullStory allows "
                f"{b.cleaner.max_count}"
            )
        problems: list[tuple[int, list]] = []
        self._fast_lines(
            np.flatnonzero(fast),
            out,
            is_line,
            problems,
            templates,
            tcodes,
            names,
            objects,
            ctx_codes,
            {
                "ts": ts,
                "uid": uid,
                "sid": sid,
                "recent": recent,
                "anon": anon,
                "event_id": event_id,
                "rows": rows,
            },
            present,
        )
        types = b.types
        for i in np.flatnonzero(slow).tolist():
            before = len(types.problems)
            out[i] = built = b.build(
                int(m[i]),
                names[i],
                props.values[props.codes[i]],
                objects[ctx_codes[i]],
                ts[i],
                uid[i],
                sid[i],
                bool(recent[i]),
                anon[i],
                event_id[i],
                row_fills.values[row_fills.codes[i]],
                int(rows[i]),
            )
            is_line[i] = type(built) is bytes
            if len(types.problems) > before:
                problems.append((i, types.problems[before:]))
                del types.problems[before:]
        problems.sort(key=lambda p: p[0])
        for _, found in problems:
            types.problems.extend(found)
        return out, is_line

    # ---- templates ---------------------------------------------------------------------------------------

    def _templates(self, m, props: Distinct, objects, ctx_codes, row_fills) -> tuple[np.ndarray, list]:
        """Per row its template's number, and the templates (`_Template`, `Reject` or `_SLOW`)."""
        k = len(m)
        pcodes, ptexts = props.codes, props.values
        pair, pair_first = _codes(m.astype(np.int64) * len(ptexts) + pcodes)
        prepared = [self._prepared(int(m[i]), ptexts[pcodes[i]]) for i in pair_first]
        # the context values each row's mapping fills in: one key per distinct (what is missing, context)
        fill = np.zeros(k, dtype=np.int64)
        fill_keys: dict = {(): 0}
        missing = [
            (int(m[i]), p[2]) if type(p) is tuple and p[2] else None
            for i, p in zip(pair_first, prepared, strict=True)
        ]
        groups: dict = {}
        for p, key in enumerate(missing):
            if key is not None:
                groups.setdefault(key, []).append(p)
        for (mi, absent), pairs in groups.items():
            paths = [self.builder.mappings[mi].from_context[prop] for prop in absent]
            at = np.flatnonzero(np.isin(pair, pairs))
            distinct, inverse = np.unique(ctx_codes[at], return_inverse=True)
            codes = [
                fill_keys.setdefault(_fill_key(absent, paths, objects[c]), len(fill_keys))
                for c in distinct.tolist()
            ]
            fill[at] = np.asarray(codes, dtype=np.int64)[inverse.reshape(-1)]
        # and the landing values it fills in (from_row), as their distinct tuples
        row_fill = row_fills.codes
        with_fill, _ = _codes(pair * len(fill_keys) + fill)
        tcodes, first = _codes(with_fill * len(row_fills.values) + row_fill)
        fills = list(fill_keys)
        templates = []
        for i in first.tolist():
            mi, text, from_row = int(m[i]), ptexts[pcodes[i]], row_fills.values[row_fill[i]]
            key = (mi, text, fills[fill[i]], from_row)
            template = self._cached(key)
            if template is None:
                template = self._template(prepared[pair[i]], mi, objects[ctx_codes[i]], from_row)
                self._remember(key, template, len(text) if type(text) is str else 0)
            templates.append(template)
        return tcodes, templates

    def _prepared(self, m: int, text) -> Reject | tuple:
        """`_prepare`, remembered across batches (never changed once made: templates copy it)."""
        key = (m, text)
        found = self._cached(key)
        if found is None:
            found = self._prepare(m, text)
            self._remember(key, found, len(text) if type(text) is str else 0)
        return found

    def _cached(self, key):
        try:
            return self._cache.get(key)
        except TypeError:  # an unhashable landing value in the key
            return None

    def _remember(self, key, value, size: int) -> None:
        """Templates (and prepared properties) are pure functions of their key: they are kept across the
        batches of a run, within a budget of about `_CACHE_BYTES` of text."""
        if type(key[2] if len(key) > 2 else None) is _PerBatch:
            return
        size += len(value.head) + len(value.tail) if type(value) is _Template else 0
        if self._cache_bytes + size > _CACHE_BYTES:
            self._cache.clear()
            self._cache_bytes = 0
        try:
            self._cache[key] = value
        except TypeError:
            return
        self._cache_bytes += size + 200

    def _prepare(self, m: int, text) -> Reject | tuple:
        """The properties of a (mapping, text) up to the fills: parsed, items taken out, renamed; and the
        mapping's from_context properties still missing (filled from each row's context)."""
        try:
            props = orjson.loads(text) if text is not None else {}
        except orjson.JSONDecodeError:
            return Reject("properties is not valid JSON")
        if type(props) is not dict:
            return Reject("properties is not a JSON object")
        mapping = self.builder.mappings[m] if m >= 0 else None
        items = self.builder.cleaner.take_items(props)
        missing: tuple = ()
        if mapping is not None:
            _apply_renames(props, mapping.renames)
            missing = tuple(p for p in mapping.from_context if props.get(p) is None)
        return props, items, missing

    def _template(self, prepared, m: int, ctx, row_fills) -> _Template | Reject:
        """`EventBuilder._properties` and `_declare` for one template (from one of its rows)."""
        if type(prepared) is Reject:
            return prepared
        b = self.builder
        props, items, missing = dict(prepared[0]), prepared[1], prepared[2]
        mapping = b.mappings[m] if m >= 0 else None
        if mapping is not None:
            for prop in missing:
                value = _dig(ctx, mapping.from_context[prop])
                if value is not None:
                    props[prop] = value
            if row_fills:
                for prop, value in row_fills:
                    if props.get(prop) is None and value is not None:
                        props[prop] = value
        try:
            properties, count = b.cleaner.clean(props)
            schema: dict[str, str] = {}
            if items is not None:
                count += b.cleaner.add_items(
                    properties, schema, items, lift=mapping is not None and mapping.lift_first_item
                )
        except Reject as reject:
            return reject
        if not (self.fast[m] if m >= 0 else self.fast_default) or not self.identity_props.isdisjoint(
            properties
        ):
            return _SLOW
        declared = b.declared[m] if m >= 0 else b.declared_default
        checker = TypeChecker()
        if declared:
            typed, _ = checker.declare(properties, declared)
            schema = {**schema, **typed} if schema else typed
        try:
            head = b',"properties":' + orjson.dumps(properties)[:-1]
            tail = b"}" + (b',"schema":' + orjson.dumps({"properties": schema}) if schema else b"") + b"}"
        except TypeError:  # a value orjson cannot write: the row path raises as before
            return _SLOW
        problems = tuple((p[4], p[5], p[6]) for p in checker.problems)
        return _Template(head, bool(properties), count, tail, problems)

    # ---- lines -------------------------------------------------------------------------------------------

    def _fast_lines(
        self,
        at: np.ndarray,
        out: np.ndarray,
        is_line: np.ndarray,
        problems: list,
        templates: list,
        tcodes: np.ndarray,
        names: np.ndarray,
        objects: list,
        ctx_codes: np.ndarray,
        columns: dict[str, np.ndarray],
        present: list[np.ndarray],
    ) -> None:
        """The lines of the rows `at`, joined from byte fragments; their type problems into `problems`."""
        if not len(at):
            return
        b = self.builder
        t = tcodes[at]
        used = np.unique(t)
        heads = np.empty(len(templates), dtype=object)
        tails = np.empty(len(templates), dtype=object)
        with_props = np.zeros(len(templates), dtype=bool)
        for j in used.tolist():
            heads[j], tails[j], with_props[j] = (
                templates[j].head,
                templates[j].tail,
                templates[j].has_properties,
            )
        c = ctx_codes[at]
        contexts = np.empty(len(objects), dtype=object)
        locales = np.empty(len(objects), dtype=object)
        for code in np.unique(c).tolist():
            obj = objects[code]
            context = _event_context(b.page_url(obj), b.user_agent(obj), b.ip(obj))
            contexts[code] = b',"context":' + orjson.dumps(context) if context else b""
            value = b.locale(obj)
            locales[code] = orjson.dumps(value) if value is not None else b""
        stamp = pa.array(columns["ts"][at], type=pa.string()).cast(pa.binary())
        fragments = [
            _per_distinct(names[at], lambda n: b'{"name":' + orjson.dumps(n)),
            pc.fill_null(pc.binary_join_element_wise(b',"timestamp":"', stamp, b'"', b""), b""),
            _identification(columns["sid"][at], columns["uid"][at], columns["recent"][at].astype(bool)),
            _gather(contexts, c),
            _gather(heads, t),
        ]
        values = [
            _quoted(columns["anon"][at]),
            _gather(locales, c),
            _quoted(columns["event_id"][at]),
        ]
        before = with_props[t]
        for key, value, is_present in zip(self.keys, values, (p[at] for p in present), strict=True):
            fragments.append(_where(before & is_present, pa.scalar(b",", pa.binary())))
            fragments.append(_where(is_present, pc.binary_join_element_wise(key, value, b"")))
            before = before | is_present
        fragments.append(_gather(tails, t))
        lines = pc.binary_join_element_wise(*fragments, b"")
        sizes = pc.binary_length(lines).to_numpy()
        out[at] = np.fromiter(lines.to_pylist(), dtype=object, count=len(at))
        is_line[at] = True
        for j in np.flatnonzero(sizes > b.largest_line).tolist():
            out[at[j]] = Reject(
                f"the event body is {sizes[j]} bytes, more than one request may carry (max_bytes)"
            )
            is_line[at[j]] = False
        has_problems = np.fromiter((bool(templates[j].problems) for j in used), dtype=bool, count=len(used))
        if has_problems.any():
            event_id, rows = columns["event_id"], columns["rows"]
            for j in np.flatnonzero(np.isin(t, used[has_problems])).tolist():
                i = int(at[j])
                found = [("event", int(rows[i]), event_id[i], None, *p) for p in templates[t[j]].problems]
                problems.append((i, found))


# ---- helpers --------------------------------------------------------------------------------------------------


def _present(values: np.ndarray) -> np.ndarray:
    """Per value: it is not None (EventBuilder adds an identity property unless its value is None)."""
    return values != None  # noqa: E711  (elementwise on an object array)


def _lengths(names: np.ndarray) -> np.ndarray:
    """Characters per name; -1 where a name is not text (the row path decides those rows)."""
    codes, distinct = _factorize(names)
    per_name = np.fromiter(
        (len(n) if type(n) is str else -1 for n in distinct), dtype=np.int64, count=len(distinct)
    )
    return per_name[codes]


def _plain_text(values: np.ndarray, longest: int) -> np.ndarray:
    """Per value: None, or text short enough to skip the byte-size check of an identity property."""
    try:
        text = pa.array(values, type=pa.string())  # None only as null: NaN and non-text raise
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return np.fromiter(
            (v is None or (type(v) is str and len(v) <= longest) for v in values),
            dtype=bool,
            count=len(values),
        )
    short = pc.less_equal(pc.utf8_length(text), longest)
    return pc.fill_null(short, True).to_numpy(zero_copy_only=False)


def _codes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense codes of integer keys in order of first appearance, and the first row of each code."""
    uniques, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)], first[order]


class _PerBatch(tuple):
    """A fill key that only holds within one batch (context values orjson cannot write as a key)."""


def _fill_key(props: tuple, paths: list, ctx) -> object:
    """What the context fills into a template: the (property, value) pairs, as JSON bytes."""
    fills = [
        (prop, value)
        for prop, path in zip(props, paths, strict=True)
        if (value := _dig(ctx, path)) is not None
    ]
    if not fills:
        return ()
    try:
        return orjson.dumps(fills)
    except TypeError:
        return _PerBatch((id(ctx),))


def _per_distinct(values: np.ndarray, fn) -> pa.Array:
    codes, distinct = _factorize(values)
    return pa.array([fn(v) for v in distinct.tolist()], type=pa.binary()).take(pa.array(codes))


def _gather(per_code: np.ndarray, codes: np.ndarray) -> pa.Array:
    """`per_code[codes]` (bytes; None where no row points) as an Arrow binary array, each value converted
    once."""
    return pa.array(per_code.tolist(), type=pa.binary()).take(pa.array(codes))


def _where(mask: np.ndarray, values) -> pa.Array:
    return pc.if_else(pa.array(mask), values, pa.scalar(b"", pa.binary()))


def _quoted(values: np.ndarray, null: bytes = b"") -> pa.Array:
    """Values as JSON (orjson's bytes, escaped where needed), `null` where a value is None. Text is
    quoted by Arrow; anything else (rare: the landing holds text) goes through orjson one by one."""
    try:
        text = pa.array(values, type=pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([null if v is None else orjson.dumps(v) for v in values], type=pa.binary())
    quoted = pc.binary_join_element_wise('"', text, '"', "")
    escape = pc.fill_null(pc.match_substring_regex(text, _NEEDS_ESCAPE), False)
    if pc.any(escape).as_py():
        at = np.flatnonzero(escape.to_numpy(zero_copy_only=False))
        quoted = pc.replace_with_mask(
            quoted, escape, pa.array([orjson.dumps(values[i]).decode() for i in at], type=pa.string())
        )
    return pc.fill_null(quoted.cast(pa.binary()), null)


def _identification(sid: np.ndarray, uid: np.ndarray, recent: np.ndarray) -> pa.Array:
    """Per row `,"session":{"id":..}`, or `,"user":{"uid":..}` (then `use_most_recent` when `recent`)."""
    has_sid = _present(sid)
    session = pc.binary_join_element_wise(b',"session":{"id":', _quoted(sid), b"}", b"")
    recent_part = _where(recent, pa.scalar(b',"session":{"use_most_recent":true}', pa.binary()))
    uid_json = _quoted(np.where(has_sid, None, uid), null=b"null")
    user = pc.binary_join_element_wise(b',"user":{"uid":', uid_json, b"}", recent_part, b"")
    return pc.if_else(pa.array(has_sid), session, user)
