"""Batch job concurrency: 100 run per org, more queue (still PROCESSING), 200 in progress -> 429.
The emulator's clock is moved instead of waiting, so the test is exact and quick."""

from __future__ import annotations

import requests

BATCH = {"requests": [{"name": "x", "user": {"uid": "u"}}]}


def create(emu, session):
    return session.post(f"{emu.base_url}/v2/events/batch", json=BATCH, timeout=10)


def statuses(emu) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in emu.jobs():
        counts[job["job"]["status"]] = counts.get(job["job"]["status"], 0) + 1
    return counts


def test_jobs_beyond_100_queue_and_200_in_progress_is_429(fullstory_emulator_factory):
    emu = fullstory_emulator_factory(job_seconds=30, rate=0)
    session = emu.api_session()
    assert all(create(emu, session).status_code == 200 for _ in range(150))
    assert emu.state()["jobs"]["queued"] == 50 and statuses(emu) == {"PROCESSING": 150}

    emu.advance_clock(31)  # the first 100 finish; the 50 queued start then, and need 30 s more
    assert statuses(emu) == {"COMPLETED": 100, "PROCESSING": 50}
    assert emu.state()["jobs"]["queued"] == 0

    assert all(create(emu, session).status_code == 200 for _ in range(150))  # 200 in progress now
    refused = create(emu, session)
    assert refused.status_code == 429 and refused.json()["code"] == "too_many_requests"
    assert int(refused.headers["Retry-After"]) >= 1
    users = session.post(f"{emu.base_url}/v2/users/batch", json={"requests": [{"uid": "u"}]}, timeout=10)
    assert users.status_code == 429

    emu.advance_clock(31)
    assert create(emu, session).status_code == 200


def test_job_seconds_is_a_fault_knob(fullstory_emulator):
    fullstory_emulator.set_faults(job_seconds=60)
    session = fullstory_emulator.api_session()
    job_id = create(fullstory_emulator, session).json()["job"]["id"]
    url = f"{fullstory_emulator.base_url}/v2/events/batch/{job_id}"
    assert session.get(url, timeout=10).json()["job"]["status"] == "PROCESSING"
    fullstory_emulator.advance_clock(61)
    assert session.get(url, timeout=10).json()["job"]["status"] == "COMPLETED"
    assert requests.get(url, timeout=10).status_code == 401
