"""Rate limits in one process (Flask's test client, memory://): what is limited, keyed by what."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from sessions_app import ConfigError, create_app
from sessions_app.corridor.rate_limits import client_address
from storage_backends import Agent
from storage_backends.codec import utcnow
from tests.conftest import ALL_SCOPES, Keys, assert_error
from tests.servers import BIN, ROOT, free_port

AGENT = "support-bot"
OTHER = "other-bot"
SESSIONS = f"/v2/agents/{AGENT}/sessions"


class Service:
    """An app on memory:// with two agents, its test client and a key minter."""

    def __init__(self, app: Any):
        self.app = app
        self.client = app.test_client()
        self.keys = Keys(app)
        storage = app.extensions["agent_sessions"].storage
        now = utcnow()
        for key in (AGENT, OTHER):
            storage.create_agent(agent=Agent(key=key, name=key, created_at=now, updated_at=now))

    @property
    def limits(self) -> Any:
        return self.app.extensions["agent_sessions"].limits

    def token(self, **kwargs: Any) -> str:
        return self.keys.create(("*", ALL_SCOPES), **kwargs)[1]

    def create(self, token: str, agent: str = AGENT, **environ: Any) -> Any:
        return self.client.post(
            f"/v2/agents/{agent}/sessions",
            json={"name": "chat"},
            headers={"x-api-key": token},
            environ_base=environ,
        )


@pytest.fixture
def service() -> Iterator[Any]:
    """Build a Service with config overrides; each app counts under its own key prefix."""
    apps: list[Any] = []

    def make(**config: Any) -> Service:
        app = create_app(
            {
                "TESTING": True,
                "STORAGE_URL": "memory://",
                "RATELIMIT_KEY_PREFIX": f"t-{uuid.uuid4().hex}",
                **config,
            }
        )
        apps.append(app)
        return Service(app)

    yield make
    for app in apps:
        app.extensions["agent_sessions"].storage.close()


def rate_headers(response: Any) -> tuple[int, int, int]:
    headers = response.headers
    return (
        int(headers["X-RateLimit-Limit"]),
        int(headers["X-RateLimit-Remaining"]),
        int(headers["X-RateLimit-Reset"]),
    )


def assert_429(response: Any, limit: int) -> int:
    """The shared error shape with truthful headers; returns Retry-After."""
    assert_error(response, 429, "rate_limit_exceeded")
    retry_after = int(response.headers["Retry-After"])
    assert retry_after >= 1
    header_limit, remaining, reset = rate_headers(response)
    assert (header_limit, remaining) == (limit, 0)
    # Reset (epoch seconds) and Retry-After (seconds from now) tell the same time.
    assert abs(reset - (time.time() + retry_after)) <= 1.5, (reset, retry_after)
    return retry_after


# What is limited, keyed by what


def test_create_limit_answers_429_in_the_error_shape(service: Any) -> None:
    svc = service(SESSION_CREATE_LIMIT="2/minute")
    token = svc.token()
    started = time.time()
    for remaining in (1, 0):
        response = svc.create(token)
        assert response.status_code == 201, response.get_json()
        limit, left, reset = rate_headers(response)
        assert (limit, left) == (2, remaining)
        assert started <= reset <= math.ceil(started) + 61
    response = svc.create(token)
    retry_after = assert_429(response, 2)
    assert retry_after <= 60
    assert response.is_json
    # Nothing was created by the refused request.
    listed = svc.client.get(SESSIONS, headers={"x-api-key": token}).get_json()
    assert len(listed["sessions"]) == 2


def test_create_limit_is_per_key_and_per_agent(service: Any) -> None:
    svc = service(SESSION_CREATE_LIMIT="1/minute")
    first, second = svc.token(), svc.token()
    assert svc.create(first).status_code == 201
    assert_429(svc.create(first), 1)
    assert svc.create(first, agent=OTHER).status_code == 201
    assert svc.create(second).status_code == 201


