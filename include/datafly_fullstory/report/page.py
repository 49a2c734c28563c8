"""The report as one self-contained HTML page: inline CSS, inline SVG charts, the figures as data.

No script runs in the page. The figures the page shows are also in `<script type="application/json"
id="report-data">` (data, not code: browsers do not execute it), and each visible figure's element carries
`data-figure="<key>"`, so a test or a tool reads the same numbers a person sees. Every text that comes
from the run (reasons, event names, ids) is HTML-escaped; the JSON block escapes `<`, `>` and `&`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from include.datafly_fullstory.outcomes import OUTCOMES
from include.datafly_fullstory.report import svg
from include.datafly_fullstory.report.svg import COLORS, MUTED, NEUTRAL, Bar, number, percent
from include.datafly_fullstory.stats import json_safe

OUTCOME_ORDER = OUTCOMES  # the outcomes, in the order the page shows them
OUTCOME_WORDS = {
    "delivered": "FullStory imported the row",
    "rejected": "FullStory refused it, or it would break a FullStory limit",
    "quarantined": "a validation expectation failed",
    "filtered": "consent or a deletion request: FullStory may not receive it",
    "skipped": "nothing to send (no identification, unmapped type, unchanged user, ...)",
    "dry_run": "a dry run: mapped, not sent",
    "pending": "delivery stopped part-way, or another run owns the row",
    "unknown": "sent, but whether FullStory imported it cannot be known",
}
IDENTIFICATION_ORDER = ("session_id", "uid", "use_most_recent", "stitched", "skipped")
TRENDS = (
    ("delivered_share", "delivered share", percent, COLORS["delivered"]),
    ("rejected_share", "rejected share", percent, COLORS["rejected"]),
    ("quarantined_share", "quarantined share", percent, COLORS["quarantined"]),
    ("skipped_share", "skipped share", percent, COLORS["skipped"]),
    ("filtered_share", "filtered share", percent, COLORS["filtered"]),
    ("read", "rows read", number, NEUTRAL),
    ("events_delivered", "events delivered", number, NEUTRAL),
    ("duration_s", "duration (s)", number, NEUTRAL),
    ("retries", "HTTP retries", number, NEUTRAL),
    ("throttled", "429 answers", number, COLORS["rejected"]),
)
NAMES_CHARTED = 15  # event names drawn; the table lists up to NAMES_LISTED
NAMES_LISTED = 60

CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: #1f2933; background: #f5f7fa; margin: 0; line-height: 1.45; }
main { max-width: 1120px; margin: 0 auto; padding: 20px 24px 48px; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 18px; margin: 0 0 10px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
section { background: #fff; border: 1px solid #dde3ea; border-radius: 8px; padding: 16px 20px; margin: 16px 0; }
.meta { color: #52606d; font-size: 13px; } .meta code { font-size: 12px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; margin: 6px 0; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eef1f4; vertical-align: top; }
th { color: #52606d; font-weight: 600; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
.problems { border-left: 4px solid #c62828; background: #fdecea; padding: 8px 12px; }
.ok { border-left: 4px solid #2e7d32; background: #e8f5e9; padding: 8px 12px; }
.note { color: #52606d; font-size: 13px; } .warn { color: #8a4b00; font-size: 13px; }
.badge { display: inline-block; background: #0277bd; color: #fff; border-radius: 4px; padding: 0 6px; font-size: 12px; }
.trends { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 12px; }
.trend { border: 1px solid #eef1f4; border-radius: 6px; padding: 6px 8px; }
.trend .name { font-size: 12px; color: #52606d; } .trend .now { font-size: 15px; font-weight: 600; }
.examples { color: #52606d; font-size: 12px; word-break: break-all; }
.reason { word-break: break-word; } svg.chart { max-width: 100%; height: auto; display: block; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
"""


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _fig(key: str, text: str, cls: str = "num") -> str:
    return f'<td class="{cls}" data-figure="{_e(key)}">{_e(text)}</td>'


def _json_block(data: Mapping[str, Any]) -> str:
    text = json.dumps(json_safe(data), sort_keys=True, allow_nan=False)
    text = text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    return f'<script type="application/json" id="report-data">{text}</script>'


def _swatch(outcome: str) -> str:
    return f'<span class="swatch" style="background:{COLORS.get(outcome, MUTED)}"></span>'


# ---- sections ------------------------------------------------------------------------------------------


