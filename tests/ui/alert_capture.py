"""A notifier plugged in through `[datafly_fullstory] alert_notifiers` in the alert tests: it renders its
template against the alert's context (as a Slack or Teams notifier would) and appends the line to the file
named by DFFS_ALERT_CAPTURE_FILE."""

from __future__ import annotations

import os

from airflow.sdk import BaseNotifier


class LineNotifier(BaseNotifier):
    template_fields = ("line",)

    def __init__(self, line: str, path: str):
        super().__init__()
        self.line = line
        self.path = path

    def notify(self, context) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(self.line.replace("\n", " ") + "\n")


def capture() -> LineNotifier:
    return LineNotifier(
        "{{ fullstory_alert.kind }} {{ fullstory_alert.run_id }} {{ fullstory_alert.report_url }}",
        os.environ["DFFS_ALERT_CAPTURE_FILE"],
    )