def test_per_key_create_limit_overrides_the_default_at_once(service: Any) -> None:
    svc = service(SESSION_CREATE_LIMIT="5/minute")
    own = svc.token(create_limit="1/minute")
    default = svc.token()
    assert rate_headers(svc.create(own))[0] == 1
    assert_429(svc.create(own), 1)
    assert rate_headers(svc.create(default))[:2] == (5, 4)
    # Through the admin API too, on the running app.
    admin = {"x-api-key": svc.keys.create(admin=True)[1]}
    body = {"name": "quota", "grants": [{"agent": AGENT, "scopes": ["sessions:create"]}]}
    created = svc.client.post(
        "/v2/api_keys", json=body | {"create_limit": "2/minute"}, headers=admin
    )
    assert created.status_code == 201, created.get_json()
    token = created.get_json()["secret"]
    assert [svc.create(token).status_code for _ in range(2)] == [201, 201]
    assert_429(svc.create(token), 2)


def test_default_limit_applies_to_every_other_call_per_key(service: Any) -> None:
    svc = service(DEFAULT_LIMIT="3/minute", SESSION_CREATE_LIMIT="10/minute")
    token, other = svc.token(), svc.token()
    headers = {"x-api-key": token}
    assert svc.create(token).status_code == 201  # creation has its own limit
    session = f"{SESSIONS}/chat"
    calls = [
        lambda: svc.client.get(SESSIONS, headers=headers),
        lambda: svc.client.get(session, headers=headers),
        lambda: svc.client.patch(session, json={"name": "renamed"}, headers=headers),
    ]
    for remaining, call in zip((2, 1, 0), calls, strict=True):
        response = call()
        assert response.status_code == 200, response.get_json()
        assert rate_headers(response)[:2] == (3, remaining)
    assert_429(svc.client.delete(session, headers=headers), 3)
    assert_429(svc.client.get(SESSIONS, headers=headers), 3)
    # Another key has its own budget; creation is not counted against the default.
    assert svc.client.get(SESSIONS, headers={"x-api-key": other}).status_code == 200
    assert svc.create(token).status_code == 201
    # A key without the grant is counted too (403 before the limit is not a free probe).
    reader = svc.keys.create((OTHER, ("sessions:read",)))[1]
    for _ in range(3):
        assert_error(svc.client.get(SESSIONS, headers={"x-api-key": reader}), 403, "forbidden")
    assert_429(svc.client.get(SESSIONS, headers={"x-api-key": reader}), 3)


def test_admin_limit_applies_to_admin_endpoints_per_key(service: Any) -> None:
    svc = service(ADMIN_LIMIT="2/minute", DEFAULT_LIMIT="50/minute")
    admin = {"x-api-key": svc.keys.create(admin=True)[1]}
    other_admin = {"x-api-key": svc.keys.create(admin=True)[1]}
    for remaining in (1, 0):
        response = svc.client.get("/v2/agents", headers=admin)
        assert response.status_code == 200
        assert rate_headers(response)[:2] == (2, remaining)
    assert_429(svc.client.get("/v2/api_keys", headers=admin), 2)
    assert svc.client.get("/v2/agents", headers=other_admin).status_code == 200
    # The same key's session calls count against DEFAULT_LIMIT, not ADMIN_LIMIT.
    response = svc.client.get(SESSIONS, headers=admin)
    assert response.status_code == 200
    assert rate_headers(response)[0] == 50


def test_auth_failures_are_limited_per_client_address(service: Any) -> None:
    svc = service(AUTH_FAILURE_LIMIT="3/minute")
    bad = {"x-api-key": "ak_0000000000000000.wrong"}
    here, elsewhere = {"REMOTE_ADDR": "10.0.0.1"}, {"REMOTE_ADDR": "10.0.0.2"}
    attempts = [bad, {}, {"Authorization": "Bearer nonsense"}]
    for remaining, headers in zip((2, 1, 0), attempts, strict=True):
        response = svc.client.get(SESSIONS, headers=headers, environ_base=here)
        assert_error(response, 401, "unauthorized")
        assert rate_headers(response)[:2] == (3, remaining)
    assert_429(svc.client.get(SESSIONS, headers=bad, environ_base=here), 3)
    assert_error(svc.client.get(SESSIONS, headers=bad, environ_base=elsewhere), 401, "unauthorized")
    # Only failures count: a valid key from another address is served, and does not
    # use that address's budget. Past the limit, a valid key from this address is
    # refused too (see test_past_the_auth_failure_limit_even_a_right_key_is_refused).
    token = svc.token()
    for _ in range(3):
        response = svc.client.get(SESSIONS, headers={"x-api-key": token}, environ_base=elsewhere)
        assert response.status_code == 200
    assert_429(svc.client.get(SESSIONS, headers={"x-api-key": token}, environ_base=here), 3)


