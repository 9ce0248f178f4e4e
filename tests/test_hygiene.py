"""Response and log hygiene: nosniff everywhere, no-store on the API, Allow on 405,
no secret in any log line, no debug mode or trace in production, the SQLite
version in the start-up log.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from sqlite_utils.utils import sqlite3

import storage_backends.sqlite
from sessions_app import create_app
from tests.conftest import ALL_SCOPES, Keys, assert_error
from tests.servers import cli, serving

AGENT = "support-bot"
SESSIONS = f"/v2/agents/{AGENT}/sessions"


@pytest.fixture
def app(tmp_path: Any) -> Iterator[Any]:
    app = create_app({"TESTING": True, "STORAGE_URL": f"sqlite:///{tmp_path}/sessions.db"})

    @app.get("/test/boom")
    def boom() -> Any:
        raise RuntimeError(f"secret detail from {__file__}")

    yield app
    app.extensions["agent_sessions"].storage.close()


@pytest.fixture
def setup(app: Any) -> dict[str, Any]:
    keys = Keys(app)
    admin = keys.headers(admin=True)
    client = app.test_client()
    assert client.post("/v2/agents", json={"key": AGENT, "name": "S"}, headers=admin).status_code
    full = keys.headers((AGENT, ALL_SCOPES))
    reader = keys.headers((AGENT, ("sessions:read",)))
    created = client.post(SESSIONS, json={"key": "s", "name": "S"}, headers=full)
    assert created.status_code == 201
    return {"client": client, "admin": admin, "full": full, "reader": reader}


def every_kind_of_response(setup: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    """(label, response, is an API response) for each kind of answer the app gives."""
    client, full, admin = setup["client"], setup["full"], setup["admin"]
    json_type = {"Content-Type": "application/json"}
    calls = [
        ("create", client.post(SESSIONS, json={"name": "n"}, headers=full), True),
        ("get", client.get(f"{SESSIONS}/s", headers=full), True),
        ("list", client.get(SESSIONS, headers=full), True),
        ("update", client.patch(f"{SESSIONS}/s", json={"name": "m"}, headers=full), True),
        ("delete", client.delete(f"{SESSIONS}/n", headers=full), True),
        ("agents", client.get("/v2/agents", headers=admin), True),
        ("api keys", client.get("/v2/api_keys", headers=admin), True),
        ("400", client.post(SESSIONS, json={"bogus": 1}, headers=full), True),
        ("400 json", client.post(SESSIONS, data=b"{", headers=full | json_type), True),
        ("401", client.get(SESSIONS), True),
        ("403", client.delete(f"{SESSIONS}/s", headers=setup["reader"]), True),
        ("404 session", client.get(f"{SESSIONS}/nope", headers=full), True),
        ("404 agent", client.get("/v2/agents/nope/sessions", headers=full), True),
        ("404 route in the API", client.get("/v2/nope", headers=full), True),
        ("405 in the API", client.put(SESSIONS, json={}, headers=full), True),
        ("409", client.post(SESSIONS, json={"key": "s", "name": "S"}, headers=full), True),
        ("413", client.post(SESSIONS, data=b"x" * 70_000, headers=full | json_type), True),
        ("415", client.post(SESSIONS, data=b"{}", headers=full), True),
        ("404 outside the API", client.get("/nope"), False),
        ("405 outside the API", client.post("/healthz"), False),
        ("healthz", client.get("/healthz"), False),
        ("readyz", client.get("/readyz"), False),
        ("openapi", client.get("/v2/openapi.json"), False),
        ("docs", client.get("/v2/docs"), False),
        ("500", client.get("/test/boom"), False),
    ]
    return calls


def test_nosniff_on_every_response(setup):
    for label, response, _ in every_kind_of_response(setup):
        assert response.headers.get("X-Content-Type-Options") == "nosniff", label


def test_no_store_on_every_api_response(setup):
    for label, response, api in every_kind_of_response(setup):
        if api:
            assert response.headers.get("Cache-Control") == "no-store", label


def test_rate_limited_answers_carry_the_headers_too(tmp_path):
    app = create_app(
        {
            "TESTING": True,
            "STORAGE_URL": f"sqlite:///{tmp_path}/sessions.db",
            "SESSION_CREATE_LIMIT": "1/minute",
        }
    )
    try:
        keys = Keys(app)
        client = app.test_client()
        client.post(
            "/v2/agents", json={"key": AGENT, "name": "S"}, headers=keys.headers(admin=True)
        )
        full = keys.headers((AGENT, ALL_SCOPES))
        assert client.post(SESSIONS, json={"name": "n"}, headers=full).status_code == 201
        response = client.post(SESSIONS, json={"name": "n"}, headers=full)
        assert_error(response, 429, "rate_limit_exceeded")
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"
    finally:
        app.extensions["agent_sessions"].storage.close()


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", SESSIONS, {"GET", "POST"}),
        ("POST", f"{SESSIONS}/s", {"GET", "PATCH", "DELETE"}),
        ("PUT", "/v2/agents", {"GET", "POST"}),
        ("PATCH", "/v2/api_keys/ak_x", {"DELETE"}),
        ("POST", "/healthz", {"GET"}),
        ("DELETE", "/readyz", {"GET"}),
    ],
)
def test_405_names_the_allowed_methods(setup, method, path, allowed):
    response = setup["client"].open(path, method=method, headers=setup["full"])
    assert response.status_code == 405
    listed = {m.strip() for m in response.headers["Allow"].split(",")}
    assert allowed <= listed <= allowed | {"HEAD", "OPTIONS"}, listed
    if path.startswith("/v2"):
        assert_error(response, 405, "method_not_allowed")


# Errors in production: no debug mode, no trace


LEAKS = re.compile(r"Traceback|File \"|/work/|\.py\b|secret detail|RuntimeError")


def test_production_configuration_has_debug_off(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("AGENT_SESSIONS_", "FLASK_")):
            monkeypatch.delenv(name)
    app = create_app()  # no overrides: what wsgi.py serves
    assert app.debug is False
    assert app.config["DEBUG"] is False
    assert app.config["TESTING"] is False
    assert not app.config["PROPAGATE_EXCEPTIONS"]

    @app.get("/test/boom")
    def boom() -> Any:
        raise RuntimeError(f"secret detail from {__file__}")

    response = app.test_client().get("/test/boom")
    assert_error(response, 500, "internal_error")
    assert response.headers["Content-Type"] == "application/json"
    assert not LEAKS.search(response.get_data(as_text=True)), response.get_data(as_text=True)


def test_an_unexpected_storage_error_in_an_api_view_is_a_bare_500(setup, app, monkeypatch):
    def broken(**kwargs: Any) -> Any:
        raise RuntimeError(f"secret detail from {__file__}: SELECT * FROM sessions")

    monkeypatch.setattr(app.extensions["agent_sessions"].storage, "get_session", broken)
    app.testing = False  # errors answered as in production, not raised into the test
    response = setup["client"].get(f"{SESSIONS}/s", headers=setup["full"])
    assert_error(response, 500, "internal_error")
    text = response.get_data(as_text=True)
    assert not LEAKS.search(text) and "SELECT" not in text, text
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"


# The SQLite version at start


@pytest.mark.parametrize(
    ("version", "warned"),
    [("3.45.1", True), ("3.51.2", True), ("3.51.3", False), ("3.52.0", False), ("4.0.0", False)],
)
def test_sqlite_version_is_logged_and_an_old_one_warned_about(
    tmp_path, caplog, monkeypatch, version, warned
):
    monkeypatch.setattr(storage_backends.sqlite.sqlite3, "sqlite_version", version)
    caplog.set_level(logging.INFO)
    app = create_app({"TESTING": True, "STORAGE_URL": f"sqlite:///{tmp_path}/s.db"})
    app.extensions["agent_sessions"].storage.close()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"SQLite {version}" in message for message in infos), infos
    assert any("walresetbug" in message for message in warnings) is warned, warnings
    assert not (tmp_path / "s.db").exists()  # logging it did not connect


# Logs of a real server: the version at start, and never a secret


def test_server_log_has_the_sqlite_version_and_no_secret(tmp_path):
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/sessions.db",
        # The admin's call below comes from another client than the failures, which
        # use up their address's budget (past it, every request from there is a 429).
        "AGENT_SESSIONS_PROXY_COUNT": "1",
    }
    secrets: list[str] = []

    def remember(token: str) -> str:
        secrets.extend([token, token.partition(".")[2]])
        return token

    cli("agents", "create", AGENT, "--name", "Support", env=env)
    admin = remember(
        cli("keys", "create", "--name", "admin", "--admin", env=env).stdout.splitlines()[-1]
    )
    with serving(env, tmp_path, workers=2) as server:
        url = server.url + SESSIONS
        made = requests.post(
            server.url + "/v2/api_keys",
            json={"name": "k", "grants": [{"agent": AGENT, "scopes": list(ALL_SCOPES)}]},
            headers={"x-api-key": admin},
            timeout=10,
        )
        assert made.status_code == 201, made.text
        token = remember(made.json()["secret"])
        key_id = made.json()["id"]
        wrong = remember(f"{key_id}.{'W' * 43}")  # a real key id with a wrong secret
        unknown = remember("ak_0123456789abcdef.guessed-secret-value-123456789")
        basic = base64.b64encode(f"{token}:".encode()).decode()
        statuses = []
        for headers, params in [
            ({"x-api-key": token}, {}),
            ({"Authorization": f"Bearer {token}"}, {}),
            ({"x-api-key": wrong}, {}),
            ({"Authorization": f"Bearer {wrong}"}, {}),
            ({"x-api-key": unknown}, {}),
            ({"x-api-key": token + "x"}, {}),
            ({"Authorization": f"Basic {basic}"}, {}),
            ({}, {"api_key": token}),  # ignored, and must not be logged either
            ({}, {"x-api-key": token}),
        ]:
            for _ in range(3):
                response = requests.get(url, headers=headers, params=params, timeout=10)
                statuses.append(response.status_code)
                response = requests.post(url, json={"name": "n"}, headers=headers, timeout=10)
                statuses.append(response.status_code)
        # Enough failures to reach the per-address limit on failed authentication.
        for _ in range(25):
            statuses.append(requests.get(url, headers={"x-api-key": wrong}, timeout=10).status_code)
        revoked = requests.delete(
            f"{server.url}/v2/api_keys/{key_id}",
            headers={"x-api-key": admin, "X-Forwarded-For": "192.0.2.10"},
            timeout=10,
        )
        assert revoked.status_code == 204
        statuses.append(requests.get(url, headers={"x-api-key": token}, timeout=10).status_code)
        logs = server.logs()
    assert {200, 201, 401, 429} <= set(statuses), statuses
    assert sqlite3.sqlite_version in logs
    assert re.search(rf"\[INFO\] storage: SQLite {re.escape(sqlite3.sqlite_version)}", logs)
    assert "walresetbug" not in logs  # the default install's SQLite has the fix
    for secret in secrets:
        assert secret not in logs, f"a secret is in the log: {secret[:12]}..."
    # Nor in the database and its WAL: only hashes are stored.
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("sessions.db*"))
    for secret in secrets:
        assert secret.encode() not in stored
