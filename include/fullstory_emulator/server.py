"""HTTP/1.1 (keep-alive) plumbing around `Emulator`: stdlib ThreadingHTTPServer, optional TLS.

The handler reads the body, asks the emulator for a Reply and writes it in one send. All the
behaviour lives in app.py; this module only moves bytes and implements dropped connections.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import ssl
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from include.fullstory_emulator.app import Emulator
from include.fullstory_emulator.config import EmulatorConfig
from include.fullstory_emulator.replies import Reply, error_reply
from include.fullstory_emulator.tls import make_certificates

READY_PREFIX = "FULLSTORY_EMULATOR_READY"
MAX_BODY_BYTES = 256 * 1024 * 1024  # a guard against runaway clients, far above any real batch


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small answers on keep-alive connections must not wait 40 ms
    server_version = "FullStoryEmulator/1.0"
    sys_version = ""

    def setup(self) -> None:
        context = self.server.ssl_context
        if context is not None:
            # The TLS handshake runs here, in the connection's own thread, not in the accept loop.
            self.request = context.wrap_socket(self.request, server_side=True)
        super().setup()

    def log_message(self, format, *args) -> None:  # noqa: A002 - signature of the base class
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            return None
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes | None:
        parts, total = [], 0
        while True:
            size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                return None
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _handle(self, method: str) -> None:
        try:
            body = self._read_body()
        except ValueError:
            body = None
        if body is None:
            self.close_connection = True
            self._write(error_reply(413, "payload_too_large", "the request body is too large or malformed"))
            return
        path, _, query = self.path.partition("?")
        reply = self.server.emulator.handle(method, path, query, self.headers, body)
        if reply.delay:
            time.sleep(reply.delay)
        if reply.drop:
            self._drop()
            return
        self._write(reply)

    def _drop(self) -> None:
        """Close the socket without a byte of answer, as a network failure would."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _write(self, reply: Reply) -> None:
        phrase = HTTPStatus(reply.status).phrase if reply.status in HTTPStatus._value2member_map_ else ""
        lines = [
            f"HTTP/1.1 {reply.status} {phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(reply.body)}",
            f"Date: {self.date_time_string()}",
        ]
        lines += [f"{name}: {value}" for name, value in reply.headers]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            self.wfile.write(head + reply.body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client went away (e.g. it timed out on a slow answer)


class EmulatorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address, emulator: Emulator, ssl_context: ssl.SSLContext | None = None):
        self.emulator = emulator
        self.ssl_context = ssl_context
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:
        kind = sys.exc_info()[0]
        if kind is not None and issubclass(kind, (ConnectionError, ssl.SSLError, TimeoutError)):
            return  # clients that hang up, time out or distrust our certificate are expected
        traceback.print_exc(file=sys.stderr)


def _ssl_context(config: EmulatorConfig, emulator: Emulator) -> ssl.SSLContext | None:
    if not config.tls:
        return None
    paths = make_certificates(config.tls_dir)
    if config.tls_dir is None:
        emulator.owned_tls_dir = os.path.dirname(paths["ca_bundle"])  # removed again at shutdown
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(paths["cert"], paths["key"])
    emulator.ca_bundle = paths["ca_bundle"]
    return context


def build_server(config: EmulatorConfig) -> EmulatorHTTPServer:
    emulator = Emulator(config)
    context = _ssl_context(emulator.config, emulator)
    server = EmulatorHTTPServer((config.host, config.port), emulator, context)
    scheme = "https" if context else "http"
    emulator.url = f"{scheme}://{config.host}:{server.server_port}"
    return server


def ready_line(server: EmulatorHTTPServer) -> str:
    emu = server.emulator
    info = {
        "url": emu.url,
        "region": emu.config.region,
        "org_id": emu.config.org_id,
        "api_keys": emu.config.api_keys,
        "ca_bundle": emu.ca_bundle,
        "pid": os.getpid(),
    }
    return f"{READY_PREFIX} {json.dumps(info)}"


def serve(config: EmulatorConfig) -> None:
    """Run until SIGTERM/SIGINT; prints one ready line (with the URL) to stdout."""
    server = build_server(config)

    def stop(signum, frame) -> None:
        # shutdown() waits for serve_forever to return, so it cannot run in this (the serving) thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    gc.freeze()  # start-up objects never need rescanning by the cyclic collector
    print(ready_line(server), flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if server.emulator.owned_tls_dir:
            shutil.rmtree(server.emulator.owned_tls_dir, ignore_errors=True)
        print("fullstory-emulator stopped", flush=True)
