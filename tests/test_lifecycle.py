"""List, get, update and delete sessions; idle expiry; the admin API."""

from __future__ import annotations

import base64
import datetime as dt
import time

import pytest

from storage_backends.codec import utcnow
from tests.conftest import ALL_SCOPES, assert_error

SESSIONS = "/v2/agents/support-bot/sessions"


def create(client, headers, **body):
    body.setdefault("name", body.get("key", "n"))
    response = client.post(SESSIONS, json=body, headers=headers)
    assert response.status_code == 201, response.json
    return response.get_json()


def walk(client, headers, limit, query=""):
    keys, page_key, pages = [], None, 0
    while True:
        url = f"{SESSIONS}?limit={limit}{query}" + (f"&page_key={page_key}" if page_key else "")
        response = client.get(url, headers=headers)
        assert response.status_code == 200, response.json
        body = response.get_json()
        keys += [s["key"] for s in body["sessions"]]
        pages += 1
        page_key = body["metadata"].get("page_key")  # absent on the last page
        if page_key is None:
            return keys, pages


# List


def test_list_shape_and_default_limit(client, full):
    for i in range(12):
        create(client, full, key=f"s{i:02d}")
    body = client.get(SESSIONS, headers=full).get_json()
    assert list(body) == ["sessions", "metadata"]
    assert [s["key"] for s in body["sessions"]] == [f"s{i:02d}" for i in range(10)]
    assert isinstance(body["metadata"]["page_key"], str)
    assert body["sessions"][0] == client.get(f"{SESSIONS}/s00", headers=full).get_json()


def test_list_walks_every_page_once(client, full):
    for i in range(23):
        create(client, full, key=f"s{i:02d}")
    keys, pages = walk(client, full, 5)
    assert keys == [f"s{i:02d}" for i in range(23)]
    assert pages == 5


def test_empty_list(client, full):
    body = client.get(SESSIONS, headers=full).get_json()
    assert body == {"sessions": [], "metadata": {}}  # no page_key on the last page


def test_list_unknown_agent(client, full):
    assert_error(client.get("/v2/agents/ghost/sessions", headers=full), 404, "agent_not_found")


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=101",
        "limit=-1",
        "limit=abc",
        "limit=1.5",
        "limit=",
        "limit=99999999999999999999",
        "page_key=%%%",
        "page_key=bm9wZQ",  # base64 of "nope"
        "page_key=" + base64.urlsafe_b64encode(b"v1:-5").decode(),
        "page_key=" + base64.urlsafe_b64encode(b"v2:5").decode(),
        "page_key=" + "A" * 300,
        "page_key=",
        "filter=(unclosed",
        "filter=" + "a" * 300,
        "filter=(?P<n>a)(?P=n)",  # backreferences are not linear-time
    ],
)
def test_bad_query_is_400(client, full, query):
    create(client, full, key="a")
    assert_error(client.get(f"{SESSIONS}?{query}", headers=full), 400, "invalid_request")


def test_limit_bounds_accepted(client, full):
    create(client, full, key="a")
    for limit in (1, 100):
        assert client.get(f"{SESSIONS}?limit={limit}", headers=full).status_code == 200


def test_filter_over_name_and_description(client, full):
    create(client, full, key="a", name="Billing question")
    create(client, full, key="b", name="other", description="about billing")
    create(client, full, key="c", name="Shipping")
    create(client, full, key="d", name="billing again")
    keys, _ = walk(client, full, 1, "&filter=billing")
    assert keys == ["b", "d"]
    keys, _ = walk(client, full, 2, "&filter=(?i)%5Ebilling")
    assert keys == ["a", "d"]


def test_catastrophic_pattern_returns_promptly(client, full, app):
    now = utcnow()
    from storage_backends import Session

    storage = app.extensions["agent_sessions"].storage
    for i in range(3000):
        storage.create_session(
            session=Session(
                key=f"s{i}",
                agent_key="support-bot",
                name="a" * 30 + "!",
                created_at=now,
                updated_at=now,
            )
        )
    started = time.monotonic()
    response = client.get(f"{SESSIONS}?filter=(a%2B)%2B%24&limit=10", headers=full)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.get_json()["sessions"] == []
    # A backtracking engine would take ages on a single name; RE2 is linear.
    assert elapsed < 10, elapsed


