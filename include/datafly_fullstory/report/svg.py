"""Charts as inline SVG, drawn in Python when the report is written: no script, no font or file to fetch.

Each chart is an `<svg class="chart" data-chart="<name>">` with explicit width, height and viewBox; every
bar is a `<rect class="bar">` carrying `data-label` and `data-value`, and has a `<title>` (the tooltip a
browser shows). Text uses the page's system font stack.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

COLORS = {
    "delivered": "#2e7d32",
    "rejected": "#c62828",
    "quarantined": "#ef6c00",
    "filtered": "#6a1b9a",
    "skipped": "#607d8b",
    "dry_run": "#0277bd",
    "pending": "#f9a825",
    "unknown": "#5d4037",
}
CHART_WIDTH = 1020  # the page's content width; charts scale down with the window (max-width: 100%)
NEUTRAL = "#3f6fb5"
MUTED = "#9aa5b1"
AXIS = "#c3cad3"
TEXT = "#1f2933"


def _a(value: object) -> str:
    return escape(str(value), quote=True)


def _n(value: float) -> str:
    """A coordinate: short, no exponent."""
    return f"{value:.2f}".rstrip("0").rstrip(".") if not float(value).is_integer() else str(int(value))


def number(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{int(value):,}"


def percent(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if value < 0.999 or value == 1 else f"{value:.2%}"


def seconds(value: float) -> str:
    if value < 60:
        return f"{value:g}s" if value >= 1 or value == 0 else f"{value * 1000:.0f}ms"
    minutes, secs = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def nice_step(span: float, ticks: int = 5) -> float:
    """A round tick step (1, 2, 5 x 10^k) giving about `ticks` ticks over `span`."""
    if span <= 0:
        return 1.0
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * power >= raw:
            return m * power
    return 10 * power


def _svg(name: str, width: float, height: float, body: str, label: str) -> str:
    return (
        f'<svg class="chart" data-chart="{_a(name)}" xmlns="http://www.w3.org/2000/svg" role="img" '
        f'aria-label="{_a(label)}" width="{_n(width)}" height="{_n(height)}" '
        f'viewBox="0 0 {_n(width)} {_n(height)}">{body}</svg>'
    )


def _text(
    x: float, y: float, text: str, *, anchor: str = "start", size: int = 12, cls: str = "", fill=TEXT
) -> str:
    klass = f' class="{cls}"' if cls else ""
    return (
        f'<text{klass} x="{_n(x)}" y="{_n(y)}" text-anchor="{anchor}" font-size="{size}" '
        f'fill="{fill}">{escape(text)}</text>'
    )


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "\u2026"


@dataclass
class Bar:
    label: str
    value: float
    color: str = NEUTRAL
    note: str = ""  # shown after the value, e.g. a share


def hbar_chart(
    name: str,
    bars: Sequence[Bar],
    *,
    title: str,
    width: int = CHART_WIDTH,
    label_width: int = 190,
    bar_height: int = 20,
    gap: int = 7,
    value_text: Callable[[float], str] = number,
) -> str:
    """Horizontal bars, one per entry, scaled to the largest; a non-zero value is at least 2 px wide."""
    top = max((b.value for b in bars), default=0) or 1
    room = width - label_width - 150
    parts = []
    for i, b in enumerate(bars):
        y = i * (bar_height + gap) + 4
        w = 0 if b.value <= 0 else max(2.0, room * b.value / top)
        shown = value_text(b.value) + (f"  {b.note}" if b.note else "")
        parts.append(
            f'<g class="bar-row" data-label="{_a(b.label)}" data-value="{_a(b.value)}">'
            + _text(label_width - 8, y + bar_height * 0.72, _clip(b.label, 30), anchor="end", cls="label")
            + f'<rect class="bar" data-label="{_a(b.label)}" data-value="{_a(b.value)}" x="{label_width}" '
            f'y="{_n(y)}" width="{_n(w)}" height="{bar_height}" rx="2" fill="{b.color}">'
            f"<title>{escape(b.label)}: {escape(shown)}</title></rect>"
            + _text(label_width + w + 6, y + bar_height * 0.72, shown, cls="value")
            + "</g>"
        )
    height = max(1, len(bars)) * (bar_height + gap) + 8
    return _svg(name, width, height, "".join(parts), title)


def share_bar(name: str, fraction: float, color: str, *, width: int = 120, height: int = 10) -> str:
    """A small bar for a table cell: `fraction` of the width, on a light track."""
    w = 0 if fraction <= 0 else max(1.5, width * min(1.0, fraction))
    body = (
        f'<rect x="0" y="0" width="{width}" height="{height}" rx="2" fill="#eef1f4"/>'
        f'<rect class="bar" data-label="{_a(name)}" data-value="{_a(round(fraction, 6))}" x="0" y="0" '
        f'width="{_n(w)}" height="{height}" rx="2" fill="{color}"/>'
    )
    return _svg(name, width, height, body, f"{name}: {percent(fraction)}")


def stacked_bar(
    name: str, parts: Sequence[Bar], *, width: int = CHART_WIDTH, height: int = 26, title: str
) -> str:
    """One bar split by share (rows by outcome at a glance)."""
    total = sum(max(0.0, p.value) for p in parts) or 1
    x, body = 0.0, []
    for p in parts:
        if p.value <= 0:
            continue
        w = width * p.value / total
        body.append(
            f'<rect class="bar" data-label="{_a(p.label)}" data-value="{_a(p.value)}" x="{_n(x)}" y="0" '
            f'width="{_n(max(w, 1.0))}" height="{height}" fill="{p.color}">'
            f"<title>{escape(p.label)}: {number(p.value)} ({percent(p.value / total)})</title></rect>"
        )
        x += w
    return _svg(name, width, height, "".join(body), title)


# ---- the delivery timeline -----------------------------------------------------------------------------


def timeline_chart(series: dict, total_s: float, *, width: int = CHART_WIDTH) -> str:
    """Three panels on one time axis: jobs in flight (steps), items/s and retries/429s (columns)."""
    left, right, panel, gap = 56, 16, 84, 26
    plot_w = width - left - right
    span = max(total_s, 1e-3)

    def x(t: float) -> float:
        return left + plot_w * min(max(t, 0.0), span) / span

    body: list[str] = []
    y0 = 12

    def frame(top: float, label: str, peak: float, fmt: Callable[[float], str]) -> None:
        body.append(_text(left, top - 2, label, size=12, cls="panel-title"))
        base = top + panel
        body.append(
            f'<line x1="{left}" y1="{_n(base)}" x2="{width - right}" y2="{_n(base)}" stroke="{AXIS}"/>'
        )
        body.append(_text(left - 6, top + 10, fmt(peak), anchor="end", size=10, fill="#52606d"))
        body.append(_text(left - 6, base, "0", anchor="end", size=10, fill="#52606d"))

    # jobs in flight
    steps = series.get("in_flight") or [[0.0, 0]]
    peak = max((n for _, n in steps), default=0) or 1
    top = y0 + 14
    frame(top, "batch jobs in flight", peak, lambda v: number(v))
    path, prev = [], None
    for t, n in steps:
        y = top + panel - panel * n / peak
        if prev is None:
            path.append(f"M{_n(x(t))},{_n(y)}")
        else:
            path.append(f"H{_n(x(t))}V{_n(y)}")
        prev = y
    path.append(f"H{_n(x(span))}")
    area = "".join(path) + f"V{_n(top + panel)}H{_n(x(0))}Z"
    body.append(f'<path class="in-flight-area" d="{area}" fill="{NEUTRAL}" fill-opacity="0.18"/>')
    body.append(
        f'<path class="in-flight" d="{"".join(path)}" fill="none" stroke="{NEUTRAL}" stroke-width="2"/>'
    )

    width_s = float(series.get("bucket_s") or 1.0)

    def columns(
        top: float,
        values: list[float],
        color: str,
        cls: str,
        *,
        peak: float | None = None,
        offset: float = 0.0,
        share: float = 1.0,
    ) -> None:
        peak = peak or max(values, default=0) or 1
        for i, v in enumerate(values):
            if v <= 0:
                continue
            x0 = x(i * width_s) + (x(width_s) - x(0)) * offset
            w = max(1.0, (x(width_s) - x(0)) * share - 1)
            h = max(1.0, panel * v / peak)
            body.append(
                f'<rect class="bar {cls}" data-label="{_a(cls)} {_a(seconds(i * width_s))}" data-value="{_a(v)}" '
                f'x="{_n(x0)}" y="{_n(top + panel - h)}" width="{_n(w)}" height="{_n(h)}" fill="{color}">'
                f"<title>{escape(cls)} from {seconds(i * width_s)}: {number(v)}</title></rect>"
            )

    items = [float(v) for v in series.get("items_per_s") or []]
    top = y0 + 14 + panel + gap + 14
    frame(top, f"items/s (items whose job ended, per {seconds(width_s)})", max(items, default=0) or 1, number)
    columns(top, items, COLORS["delivered"], "items")

    retries = [float(v) for v in series.get("retries") or []]
    throttled = [float(v) for v in series.get("throttled") or []]
    top = top + panel + gap + 14
    peak = max(retries + throttled, default=0) or 1
    frame(top, "retries (blue) and 429 answers (red)", peak, number)
    # side by side in each bucket, on one scale (the larger peak)
    columns(top, retries, NEUTRAL, "retries", peak=peak, share=0.5)
    columns(top, throttled, COLORS["rejected"], "throttled", peak=peak, offset=0.5, share=0.5)
    # the time axis
    base = top + panel
    step = nice_step(span, 6)
    t = 0.0
    while t <= span + 1e-9:
        body.append(
            f'<line x1="{_n(x(t))}" y1="{_n(base)}" x2="{_n(x(t))}" y2="{_n(base + 4)}" stroke="{AXIS}"/>'
        )
        body.append(_text(x(t), base + 16, seconds(round(t, 3)), anchor="middle", size=10, fill="#52606d"))
        t += step
    height = base + 24
    return _svg("delivery-timeline", width, height, "".join(body), "delivery timeline")


# ---- trends --------------------------------------------------------------------------------------------


def sparkline(
    name: str,
    values: Sequence[float | None],
    labels: Sequence[str],
    *,
    fmt: Callable[[float], str],
    width: int = 230,
    height: int = 70,
    color: str = NEUTRAL,
) -> str:
    """A small trend: one point per run (the last, this run, drawn larger), a line through the known ones,
    the range on the left. A run without the figure (None) leaves a gap."""
    left, right, top, bottom = 44, 8, 8, 8
    known = [v for v in values if v is not None]
    lo, hi = (min(known), max(known)) if known else (0.0, 0.0)
    flat = hi == lo  # every run the same: one label, the line in the middle
    if flat:
        lo, hi = lo - 1, hi + 1
    n = max(1, len(values) - 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return (
            left + (width - left - right) * (i / n if len(values) > 1 else 0.5),
            top + (height - top - bottom) * (1 - (v - lo) / (hi - lo)),
        )

    body = [
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="{AXIS}"/>'
    ]
    if flat:
        body.append(_text(left - 4, height / 2 + 3, fmt(lo + 1), anchor="end", size=9, fill="#52606d"))
    else:
        body.append(_text(left - 4, top + 8, fmt(hi), anchor="end", size=9, fill="#52606d"))
        body.append(_text(left - 4, height - bottom, fmt(lo), anchor="end", size=9, fill="#52606d"))
    segment: list[str] = []
    for i, v in enumerate(values):
        if v is None:
            if len(segment) > 1:
                body.append(
                    f'<polyline points="{" ".join(segment)}" fill="none" stroke="{color}" stroke-width="1.5"/>'
                )
            segment = []
            continue
        px, py = xy(i, v)
        segment.append(f"{_n(px)},{_n(py)}")
    if len(segment) > 1:
        body.append(
            f'<polyline points="{" ".join(segment)}" fill="none" stroke="{color}" stroke-width="1.5"/>'
        )
    for i, v in enumerate(values):
        if v is None:
            continue
        px, py = xy(i, v)
        last = i == len(values) - 1
        body.append(
            f'<circle class="point{" current" if last else ""}" data-label="{_a(labels[i])}" data-value="{_a(v)}" '
            f'cx="{_n(px)}" cy="{_n(py)}" r="{4 if last else 2.5}" fill="{COLORS["rejected"] if last else color}">'
            f"<title>{escape(labels[i])}: {escape(fmt(v))}</title></circle>"
        )
    return _svg(name, width, height, "".join(body), name)