def test_proxy_count_takes_the_client_address_from_x_forwarded_for(service: Any) -> None:
    svc = service(AUTH_FAILURE_LIMIT="1/minute", PROXY_COUNT=1)
    proxy = {"REMOTE_ADDR": "10.9.9.9"}

    def attempt(client_ip: str) -> Any:
        headers = {"x-api-key": "nope", "X-Forwarded-For": f"203.0.113.7, {client_ip}"}
        return svc.client.get(SESSIONS, headers=headers, environ_base=proxy)

    assert attempt("198.51.100.1").status_code == 401
    assert attempt("198.51.100.2").status_code == 401  # another client behind the proxy
    assert_429(attempt("198.51.100.1"), 1)


def test_headers_on_success_and_none_where_nothing_counts(service: Any) -> None:
    svc = service()
    token = svc.token()
    created = svc.create(token)
    assert rate_headers(created)[:2] == (120, 119)
    read = svc.client.get(f"{SESSIONS}/chat", headers={"x-api-key": token})
    assert read.status_code == 200
    assert rate_headers(read)[:2] == (600, 599)
    health = svc.client.get("/healthz")
    assert "X-RateLimit-Limit" not in health.headers


def test_limit_keys_carry_the_key_id_never_the_secret_and_no_empty_part(service: Any) -> None:
    svc = service(SESSION_CREATE_LIMIT="1/minute", AUTH_FAILURE_LIMIT="1/minute")
    key_id, token = svc.keys.create(("*", ALL_SCOPES))
    secret = token.partition(".")[2]
    svc.create(token)
    svc.create(token)  # a 429
    svc.client.get(SESSIONS, headers={"x-api-key": token})
    for _ in range(2):  # an address the server cannot tell
        svc.client.get(
            SESSIONS, headers={"x-api-key": token + "x"}, environ_base={"REMOTE_ADDR": ""}
        )
    counters = svc.limits.storage.keys()
    assert len(counters) == 3, counters
    for counter in counters:
        assert secret not in counter
        assert all(counter.split("/")), counter
    assert sum(key_id in counter for counter in counters) == 2
    assert any("/auth-failure/unknown/" in counter for counter in counters), counters


def test_client_address_is_never_empty(service: Any) -> None:
    svc = service()
    for environ, expected in (
        ({"REMOTE_ADDR": ""}, "unknown"),
        ({}, "unknown"),
        ({"REMOTE_ADDR": "192.0.2.1"}, "192.0.2.1"),
    ):
        with svc.app.test_request_context("/", environ_base=environ):
            assert client_address() == expected


def test_an_empty_key_part_is_refused_not_counted(service: Any) -> None:
    svc = service()
    with svc.app.test_request_context("/"), pytest.raises(ValueError, match="empty"):
        svc.limits.hit("1/minute", "api", "")
    assert not svc.limits.storage.keys()


# Every authenticated request counts, and limiter state stays bounded


def test_creates_on_agents_that_do_not_exist_are_limited_like_any_call(service: Any) -> None:
    svc = service(SESSION_CREATE_LIMIT="5/minute", DEFAULT_LIMIT="5/minute")
    for token in (svc.token(), svc.keys.create(admin=True)[1]):
        statuses = []
        for i in range(8):
            response = svc.create(token, agent=f"made-up-{i}")
            statuses.append(response.status_code)
            if response.status_code == 404:
                assert_error(response, 404, "agent_not_found")
                assert rate_headers(response)[:2] == (5, 4 - i)  # DEFAULT_LIMIT's budget
        assert statuses == [404] * 5 + [429] * 3, statuses
        assert_429(svc.create(token, agent="made-up-again"), 5)
    # No counter names a made-up agent: one DEFAULT_LIMIT counter per key.
    counters = svc.limits.storage.keys()
    assert not [c for c in counters if "made-up" in c], counters
    assert len(counters) == 2, counters
    # A real agent still has its own creation budget.
    token = svc.token()
    assert rate_headers(svc.create(token))[:2] == (5, 4)


