"""Realistic Datafly Signal landings for the demo, the tests and the benchmarks.

Deterministic for a seed and sized by a row count. Rows are drawn from pools of realistic payloads
(pages, products, orders in the three spellings of datafly-events.md, identify traits in camelCase and
snake_case, both consent shapes, FullStory session ids, both user-agent spellings), picked with numpy,
so a 10M-row landing is generated in seconds. A small share of bad rows exercises validation.

    python -m include.datafly_fullstory.sample OUT_DIR --rows 5000 --start 2026-11-26T07:00:00Z --hours 3
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from include.datafly_fullstory.landing import JSON_COLUMNS, STRING_COLUMNS, TIMESTAMP_COLUMNS

# The bad-row kinds, each failing one validation rule (see validation.py).
BAD_KINDS = (
    "null_event_id",
    "duplicate_event_id",
    "unknown_type",
    "track_without_event",
    "bad_json_properties",
    "identify_without_traits",
    "missing_anonymous_id",
    "json_not_object",
)

# Share of each event family in a landing (bad rows are carved out of these afterwards).
MIX = {
    "page": 0.34,
    "product_viewed": 0.18,
    "order_completed": 0.07,
    "custom_track": 0.22,
    "identify": 0.14,
    "other_types": 0.05,
}

CUSTOM_EVENTS = (
    "Product Added",
    "Checkout Started",
    "Newsletter Subscribed",
    "Search Performed",
    "add_to_cart",
    "Video Played",
)
CATEGORIES = ("Shoes", "Outerwear", "Accessories", "Kitchen", "Garden", "Toys")
LOCALES = ("en-US", "en-GB", "de-DE", "fr-FR", "nl-NL", None)
USER_AGENTS = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
)


@dataclass(frozen=True)
class LandingSpec:
    rows: int
    start: datetime
    end: datetime
    seed: int = 7
    bad_fraction: float = 0.004
    denied_fraction: float = 0.03


def _dumps(obj) -> str:
    return orjson.dumps(obj).decode()


def _products(rng: np.random.Generator, n: int = 240) -> list[dict]:
    out = []
    for i in range(n):
        cat = CATEGORIES[i % len(CATEGORIES)]
        out.append(
            {
                "product_id": f"P{1000 + i}",
                "sku": f"SKU-{cat[:3].upper()}-{i:04d}",
                "name": f"{cat} item {i}",
                "category": cat,
                "brand": ("Acme", "Northwind", "Globex")[i % 3],
                "variant": ("red", "blue", "green", None)[i % 4],
                "price": round(float(rng.uniform(4, 400)), 2),
            }
        )
    return out


def _context_pool(rng: np.random.Generator, pages: list[dict], n: int = 600) -> tuple[list[str], np.ndarray]:
    """Context JSON strings and, for each, whether analytics consent is explicitly denied."""
    pool, denied = [], []
    for i in range(n):
        page = pages[i % len(pages)]
        ctx: dict = {"page": page, "ip": f"203.0.113.{i % 250 + 1}"}
        locale = LOCALES[i % len(LOCALES)]
        if locale:
            ctx["locale"] = locale
        ua_key = "userAgent" if i % 3 else "user_agent"
        ctx[ua_key] = USER_AGENTS[i % len(USER_AGENTS)]
        if i % 5 == 0:
            ctx["device"] = {"type": "mobile", "manufacturer": "Apple", "model": "iPhone16,1"}
        if i % 7 == 0:
            ctx["campaign"] = {"source": "newsletter", "medium": "email", "name": "black-friday"}
        if i % 6 == 1:
            ctx["fullstory"] = {"session_id": f"{5812340000000000 + i}:{6723450000000000 + i}"}
        shape = i % 4
        is_denied = i % 29 == 3
        if shape == 0:
            ctx["consent"] = {
                "canonical": {
                    "essential": True,
                    "functional": True,
                    "analytics": not is_denied,
                    "marketing": bool(i % 2),
                    "personalization": False,
                },
                "categories": ["C0001", "C0002"] + ([] if is_denied else ["C0003"]),
            }
        elif shape == 1:
            ctx["consent"] = {"analytics": not is_denied, "marketing": False}
        else:
            is_denied = False  # no consent information: granted by default
        pool.append(_dumps(ctx))
        denied.append(is_denied)
    return pool, np.array(denied)


def _page_pool(n: int = 300) -> list[dict]:
    paths = ["/", "/sale", "/cart", "/checkout", "/account"] + [
        f"/p/{c.lower()}/{i}" for i in range(60) for c in CATEGORIES[:4]
    ]
    out = []
    for i in range(n):
        path = paths[i % len(paths)]
        page = {
            "url": f"https://shop.example.com{path}" + ("?utm_source=mail" if i % 9 == 0 else ""),
            "path": path,
            "title": f"Example Shop - {path.strip('/') or 'home'}",
            "referrer": "https://www.google.com/" if i % 4 == 0 else "",
        }
        if i % 9 == 0:
            page["search"] = "?utm_source=mail"
        out.append(page)
    return out


def _order_pool(rng: np.random.Generator, products: list[dict], n: int = 300) -> list[tuple[str, str]]:
    """(event name, properties JSON) for Order Completed in Title Case, snake_case and GA4 spellings."""
    out = []
    for i in range(n):
        picks = [products[j] for j in rng.choice(len(products), size=int(rng.integers(1, 5)), replace=False)]
        qty = [int(rng.integers(1, 4)) for _ in picks]
        subtotal = round(sum(p["price"] * q for p, q in zip(picks, qty, strict=True)), 2)
        tax, shipping = round(subtotal * 0.2, 2), (0.0 if subtotal > 100 else 4.95)
        order_id = f"ORD-{i:06d}"
        if i % 3 == 2:  # GA4
            props = {
                "transaction_id": order_id,
                "value": subtotal,
                "currency": "EUR",
                "tax": tax,
                "shipping": shipping,
                "items": [
                    {
                        "item_id": p["product_id"],
                        "item_name": p["name"],
                        "item_category": p["category"],
                        "price": p["price"],
                        "quantity": q,
                    }
                    for p, q in zip(picks, qty, strict=True)
                ],
            }
            name = "purchase"
        else:
            props = {
                "order_id": order_id,
                "checkout_id": f"CHK-{i:06d}",
                "total": round(subtotal + tax + shipping, 2),
                "revenue": subtotal,
                "tax": tax,
                "shipping": shipping,
                "discount": 0.0 if i % 4 else 5.0,
                "currency": "USD",
                "products": [dict(p, quantity=q) for p, q in zip(picks, qty, strict=True)],
            }
            if i % 4 == 0:
                props["coupon"] = "WELCOME5"
            name = "Order Completed" if i % 3 == 0 else "order_completed"
        out.append((name, _dumps(props)))
    return out


def _product_viewed_pool(products: list[dict]) -> list[tuple[str, str]]:
    out = []
    for i, p in enumerate(products):
        if i % 3 == 2:
            props = {
                "currency": "EUR",
                "value": p["price"],
                "items": [
                    {
                        "item_id": p["product_id"],
                        "item_name": p["name"],
                        "item_category": p["category"],
                        "price": p["price"],
                        "quantity": 1,
                    }
                ],
            }
            out.append(("view_item", _dumps(props)))
        else:
            props = dict(
                p,
                currency="USD",
                url=f"https://shop.example.com/p/{p['product_id']}",
                image_url=f"https://cdn.example.com/{p['sku']}.jpg",
                position=i % 12,
            )
            out.append(("Product Viewed" if i % 3 == 0 else "product_viewed", _dumps(props)))
    return out


def _custom_pool(n: int = 120) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        name = CUSTOM_EVENTS[i % len(CUSTOM_EVENTS)]
        props = {
            "source": "web",
            "step": i % 4 + 1,
            "query": f"winter boots {i}" if "Search" in name else None,
            "Video Length (s)": 30 + i if "Video" in name else None,
            "is_logged_in": bool(i % 2),
        }
        out.append((name, _dumps({k: v for k, v in props.items() if v is not None})))
    return out


def _traits_pool(n_users: int) -> list[str]:
    out = []
    for i in range(n_users):
        first, last = (
            ("Ada", "Grace", "Alan", "Edsger", "Barbara")[i % 5],
            ("Lovelace", "Hopper", "Turing")[i % 3],
        )
        traits: dict = {
            "email": f"user{i}@example.com",
            "plan": ("free", "pro", "enterprise")[i % 3],
            "createdAt": f"2025-{i % 12 + 1:02d}-15T10:00:00Z",
            "logins": i % 40,
            "company": {"name": f"Company {i % 50}", "size": 10 + i % 500},
        }
        naming = i % 3
        if naming == 0:
            traits.update(firstName=first, lastName=last, displayName=f"{first} {last}")
        elif naming == 1:
            traits.update(first_name=first, last_name=last, display_name=f"{first} {last}")
        else:
            traits["name"] = f"{first} {last}"
        if i % 4 == 0:
            traits["address"] = {"city": "Berlin", "country": "DE"}
        out.append(_dumps(traits))
    return out


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


def _inject_bad_rows(rng: np.random.Generator, spec: LandingSpec, cols: dict) -> None:
    n = spec.rows
    n_bad = int(round(n * spec.bad_fraction))
    if n_bad == 0 or n < 20:
        return
    rows = rng.choice(np.arange(1, n), size=min(n_bad, n - 1), replace=False)
    for i, row in enumerate(rows):
        kind = BAD_KINDS[i % len(BAD_KINDS)]
        if kind == "null_event_id":
            cols["event_id"][row] = None
        elif kind == "duplicate_event_id":
            cols["event_id"][row] = cols["event_id"][row - 1]
        elif kind == "unknown_type":
            cols["type"][row] = "pageview"
        elif kind == "track_without_event":
            cols["type"][row], cols["event"][row] = "track", None
            cols["properties"][row] = '{"source": "web"}'
        elif kind == "bad_json_properties":
            cols["type"][row], cols["event"][row] = "track", "Product Added"
            cols["properties"][row] = '{"product_id": "P1", "price": 12.5'
        elif kind == "identify_without_traits":
            cols["type"][row], cols["traits"][row] = "identify", None
        elif kind == "missing_anonymous_id":
            cols["anonymous_id"][row] = None
        elif kind == "json_not_object":
            cols["context"][row] = '["not", "an", "object"]'


def write_landing(
    table: pa.Table,
    out_dir: str | Path,
    *,
    layout: str = "hive",
    files_per_hour: int = 1,
    row_group_size: int = 64_000,
) -> list[Path]:
    """Write a landing table as Parquet: `hive` (dt=YYYY-MM-DD/hour=HH/part-N.parquet) or `flat`
    (part-N.parquet, one file per hour and split). Returns the files written, sorted."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hours = pc.floor_temporal(table.column("timestamp"), unit="hour")
    written = []
    for hour in pc.unique(hours).to_pylist():
        part = table.filter(pc.equal(hours, pa.scalar(hour, type=hours.type)))
        for k, piece in enumerate(_split(part, files_per_hour)):
            if layout == "hive":
                folder = out / f"dt={hour:%Y-%m-%d}" / f"hour={hour:%H}"
                path = folder / f"part-{k:05d}.parquet"
            elif layout == "flat":
                folder = out
                path = folder / f"events-{hour:%Y%m%dT%H}-{k:05d}.parquet"
            else:
                raise ValueError(f"layout {layout!r}: use 'hive' or 'flat'")
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(piece, path, row_group_size=row_group_size, compression="zstd")
            written.append(path)
    return sorted(written)


