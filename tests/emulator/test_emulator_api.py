"""The v2 endpoints over HTTP: shapes, auth and region, upserts, batch jobs with imports and errors."""

from __future__ import annotations

import base64
import time

import pytest
import requests

EVENT = {"name": "Order Completed", "user": {"uid": "u-1"}, "timestamp": "2024-05-01T08:00:00Z"}


@pytest.fixture
def api(fullstory_emulator):
    session = fullstory_emulator.api_session()
    session.base = fullstory_emulator.base_url
    yield session
    session.close()


def post(api, path, body, **kw):
    return api.post(f"{api.base}{path}", json=body, timeout=10, **kw)


def get(api, path, **kw):
    return api.get(f"{api.base}{path}", timeout=10, **kw)


def finished(api, kind, job_id, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = get(api, f"/v2/{kind}/batch/{job_id}").json()
        if status["job"]["status"] != "PROCESSING":
            return status
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def all_pages(api, url) -> tuple[list, int]:
    results, token, pages = [], None, 0
    for _ in range(100):
        page = get(api, url, params={"page_token": token} if token else None).json()
        results += page["results"]
        pages += 1
        token = page.get("next_page_token")
        if not token:
            return results, pages
    raise AssertionError("too many pages")


def test_me_answers_email_org_and_role(fullstory_emulator, api):
    me = get(api, "/me")
    assert me.status_code == 200
    assert me.json() == {"email": "emulator@example.com", "orgId": "o-LOCAL-na1", "role": "ADMIN"}


def test_create_event_answers_empty_object_and_is_stored(fullstory_emulator, api):
    answer = post(api, "/v2/events", {**EVENT, "properties": {"total": 58.99}})
    assert (answer.status_code, answer.json()) == (200, {})
    [stored] = fullstory_emulator.events()
    assert stored["name"] == "Order Completed"
    assert (stored["identification"], stored["ident"]) == ("user.uid", "u-1")
    assert stored["timestamp"] == "2024-05-01T08:00:00.000Z"
    assert stored["properties"] == {"total": 58.99}


def test_single_event_refusal_is_400_naming_the_field(fullstory_emulator, api):
    answer = post(api, "/v2/events", {**EVENT, "properties": {"bad-name": 1}})
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid_argument" and "bad-name" in answer.json()["message"]
    answer = post(api, "/v2/events", {**EVENT, "colour": "red"})
    assert answer.status_code == 400 and "colour" in answer.json()["message"]
    answer = api.post(f"{api.base}/v2/events", data=b"{not json", timeout=10)
    assert answer.status_code == 400 and answer.json()["code"] == "invalid_argument"
    assert fullstory_emulator.state()["events"] == 0


@pytest.mark.parametrize(
    "header",
    [None, "Bearer na1.local-emulator-key/demo", "Basic na1.unknown/x", "Basic nokey", "Basic "],
)
def test_missing_or_unknown_key_is_401(fullstory_emulator, header):
    headers = {"Authorization": header} if header is not None else {}
    answer = requests.post(
        f"{fullstory_emulator.base_url}/v2/events", json=EVENT, headers=headers, timeout=10
    )
    assert answer.status_code == 401
    assert answer.json()["code"] == "unauthorized" and answer.json()["message"]


def test_base64_encoded_key_is_refused_with_a_hint(fullstory_emulator):
    encoded = base64.b64encode(f"{fullstory_emulator.api_key}:".encode()).decode()
    answer = requests.get(
        f"{fullstory_emulator.base_url}/me", headers={"Authorization": f"Basic {encoded}"}, timeout=10
    )
    assert answer.status_code == 401 and "verbatim" in answer.json()["message"]


def test_key_of_the_other_region_is_404_org_not_found(fullstory_emulator):
    answer = requests.get(
        f"{fullstory_emulator.base_url}/me", headers={"Authorization": "Basic eu1.some-key/abc"}, timeout=10
    )
    assert answer.status_code == 404
    assert answer.json()["code"] == "resource_not_found"
    assert "org not found in this data region" in answer.json()["message"]


def test_create_user_upserts_on_uid_and_merges_properties(fullstory_emulator, api):
    first = post(
        api,
        "/v2/users",
        {"uid": "u-42", "display_name": "Ada", "properties": {"plan": "free", "a": {"x": 1}}},
    )
    second = post(
        api,
        "/v2/users",
        {"uid": "u-42", "email": "ada@example.com", "properties": {"plan": "pro", "a": {"y": 2}}},
    )
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    other = post(api, "/v2/users", {"uid": "u-43"}).json()["id"]
    anonymous = post(api, "/v2/users", {}).json()["id"]
    assert len({first.json()["id"], other, anonymous}) == 3
    [ada] = fullstory_emulator.users(uid="u-42")
    assert ada["properties"] == {"plan": "pro", "a": {"x": 1, "y": 2}}
    assert (ada["display_name"], ada["email"], ada["updates"]) == ("Ada", "ada@example.com", 2)
    fetched = get(api, f"/v2/users/{first.json()['id']}").json()
    assert fetched["uid"] == "u-42" and fetched["is_being_deleted"] is False
    assert get(api, "/v2/users/999").status_code == 404


def test_event_batch_job_lifecycle_with_imports_and_errors(fullstory_emulator, api):
    items = [{**EVENT, "properties": {"n": i}} for i in range(5)]
    items.append({"name": "Bad", "user": {"uid": "u-1"}, "properties": {"9": 1}})
    items.append(
        {"name": "Ctx", "user": {"uid": "u-1"}, "context": {"browser": {"url": "https://a.example"}}}
    )
    shared = {"context": {"location": {"country": "DE"}}}
    created = post(api, "/v2/events/batch", {"requests": items, "shared": shared})
    assert created.status_code == 200
    job = created.json()["job"]
    assert job["status"] == "PROCESSING" and set(job) == {"id", "status", "created"}
    assert get(api, f"/v2/events/batch/{job['id']}/imports").status_code == 202
    assert get(api, f"/v2/events/batch/{job['id']}/errors").status_code == 202
    status = finished(api, "events", job["id"])
    assert (status["imports"], status["errors"], status["job"]["status"]) == (5, 2, "FAILED")
    assert status["job"]["finished"] >= status["job"]["created"]
    imports = get(api, f"/v2/events/batch/{job['id']}/imports").json()
    assert imports["total_records"] == "5" and [r["properties"]["n"] for r in imports["results"]] == list(
        range(5)
    )
    assert imports["results"][0]["user"] == {"uid": "u-1"}
    errors = get(api, f"/v2/events/batch/{job['id']}/errors").json()
    assert errors["total_records"] == "2"
    bad, conflict = errors["results"]
    assert bad["event"] == items[5] and bad["code"] == "invalid_argument" and "'9'" in bad["message"]
    assert conflict["event"] == items[6] and conflict["shared"] == shared and "context" in conflict["message"]
    assert fullstory_emulator.state()["events"] == 5


def test_clean_batch_completes(fullstory_emulator, api):
    job = post(api, "/v2/events/batch", {"requests": [EVENT, EVENT]}).json()["job"]
    status = finished(api, "events", job["id"])
    assert (status["imports"], status["errors"], status["job"]["status"]) == (2, 0, "COMPLETED")
    errors = get(api, f"/v2/events/batch/{job['id']}/errors").json()
    assert errors == {"results": [], "total_records": "0"}


def test_batch_envelope_defects_are_a_400_for_the_whole_request(fullstory_emulator, api):
    assert api.post(f"{api.base}/v2/events/batch", data=b"nope", timeout=10).status_code == 400
    assert post(api, "/v2/events/batch", {"events": [EVENT]}).status_code == 400
    too_many = post(api, "/v2/events/batch", {"requests": [EVENT] * 50_001})
    assert too_many.status_code == 400 and "50000" in too_many.json()["message"]
    assert post(api, "/v2/users/batch", {"requests": "x"}).status_code == 400
    assert fullstory_emulator.state()["jobs"]["total"] == 0


def test_user_batch_with_status_imports_and_errors(fullstory_emulator, api):
    existing = post(api, "/v2/users", {"uid": "u-1", "properties": {"tier": "silver"}}).json()["id"]
    items = [
        {"uid": "u-1", "properties": {"tier": "gold"}},
        {"id": existing, "email": "one@example.com"},
        {"id": "404404"},
        {"uid": "u-2", "email": "e" * 129},
        {"uid": "u-3", "display_name": "Three"},
    ]
    job = post(api, "/v2/users/batch", {"requests": items}).json()["job"]
    status = finished(api, "users", job["id"])
    assert (status["imports"], status["errors"], status["job"]["status"]) == (3, 2, "FAILED")
    imports = get(api, f"/v2/users/batch/{job['id']}/imports").json()
    assert [r["id"] for r in imports["results"]][:2] == [existing, existing]
    errors = get(api, f"/v2/users/batch/{job['id']}/errors").json()["results"]
    assert {e["code"] for e in errors} == {"user_not_found", "invalid_argument"}
    assert [e["user"] for e in errors] == [items[2], items[3]]
    assert "email" in errors[1]["message"]
    [user] = fullstory_emulator.users(uid="u-1")
    assert user["properties"] == {"tier": "gold"} and user["email"] == "one@example.com"


def test_imports_and_errors_are_paged(fullstory_emulator_factory):
    emu = fullstory_emulator_factory(page_size=7, job_seconds=0.01)
    session = emu.api_session()
    session.base = emu.base_url
    items = [{**EVENT, "properties": {"n": i}} for i in range(30)] + [{"name": ""}] * 10
    job = post(session, "/v2/events/batch", {"requests": items}).json()["job"]
    finished(session, "events", job["id"])
    imported, pages = all_pages(session, f"/v2/events/batch/{job['id']}/imports")
    assert [r["properties"]["n"] for r in imported] == list(range(30)) and pages == 5
    errors, pages = all_pages(session, f"/v2/events/batch/{job['id']}/errors")
    assert len(errors) == 10 and pages == 2
    bad = get(session, f"/v2/events/batch/{job['id']}/imports", params={"page_token": "garbage!"})
    assert bad.status_code == 400


def test_unknown_job_and_route_are_404(fullstory_emulator, api):
    assert get(api, "/v2/events/batch/nope").json()["code"] == "resource_not_found"
    job = post(api, "/v2/events/batch", {"requests": [EVENT]}).json()["job"]
    assert get(api, f"/v2/users/batch/{job['id']}").status_code == 404  # an events job is not a users job
    assert get(api, "/v3/anything").status_code == 404


def test_v2beta_paths_behave_like_v2(fullstory_emulator, api):
    assert post(api, "/v2beta/events", EVENT).status_code == 200
    assert fullstory_emulator.requests()["by_path"]["POST /v2/events"] == {"200": 1}


def test_admin_lists_requests_by_path_and_status(fullstory_emulator, api):
    post(api, "/v2/events", EVENT)
    post(api, "/v2/events", {"name": "x"})
    counts = fullstory_emulator.requests()
    assert counts["by_path"]["POST /v2/events"] == {"200": 1, "400": 1}
    assert counts["by_status"] == {"200": 1, "400": 1} and counts["total"] == 2
    state = fullstory_emulator.state()
    assert state["events"] == 1 and state["requests"] == 2


def test_admin_events_filter_and_page(fullstory_emulator, api):
    post(api, "/v2/events/batch", {"requests": [{**EVENT, "user": {"uid": f"u-{i % 3}"}} for i in range(9)]})
    assert len(fullstory_emulator.events(ident="u-1")) == 3
    assert len(fullstory_emulator.events(page=2)) == 9
    assert len(fullstory_emulator.events(limit=4)) == 4
    assert fullstory_emulator.events(name="nothing") == []