def test_limiter_state_stays_bounded_whatever_the_url(service: Any) -> None:
    svc = service(SESSION_CREATE_LIMIT="1000/day", DEFAULT_LIMIT="1000/day")
    token = svc.token()
    headers = {"x-api-key": token}
    for i in range(300):
        agent = f"{i:04d}" + "a" * 60
        assert svc.create(token, agent=agent).status_code == 404
        assert svc.client.get(f"/v2/agents/{agent}/sessions", headers=headers).status_code == 404
        long = f"{i}" + "b" * 8000
        assert svc.create(token, agent=long).status_code in (400, 404)
    counters = svc.limits.storage.keys()
    assert len(counters) == 1, counters[:5]
    assert max(len(c) for c in counters) < 200


def test_options_is_405_and_refused_calls_count(service: Any) -> None:
    svc = service(DEFAULT_LIMIT="5/minute", SESSION_CREATE_LIMIT="5/minute")
    reader = {"x-api-key": svc.keys.create((AGENT, ("sessions:read",)))[1]}
    for path, allowed in (
        (SESSIONS, {"GET", "POST"}),
        (f"/v2/agents/{OTHER}/sessions", {"GET", "POST"}),
        ("/v2/agents/no-such-agent/sessions", {"GET", "POST"}),
        (f"{SESSIONS}/chat", {"GET", "PATCH", "DELETE"}),
        ("/v2/agents", {"GET", "POST"}),
        ("/v2/api_keys/ak_0000000000000000", {"DELETE"}),
    ):
        response = svc.client.options(path, headers=reader)
        assert_error(response, 405, "method_not_allowed")
        listed = {m.strip() for m in response.headers["Allow"].split(",")}
        assert allowed <= listed <= allowed | {"HEAD"}, (path, listed)
    # A key without sessions:create: every 403 counts against DEFAULT_LIMIT.
    for remaining in range(4, -1, -1):
        response = svc.create(reader["x-api-key"])
        assert_error(response, 403, "forbidden")
        assert rate_headers(response)[:2] == (5, remaining)
    assert_429(svc.create(reader["x-api-key"]), 5)
    assert_429(svc.client.get(SESSIONS, headers=reader), 5)


def test_past_the_auth_failure_limit_even_a_right_key_is_refused(service: Any) -> None:
    svc = service(AUTH_FAILURE_LIMIT="3/2second", DEFAULT_LIMIT="10/minute")
    token = svc.token()
    right, wrong = {"x-api-key": token}, {"x-api-key": token[:-1] + "!"}
    here, elsewhere = {"REMOTE_ADDR": "10.0.0.1"}, {"REMOTE_ADDR": "10.0.0.2"}
    for _ in range(3):
        assert_error(
            svc.client.get(SESSIONS, headers=wrong, environ_base=here), 401, "unauthorized"
        )
    # Used up: a right key is refused like a wrong one, and is not counted as a call.
    for headers in (right, wrong, right):
        retry_after = assert_429(svc.client.get(SESSIONS, headers=headers, environ_base=here), 3)
    served = svc.client.get(SESSIONS, headers=right, environ_base=elsewhere)
    assert served.status_code == 200
    assert rate_headers(served)[:2] == (10, 9)
    # Until the window ends.
    time.sleep(retry_after)
    served = svc.client.get(SESSIONS, headers=right, environ_base=here)
    assert served.status_code == 200, served.get_json()
    assert rate_headers(served)[:2] == (10, 8)


def test_public_pages_answer_an_address_past_the_auth_failure_limit(service: Any) -> None:
    """The docs need no key, so an address out of authentication attempts still reads them."""
    svc = service(AUTH_FAILURE_LIMIT="2/minute")
    here = {"REMOTE_ADDR": "10.0.0.3"}
    for _ in range(2):
        response = svc.client.get(SESSIONS, headers={"x-api-key": "ak_0.x"}, environ_base=here)
        assert_error(response, 401, "unauthorized")
    assert_429(svc.client.get(SESSIONS, environ_base=here), 2)
    for path in ("/v2/openapi.json", "/v2/docs", "/healthz"):
        assert svc.client.get(path, environ_base=here).status_code == 200, path