def _header(data: Mapping[str, Any]) -> str:
    run, stats = data["run"], data["stats"]
    badge = ' <span class="badge">dry run</span>' if run.get("dry_run") else ""
    problems = stats.get("problems") or []
    if problems:
        status = (
            '<div class="problems" data-figure="problems"><strong>The run needs a person:</strong><ul>'
            + "".join(f"<li>{_e(p)}</li>" for p in problems)
            + "</ul></div>"
        )
    else:
        status = '<div class="ok" data-figure="problems">No problems: nothing here needs a person.</div>'
    report = stats.get("report") or {}
    return (
        f"<header><h1>Datafly \u2192 FullStory run report{badge}</h1>"
        f'<div class="meta">run <code data-figure="run_id">{_e(run.get("run_id"))}</code> \u00b7 window '
        f'<span data-figure="window">{_e(run.get("window_start"))} \u2192 {_e(run.get("window_end"))}</span> (UTC) \u00b7 '
        f"destination <code>{_e(run.get('destination') or '-')}</code> \u00b7 "
        f'<span data-figure="duration_s">{_e(svg.number(run.get("duration_s")))}</span> s \u00b7 '
        f"written {_e(data.get('generated_at'))}</div>"
        f'<div class="meta">run folder <code>{_e(run.get("artifacts") or "-")}</code>'
        + (f" \u00b7 this file <code>{_e(report.get('path'))}</code>" if report.get("path") else "")
        + f"</div></header>{status}"
    )


def _outcomes(data: Mapping[str, Any]) -> str:
    rows = data["stats"].get("rows") or {}
    read = int(rows.get("read") or 0)
    parts = [Bar(o, float(rows.get(o) or 0), COLORS[o]) for o in OUTCOME_ORDER]
    bars = [
        Bar(o, float(rows.get(o) or 0), COLORS[o], percent((rows.get(o) or 0) / read) if read else "")
        for o in OUTCOME_ORDER
    ]
    table = "".join(
        f"<tr>{'<td>' + _swatch(o) + _e(o) + '</td>'}{_fig(f'rows.{o}', number(rows.get(o) or 0))}"
        f"{_fig(f'share.{o}', percent((rows.get(o) or 0) / read) if read else '-')}"
        f"<td class='note'>{_e(OUTCOME_WORDS[o])}</td></tr>"
        for o in OUTCOME_ORDER
    )
    return (
        '<section id="outcomes"><h2>Rows by outcome</h2>'
        f'<p>Every input row ends with exactly one outcome: <strong data-figure="rows.read">{number(read)}</strong> rows '
        "read (the window and the look-back's late rows).</p>"
        + svg.stacked_bar("outcome-shares", parts, title="rows by outcome, as shares")
        + '<div style="height:10px"></div>'
        + svg.hbar_chart("rows-by-outcome", bars, title="rows by outcome")
        + f'<table><tr><th>outcome</th><th class="num">rows</th><th class="num">share</th><th>meaning</th></tr>{table}</table>'
        "</section>"
    )


def _reasons(data: Mapping[str, Any]) -> str:
    found = data.get("outcomes")
    if found is None:
        return _failed("reasons", "Why rows were not delivered", data)
    order = [o for o in OUTCOME_ORDER if o != "delivered"] + ["delivered"]
    blocks = []
    for outcome in order:
        entry = found.get(outcome)
        if not entry or not entry["rows"]:
            continue
        lines = []
        for r in entry["reasons"]:
            share = r["share_of_outcome"] or 0.0
            example = r.get("example_reason")
            full = (
                f'<div class="examples">e.g. {_e(example)}</div>'
                if example and example != r["reason"]
                else ""
            )
            ids = ", ".join(r["examples"])
            lines.append(
                f'<tr data-outcome="{_e(outcome)}" data-reason="{_e(r["reason"])}">'
                f'<td class="reason">{_e(r["reason"])}{full}</td>'
                f'<td class="num" data-figure="reason.rows">{number(r["rows"])}</td>'
                f'<td class="num">{percent(share)}</td>'
                f"<td>{svg.share_bar(outcome + ': ' + r['reason'][:60], share, COLORS.get(outcome, MUTED))}</td>"
                f'<td class="examples">{_e(ids)}</td></tr>'
            )
        more = ""
        if entry["more_reasons"]:
            more = (
                f'<p class="note">{number(entry["more_reasons"])} more reason(s), '
                f"{number(entry['more_reasons_rows'])} row(s): all in outcomes.parquet.</p>"
            )
        if entry.get("folded"):
            more += (
                '<p class="warn">This outcome had too many distinct reasons to tally each one; the rarest '
                "were counted together (the counts per outcome are exact).</p>"
            )
        blocks.append(
            f'<h3 data-outcome="{_e(outcome)}">{_swatch(outcome)}{_e(outcome)}: '
            f'<span data-figure="outcome.{_e(outcome)}">{number(entry["rows"])}</span> row(s)</h3>'
            '<table><tr><th>reason</th><th class="num">rows</th><th class="num">of the outcome</th><th></th>'
            f"<th>example event ids</th></tr>{''.join(lines)}</table>{more}"
        )
    body = "".join(blocks) or '<p class="note">No rows.</p>'
    return (
        '<section id="reasons"><h2>Why: the top reasons per outcome</h2>'
        '<p class="note">Reasons that name a run, time, row or id are grouped (<code>&lt;run&gt;</code>, '
        "<code>&lt;time&gt;</code>, ...), with one full reason and example event ids. Every row's own reason "
        f"is in outcomes.parquet.</p>{body}</section>"
    )


