"""DELETE /v2/users?uid= and DELETE /v2/users/{id}: the user and its events are gone, and deleting is idempotent."""

from __future__ import annotations

import pytest


@pytest.fixture
def api(fullstory_emulator):
    session = fullstory_emulator.api_session()
    session.base = fullstory_emulator.base_url
    yield session
    session.close()


def _event(uid: str, name: str = "Order Completed") -> dict:
    return {"name": name, "user": {"uid": uid}, "timestamp": "2024-05-01T08:00:00Z"}


def _seed(api) -> str:
    """Two users with an event each; returns u-1's FullStory id."""
    user_id = api.post(f"{api.base}/v2/users", json={"uid": "u-1", "email": "a@example.com"}, timeout=10)
    api.post(f"{api.base}/v2/users", json={"uid": "u-2"}, timeout=10)
    for body in (_event("u-1"), _event("u-1", "Viewed"), _event("u-2")):
        assert api.post(f"{api.base}/v2/events", json=body, timeout=10).status_code == 200
    return user_id.json()["id"]


def test_delete_by_uid_removes_the_user_and_its_events(fullstory_emulator, api):
    _seed(api)
    answer = api.delete(f"{api.base}/v2/users", params={"uid": "u-1"}, timeout=10)
    assert (answer.status_code, answer.json()) == (200, {})
    assert fullstory_emulator.users(uid="u-1") == []
    assert [u["uid"] for u in fullstory_emulator.users()] == ["u-2"]
    assert fullstory_emulator.events(ident="u-1") == []
    assert [e["ident"] for e in fullstory_emulator.events()] == ["u-2"]
    state = fullstory_emulator.state()
    assert (state["events"], state["users"], state["deleted_users"]) == (1, 1, 1)
    assert fullstory_emulator.requests()["by_path"]["DELETE /v2/users"] == {"200": 1}


def test_delete_by_id_removes_events_sent_by_id_and_by_uid(fullstory_emulator, api):
    user_id = _seed(api)
    api.post(f"{api.base}/v2/events", json={"name": "By id", "user": {"id": user_id}}, timeout=10)
    answer = api.delete(f"{api.base}/v2/users/{user_id}", timeout=10)
    assert (answer.status_code, answer.json()) == (200, {})
    assert api.get(f"{api.base}/v2/users/{user_id}", timeout=10).status_code == 404
    assert [e["ident"] for e in fullstory_emulator.events()] == ["u-2"]
    assert fullstory_emulator.requests()["by_path"]["DELETE /v2/users/{id}"] == {"200": 1}


def test_deleting_twice_or_an_unknown_uid_answers_200_and_changes_nothing_else(fullstory_emulator, api):
    _seed(api)
    for uid in ("u-1", "u-1", "never-seen"):
        answer = api.delete(f"{api.base}/v2/users", params={"uid": uid}, timeout=10)
        assert (answer.status_code, answer.json()) == (200, {})
    assert [u["uid"] for u in fullstory_emulator.users()] == ["u-2"]
    assert fullstory_emulator.state()["events"] == 1


def test_events_sent_by_uid_without_a_user_record_are_erased_too(fullstory_emulator, api):
    api.post(f"{api.base}/v2/events", json=_event("only-events"), timeout=10)
    api.delete(f"{api.base}/v2/users", params={"uid": "only-events"}, timeout=10)
    assert fullstory_emulator.events() == []


def test_a_deleted_uid_upserted_again_is_a_new_user(fullstory_emulator, api):
    first = _seed(api)
    api.delete(f"{api.base}/v2/users", params={"uid": "u-1"}, timeout=10)
    again = api.post(f"{api.base}/v2/users", json={"uid": "u-1"}, timeout=10).json()["id"]
    assert again != first
    assert [u["id"] for u in fullstory_emulator.users(uid="u-1")] == [again]


def test_delete_without_uid_is_400_and_needs_the_key(fullstory_emulator, api):
    answer = api.delete(f"{api.base}/v2/users", timeout=10)
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid_argument"
    unauthenticated = fullstory_emulator.http.delete(
        f"{api.base}/v2/users", params={"uid": "u-1"}, timeout=10
    )
    assert unauthenticated.status_code == 401