def test_an_out_of_bounds_limit_stored_earlier_is_ignored(service: Any) -> None:
    svc = service(SESSION_CREATE_LIMIT="7/minute")
    for own in (f"2/{10**45} seconds", "3/2day", "0/minute"):
        # Stored as an older release would have, past today's checks.
        token = svc.token(create_limit=own)
        response = svc.create(token)
        assert response.status_code == 201, response.get_json()
        assert rate_headers(response)[:2] == (7, 6)
        assert int(response.headers["X-RateLimit-Reset"]) <= time.time() + 61


@pytest.mark.parametrize(
    "limit",
    [
        f"2/{10**45} seconds",
        "1/2day",
        "5/25hours",
        "0/minute",
        "1000000001/second",
        "5/0 seconds",
        "5 per 0 minute",
    ],
)
def test_limits_out_of_bounds_are_refused_where_they_are_set(service: Any, limit: str) -> None:
    for name in ("SESSION_CREATE_LIMIT", "DEFAULT_LIMIT", "ADMIN_LIMIT", "AUTH_FAILURE_LIMIT"):
        with pytest.raises(ConfigError, match=f"{name}: .*out of bounds") as raised:
            create_app({"TESTING": True, "STORAGE_URL": "memory://", name: limit})
        assert "\n" not in str(raised.value)
    svc = service()
    admin = {"x-api-key": svc.keys.create(admin=True)[1]}
    body = {"name": "quota", "grants": [], "create_limit": limit}
    response = svc.client.post("/v2/api_keys", json=body, headers=admin)
    assert_error(response, 400, "invalid_request")
    assert "create_limit" in response.get_json()["field_errors"]
    listed = svc.client.get("/v2/api_keys", headers=admin).get_json()["api_keys"]
    assert [k["name"] for k in listed] == ["test"]


# Strategy and windows


def test_window_resets_after_retry_after(service: Any) -> None:
    svc = service(SESSION_CREATE_LIMIT="1/second")
    token = svc.token()
    assert svc.create(token).status_code == 201
    retry_after = assert_429(svc.create(token), 1)
    assert retry_after == 1
    time.sleep(retry_after)
    assert svc.create(token).status_code == 201


@pytest.mark.parametrize("strategy", ["moving-window", "sliding-window-counter"])
def test_other_strategies_work_through_the_generic_path(service: Any, strategy: str) -> None:
    svc = service(RATELIMIT_STRATEGY=strategy, SESSION_CREATE_LIMIT="2/minute")
    token = svc.token()
    assert [svc.create(token).status_code for _ in range(2)] == [201, 201]
    assert 1 <= assert_429(svc.create(token), 2) <= 60


# Configuration


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"RATELIMIT_FAILURE_POLICY": "maybe"}, "RATELIMIT_FAILURE_POLICY"),
        ({"SESSION_CREATE_LIMIT": "often"}, "SESSION_CREATE_LIMIT"),
        ({"DEFAULT_LIMIT": "10/fortnight"}, "DEFAULT_LIMIT"),
        ({"ADMIN_LIMIT": "1/minute;2/hour"}, "ADMIN_LIMIT"),
        ({"RATELIMIT_STRATEGY": "leaky-bucket"}, "strategy"),
        ({"RATELIMIT_STORAGE_URI": "nosuch://x"}, "rate limits"),
        ({"RATELIMIT_REQUIRE_SHARED": True}, "RATELIMIT_REQUIRE_SHARED"),
        ({"RATELIMIT_REQUIRE_SHARED": "true"}, "memory://"),
        ({"SESSION_CREATE_LIMIT": f"2/{10**45} seconds"}, "SESSION_CREATE_LIMIT.*out of bounds"),
    ],
)
def test_configuration_errors(config: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        create_app({"TESTING": True, "STORAGE_URL": "memory://", **config})


def test_redis_gets_socket_timeouts_unless_the_operator_sets_them(service: Any) -> None:
    uri = f"redis://127.0.0.1:{free_port()}/0"
    svc = service(RATELIMIT_STORAGE_URI=uri, RATELIMIT_REQUIRE_SHARED=True, RATELIMIT_TIMEOUT=0.25)
    kwargs = svc.limits.storage.get_connection().connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.25, 0.25)
    svc = service(RATELIMIT_STORAGE_URI=uri, RATELIMIT_STORAGE_OPTIONS={"socket_timeout": 2})
    kwargs = svc.limits.storage.get_connection().connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (2, 0.5)


