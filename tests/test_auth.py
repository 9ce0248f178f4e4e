"""Authentication and permissions: 401, then 403, then 404, then 400."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from storage_backends.codec import utcnow
from tests.conftest import ALL_SCOPES, assert_error

SESSIONS = "/v2/agents/{agent}/sessions"
ONE = "/v2/agents/{agent}/sessions/{session}"

# (method, path template, scope, json body)
SESSION_ROUTES = [
    ("POST", SESSIONS, "sessions:create", {"name": "n"}),
    ("GET", SESSIONS, "sessions:read", None),
    ("GET", ONE, "sessions:read", None),
    ("PATCH", ONE, "sessions:update", {"name": "m"}),
    ("DELETE", ONE, "sessions:delete", None),
]

ADMIN_ROUTES = [
    ("POST", "/v2/agents", {"key": "new", "name": "n"}),
    ("GET", "/v2/agents", None),
    ("GET", "/v2/agents/support-bot", None),
    ("PATCH", "/v2/agents/support-bot", {"name": "n"}),
    ("DELETE", "/v2/agents/support-bot", None),
    ("POST", "/v2/api_keys", {"name": "n"}),
    ("GET", "/v2/api_keys", None),
    ("DELETE", "/v2/api_keys/ak_0000000000000000", None),
]


def call(client, method, path, headers=None, body=None):
    return client.open(path, method=method, headers=headers or {}, json=body)


@pytest.fixture
def session(client, full, agent):
    response = client.post(
        SESSIONS.format(agent=agent), json={"key": "s1", "name": "n"}, headers=full
    )
    assert response.status_code == 201
    return "s1"


def unauthorized_body(response):
    body = assert_error(response, 401, "unauthorized")
    return {k: v for k, v in body.items() if k != "request_id"}


def test_every_bad_key_gets_the_same_401(client, keys, agent, session):
    key_id, token = keys.create(("*", ALL_SCOPES))
    revoked_id, revoked = keys.create(("*", ALL_SCOPES))
    _, expired = keys.create(("*", ALL_SCOPES), expires_at=utcnow() - dt.timedelta(seconds=1))
    with client.application.app_context():
        client.application.extensions["agent_sessions"].storage.revoke_api_key(
            key_id=revoked_id, now=utcnow()
        )
    secret = token.split(".", 1)[1]
    presented = [
        {},
        {"x-api-key": ""},
        {"x-api-key": "garbage"},
        {"x-api-key": key_id},
        {"x-api-key": f"{key_id}.wrong-secret"},
        {"x-api-key": f"ak_ffffffffffffffff.{secret}"},
        {"x-api-key": token + "x"},
        {"x-api-key": revoked},
        {"x-api-key": expired},
        {"Authorization": "Bearer garbage"},
        {"Authorization": f"Basic {token}"},
        {"x-api-key": "é" * 300},
    ]
    bodies = []
    for headers in presented:
        response = client.get(ONE.format(agent=agent, session=session), headers=headers)
        bodies.append(unauthorized_body(response))
        assert response.headers.get("Cache-Control") == "no-store"
    assert all(b == bodies[0] for b in bodies), bodies


def test_key_in_header_or_bearer(client, keys, agent, session):
    _, token = keys.create(("*", ALL_SCOPES))
    for headers in ({"x-api-key": token}, {"Authorization": f"Bearer {token}"}):
        assert (
            client.get(ONE.format(agent=agent, session=session), headers=headers).status_code == 200
        )


def test_an_empty_x_api_key_does_not_hide_a_bearer_key(client, keys, agent, session):
    _, token = keys.create(("*", ALL_SCOPES))
    url = ONE.format(agent=agent, session=session)
    for empty in ("", "  "):
        headers = {"x-api-key": empty, "Authorization": f"Bearer {token}"}
        assert client.get(url, headers=headers).status_code == 200
    # A non-empty x-api-key is the one presented, even next to a valid Bearer key.
    headers = {"x-api-key": "garbage", "Authorization": f"Bearer {token}"}
    assert_error(client.get(url, headers=headers), 401, "unauthorized")


def test_key_in_query_string_is_ignored(client, keys, agent, session):
    _, token = keys.create(("*", ALL_SCOPES))
    for name in ("api_key", "x-api-key", "key"):
        response = client.get(ONE.format(agent=agent, session=session) + f"?{name}={token}")
        assert_error(response, 401, "unauthorized")


def test_revocation_through_the_api_is_effective_at_the_next_request(
    client, keys, admin, agent, session
):
    """The worker that revoked the key forgets it at once, cache or not."""
    key_id, token = keys.create(("*", ALL_SCOPES))
    path = ONE.format(agent=agent, session=session)
    assert client.get(path, headers={"x-api-key": token}).status_code == 200
    assert client.delete(f"/v2/api_keys/{key_id}", headers=admin).status_code == 204
    assert_error(client.get(path, headers={"x-api-key": token}), 401, "unauthorized")


def test_revocation_elsewhere_is_effective_within_one_second(client, keys, agent, session):
    """A revocation this worker did not make (the CLI, another worker) waits out the key cache."""
    key_id, token = keys.create(("*", ALL_SCOPES))
    path = ONE.format(agent=agent, session=session)
    assert client.get(path, headers={"x-api-key": token}).status_code == 200
    with client.application.app_context():
        client.application.extensions["agent_sessions"].storage.revoke_api_key(
            key_id=key_id, now=utcnow()
        )
    revoked = time.monotonic()
    time.sleep(max(0.0, revoked + 1.0 - time.monotonic()))
    assert_error(client.get(path, headers={"x-api-key": token}), 401, "unauthorized")


def test_deleting_an_agent_ends_its_grants_at_once_here(client, keys, admin, agent, session):
    """The grants an agent's deletion ends are gone at this worker's next request."""
    token = keys.headers((agent, ALL_SCOPES))
    path = ONE.format(agent=agent, session=session)
    assert client.get(path, headers=token).status_code == 200
    assert client.delete(f"/v2/agents/{agent}", headers=admin).status_code == 204
    assert (
        client.post("/v2/agents", json={"key": agent, "name": "Again"}, headers=admin).status_code
        == 201
    )
    assert_error(client.get(f"/v2/agents/{agent}/sessions", headers=token), 403, "forbidden")


@pytest.mark.parametrize(("method", "template", "scope", "body"), SESSION_ROUTES)
def test_each_route_needs_its_scope(client, keys, agent, session, method, template, scope, body):
    path = template.format(agent=agent, session=session)
    others = [s for s in ALL_SCOPES if s != scope]
    lacking = keys.headers((agent, tuple(others)))
    assert_error(call(client, method, path, lacking, body), 403, "forbidden")
    holding = keys.headers((agent, (scope,)))
    assert call(client, method, path, holding, body).status_code < 300


@pytest.mark.parametrize(("method", "template", "scope", "body"), SESSION_ROUTES)
def test_order_401_403_404_400(client, keys, agent, session, method, template, scope, body):
    """A key without a grant learns nothing about which agents exist."""
    granted_elsewhere = keys.headers(("elsewhere", ALL_SCOPES))
    wildcard = keys.headers(("*", ALL_SCOPES))
    for target in (agent, "no-such-agent"):
        path = template.format(agent=target, session=session)
        assert_error(call(client, method, path, {}, body), 401, "unauthorized")
        forbidden = call(client, method, path, granted_elsewhere, body)
        assert_error(forbidden, 403, "forbidden")
    # With the grant: 404 for the missing agent even when the body is also bad.
    bad_body = {"bogus": True} if body is not None else None
    missing = call(
        client, method, template.format(agent="no-such-agent", session=session), wildcard, bad_body
    )
    assert_error(missing, 404, "agent_not_found")
    if bad_body is not None:
        bad = call(
            client, method, template.format(agent=agent, session=session), wildcard, bad_body
        )
        assert_error(bad, 400, "invalid_request", "bogus")


def test_forbidden_bodies_do_not_depend_on_existence(client, keys, agent):
    granted_elsewhere = keys.headers(("elsewhere", ALL_SCOPES))
    first = client.get(SESSIONS.format(agent=agent), headers=granted_elsewhere).get_json()
    second = client.get(SESSIONS.format(agent="ghost"), headers=granted_elsewhere).get_json()
    assert first["messages"] == second["messages"]


def test_missing_session_after_permission(client, full, agent):
    response = client.get(ONE.format(agent=agent, session="ghost"), headers=full)
    assert_error(response, 404, "session_not_found")


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_admin_routes_need_an_admin_key(client, keys, agent, method, path, body):
    assert_error(call(client, method, path, {}, body), 401, "unauthorized")
    everything = keys.headers(("*", ALL_SCOPES))
    assert_error(call(client, method, path, everything, body), 403, "forbidden")


def test_admin_key_may_use_sessions(client, admin, agent):
    response = client.post(SESSIONS.format(agent=agent), json={"name": "n"}, headers=admin)
    assert response.status_code == 201


def test_no_cross_agent_access(client, keys, admin, agent):
    """A key granted on agent A gets 403 for every route and method on agent B."""
    client.post("/v2/agents", json={"key": "agent-b", "name": "B"}, headers=admin)
    b_sessions = SESSIONS.format(agent="agent-b")
    client.post(b_sessions, json={"key": "b1", "name": "b"}, headers=admin)
    a_key = keys.headers((agent, ALL_SCOPES))
    for method, template, _, body in SESSION_ROUTES:
        path = template.format(agent="agent-b", session="b1")
        assert_error(call(client, method, path, a_key, body), 403, "forbidden")
    # B's session keys under A's path are 404.
    response = client.get(ONE.format(agent=agent, session="b1"), headers=a_key)
    assert_error(response, 404, "session_not_found")
    assert client.get(b_sessions + "/b1", headers=admin).status_code == 200
