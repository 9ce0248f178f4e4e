"""Fixtures: storage backends, apps, clients and API keys.

Tests that need a server (PostgreSQL, Redis) skip with a clear reason when it
is missing on a developer's machine, and fail instead under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlite_utils.utils import sqlite3

from sessions_app import create_app
from storage_backends import Grant, storage_from_url

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

# Every backend the contract and HTTP suites run against.
BACKENDS = ["memory", "sqlite", "postgres"]

ALL_SCOPES = ("sessions:create", "sessions:read", "sessions:update", "sessions:delete")

# A session's fields in API answers, in the order the schema gives them.
SESSION_FIELDS = [
    "key",
    "agent_key",
    "name",
    "description",
    "metadata",
    "enabled",
    "tti_minutes",
    "created_at",
    "updated_at",
]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def require_server(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (in CI) when a server a test needs is not running."""
    if port_open(host, port):
        return
    message = f"{name} is not running on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message}; CI must start it (see .ci/run)")
    pytest.skip(f"{message}; start it to run this test")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that touches storage once per backend, unless it picks one itself."""
    if "storage_url" in metafunc.fixturenames and not any(
        m.name == "parametrize" and "storage_url" in m.args[0]
        for m in metafunc.definition.iter_markers()
    ):
        metafunc.parametrize("storage_url", BACKENDS, indirect=True)


@pytest.fixture
def storage_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """A fresh, empty store of the requested backend, as a STORAGE_URL."""
    backend = getattr(request, "param", "sqlite")
    if backend == "memory":
        yield "memory://"
    elif backend == "sqlite":
        yield f"sqlite:///{tmp_path}/sessions.db"
    elif backend == "postgres":
        require_server("PostgreSQL", "127.0.0.1", 5432)
        with postgres_schema() as url:
            yield url
    else:
        raise ValueError(backend)


@contextlib.contextmanager
def postgres_schema(base_url: str = POSTGRES_URL) -> Iterator[str]:
    """A fresh, empty schema on ``base_url``, as a URL whose search_path selects it.

    libpq's ``options`` parameter sets the search_path, so every connection the
    backend opens (in this process, in gunicorn workers, in the CLI) uses it.
    """
    import psycopg

    schema = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in base_url else "?"
    try:
        yield f"{base_url}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base_url, autocommit=True) as conn:
            # Bounded: a leftover connection holding a lock must not hang the suite.
            conn.execute("SET lock_timeout = '10s'")
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def sqlite_integrity(path: Path) -> str:
    """What ``PRAGMA integrity_check`` says of the SQLite file at ``path``: "ok" when whole."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def storage(storage_url: str) -> Iterator[Any]:
    store = storage_from_url(storage_url, {})
    yield store
    store.close()


@pytest.fixture
def app(storage_url: str) -> Iterator[Any]:
    app = create_app({"TESTING": True, "STORAGE_URL": storage_url})
    yield app
    app.extensions["agent_sessions"].storage.close()


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


class Keys:
    """Mints API keys and agents directly through the app's storage."""

    def __init__(self, app: Any):
        self.app = app

    def create(
        self,
        *grants: tuple[str, tuple[str, ...]],
        admin: bool = False,
        create_limit: str | None = None,
        **kwargs: Any,
    ) -> tuple[str, str]:
        from sessions_app.corridor.auth import new_api_key

        with self.app.app_context():
            key, token = new_api_key(
                name=kwargs.get("name", "test"),
                grants=[Grant(agent, tuple(scopes)) for agent, scopes in grants],
                admin=admin,
                create_limit=create_limit,
                expires_at=kwargs.get("expires_at"),
            )
        return key.id, token

    def headers(self, *grants: tuple[str, tuple[str, ...]], **kwargs: Any) -> dict[str, str]:
        return {"x-api-key": self.create(*grants, **kwargs)[1]}


@pytest.fixture
def keys(app: Any) -> Keys:
    return Keys(app)


@pytest.fixture
def admin(keys: Keys) -> dict[str, str]:
    return keys.headers(admin=True)


@pytest.fixture
def agent(client: Any, admin: dict[str, str]) -> str:
    response = client.post(
        "/v2/agents", json={"key": "support-bot", "name": "Support"}, headers=admin
    )
    assert response.status_code == 201, response.json
    return "support-bot"


@pytest.fixture
def full(keys: Keys, agent: str) -> dict[str, str]:
    """A key with every session scope on every agent."""
    return keys.headers(("*", ALL_SCOPES))


def assert_error(response: Any, status: int, code: str, field: str | None = None) -> dict:
    """The one error shape: status, code, messages, request id in body and header."""
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True))
    body = response.get_json()
    assert body["error"] == code, body
    assert isinstance(body["messages"], list) and body["messages"], body
    assert all(isinstance(m, str) for m in body["messages"])
    assert body["request_id"] == response.headers["X-Request-ID"]
    if field is not None:
        assert field in body["field_errors"], body
    assert "Traceback" not in response.get_data(as_text=True)
    return body
