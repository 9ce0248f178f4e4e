"""What an adapter would otherwise fake with several requests, over HTTP: emptying a
history, popping the newest event, a batch that creates its session, batches past 100."""

from __future__ import annotations

from typing import Any

import pytest

from sessions_app import create_app
from tests.conftest import assert_error
from tests.test_events_api import AGENT, EVENTS, EVERYTHING, S1, SESSIONS, TEXT, batch


@pytest.fixture
def app_config() -> dict[str, Any]:
    return {}


@pytest.fixture
def app(storage_url: str, app_config: dict[str, Any]) -> Any:
    app = create_app({"TESTING": True, "STORAGE_URL": storage_url, **app_config})
    yield app
    app.extensions["agent_sessions"].storage.close()


@pytest.fixture
def full(keys: Any, agent: str) -> dict[str, str]:
    return keys.headers(("*", EVERYTHING))


@pytest.fixture
def session(client: Any, full: dict[str, str]) -> str:
    response = client.post(SESSIONS, json={"key": "s1", "name": "One"}, headers=full)
    assert response.status_code == 201, response.json
    return "s1"


def listed(client: Any, headers: dict[str, str], url: str = EVENTS) -> list[str]:
    response = client.get(
        url, query_string={"limit": 1000, "include_hidden": "true"}, headers=headers
    )
    assert response.status_code == 200, response.json
    return [e["id"] for e in response.json["events"]]


OUTPUT = {"type": "agent_output", "content": "hi"}

# DELETE /events


def test_clear_empties_the_history_and_keeps_the_session(client, full, session):
    ids = [e["id"] for e in batch(client, full, TEXT, OUTPUT, OUTPUT).json["events"]]
    client.post(f"{EVENTS}/{ids[1]}/hide", headers=full)
    before = client.get(S1, headers=full)
    response = client.delete(EVENTS, headers=full)
    assert response.status_code == 204 and response.data == b""
    assert listed(client, full) == []
    after = client.get(S1, headers=full)
    assert after.json == before.json and after.headers["ETag"] == before.headers["ETag"]
    assert client.delete(EVENTS, headers=full).status_code == 204  # an empty one too
    again = batch(client, full, TEXT, if_last_event_id=None)  # "no event yet" holds again
    assert again.status_code == 201, again.json
    assert_error(client.get(f"{EVENTS}/{ids[0]}", headers=full), 404, "event_not_found")


def test_clear_errors(client, keys, full, session):
    assert_error(client.delete(f"{SESSIONS}/nope/events", headers=full), 404, "session_not_found")
    assert_error(
        client.delete("/v2/agents/nobot/sessions/s1/events", headers=full), 404, "agent_not_found"
    )
    runtime = keys.headers((AGENT, ("sessions:read", "events:append", "sessions:update")))
    assert_error(client.delete(EVENTS, headers=runtime), 403, "forbidden")
    other = keys.headers(("elsewhere", EVERYTHING))
    assert_error(
        client.delete("/v2/agents/nobot/sessions/s1/events", headers=other), 403, "forbidden"
    )
    assert_error(client.delete(EVENTS), 401, "unauthorized")
    assert_error(client.delete(EVENTS, headers={"x-api-key": "nope"}), 401, "unauthorized")
    assert_error(client.delete(f"{EVENTS}?x=1", headers=full), 400, "invalid_request", "x")
    assert_error(client.delete(f"{SESSIONS}/a%20b/events", headers=full), 404, "not_found")
    deleter = keys.headers((AGENT, ("sessions:delete",)))
    batch(client, full, TEXT)
    assert client.delete(EVENTS, headers=deleter).status_code == 204
    assert listed(client, full) == []


def test_a_disabled_session_is_cleared(client, full, session):
    batch(client, full, TEXT)
    client.patch(S1, json={"enabled": False}, headers=full)
    assert client.delete(EVENTS, headers=full).status_code == 204
    assert listed(client, full) == []


# POST /events/pop

POP = f"{EVENTS}/pop"


def test_pop_answers_the_newest_event(client, full, session):
    written = batch(client, full, TEXT, {**OUTPUT, "metadata": {"m": 1}}).json["events"]
    response = client.post(POP, json={}, headers=full)
    assert response.status_code == 200, response.json
    assert response.json == {"events": [written[1]], "session_key": "s1"}
    assert listed(client, full) == [written[0]["id"]]
    guarded = client.post(POP, json={"if_last_event_id": written[0]["id"]}, headers=full)
    assert guarded.status_code == 200 and guarded.json["events"] == [written[0]]
    empty = client.post(POP, json={}, headers=full)
    assert empty.status_code == 200 and empty.json == {"events": [], "session_key": "s1"}


