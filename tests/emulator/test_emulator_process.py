"""The emulator as a process: CLI and ready line, clean shutdown on signals, region defaults, TLS with
a generated CA bundle, the pytest fixtures, and compact event storage."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tracemalloc

import pytest
import requests

from include.fullstory_emulator.state import EventLog
from include.fullstory_emulator.testing import REPO_ROOT, EmulatorProcess


def test_cli_prints_one_ready_line_and_stops_cleanly_on_sigterm_and_sigint():
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        process = subprocess.Popen(
            [sys.executable, "-m", "include.fullstory_emulator", "--port", "0", "--region", "na1"],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            line = process.stdout.readline()
            assert line.startswith("FULLSTORY_EMULATOR_READY ")
            info = json.loads(line.split(" ", 1)[1])
            assert info["url"].startswith("http://127.0.0.1:")
            assert requests.get(f"{info['url']}/_emulator/health", timeout=5).json()["status"] == "ok"
            process.send_signal(stop_signal)
            assert process.wait(10) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(5)


def test_cli_refuses_a_key_of_the_other_region():
    done = subprocess.run(
        [sys.executable, "-m", "include.fullstory_emulator", "--port", "0", "--api-key", "eu1.x/y"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 2 and "eu1" in done.stderr


def test_eu1_defaults_and_na1_keys_are_404(fullstory_emulator_factory):
    emu = fullstory_emulator_factory(region="eu1")
    assert (emu.api_key, emu.org_id, emu.region) == ("eu1.local-emulator-key/demo", "o-LOCAL-eu1", "eu1")
    me = requests.get(f"{emu.base_url}/me", headers=emu.auth_headers, timeout=5)
    assert me.json()["orgId"] == "o-LOCAL-eu1"
    na1 = requests.get(
        f"{emu.base_url}/me", headers={"Authorization": "Basic na1.local-emulator-key/demo"}, timeout=5
    )
    assert na1.status_code == 404 and na1.json()["code"] == "resource_not_found"
    unknown_eu1 = requests.get(
        f"{emu.base_url}/me", headers={"Authorization": "Basic eu1.other/x"}, timeout=5
    )
    assert unknown_eu1.status_code == 401


def test_several_keys_and_a_custom_org(fullstory_emulator_factory):
    emu = fullstory_emulator_factory(
        api_key=["na1.first/a", "legacy-key-without-prefix"], org_id="o-1A2B3C-na1"
    )
    for key in emu.api_keys:
        me = requests.get(f"{emu.base_url}/me", headers={"Authorization": f"Basic {key}"}, timeout=5)
        assert me.json()["orgId"] == "o-1A2B3C-na1"


def test_tls_verifies_with_the_ca_bundle_and_fails_without(fullstory_emulator_factory, tmp_path):
    emu = fullstory_emulator_factory(tls=True, tls_dir=str(tmp_path))
    assert emu.base_url.startswith("https://127.0.0.1:") and emu.ca_bundle == str(tmp_path / "ca.pem")
    answer = requests.get(f"{emu.base_url}/me", headers=emu.auth_headers, verify=emu.ca_bundle, timeout=5)
    assert answer.status_code == 200
    localhost = emu.base_url.replace("127.0.0.1", "localhost")
    assert requests.get(f"{localhost}/_emulator/health", verify=emu.ca_bundle, timeout=5).status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{emu.base_url}/me", headers=emu.auth_headers, timeout=5)  # system CAs only
    assert emu.health()["ca_bundle"] == emu.ca_bundle


def test_emulator_process_context_manager_stops_the_child():
    with EmulatorProcess(job_seconds=0.05) as emu:
        process = emu.process
        assert emu.health()["status"] == "ok"
    assert process.poll() == 0


def test_emulator_process_reports_a_failed_start():
    with pytest.raises(RuntimeError, match="did not become ready"):
        EmulatorProcess(region="xx1", startup_timeout=10).start()


def test_session_fixture_is_reset_between_tests_part_one(fullstory_emulator):
    requests.post(
        f"{fullstory_emulator.base_url}/v2/events",
        json={"name": "x", "user": {"uid": "u"}},
        headers=fullstory_emulator.auth_headers,
        timeout=5,
    )
    fullstory_emulator.set_faults(latency_ms=1)
    assert fullstory_emulator.state()["events"] == 1


def test_session_fixture_is_reset_between_tests_part_two(fullstory_emulator):
    state = fullstory_emulator.state()
    assert state["events"] == 0 and state["requests"] == 0 and state["faults"]["latency_ms"] == 0


def test_event_log_is_compact():
    log = EventLog(keep_properties=False)
    events = [("page_view", 1, f"user-{i:08d}", 1.7e9 + i, None) for i in range(100_000)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    log.append_many(events, 0.0, 0)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # ident strings (~62 B each, shared with the caller here) aside, a few dozen bytes an event
    assert used / len(events) < 40, used / len(events)
    assert log.render(99_999, ["job"])["ident"] == "user-00099999"
