"""The value pools rows are drawn from: products, pages, contexts (both consent shapes, both user-agent
spellings, FullStory session ids), orders in the three spellings of datafly-events.md, product views,
custom events and identify traits in camelCase and snake_case. Payloads are JSON strings (`_dumps`).

The pools taking the table's random generator draw from it: table.py calls them in a fixed order, which is
part of what makes a landing the same for a seed.
"""

from __future__ import annotations

import numpy as np
import orjson

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