def _events(data: Mapping[str, Any]) -> str:
    stats = data["stats"]
    names = sorted((stats.get("events_by_name") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    charted = [Bar(str(n), float(c)) for n, c in names[:NAMES_CHARTED]]
    rest = sum(c for _, c in names[NAMES_CHARTED:])
    if rest:
        charted.append(Bar(f"{len(names) - NAMES_CHARTED} other names", float(rest), MUTED))
    events, users = stats.get("events") or {}, stats.get("users") or {}
    items = "".join(
        f"<tr><td>{what}</td>"
        + "".join(_fig(f"{what}.{k}", number(src.get(k) or 0)) for k in ("mapped", "delivered", "rejected"))
        + "</tr>"
        for what, src in (("events", events), ("users", users))
    )
    listed = "".join(
        f"<tr><td>{_e(n)}</td>{_fig(f'events_by_name.{n}', number(c))}</tr>" for n, c in names[:NAMES_LISTED]
    )
    more = (
        f'<p class="note">{len(names) - NAMES_LISTED} more names: see stats.json.</p>'
        if len(names) > NAMES_LISTED
        else ""
    )
    chart = (
        svg.hbar_chart("events-by-name", charted, title="event lines per FullStory event name")
        if charted
        else '<p class="note">No events were mapped.</p>'
    )
    return (
        '<section id="events"><h2>Events per FullStory event name</h2>'
        '<p class="note">Event lines mapped into chunks, per FullStory event name (<code>events_by_name</code>).</p>'
        + chart
        + '<table><tr><th></th><th class="num">mapped</th><th class="num">delivered</th><th class="num">rejected</th></tr>'
        + items
        + "</table>"
        + (f"<details><summary>all names</summary><table>{listed}</table>{more}</details>" if names else "")
        + "</section>"
    )


def _identification(data: Mapping[str, Any]) -> str:
    stats = data["stats"]
    modes = dict(stats.get("identification") or {})
    keys = [m for m in IDENTIFICATION_ORDER if m in modes] + sorted(set(modes) - set(IDENTIFICATION_ORDER))
    total = sum(int(v or 0) for v in modes.values())
    bars = [
        Bar(
            m,
            float(modes[m] or 0),
            COLORS["skipped"] if m == "skipped" else NEUTRAL,
            percent((modes[m] or 0) / total) if total else "",
        )
        for m in keys
    ]
    identity = stats.get("identity") or {}
    rows = "".join(
        f"<tr><td>{_e(m)}</td>{_fig(f'identification.{m}', number(modes[m] or 0))}</tr>" for m in keys
    )
    stitched = "".join(
        f"<tr><td>{_e(k.replace('_', ' '))}</td>{_fig(f'identity.{k}', number(v))}</tr>"
        for k, v in identity.items()
    )
    chart = (
        svg.hbar_chart("identification", bars, title="event rows per identification mode")
        if bars
        else '<p class="note">No event rows were mapped.</p>'
    )
    return (
        '<section id="identification"><h2>Identification modes</h2>'
        '<p class="note">Event rows per identification: a FullStory session id, the row\'s own user id '
        "(with <code>use_most_recent</code> while its session may be open), a user stitched from its anonymous "
        "id, or none (skipped).</p>"
        + chart
        + f"<table><tr><th>mode</th><th class='num'>event rows</th></tr>{rows}</table>"
        + (f"<h3>Identity stitching</h3><table>{stitched}</table>" if stitched else "")
        + "</section>"
    )


def _delivery(data: Mapping[str, Any]) -> str:
    d = data.get("delivery")
    if d is None:
        return _failed("delivery", "Delivery timeline", data)
    stats = data["stats"]
    http = stats.get("http") or {}
    statuses = http.get("status_counts") or {}
    status_text = ", ".join(f"{k}: {number(v)}" for k, v in sorted(statuses.items())) or "-"
    head = (
        "<table><tr>"
        + "".join(
            f'<th class="num">{label}</th>'
            for label in (
                "batch jobs",
                "tries",
                "items",
                "items/s",
                "max in flight",
                "retries",
                "429s",
                "seconds",
            )
        )
        + "</tr><tr>"
        + _fig("delivery.jobs", number(d.get("jobs", 0)))
        + _fig("delivery.tries", number(d.get("tries", 0)))
        + _fig("delivery.items", number(d.get("items", 0)))
        + _fig("delivery.items_per_s", number(d.get("items_per_s", 0)))
        + _fig("delivery.max_in_flight", number(d.get("max_in_flight", 0)))
        + _fig("delivery.retries", number(d.get("retries", 0)))
        + _fig("delivery.throttled", number(d.get("throttled", 0)))
        + _fig("delivery.seconds", number(d.get("seconds", 0)))
        + "</tr></table>"
        f'<p class="note">The run\'s HTTP traffic (stats.json, the tries that succeeded): '
        f'<span data-figure="http.requests">{number(http.get("requests", 0))}</span> requests, '
        f'<span data-figure="http.retries">{number(http.get("retries", 0))}</span> retries; answers by status: '
        f"{_e(status_text)}.</p>"
    )
    if stats.get("dry_run"):
        return f'<section id="delivery"><h2>Delivery timeline</h2><p class="note">A dry run sends nothing.</p>{head}</section>'
    if not d.get("series") or not d.get("jobs"):
        return (
            '<section id="delivery"><h2>Delivery timeline</h2>'
            '<p class="note">No batch job was sent or polled in this run (nothing to deliver, or every chunk '
            f"was already complete).</p>{head}{_unreadable(d)}</section>"
        )
    ended = d.get("ended") or []
    stopped = [e for e in ended if e != "finished"]
    tries = (
        f'<p class="warn">{len(stopped)} of {len(ended)} delivery tries stopped: {_e(", ".join(stopped))}. '
        "Later tries resumed their jobs from the ledger.</p>"
        if stopped
        else ""
    )
    rows = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"num" if isinstance(v, int | float) else ""}">{_e(v)}</td>'
            for v in (
                j["chunk"],
                j["mode"],
                j["items"],
                "-" if j["begin_s"] is None else svg.seconds(j["begin_s"]),
                "-" if j["end_s"] is None else svg.seconds(j["end_s"]),
                j["outcome"],
                j["delivered"],
                j["rejected"],
                j["polls"],
                j["retries"],
                j["throttled"],
            )
        )
        + "</tr>"
        for j in d.get("job_rows") or []
    )
    left_out = (
        f'<p class="note">{number(d["job_rows_left_out"])} more jobs are in the charts but not listed.</p>'
        if d.get("job_rows_left_out")
        else ""
    )
    return (
        '<section id="delivery"><h2>Delivery timeline</h2>'
        f'<p class="note">From {_e(d.get("started_at"))} UTC, every try of every delivery task on one time '
        "axis. A batch job is in flight from its POST until its results were recorded.</p>"
        + head
        + tries
        + svg.timeline_chart(d["series"], float(d.get("seconds") or 0))
        + "<details><summary>batch jobs</summary><table><tr>"
        + "".join(
            f"<th>{h}</th>"
            for h in (
                "chunk",
                "mode",
                "items",
                "from",
                "to",
                "outcome",
                "delivered",
                "rejected",
                "polls",
                "retries",
                "429s",
            )
        )
        + f"</tr>{rows}</table>{left_out}</details>{_unreadable(d)}</section>"
    )


