"""An answer to one request, and the JSON helpers every route uses."""

from __future__ import annotations

import orjson


class Reply:
    __slots__ = ("body", "delay", "drop", "headers", "status")

    def __init__(self, status: int, body: bytes = b"{}", headers: list | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or []
        self.drop = False  # close the socket without answering
        self.delay = 0.0  # seconds to wait before answering (latency and slow-answer faults)


def json_reply(status: int, obj, headers: list | None = None) -> Reply:
    return Reply(status, orjson.dumps(obj), headers)


def error_reply(status: int, code: str, message: str, headers: list | None = None) -> Reply:
    """FullStory's ErrorResponse: {"message", "code"}."""
    return json_reply(status, {"message": message, "code": code}, headers)
