"""A real SMTP server on 127.0.0.1 for the alert tests (aiosmtpd, in a thread of the test process).

with LocalSmtp() as smtp:
    smtp.connection_json()            # an Airflow `smtp` connection to it (AIRFLOW_CONN_SMTP_DEFAULT)
    smtp.wait_for(lambda m: ..., 60)  # bounded wait for a received message
    smtp.messages                     # email.message.EmailMessage objects, in arrival order
"""

from __future__ import annotations

import email
import email.policy
import json
import socket
import threading
import time
from collections.abc import Callable
from email.message import EmailMessage

from aiosmtpd.controller import Controller


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalSmtp:
    def __init__(self, from_email: str = "airflow@example.com"):
        self.port = _free_port()
        self.from_email = from_email
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self._lock = threading.Lock()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, ready_timeout=10)

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd's handler hook
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self._lock:
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            self.messages.append(message)
        return "250 Message accepted for delivery"

    def __enter__(self) -> LocalSmtp:
        self._controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self._controller.stop()

    def connection_json(self) -> str:
        return json.dumps(
            {
                "conn_type": "smtp",
                "host": "127.0.0.1",
                "port": self.port,
                "extra": {
                    "from_email": self.from_email,
                    "disable_tls": True,
                    "disable_ssl": True,
                    "timeout": 10,
                    "retry_limit": 1,
                },
            }
        )

    def wait_for(self, predicate: Callable[[EmailMessage], bool], timeout: float) -> EmailMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [m for m in self.messages if predicate(m)]
            if found:
                return found[0]
            time.sleep(0.5)
        with self._lock:
            subjects = [str(m["Subject"]) for m in self.messages]
        raise TimeoutError(f"no matching e-mail within {timeout:.0f}s; received: {subjects}")


def body_text(message: EmailMessage) -> str:
    """The message's HTML (or plain) part as text: tags dropped, entities resolved."""
    import html
    import re

    part = message.get_body(preferencelist=("html", "plain"))
    if part is None:
        return ""
    return html.unescape(re.sub(r"<[^>]+>", "", part.get_content()))
