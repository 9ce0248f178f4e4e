"""The service embedded in another Flask application through ``init_app``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, request

from sessions_app import init_app
from tests.conftest import ALL_SCOPES, SESSION_FIELDS, Keys, assert_error

PREFIX = "/api/v2"
SESSIONS = f"{PREFIX}/agents/support-bot/sessions"


@pytest.fixture
def host(tmp_path: Any) -> Iterator[Flask]:
    """A host application with its own configuration and its own routes."""
    host = Flask("host")
    host.config.update(
        TESTING=True,
        STORAGE_URL=f"sqlite:///{tmp_path}/host.db",
        SESSION_CREATE_LIMIT="3/minute",
        METADATA_MAX_KEYS=2,
    )

    @host.get("/")
    def index() -> Any:
        return {"host": "index"}

    @host.get("/hello/<name>")
    def hello(name: str) -> Any:
        return f"hello {name}", 200, {"Content-Type": "text/plain"}

    @host.post("/upload")
    def upload() -> Any:
        return {"bytes": len(request.get_data())}

    @host.errorhandler(404)
    def host_not_found(err: Any) -> Any:
        return "the host's own 404", 404, {"Content-Type": "text/plain"}

    init_app(host, url_prefix=PREFIX)
    yield host
    host.extensions["agent_sessions"].storage.close()


@pytest.fixture
def host_client(host: Flask) -> Any:
    return host.test_client()


@pytest.fixture
def full(host: Flask, host_client: Any) -> dict[str, str]:
    """An agent created through the prefixed admin API, and a key with every session scope."""
    keys = Keys(host)
    admin = keys.headers(admin=True)
    response = host_client.post(
        f"{PREFIX}/agents", json={"key": "support-bot", "name": "Support"}, headers=admin
    )
    assert response.status_code == 201, response.get_json()
    assert response.headers["Location"] == f"{PREFIX}/agents/support-bot"
    return keys.headers(("*", ALL_SCOPES))


def test_host_routes_still_work(host_client: Any, full: dict[str, str]) -> None:
    assert host_client.get("/").get_json() == {"host": "index"}
    response = host_client.get("/hello/world")
    assert response.status_code == 200
    assert response.get_data(as_text=True) == "hello world"
    assert host_client.get("/healthz").status_code == 200


def test_create_and_get_through_the_prefix(host_client: Any, full: dict[str, str]) -> None:
    response = host_client.post(SESSIONS, json={"key": "chat-1", "name": "Chat"}, headers=full)
    assert response.status_code == 201, response.get_json()
    assert response.headers["Location"] == f"{SESSIONS}/chat-1"
    fetched = host_client.get(response.headers["Location"], headers=full)
    assert fetched.status_code == 200
    assert fetched.get_json() == response.get_json()
    listed = host_client.get(SESSIONS, headers=full).get_json()
    assert [s["key"] for s in listed["sessions"]] == ["chat-1"]
    # The service is not also mounted at its standalone prefix.
    assert host_client.get("/v2/agents/support-bot/sessions", headers=full).status_code == 404


def test_the_host_json_settings_do_not_change_the_api(host_client: Any, full: dict[str, str]):
    # Flask's default provider sorts keys and escapes non-ASCII; the API answers as it documents.
    sent = {"key": "c", "name": "Café", "description": "d"}  # an absent one is left out
    response = host_client.post(SESSIONS, json=sent, headers=full)
    body = response.get_data(as_text=True)
    assert list(response.get_json()) == SESSION_FIELDS
    assert '"name":"Café"' in body


def test_host_metadata_bound_applies(host_client: Any, full: dict[str, str]) -> None:
    ok = host_client.post(SESSIONS, json={"name": "a", "metadata": {"x": 1, "y": 2}}, headers=full)
    assert ok.status_code == 201, ok.get_json()
    too_many = {"name": "b", "metadata": {"x": 1, "y": 2, "z": 3}}
    assert_error(host_client.post(SESSIONS, json=too_many, headers=full), 400, "invalid_metadata")


def test_host_create_limit_applies(host_client: Any, full: dict[str, str]) -> None:
    for i in range(3):
        response = host_client.post(SESSIONS, json={"name": f"s{i}"}, headers=full)
        assert response.status_code == 201, response.get_json()
        assert response.headers["X-RateLimit-Limit"] == "3"
        assert response.headers["X-RateLimit-Remaining"] == str(2 - i)
    response = host_client.post(SESSIONS, json={"name": "s3"}, headers=full)
    assert_error(response, 429, "rate_limit_exceeded")
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["X-RateLimit-Remaining"] == "0"
    # Reading is not limited by the creation limit.
    assert host_client.get(SESSIONS, headers=full).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("get", SESSIONS, {"headers": {}}, 401, "unauthorized"),
        ("get", SESSIONS, {"headers": {"x-api-key": "ak_0.nope"}}, 401, "unauthorized"),
        ("get", f"{PREFIX}/agents/other-bot/sessions", {}, 404, "agent_not_found"),
        ("get", f"{SESSIONS}/missing", {}, 404, "session_not_found"),
        ("post", SESSIONS, {"json": {"nme": "typo"}}, 400, "invalid_request"),
        ("post", SESSIONS, {"data": "name=x"}, 415, "unsupported_media_type"),
        ("post", f"{PREFIX}/agents", {"json": {"key": "x", "name": "X"}}, 403, "forbidden"),
    ],
)
def test_blueprint_errors_are_json(
    host_client: Any,
    full: dict[str, str],
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    code: str,
) -> None:
    kwargs = {"headers": full, **kwargs}
    assert_error(getattr(host_client, method)(path, **kwargs), status, code)


def test_blueprint_conflict_is_json(host_client: Any, full: dict[str, str]) -> None:
    body = {"key": "dup", "name": "First"}
    assert host_client.post(SESSIONS, json=body, headers=full).status_code == 201
    assert_error(host_client.post(SESSIONS, json=body, headers=full), 409, "conflict")


def test_blueprint_method_not_allowed_is_json(host_client: Any, full: dict[str, str]) -> None:
    response = host_client.put(SESSIONS, json={"name": "x"}, headers=full)
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_blueprint_unexpected_error_is_json(
    host: Flask, host_client: Any, full: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(**kwargs: Any) -> Any:
        raise RuntimeError("/secret/path/to/db exploded")

    monkeypatch.setattr(host.extensions["agent_sessions"].storage, "get_session", explode)
    response = host_client.get(f"{SESSIONS}/any", headers=full)
    assert_error(response, 500, "internal_error")
    assert "/secret/path" not in response.get_data(as_text=True)


def test_unknown_path_under_the_prefix_is_json(host_client: Any, full: dict[str, str]) -> None:
    assert_error(host_client.get(f"{PREFIX}/no/such/thing", headers=full), 404, "not_found")
    assert_error(host_client.get(f"{SESSIONS}/s/extra", headers=full), 404, "not_found")


def test_host_not_found_is_left_to_the_host(host_client: Any) -> None:
    for path in ("/no/such/page", "/api", "/api/v2x/agents", "/hello"):
        response = host_client.get(path)
        assert response.status_code == 404, path
        assert response.get_data(as_text=True) == "the host's own 404", path


def test_host_without_handlers_keeps_flask_defaults(tmp_path: Any) -> None:
    bare = Flask("bare")
    bare.config.update(TESTING=True, STORAGE_URL=f"sqlite:///{tmp_path}/bare.db")
    init_app(bare, url_prefix=PREFIX)
    try:
        response = bare.test_client().get("/no/such/page")
        assert response.status_code == 404
        assert response.mimetype == "text/html"
        assert_error(bare.test_client().get(f"{PREFIX}/nothing"), 404, "not_found")
    finally:
        bare.extensions["agent_sessions"].storage.close()


def test_the_body_limit_holds_whatever_the_host_config(host: Flask, full: dict[str, str]):
    # Flask's own defaults hold MAX_CONTENT_LENGTH = None: the service keeps its 64 KiB.
    assert host.config["MAX_CONTENT_LENGTH"] is None
    client = host.test_client()
    big = {"name": "n", "description": "x" * (5 * 1024 * 1024)}
    assert_error(client.post(SESSIONS, json=big, headers=full), 413, "payload_too_large")
    assert client.get(SESSIONS, headers=full).get_json()["sessions"] == []
    # The host's own routes keep the host's (absent) limit.
    assert client.post("/upload", data=b"x" * 100_000).get_json() == {"bytes": 100_000}