def test_page_key_from_another_agent_lists_only_this_agent(client, full, admin):
    client.post("/v2/agents", json={"key": "agent-b", "name": "B"}, headers=admin)
    for i in range(6):
        create(client, full, key=f"a{i}")
        client.post("/v2/agents/agent-b/sessions", json={"key": f"b{i}", "name": "b"}, headers=full)
    b_page = client.get("/v2/agents/agent-b/sessions?limit=2", headers=full).get_json()
    replayed = client.get(
        f"{SESSIONS}?limit=10&page_key={b_page['metadata']['page_key']}", headers=full
    )
    assert response_keys(replayed) and all(k.startswith("a") for k in response_keys(replayed))


def response_keys(response):
    return [s["key"] for s in response.get_json()["sessions"]]


def test_key_granted_on_a_lists_nothing_of_b(client, keys, admin, full):
    client.post("/v2/agents", json={"key": "agent-b", "name": "B"}, headers=admin)
    client.post("/v2/agents/agent-b/sessions", json={"key": "b0", "name": "b"}, headers=full)
    create(client, full, key="a0")
    a_only = keys.headers(("support-bot", ALL_SCOPES))
    assert response_keys(client.get(SESSIONS, headers=a_only)) == ["a0"]
    assert_error(client.get("/v2/agents/agent-b/sessions", headers=a_only), 403, "forbidden")


# Get, update, delete


def test_update_is_partial_and_moves_updated_at(client, full):
    created = create(client, full, key="s", name="old", description="d", metadata={"a": 1, "b": 2})
    time.sleep(0.005)
    response = client.patch(
        f"{SESSIONS}/s", json={"name": "new", "metadata": {"c": 3}}, headers=full
    )
    assert response.status_code == 200, response.json
    updated = response.get_json()
    assert updated["name"] == "new"
    assert updated["metadata"] == {"c": 3}
    assert updated["description"] == "d"
    assert updated["created_at"] == created["created_at"]
    assert updated["updated_at"] > created["updated_at"]
    assert client.get(f"{SESSIONS}/s", headers=full).get_json() == updated


def test_update_with_nulls_changes_nothing_but_the_time(client, full):
    created = create(client, full, key="s", description="d")
    updated = client.patch(f"{SESSIONS}/s", json={"description": None}, headers=full).get_json()
    assert updated["description"] == "d"
    assert {k: v for k, v in updated.items() if k != "updated_at"} == {
        k: v for k, v in created.items() if k != "updated_at"
    }


@pytest.mark.parametrize(
    "body",
    [
        {"key": "other"},
        {"agent_key": "other"},
        {"created_at": "2020-01-01T00:00:00.000Z"},
        {"updated_at": "2020-01-01T00:00:00.000Z"},
        {"name": "ok", "is_admin": True},
        {"name": "ok", "key": "other"},
        {"name": ""},
        {"enabled": "false"},
        {"tti_minutes": -5},
        {"metadata": []},
    ],
)
def test_patch_mass_assignment_rejected_and_nothing_changed(client, full, body):
    created = create(client, full, key="s", name="original")
    response = client.patch(f"{SESSIONS}/s", json=body, headers=full)
    assert response.status_code == 400
    assert client.get(f"{SESSIONS}/s", headers=full).get_json() == created
    assert client.get(f"{SESSIONS}/other", headers=full).status_code == 404


def test_patch_unknown_session(client, full):
    assert_error(
        client.patch(f"{SESSIONS}/ghost", json={"name": "n"}, headers=full),
        404,
        "session_not_found",
    )


def test_patch_needs_json(client, full):
    create(client, full, key="s")
    response = client.patch(
        f"{SESSIONS}/s", data="name=x", headers=full | {"Content-Type": "text/plain"}
    )
    assert_error(response, 415, "unsupported_media_type")


