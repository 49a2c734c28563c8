"""Reading a run report back: its JSON data block and the figures a person sees (`data-figure` elements)."""

from __future__ import annotations

import json
from html.parser import HTMLParser


class ReportParser(HTMLParser):
    """Collects the `report-data` JSON block, the text of every element with `data-figure`, the charts
    (`svg.chart` by `data-chart`) and every tag's attributes (to check the page fetches nothing)."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "source", "area", "base", "col", "embed", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.data_text: list[str] = []
        self.figures: dict[str, list[str]] = {}
        self.charts: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[dict[str, str | None]] = []
        self._stack: list[tuple[str, str | None]] = []  # (tag, figure key being collected)
        self._texts: dict[int, list[str]] = {}
        self._in_data = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "script":
            self.scripts.append(attributes)
            self._in_data = attributes.get("id") == "report-data"
        if tag == "svg" and "chart" in (attributes.get("class") or "").split():
            self.charts.append(attributes.get("data-chart") or "")
        if tag in self.VOID:
            return
        key = attributes.get("data-figure")
        self._stack.append((tag, key))
        if key is not None:
            self._texts[len(self._stack)] = []

    def handle_startendtag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "svg" and "chart" in (attributes.get("class") or "").split():
            self.charts.append(attributes.get("data-chart") or "")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_data = False
        if tag in self.VOID:
            return
        while self._stack:
            depth = len(self._stack)
            open_tag, key = self._stack.pop()
            if key is not None:
                text = " ".join("".join(self._texts.pop(depth)).split())
                self.figures.setdefault(key, []).append(text)
            if open_tag == tag:
                break

    def handle_data(self, data):
        if self._in_data:
            self.data_text.append(data)
        for depth in self._texts:
            self._texts[depth].append(data)

    @property
    def data(self) -> dict:
        return json.loads("".join(self.data_text))

    def figure(self, key: str) -> str:
        (text,) = self.figures[key]
        return text


def parse_report(html: str) -> ReportParser:
    parser = ReportParser()
    parser.feed(html)
    parser.close()
    return parser


def shown(n: int) -> str:
    """A count as the report shows it."""
    return f"{n:,}"