def test_pop_refusals(client, keys, full, session):
    [first] = batch(client, full, TEXT).json["events"]
    batch(client, full, OUTPUT)
    stale = client.post(POP, json={"if_last_event_id": first["id"]}, headers=full)
    assert_error(stale, 409, "conflict")
    assert len(listed(client, full)) == 2  # nothing deleted
    for body, field in [
        ({"if_last_event_id": "nope"}, "if_last_event_id"),
        ({"if_last_event_id": None, "x": 1}, "x"),
        ([], None),
    ]:
        assert_error(client.post(POP, json=body, headers=full), 400, "invalid_request", field)
    assert_error(
        client.post(f"{SESSIONS}/nope/events/pop", json={}, headers=full), 404, "session_not_found"
    )
    runtime = keys.headers((AGENT, ("sessions:read", "events:append")))
    assert_error(client.post(POP, json={}, headers=runtime), 403, "forbidden")
    assert_error(client.post(POP, json={}), 401, "unauthorized")
    assert len(listed(client, full)) == 2


def test_a_retried_pop_with_its_idempotency_key_pops_once(client, full, session):
    ids = [e["id"] for e in batch(client, full, TEXT, OUTPUT).json["events"]]
    headers = {**full, "Idempotency-Key": "pop-1"}
    first = client.post(POP, json={}, headers=headers)
    again = client.post(POP, json={}, headers=headers)
    assert first.json == again.json and again.headers["Idempotent-Replayed"] == "true"
    assert listed(client, full) == ids[:1]


# create_session on a batch


def test_a_batch_creates_its_session(client, keys, full, agent):
    body = {"name": "Chat", "metadata": {"user_id": "u-1"}, "tti_minutes": 30}
    response = batch(client, full, TEXT, create_session=body, if_last_event_id=None)
    assert response.status_code == 201, response.json
    session = client.get(S1, headers=full).json
    assert session["name"] == "Chat" and session["metadata"] == {"user_id": "u-1"}
    assert session["tti_minutes"] == 30
    again = batch(client, full, OUTPUT, create_session={"name": "Other"})
    assert again.status_code == 201
    assert client.get(S1, headers=full).json["name"] == "Chat"  # it existed: unchanged
    assert len(listed(client, full)) == 2
    found = client.get(SESSIONS, query_string={"metadata.user_id": "u-1"}, headers=full)
    assert [s["key"] for s in found.json["sessions"]] == ["s1"]


def test_create_session_refusals(client, keys, full, agent, admin):
    runtime = keys.headers((AGENT, ("events:append",)))
    assert_error(batch(client, runtime, TEXT, create_session={"name": "x"}), 403, "forbidden")
    assert_error(batch(client, runtime, TEXT), 404, "session_not_found")
    for body, field in [
        ({}, "create_session.name"),
        ({"name": " "}, "create_session.name"),
        ({"name": "x", "key": "s2"}, "create_session.key"),
        ({"name": "x", "from_session": {"session_key": "a"}}, "create_session.from_session"),
        ({"name": "x", "tti_minutes": -1}, "create_session.tti_minutes"),
        ("x", "create_session"),
    ]:
        assert_error(batch(client, full, TEXT, create_session=body), 400, "invalid_request", field)
    assert_error(
        batch(client, full, TEXT, create_session={"name": "x", "metadata": [1]}),
        400,
        "invalid_metadata",
    )
    disabled = batch(client, full, TEXT, create_session={"name": "x", "enabled": False})
    assert_error(disabled, 409, "session_disabled")
    stale = batch(client, full, TEXT, create_session={"name": "x"}, if_last_event_id="aev_1")
    assert_error(stale, 409, "conflict")
    missing = "/v2/agents/nobot/sessions/s1/events/batch"
    assert_error(
        batch(client, full, TEXT, url=missing, create_session={"name": "x"}), 404, "agent_not_found"
    )
    client.patch(f"/v2/agents/{AGENT}", json={"enabled": False}, headers=admin)
    assert_error(batch(client, full, TEXT, create_session={"name": "x"}), 409, "agent_disabled")
    assert_error(client.get(S1, headers=full), 404, "session_not_found")  # nothing was created


# Batches past Vectara's 100


def test_a_batch_of_a_thousand_is_one_write(client, full, session):
    events = [{"type": "agent_output", "content": str(n)} for n in range(1000)]
    response = batch(client, full, *events)
    assert response.status_code == 201, response.json
    assert len(listed(client, full)) == 1000
    over = batch(client, full, *events, OUTPUT)
    assert_error(over, 400, "invalid_request", "events")
    assert len(listed(client, full)) == 1000


@pytest.mark.parametrize("app_config", [{"EVENTS_BATCH_MAX": 3}])
def test_the_batch_bound_is_a_setting(client, full, session):
    assert batch(client, full, TEXT, TEXT, TEXT).status_code == 201
    body = assert_error(
        batch(client, full, TEXT, TEXT, TEXT, TEXT), 400, "invalid_request", "events"
    )
    assert "at most 3" in body["field_errors"]["events"]


@pytest.mark.parametrize("app_config", [{"EVENTS_MAX_CONTENT_LENGTH": 64 * 1024}])
def test_a_batch_stays_within_its_body_bound(client, full, session):
    events = [{"type": "agent_output", "content": "x" * 100} for _ in range(1000)]
    assert_error(batch(client, full, *events), 413, "payload_too_large")
    assert listed(client, full) == []
