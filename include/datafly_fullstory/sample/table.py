"""The row generator: `generate_table` draws a landing table for a `LandingSpec` from the value pools
(pools.py) with numpy, in the event families of `MIX`, then carves in the bad rows (bad_rows.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from include.datafly_fullstory.landing import JSON_COLUMNS, STRING_COLUMNS, TIMESTAMP_COLUMNS
from include.datafly_fullstory.sample.bad_rows import _inject_bad_rows
from include.datafly_fullstory.sample.pools import (
    _context_pool,
    _custom_pool,
    _dumps,
    _order_pool,
    _page_pool,
    _product_viewed_pool,
    _products,
    _traits_pool,
)
from include.datafly_fullstory.sample.spec import LandingSpec

# Share of each event family in a landing (bad rows are carved out of these afterwards).
MIX = {
    "page": 0.34,
    "product_viewed": 0.18,
    "order_completed": 0.07,
    "custom_track": 0.22,
    "identify": 0.14,
    "other_types": 0.05,
}


def generate_table(spec: LandingSpec) -> pa.Table:
    """A landing table of `spec.rows` rows with canonical columns (JSON as strings, timestamps UTC ns)."""
    rng = np.random.default_rng(spec.seed)
    n = spec.rows
    products = _products(rng)
    pages = _page_pool()
    contexts, denied = _context_pool(rng, pages)
    orders = _order_pool(rng, products)
    viewed = _product_viewed_pool(products)
    custom = _custom_pool()
    n_users = max(5, n // 40)
    traits = _traits_pool(min(n_users, 5000))

    families = np.array(list(MIX))
    family = rng.choice(len(families), size=n, p=np.array(list(MIX.values())))
    type_col = np.full(n, "track", dtype=object)
    event_col = np.full(n, None, dtype=object)
    name_col = np.full(n, None, dtype=object)
    props_col = np.full(n, None, dtype=object)
    traits_col = np.full(n, None, dtype=object)

    page_idx = rng.integers(0, len(pages), size=n)
    ctx_idx = rng.integers(0, len(contexts), size=n)
    is_page = family == 0
    type_col[is_page] = "page"
    page_props = np.array(
        [_dumps({k: v for k, v in p.items() if k != "search"}) for p in pages], dtype=object
    )
    props_col[is_page] = page_props[page_idx[is_page]]
    page_names = np.array([p["title"].split(" - ")[-1].title() for p in pages], dtype=object)
    name_col[is_page] = page_names[page_idx[is_page]]

    for fam, pool in ((1, viewed), (2, orders), (3, custom)):
        mask = family == fam
        idx = rng.integers(0, len(pool), size=int(mask.sum()))
        names = np.array([p[0] for p in pool], dtype=object)
        bodies = np.array([p[1] for p in pool], dtype=object)
        event_col[mask] = names[idx]
        props_col[mask] = bodies[idx]

    user_num = rng.integers(0, n_users, size=n)
    has_user = rng.random(n) < 0.55
    is_identify = family == 4
    has_user |= is_identify & (rng.random(n) < 0.97)  # a few identify calls come without a user id
    type_col[is_identify] = "identify"
    traits_arr = np.array(traits, dtype=object)
    traits_col[is_identify] = traits_arr[user_num[is_identify] % len(traits_arr)]

    other = family == 5
    other_types = np.array(["group", "screen", "alias"], dtype=object)
    type_col[other] = other_types[rng.integers(0, 3, size=int(other.sum()))]

    ids = np.arange(n, dtype=np.int64)
    event_id = pc.binary_join_element_wise(f"evt-{spec.seed}-", pa.array(ids).cast(pa.string()), "")
    event_id = event_id.to_numpy(zero_copy_only=False).astype(object)
    user_id = pc.binary_join_element_wise("user-", pa.array(user_num).cast(pa.string()), "")
    user_id = user_id.to_numpy(zero_copy_only=False).astype(object)
    user_id[~has_user] = None
    anon = pc.binary_join_element_wise("dfid-", pa.array(user_num * 7 + (ids % 3)).cast(pa.string()), "")
    anon = anon.to_numpy(zero_copy_only=False).astype(object)

    span_ns = int((spec.end - spec.start).total_seconds() * 1e9)
    start_ns = int(spec.start.timestamp() * 1e9)
    ts = np.sort(rng.integers(0, span_ns, size=n)) + start_ns
    received = ts + rng.integers(50_000_000, 3_000_000_000, size=n)
    sent = ts + rng.integers(0, 40_000_000, size=n)

    context_arr = np.array(contexts, dtype=object)[ctx_idx]
    table_cols = {
        "event_id": event_id,
        "type": type_col,
        "event": event_col,
        "name": name_col,
        "anonymous_id": anon,
        "user_id": user_id,
        "timestamp": ts,
        "received_at": received,
        "sent_at": sent,
        "context": context_arr,
        "properties": props_col,
        "traits": traits_col,
    }
    _inject_bad_rows(rng, spec, table_cols)
    return pa.table(
        {
            **{k: pa.array(table_cols[k], type=pa.string()) for k in STRING_COLUMNS},
            **{k: pa.array(table_cols[k], type=pa.timestamp("ns", tz="UTC")) for k in TIMESTAMP_COLUMNS},
            **{k: pa.array(table_cols[k], type=pa.string()) for k in JSON_COLUMNS},
            "source_id": pa.array(np.where(np.arange(n) % 2 == 0, "web-shop", "web-blog"), type=pa.string()),
        }
    )
