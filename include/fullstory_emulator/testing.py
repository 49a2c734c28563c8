"""Start the real emulator as a subprocess and talk to it (tests, the demo, benchmarks).

with EmulatorProcess(region="eu1", tls=True, job_seconds=0.05) as emu:
    requests.post(f"{emu.base_url}/v2/events", json=..., headers=emu.auth_headers, verify=emu.verify)
    emu.set_faults(error_rate=0.5, seed=7)
    assert emu.state()["events"] == 1
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from include.fullstory_emulator.server import READY_PREFIX

REPO_ROOT = Path(__file__).resolve().parents[2]


def _flag_args(flags: dict) -> list[str]:
    """{"job_seconds": 0.1, "tls": True, "api_key": ["a", "b"]} -> ["--job-seconds", "0.1", "--tls", ...]."""
    args: list[str] = []
    for name, value in flags.items():
        option = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            args.append(option)
        elif isinstance(value, list | tuple):
            for item in value:
                args += [option, str(item)]
        else:
            args += [option, str(value)]
    return args


def _local_session() -> requests.Session:
    """A session that ignores the environment: no proxy for 127.0.0.1, and REQUESTS_CA_BUNDLE /
    CURL_CA_BUNDLE cannot override the emulator's CA bundle (requests lets them beat session.verify)."""
    session = requests.Session()
    session.trust_env = False
    return session


class EmulatorProcess:
    """The emulator in a child process on a free port. Keyword flags become CLI flags."""

    def __init__(self, *args: str, startup_timeout: float = 20.0, **flags) -> None:
        self.args = [*args, *_flag_args(flags)]
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.info: dict = {}
        self.http = _local_session()
        self._stderr = None
        self._lines: queue.Queue[str] = queue.Queue()

    # ---- life cycle ------------------------------------------------------------------------------------

    def start(self) -> EmulatorProcess:
        self._stderr = tempfile.TemporaryFile()
        command = [sys.executable, "-m", "include.fullstory_emulator", "--port", "0", *self.args]
        self.process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            start_new_session=True,  # a Ctrl-C in the test runner is not delivered twice
        )
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        self.info = self._wait_ready()
        self.http.verify = self.verify
        return self

    def _pump_stdout(self) -> None:
        for line in self.process.stdout:  # keeps the pipe drained for the life of the process
            self._lines.put(line)

    def _wait_ready(self) -> dict:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.1)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if line.startswith(READY_PREFIX):
                return json.loads(line[len(READY_PREFIX) :])
        error = self._stderr_text()
        self.stop()
        raise RuntimeError(f"the FullStory emulator did not become ready ({self.args}):\n{error}")

    def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-4000:]

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self.http.close()
        return process.returncode

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- connection facts --------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.info["url"]

    @property
    def api_key(self) -> str:
        return self.info["api_keys"][0]

    @property
    def api_keys(self) -> list[str]:
        return list(self.info["api_keys"])

    @property
    def org_id(self) -> str:
        return self.info["org_id"]

    @property
    def region(self) -> str:
        return self.info["region"]

    @property
    def ca_bundle(self) -> str | None:
        return self.info.get("ca_bundle")

    @property
    def verify(self) -> str | bool:
        """What to pass as requests' `verify=`: the CA bundle under --tls, else True (plain HTTP)."""
        return self.ca_bundle or True

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Basic {self.api_key}"}

    def api_session(self) -> requests.Session:
        """A requests.Session already carrying the auth header and the CA bundle."""
        session = _local_session()
        session.headers.update(self.auth_headers)
        session.verify = self.verify
        return session

    # ---- admin API ---------------------------------------------------------------------------------

    def _admin(self, method: str, route: str, payload: dict | None = None, params: dict | None = None):
        response = self.http.request(
            method, f"{self.base_url}/_emulator/{route}", json=payload, params=params, timeout=30
        )
        response.raise_for_status()
        return response.json()

    def health(self) -> dict:
        return self._admin("GET", "health")

    def set_faults(self, **faults) -> dict:
        """Partial update of the fault knobs (see README); returns all of them."""
        return self._admin("POST", "faults", faults)

    def faults(self) -> dict:
        return self._admin("GET", "faults")

    def reset(self, keep_faults: bool = False) -> None:
        """Forget events, users, jobs, idempotency keys and counts; faults return to start-up values."""
        self._admin("POST", "reset", {"keep_faults": keep_faults})

    def state(self) -> dict:
        return self._admin("GET", "state")

    def events(self, limit: int | None = None, page: int = 50_000, **filters) -> list[dict]:
        """Accepted events in arrival order (filters: name=, ident=), paged through the admin API."""
        out: list[dict] = []
        offset: int | None = 0
        while offset is not None and (limit is None or len(out) < limit):
            size = page if limit is None else min(page, limit - len(out))
            answer = self._admin("GET", "events", params={"offset": offset, "limit": size, **filters})
            out += answer["events"]
            offset = answer["next_offset"] if answer["events"] else None
        return out

    def users(self, uid: str | None = None) -> list[dict]:
        return self._admin("GET", "users", params={"uid": uid} if uid is not None else None)["users"]

    def requests(self) -> dict:
        """{"total", "by_status": {"200": n}, "by_path": {"POST /v2/events/batch": {"200": n}}}."""
        return self._admin("GET", "requests")

    def jobs(self) -> list[dict]:
        return self._admin("GET", "jobs")["jobs"]

    def advance_clock(self, seconds: float) -> float:
        """Move the emulator's clock forward (idempotency expiry, job completion)."""
        return self._admin("POST", "clock", {"advance_seconds": seconds})["clock_offset"]