def test_delete(client, full):
    create(client, full, key="s")
    response = client.delete(f"{SESSIONS}/s", headers=full)
    assert response.status_code == 204 and response.data == b""
    assert_error(client.get(f"{SESSIONS}/s", headers=full), 404, "session_not_found")
    assert_error(client.delete(f"{SESSIONS}/s", headers=full), 404, "session_not_found")
    assert response_keys(client.get(SESSIONS, headers=full)) == []


# Idle expiry with a controllable clock


class Clock:
    def __init__(self):
        self.now = utcnow()

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    from sessions_app.api import agents, api_keys, endpoint, events, sessions

    for views in (endpoint, sessions, events, agents, api_keys):
        monkeypatch.setattr(views, "utcnow", clock)
    return clock


def test_idle_session_expires(client, full, app, clock):
    create(client, full, key="short", tti_minutes=1)
    create(client, full, key="forever")
    clock.now += dt.timedelta(seconds=59)
    assert client.get(f"{SESSIONS}/short", headers=full).status_code == 200
    clock.now += dt.timedelta(seconds=1)
    assert_error(client.get(f"{SESSIONS}/short", headers=full), 404, "session_not_found")
    assert response_keys(client.get(SESSIONS, headers=full)) == ["forever"]
    # Removed from storage, not just hidden.
    storage = app.extensions["agent_sessions"].storage
    assert storage.purge_expired_sessions(now=clock.now) == 0
    with pytest.raises(Exception, match="short"):
        storage.get_session(
            agent_key="support-bot", session_key="short", now=clock.now - dt.timedelta(hours=1)
        )


def test_update_keeps_a_session_alive(client, full, clock):
    create(client, full, key="s", tti_minutes=1)
    clock.now += dt.timedelta(seconds=50)
    assert client.patch(f"{SESSIONS}/s", json={"enabled": False}, headers=full).status_code == 200
    clock.now += dt.timedelta(seconds=50)
    assert client.get(f"{SESSIONS}/s", headers=full).status_code == 200


def test_expired_sessions_are_purged_without_requests(client, full, app, clock):
    create(client, full, key="a", tti_minutes=1)
    create(client, full, key="b", tti_minutes=1)
    storage = app.extensions["agent_sessions"].storage
    assert storage.purge_expired_sessions(now=clock.now + dt.timedelta(minutes=2)) == 2


# Admin API: agents


def test_agents_crud(client, admin):
    # With a description: an absent one is left out of the answer.
    body = {"key": "bot", "name": "Bot", "description": "d", "metadata": {"team": "x"}}
    response = client.post("/v2/agents", json=body, headers=admin)
    assert response.status_code == 201
    assert response.headers["Location"] == "/v2/agents/bot"
    agent = response.get_json()
    assert list(agent) == [
        "key",
        "name",
        "description",
        "metadata",
        "enabled",
        "created_at",
        "updated_at",
    ]
    # The one agent's answer adds what it stores (Storage quotas).
    usage = {"sessions": 0, "events": 0, "bytes": 0}
    assert client.get("/v2/agents/bot", headers=admin).get_json() == agent | {"usage": usage}
    assert_error(
        client.post("/v2/agents", json={"key": "bot", "name": "again"}, headers=admin),
        409,
        "conflict",
    )
    patched = client.patch("/v2/agents/bot", json={"enabled": False}, headers=admin).get_json()
    assert patched["enabled"] is False and patched["name"] == "Bot"
    listing = client.get("/v2/agents?limit=1", headers=admin).get_json()
    assert [a["key"] for a in listing["agents"]] == ["bot"]
    assert client.delete("/v2/agents/bot", headers=admin).status_code == 204
    assert_error(client.get("/v2/agents/bot", headers=admin), 404, "agent_not_found")
    assert_error(client.delete("/v2/agents/bot", headers=admin), 404, "agent_not_found")


