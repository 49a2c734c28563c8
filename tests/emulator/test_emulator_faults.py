"""Fault injection: latency, 5xx, 429 storms, the token bucket, dropped connections, slow answers,
per-item rejections that can be removed again, and the admin endpoint that changes them."""

from __future__ import annotations

import time

import pytest
import requests

EVENT = {"name": "Order Completed", "user": {"uid": "u-1"}}


def send(emu, path="/v2/events", body=EVENT, timeout=10):
    return requests.post(f"{emu.base_url}{path}", json=body, headers=emu.auth_headers, timeout=timeout)


def test_latency_is_added_to_api_answers_only(fullstory_emulator):
    fullstory_emulator.set_faults(latency_ms=150)
    started = time.monotonic()
    assert send(fullstory_emulator).status_code == 200
    assert time.monotonic() - started >= 0.15
    started = time.monotonic()
    fullstory_emulator.state()
    assert time.monotonic() - started < 0.15


def test_error_rate_is_deterministic_for_a_seed(fullstory_emulator):
    def run() -> list[int]:
        fullstory_emulator.set_faults(error_rate=0.5, seed=1234)
        return [send(fullstory_emulator).status_code for _ in range(30)]

    first, second = run(), run()
    assert first == second and set(first) == {200, 500}
    fullstory_emulator.set_faults(error_rate=1.0, error_status=503)
    answer = send(fullstory_emulator)
    assert answer.status_code == 503 and answer.json()["code"] == "service_unavailable"
    assert fullstory_emulator.state()["events"] == first.count(200) * 2  # 5xx answers did nothing


def test_throttle_storm_answers_429_with_retry_after(fullstory_emulator):
    fullstory_emulator.set_faults(throttle_next=3, retry_after=7)
    answers = [send(fullstory_emulator) for _ in range(4)]
    assert [a.status_code for a in answers] == [429, 429, 429, 200]
    assert answers[0].headers["Retry-After"] == "7"
    assert answers[0].json()["code"] == "too_many_requests"


def test_token_bucket_limits_rate_and_burst(fullstory_emulator_factory):
    emu = fullstory_emulator_factory(rate=2, burst=3)
    statuses = [send(emu).status_code for _ in range(6)]
    assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:]
    limited = send(emu)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    time.sleep(1.1)  # two tokens come back
    assert send(emu).status_code == 200


def test_rate_limit_is_changeable_while_running(fullstory_emulator):
    fullstory_emulator.set_faults(rate=1, burst=1)
    assert [send(fullstory_emulator).status_code for _ in range(2)] == [200, 429]
    fullstory_emulator.set_faults(rate=0)  # 0 switches the limiter off
    assert send(fullstory_emulator).status_code == 200


def test_dropped_connection_gets_no_answer(fullstory_emulator):
    fullstory_emulator.set_faults(drop_next=1)
    with pytest.raises(requests.ConnectionError):
        send(fullstory_emulator)
    assert send(fullstory_emulator).status_code == 200
    assert fullstory_emulator.state()["events"] == 1
    assert fullstory_emulator.requests()["by_path"]["POST /v2/events"] == {"dropped": 1, "200": 1}


def test_drop_after_processing_loses_the_answer_not_the_event(fullstory_emulator):
    fullstory_emulator.set_faults(drop_next=1, drop_after_processing=True)
    with pytest.raises(requests.ConnectionError):
        send(fullstory_emulator)
    assert fullstory_emulator.state()["events"] == 1


def test_slow_answer_outlasts_a_client_timeout(fullstory_emulator):
    fullstory_emulator.set_faults(slow_next=1, slow_seconds=1.5)
    with pytest.raises(requests.Timeout):
        send(fullstory_emulator, timeout=0.5)
    assert send(fullstory_emulator, timeout=5).status_code == 200
    assert fullstory_emulator.state()["events"] == 2  # the slow one took effect before answering late


def test_rejected_event_names_fail_per_item_until_removed(fullstory_emulator):
    fullstory_emulator.set_faults(reject_event_names=["Refund"], reject_properties={"sku": ["BAD-1"]})
    items = [EVENT, {**EVENT, "name": "Refund"}, {**EVENT, "properties": {"sku": "BAD-1"}}]
    job = send(fullstory_emulator, "/v2/events/batch", {"requests": items}).json()["job"]
    status = _finished(fullstory_emulator, job["id"])
    assert (status["imports"], status["errors"]) == (1, 2)
    single = send(fullstory_emulator, body={**EVENT, "name": "Refund"})
    assert single.status_code == 400 and "Refund" in single.json()["message"]
    fullstory_emulator.set_faults(reject_event_names=[], reject_properties={})  # the cause is removed
    job = send(fullstory_emulator, "/v2/events/batch", {"requests": items}).json()["job"]
    assert _finished(fullstory_emulator, job["id"])["errors"] == 0


def test_rejected_user_uids(fullstory_emulator):
    fullstory_emulator.set_faults(reject_user_uids=["u-bad"], reject_code="blocked_user")
    answer = send(fullstory_emulator, "/v2/users", {"uid": "u-bad"})
    assert answer.status_code == 400 and answer.json()["code"] == "blocked_user"
    assert send(fullstory_emulator, "/v2/users", {"uid": "u-good"}).status_code == 200


def test_fault_admin_validates_and_reset_restores_start_values(fullstory_emulator):
    base = fullstory_emulator.base_url
    bad = requests.post(f"{base}/_emulator/faults", json={"error_rate": 2}, timeout=10)
    assert bad.status_code == 400 and "error_rate" in bad.json()["message"]
    unknown = requests.post(f"{base}/_emulator/faults", json={"chaos": True}, timeout=10)
    assert unknown.status_code == 400 and "chaos" in unknown.json()["message"]
    assert fullstory_emulator.set_faults(latency_ms=5)["latency_ms"] == 5
    fullstory_emulator.reset()
    assert fullstory_emulator.faults()["latency_ms"] == 0


def test_faults_can_be_set_on_the_command_line(fullstory_emulator_factory):
    emu = fullstory_emulator_factory(throttle_next=1, error_rate=0.0, latency_ms=1, reject_event_name=["X"])
    assert send(emu).status_code == 429
    assert emu.faults()["reject_event_names"] == ["X"] and emu.faults()["latency_ms"] == 1


def _finished(emu, job_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = requests.get(
            f"{emu.base_url}/v2/events/batch/{job_id}", headers=emu.auth_headers, timeout=10
        ).json()
        if status["job"]["status"] != "PROCESSING":
            return status
        time.sleep(0.02)
    raise AssertionError("job did not finish")