def _unreadable(d: Mapping[str, Any]) -> str:
    if not d.get("unreadable"):
        return ""
    return f'<p class="warn">Timeline files that could not be read: {_e(", ".join(d["unreadable"]))}.</p>'


def _trends(data: Mapping[str, Any]) -> str:
    history = data.get("history")
    if history is None:
        return _failed("history", "The previous runs", data)
    runs: Sequence[Mapping[str, Any]] = [*history["runs"], data["current"]]
    labels = [f"{(r.get('window_start') or '?')[:16].replace('T', ' ')} ({r.get('run_id')})" for r in runs]
    cards = []
    for key, name, fmt, color in TRENDS:
        values = [r.get(key) for r in runs]
        now = values[-1]
        cards.append(
            f'<div class="trend" data-trend="{_e(key)}"><div class="name">{_e(name)}</div>'
            f'<div class="now" data-figure="trend.{_e(key)}">{_e(fmt(now) if now is not None else "-")}</div>'
            + svg.sparkline(f"trend-{key}", values, labels, fmt=fmt, color=color)
            + "</div>"
        )
    notes = []
    if not history["runs"]:
        notes.append(
            "No earlier run of this DAG was found in the state store: the charts show this run alone."
        )
    if history["missing_count"]:
        notes.append(
            f"{history['missing_count']} run folder(s) have no stats.json (a run in progress, or one that stopped "
            f"before its summary): {', '.join(history['missing'])}"
            + (" ..." if history["missing_count"] > len(history["missing"]) else "")
        )
    if history["unreadable_count"]:
        notes.append(
            f"{history['unreadable_count']} stats.json file(s) could not be read: {'; '.join(history['unreadable'])}"
            + (" ..." if history["unreadable_count"] > len(history["unreadable"]) else "")
        )
    if history["not_read"]:
        notes.append(
            f"{history['not_read']} older run folder(s) were not looked at (the report reads at most "
            f"{history['max_reads']} stats.json files)."
        )
    if history["later"]:
        notes.append(f"{history['later']} run(s) of later windows are left out.")
    table = "".join(
        f"<tr><td>{_e((r.get('window_start') or '?')[:16].replace('T', ' '))}</td><td><code>{_e(r.get('run_id'))}</code>"
        + (' <span class="badge">dry run</span>' if r.get("dry_run") else "")
        + "</td>"
        + "".join(
            f'<td class="num">{_e(v)}</td>'
            for v in (
                number(r.get("read")),
                percent(r.get("delivered_share")),
                percent(r.get("rejected_share")),
                percent(r.get("quarantined_share")),
                percent(r.get("skipped_share")),
                number(r.get("duration_s")),
                number(r.get("problems")),
            )
        )
        + "</tr>"
        for r in reversed(runs)
    )
    return (
        '<section id="trends"><h2>This run against the previous runs</h2>'
        f'<p class="note">The last <span data-figure="history.runs">{len(history["runs"])}</span> earlier run(s) '
        f"of the DAG (at most {history['max_runs']}), by window; this run is the last point, in red.</p>"
        + "".join(f'<p class="warn">{_e(n)}</p>' for n in notes)
        + f'<div class="trends">{"".join(cards)}</div>'
        "<details><summary>the runs</summary><table><tr><th>window</th><th>run</th>"
        + "".join(
            f'<th class="num">{h}</th>'
            for h in ("read", "delivered", "rejected", "quarantined", "skipped", "seconds", "problems")
        )
        + f"</tr>{table}</table></details></section>"
    )


def _files(data: Mapping[str, Any]) -> str:
    files = data.get("files") or []
    if not files:
        return ""
    links = "".join(
        f'<li><a href="{_e(name)}">{_e(name)}</a> <span class="note">{_e(what)}</span></li>'
        for name, what in files
    )
    return f'<section id="files"><h2>The run folder</h2><ul>{links}</ul></section>'


def _failed(key: str, title: str, data: Mapping[str, Any]) -> str:
    why = (data.get("errors") or {}).get(key, "not available")
    return f'<section id="{_e(key)}"><h2>{_e(title)}</h2><p class="warn">This part could not be drawn: {_e(why)}</p></section>'


def render(data: Mapping[str, Any]) -> str:
    run = data["run"]
    title = f"Run report {run.get('run_id')} ({run.get('window_start')} \u2192 {run.get('window_end')})"
    body = "".join(
        part(data)
        for part in (_header, _outcomes, _reasons, _events, _identification, _delivery, _trends, _files)
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        'img-src data:">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>"
        f"<body><main>{body}</main>{_json_block(data)}</body></html>\n"
    )