@pytest.mark.parametrize(
    "body",
    [
        {"name": "no key"},
        {"key": "bad key", "name": "n"},
        {"key": "k"},
        {"key": "k", "name": "n", "x": 1},
    ],
)
def test_bad_agent_bodies(client, admin, body):
    assert_error(client.post("/v2/agents", json=body, headers=admin), 400, "invalid_request")


def test_deleting_an_agent_deletes_its_sessions(client, admin, full):
    create(client, full, key="s")
    assert client.delete("/v2/agents/support-bot", headers=admin).status_code == 204
    client.post("/v2/agents", json={"key": "support-bot", "name": "again"}, headers=admin)
    assert response_keys(client.get(SESSIONS, headers=full)) == []


# Admin API: keys


def test_api_keys_lifecycle(client, admin, agent):
    body = {
        "name": "support",
        "grants": [{"agent": "support-bot", "scopes": ["sessions:create", "sessions:read"]}],
        "create_limit": "30/minute",
        "expires_at": "2099-01-01T00:00:00Z",
    }
    response = client.post("/v2/api_keys", json=body, headers=admin)
    assert response.status_code == 201, response.json
    created = response.get_json()
    token = created["secret"]
    assert token.startswith(created["id"] + ".")
    assert created["state"] == "active" and created["create_limit"] == "30/minute"
    assert created["expires_at"] == "2099-01-01T00:00:00.000Z"
    key = {"x-api-key": token}
    assert client.post(SESSIONS, json={"name": "n"}, headers=key).status_code == 201
    assert_error(client.delete(f"{SESSIONS}/n", headers=key), 403, "forbidden")
    listing = client.get("/v2/api_keys", headers=admin)
    assert token.split(".")[1] not in listing.get_data(as_text=True)
    listed = {k["id"]: k for k in listing.get_json()["api_keys"]}
    assert "secret" not in listed[created["id"]]
    assert client.delete(f"/v2/api_keys/{created['id']}", headers=admin).status_code == 204
    assert_error(client.get(SESSIONS, headers=key), 401, "unauthorized")
    revoked = {k["id"]: k for k in client.get("/v2/api_keys", headers=admin).get_json()["api_keys"]}
    assert revoked[created["id"]]["state"] == "revoked"
    assert_error(client.delete("/v2/api_keys/ak_nope", headers=admin), 404, "not_found")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": "n", "grants": [{"agent": "bot", "scopes": ["sessions:fly"]}]},
        {"name": "n", "grants": [{"agent": "bad key", "scopes": ["sessions:read"]}]},
        {"name": "n", "grants": [{"agent": "bot", "scopes": []}]},
        {"name": "n", "grants": [{"agent": "bot"}]},
        {"name": "n", "grants": "all"},
        {"name": "n", "admin": "yes"},
        {"name": "n", "create_limit": "lots"},
        {"name": "n", "create_limit": "1/minute;2/hour"},
        {"name": "n", "expires_at": "tomorrow"},
        {"name": "n", "expires_at": "2099-01-01T00:00:00"},
        {"name": "n", "secret": "chosen"},
        {"name": "n", "id": "ak_mine"},
    ],
)
def test_bad_api_key_bodies(client, admin, body):
    assert_error(client.post("/v2/api_keys", json=body, headers=admin), 400, "invalid_request")


def test_wildcard_and_admin_keys(client, admin, agent):
    made = client.post(
        "/v2/api_keys",
        json={"name": "reader", "grants": [{"agent": "*", "scopes": ["sessions:read"]}]},
        headers=admin,
    ).get_json()
    reader = {"x-api-key": made["secret"]}
    assert client.get(SESSIONS, headers=reader).status_code == 200
    assert_error(client.post(SESSIONS, json={"name": "n"}, headers=reader), 403, "forbidden")
    assert_error(client.get("/v2/agents", headers=reader), 403, "forbidden")
    new_admin = client.post(
        "/v2/api_keys", json={"name": "root", "admin": True}, headers=admin
    ).get_json()
    assert client.get("/v2/agents", headers={"x-api-key": new_admin["secret"]}).status_code == 200
