"""An agent's state documents over HTTP: written by a batch's state_patch with its events,
read by key, and every refusal."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import assert_error
from tests.test_events_api import AGENT, EVENTS, EVERYTHING, SESSIONS, TEXT, batch

STATE = f"/v2/agents/{AGENT}/state"


@pytest.fixture
def full(keys: Any, agent: str) -> dict[str, str]:
    return keys.headers(("*", EVERYTHING))


@pytest.fixture
def session(client: Any, full: dict[str, str]) -> str:
    for key in ("s1", "s2"):
        response = client.post(SESSIONS, json={"key": key, "name": key}, headers=full)
        assert response.status_code == 201, response.json
    return "s1"


def state(client: Any, headers: dict[str, str], keys: str) -> list[dict]:
    response = client.get(STATE, query_string={"keys": keys}, headers=headers)
    assert response.status_code == 200, response.json
    return response.json["state"]


def test_a_batch_patches_the_agents_state_with_its_events(client, full, session):
    assert state(client, full, "app,user:u-1") == [
        {"key": "app", "value": {}},
        {"key": "user:u-1", "value": {}},
    ]
    patch = {"app": {"theme": "dark", "n": 1}, "user:u-1": {"lang": "fr"}}
    assert batch(client, full, TEXT, state_patch=patch).status_code == 201
    other = batch(
        client,
        full,
        TEXT,
        url=f"{SESSIONS}/s2/events/batch",
        state_patch={"app": {"n": 2, "theme": None}},
    )
    assert other.status_code == 201
    app, user = state(client, full, "app,user:u-1")
    assert app["value"] == {"n": 2} and app["updated_at"].endswith("Z")
    assert user["value"] == {"lang": "fr"}
    assert [d["key"] for d in state(client, full, "user:u-1,app")] == ["user:u-1", "app"]


def test_a_batch_of_state_alone(client, full, session):
    response = batch(client, full, state_patch={"user:u-9": {"seen": True}})
    assert response.status_code == 201 and response.json["events"] == []
    assert state(client, full, "user:u-9")[0]["value"] == {"seen": True}
    assert_error(batch(client, full), 400, "invalid_request", "events")
    # A session and its shared state, with no event yet.
    created = client.post(
        f"{SESSIONS}/s3/events/batch",
        json={"events": [], "create_session": {"name": "Three"}, "state_patch": {"app": {"a": 1}}},
        headers=full,
    )
    assert created.status_code == 201, created.json
    assert client.get(f"{SESSIONS}/s3", headers=full).status_code == 200


@pytest.mark.parametrize(
    ("state_patch", "field"),
    [
        ({}, "state_patch"),
        ({f"k{n}": {} for n in range(17)}, "state_patch"),
        ({"bad key": {"a": 1}}, "state_patch"),
        ({"k" * 129: {"a": 1}}, "state_patch"),
        ({"app": [1]}, "state_patch"),
        ({"app": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}}, "state_patch"),
        ([1], "state_patch"),
    ],
)
def test_bad_state_patches(client, full, session, state_patch, field):
    response = batch(client, full, TEXT, state_patch=state_patch)
    assert_error(response, 400, "invalid_request", None)
    assert any(path.startswith(field) for path in response.json["field_errors"]), response.json
    assert client.get(EVENTS, headers=full).json["events"] == []


def test_a_patched_document_past_the_metadata_bounds_writes_nothing(app, client, full, session):
    app.config["METADATA_MAX_BYTES"] = 200
    assert batch(client, full, TEXT, state_patch={"app": {"a": "x" * 100}}).status_code == 201
    response = batch(client, full, TEXT, state_patch={"app": {"b": "y" * 100}, "other": {"c": 1}})
    assert_error(response, 400, "invalid_request", "state_patch.app")
    assert [d["value"] for d in state(client, full, "app,other")] == [{"a": "x" * 100}, {}]
    assert len(client.get(EVENTS, headers=full).json["events"]) == 1


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({}, "keys"),
        ({"keys": ""}, "keys"),
        ({"keys": "app,"}, "keys"),
        ({"keys": "a b"}, "keys"),
        ({"keys": "app,app"}, "keys"),
        ({"keys": ",".join(f"k{n}" for n in range(17))}, "keys"),
        ({"keys": "k" * 129}, "keys"),
        ({"keys": "app", "x": "1"}, "x"),
    ],
)
def test_bad_reads(client, full, session, query, field):
    assert_error(client.get(STATE, query_string=query, headers=full), 400, "invalid_request", field)


def test_scopes_and_missing_agents(client, keys, full, session):
    assert_error(client.get(STATE, query_string={"keys": "app"}), 401, "unauthorized")
    writer = keys.headers((AGENT, ("events:append",)))
    assert_error(client.get(STATE, query_string={"keys": "app"}, headers=writer), 403, "forbidden")
    user_input = keys.headers((AGENT, ("events:create", "sessions:read")))
    denied = batch(client, user_input, TEXT, state_patch={"app": {"a": 1}})
    assert_error(denied, 403, "forbidden")
    assert state(client, full, "app")[0]["value"] == {}
    missing = client.get("/v2/agents/nobody/state", query_string={"keys": "app"}, headers=full)
    assert_error(missing, 404, "agent_not_found")
    bad = client.get("/v2/agents/nobody/state", query_string={"keys": "a b"}, headers=full)
    assert_error(bad, 404, "agent_not_found")


def test_an_exclusive_create_refuses_a_session_that_exists(client, full, session):
    body = {
        "events": [],
        "create_session": {"name": "Four", "exclusive": True, "metadata": {"v": 1}},
        "state_patch": {"app": {"by": "first"}},
    }
    first = client.post(f"{SESSIONS}/s4/events/batch", json=body, headers=full)
    assert first.status_code == 201, first.json
    body["create_session"]["metadata"] = {"v": 2}
    body["state_patch"] = {"app": {"by": "second"}}
    again = client.post(f"{SESSIONS}/s4/events/batch", json=body, headers=full)
    assert_error(again, 409, "conflict")
    # Nothing of the refused batch: neither the session's metadata nor the shared state.
    assert client.get(f"{SESSIONS}/s4", headers=full).json["metadata"] == {"v": 1}
    assert state(client, full, "app")[0]["value"] == {"by": "first"}
    # Without exclusive, the batch goes to the existing session, as before.
    body["create_session"].pop("exclusive")
    assert client.post(f"{SESSIONS}/s4/events/batch", json=body, headers=full).status_code == 201
    bad = dict(body, create_session={"name": "Five", "exclusive": "yes"})
    assert_error(
        client.post(f"{SESSIONS}/s5/events/batch", json=bad, headers=full),
        400,
        "invalid_request",
        "create_session.exclusive",
    )


def test_a_page_of_events_answers_its_session_and_state_when_asked(client, full, session):
    patch = {"app": {"theme": "dark"}, "user:u-1": {"lang": "fr"}}
    assert batch(client, full, TEXT, state_patch=patch, metadata_patch={"m": 1}).status_code == 201
    plain = client.get(EVENTS, headers=full).json
    assert set(plain) == {"events", "metadata"}
    page = client.get(
        EVENTS,
        query_string={"include_session": "true", "include_state": "user:u-1,app,user:u-2"},
        headers=full,
    )
    assert page.status_code == 200, page.json
    body = page.json
    assert body["events"] == plain["events"]
    assert body["session"] == client.get(f"{SESSIONS}/s1", headers=full).json
    assert body["session"]["metadata"] == {"m": 1}
    assert [(d["key"], d["value"]) for d in body["state"]] == [
        ("user:u-1", {"lang": "fr"}),
        ("app", {"theme": "dark"}),
        ("user:u-2", {}),
    ]
    off = client.get(EVENTS, query_string={"include_session": "false"}, headers=full).json
    assert "session" not in off and "state" not in off
    for query, field in [
        ({"include_session": "yes"}, "include_session"),
        ({"include_state": "a b"}, "include_state"),
        ({"include_state": "app,app"}, "include_state"),
    ]:
        assert_error(
            client.get(EVENTS, query_string=query, headers=full), 400, "invalid_request", field
        )