# Storage failures (no Redis needed: a closed port, or a listener that never answers)


@contextlib.contextmanager
def stalled_listener() -> Iterator[int]:
    """A TCP port that accepts connections and never answers: a stalled Redis."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        server.close()


@contextlib.contextmanager
def broken_redis(kind: str) -> Iterator[str]:
    if kind == "stalled":
        with stalled_listener() as port:
            yield f"redis://127.0.0.1:{port}/0"
    else:
        yield f"redis://127.0.0.1:{free_port()}/0"


TIMEOUT = 0.3
MARGIN = 1.0


@pytest.mark.parametrize("kind", ["stopped", "stalled"])
@pytest.mark.parametrize("policy", ["open", "closed"])
def test_storage_failure_follows_the_policy(
    service: Any, kind: str, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    with broken_redis(kind) as uri:
        svc = service(
            RATELIMIT_STORAGE_URI=uri,
            RATELIMIT_FAILURE_POLICY=policy,
            RATELIMIT_TIMEOUT=TIMEOUT,
            RATELIMIT_FAILURE_BACKOFF=0.2,
        )
        token = svc.token()
        headers = {"x-api-key": token}
        for _ in range(3):
            for call in (
                lambda: svc.create(token),
                lambda: svc.client.get(SESSIONS, headers=headers),
                lambda: svc.client.get(SESSIONS, headers={"x-api-key": "bad"}),
            ):
                started = time.monotonic()
                response = call()
                assert time.monotonic() - started < TIMEOUT + MARGIN
                if policy == "closed":
                    assert_error(response, 503, "unavailable")
                    assert int(response.headers["Retry-After"]) >= 1
                else:
                    assert response.status_code in (200, 201, 401), response.get_json()
                    assert "X-RateLimit-Limit" not in response.headers
            time.sleep(0.25)  # past the backoff: the storage is tried again
        ready = svc.client.get("/readyz")
        assert ready.get_json()["rate_limit"] == "degraded"
        assert ready.status_code == (503 if policy == "closed" else 200)
    warnings = [r for r in caplog.records if "rate-limit storage unreachable" in r.getMessage()]
    assert warnings and token.partition(".")[2] not in caplog.text


# gunicorn: memory:// with several workers


@pytest.mark.slow
def test_gunicorn_warns_only_where_limits_stay_per_worker(tmp_path: Any) -> None:
    from tests.servers import serving

    env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/s.db"}
    with serving(env, tmp_path, workers=2) as server:
        pass  # fixed window on memory://: the workers share the server's counters file
    assert "RATE LIMITS ARE PER WORKER" not in server.logs()
    env["AGENT_SESSIONS_RATELIMIT_STRATEGY"] = "moving-window"  # kept in each worker
    with serving(env, tmp_path, workers=2) as server:
        pass
    assert "RATE LIMITS ARE PER WORKER" in server.logs()
    with serving(env, tmp_path, workers=1) as server:
        pass
    assert "RATE LIMITS ARE PER WORKER" not in server.logs()


@pytest.mark.slow
def test_gunicorn_refuses_memory_storage_when_shared_is_required(tmp_path: Any) -> None:
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/s.db",
        "AGENT_SESSIONS_RATELIMIT_REQUIRE_SHARED": "true",
    }
    result = subprocess.run(
        [
            str(BIN / "gunicorn"),
            "-c",
            str(ROOT / "gunicorn.conf.py"),
            "--bind",
            f"127.0.0.1:{free_port()}",
            "--workers",
            "2",
            "wsgi:app",
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "RATELIMIT_REQUIRE_SHARED" in result.stderr
    assert "Traceback" not in result.stderr