def _split(table: pa.Table, parts: int) -> list[pa.Table]:
    size = max(1, -(-table.num_rows // max(1, parts)))
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


def generate_landing(
    out_dir: str | Path,
    rows: int,
    start: datetime,
    hours: int = 1,
    *,
    seed: int = 7,
    layout: str = "hive",
    bad_fraction: float = 0.004,
    files_per_hour: int = 1,
) -> list[Path]:
    """Generate and write a landing of `rows` rows spread over `hours` hours from `start`."""
    spec = LandingSpec(
        rows=rows, start=start, end=start + timedelta(hours=hours), seed=seed, bad_fraction=bad_fraction
    )
    return write_landing(generate_table(spec), out_dir, layout=layout, files_per_hour=files_per_hour)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--start", default="2026-11-26T07:00:00+00:00")
    parser.add_argument("--hours", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--layout", choices=("hive", "flat"), default="hive")
    parser.add_argument("--bad-fraction", type=float, default=0.004)
    args = parser.parse_args()
    start = datetime.fromisoformat(args.start.replace("Z", "+00:00")).astimezone(UTC)
    files = generate_landing(
        args.out_dir,
        args.rows,
        start,
        args.hours,
        seed=args.seed,
        layout=args.layout,
        bad_fraction=args.bad_fraction,
    )
    print(f"wrote {args.rows} rows in {len(files)} files under {args.out_dir}")


if __name__ == "__main__":
    _main()
