"""Idempotency-Key: replay of the first stored answer, mismatch refusal, retryable answers not stored,
24 h expiry on the emulator's (movable) clock, replay counting."""

from __future__ import annotations

import requests

EVENT = {"name": "Order Completed", "user": {"uid": "u-1"}}


def send(emu, body, key, path="/v2/events"):
    headers = {**emu.auth_headers, "Idempotency-Key": key}
    return requests.post(f"{emu.base_url}{path}", json=body, headers=headers, timeout=10)


def test_same_key_same_body_replays_the_first_answer(fullstory_emulator):
    first = send(fullstory_emulator, {"requests": [EVENT]}, "k-1", "/v2/events/batch")
    again = send(fullstory_emulator, {"requests": [EVENT]}, "k-1", "/v2/events/batch")
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()  # same job, even its PROCESSING status at the time
    assert again.headers["Idempotent-Replayed"] == "true"
    state = fullstory_emulator.state()
    assert state["events"] == 1 and state["jobs"]["total"] == 1
    assert state["idempotency"]["replays"] == 1


def test_refusals_are_stored_and_replayed_too(fullstory_emulator):
    assert send(fullstory_emulator, {"name": "x"}, "k-400").status_code == 400
    replay = send(fullstory_emulator, {"name": "x"}, "k-400")
    assert replay.status_code == 400 and replay.headers.get("Idempotent-Replayed") == "true"


def test_same_key_different_body_is_a_400_mismatch(fullstory_emulator):
    assert send(fullstory_emulator, EVENT, "k-2").status_code == 200
    other = send(fullstory_emulator, {**EVENT, "name": "Other"}, "k-2")
    assert other.status_code == 400 and other.json()["code"] == "idempotency_key_mismatch"
    assert fullstory_emulator.state()["idempotency"]["mismatches"] == 1
    assert fullstory_emulator.state()["events"] == 1


def test_keys_are_scoped_per_endpoint(fullstory_emulator):
    assert send(fullstory_emulator, EVENT, "k-3").status_code == 200
    assert send(fullstory_emulator, {"uid": "u-1"}, "k-3", "/v2/users").status_code == 200


def test_429_and_5xx_are_not_stored(fullstory_emulator):
    fullstory_emulator.set_faults(throttle_next=1)
    assert send(fullstory_emulator, EVENT, "k-4").status_code == 429
    fullstory_emulator.set_faults(error_next=1)
    assert send(fullstory_emulator, EVENT, "k-4").status_code == 500
    retried = send(fullstory_emulator, EVENT, "k-4")
    assert retried.status_code == 200 and "Idempotent-Replayed" not in retried.headers
    assert fullstory_emulator.state()["idempotency"]["replays"] == 0


def test_keys_expire_after_24_hours(fullstory_emulator):
    assert send(fullstory_emulator, EVENT, "k-5").status_code == 200
    fullstory_emulator.advance_clock(23 * 3600)
    assert send(fullstory_emulator, EVENT, "k-5").headers.get("Idempotent-Replayed") == "true"
    fullstory_emulator.advance_clock(3600 + 1)
    fresh = send(fullstory_emulator, {**EVENT, "name": "New body, old key"}, "k-5")
    assert fresh.status_code == 200 and "Idempotent-Replayed" not in fresh.headers
    assert fullstory_emulator.state()["events"] == 2
