"""Rate limits on a real Redis, across gunicorn workers and instances, and when Redis fails."""

from __future__ import annotations

import collections
import contextlib
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import limits
import pytest
import redis
import requests

from sessions_app import create_app
from storage_backends import Agent
from storage_backends.codec import utcnow
from tests.conftest import ALL_SCOPES, IN_CI, REDIS_URL, Keys, require_server
from tests.conftest import assert_error as assert_error_in_process
from tests.servers import cli, free_port, serving
from tests.test_limits import broken_redis

pytestmark = [pytest.mark.redis, pytest.mark.slow]

AGENT = "support-bot"
OTHER = "other-bot"
ALL = "sessions:create,sessions:read,sessions:update,sessions:delete"
TIMEOUT = 0.5
MARGIN = 1.0


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    require_server("Redis", "127.0.0.1", 6379)
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own, so no two tests share counters."""
    value = f"t-{uuid.uuid4().hex}"
    yield value
    for key in redis_client.scan_iter(match=f"*{value}*"):
        redis_client.delete(key)


def service_env(tmp_path: Path, prefix: str, uri: str = REDIS_URL, **settings: str) -> dict:
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/sessions.db",
        "AGENT_SESSIONS_RATELIMIT_STORAGE_URI": uri,
        "AGENT_SESSIONS_RATELIMIT_KEY_PREFIX": prefix,
        "AGENT_SESSIONS_RATELIMIT_TIMEOUT": str(TIMEOUT),
    }
    return env | {f"AGENT_SESSIONS_{name}": value for name, value in settings.items()}


def make_key(env: dict[str, str], *args: str) -> str:
    out = cli("keys", "create", "--name", "test", "--grant", f"*={ALL}", *args, env=env).stdout
    return out.strip().splitlines()[-1]


def setup_agents(env: dict[str, str]) -> None:
    for agent in (AGENT, OTHER):
        cli("agents", "create", agent, "--name", agent, env=env)


def create(base: str, token: str, agent: str = AGENT, name: str = "chat") -> requests.Response:
    return requests.post(
        f"{base}/v2/agents/{agent}/sessions",
        json={"name": name},
        headers={"x-api-key": token},
        timeout=30,
    )


def assert_429(response: requests.Response, limit: int) -> int:
    assert response.status_code == 429, (response.status_code, response.text)
    body = response.json()
    assert body["error"] == "rate_limit_exceeded" and body["messages"], body
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert response.headers["X-RateLimit-Limit"] == str(limit)
    assert response.headers["X-RateLimit-Remaining"] == "0"
    retry_after = int(response.headers["Retry-After"])
    reset = int(response.headers["X-RateLimit-Reset"])
    assert retry_after >= 1
    assert abs(reset - (time.time() + retry_after)) <= 1.5, (reset, retry_after)
    return retry_after


def creates_at_once(bases: list[str], token: str, n: int, label: str) -> list[requests.Response]:
    """3n creates with one key, released together, spread over ``bases`` in turn.

    The create limit is n: exactly n are 201 and the other 2n a full 429 (see
    ``assert_429``). ``label`` names the set-up in the printed tally. Returns
    every response, in the order sent.
    """
    barrier = threading.Barrier(3 * n)

    def one(i: int) -> requests.Response:
        barrier.wait(timeout=30)
        return create(bases[i % len(bases)], token, name=f"chat {i}")

    with ThreadPoolExecutor(max_workers=3 * n) as pool:
        responses = list(pool.map(one, range(3 * n)))
    statuses = collections.Counter(r.status_code for r in responses)
    print(f"{3 * n} concurrent creates, limit {n}/minute, {label}: {dict(statuses)}")
    assert statuses == {201: n, 429: 2 * n}, statuses
    for response in responses:
        if response.status_code == 429:
            assert_429(response, n)
    return responses


def test_limit_is_exact_across_workers_and_instances(
    tmp_path: Path, prefix: str, redis_client: redis.Redis
) -> None:
    n = 20
    env = service_env(tmp_path, prefix, SESSION_CREATE_LIMIT=f"{n}/minute")
    setup_agents(env)
    token, other_token = make_key(env), make_key(env)
    with serving(env, tmp_path, workers=4) as first, serving(env, tmp_path, workers=2) as second:
        bases = [first.url, second.url]
        responses = creates_at_once(bases, token, n, "two instances")
        # Both instances answered some of each.
        by_instance = collections.Counter((r.url.split("/v2")[0], r.status_code) for r in responses)
        assert all(by_instance[(base, 429)] > 0 for base in bases), by_instance
        # Exactly n sessions exist; another key and another agent are unaffected.
        listed = requests.get(
            f"{second.url}/v2/agents/{AGENT}/sessions?limit=100",
            headers={"x-api-key": token},
            timeout=10,
        ).json()
        assert len(listed["sessions"]) == n
        for base in bases:
            response = create(base, other_token)
            assert response.status_code == 201, response.text
            assert response.headers["X-RateLimit-Limit"] == str(n)
            response = create(base, token, agent=OTHER)
            assert response.status_code == 201, response.text
        logs = first.logs() + second.logs()
    assert "RATE LIMITS ARE PER WORKER" not in logs
    assert "Traceback" not in logs


def test_window_resets_after_retry_after(tmp_path: Path, prefix: str) -> None:
    env = service_env(tmp_path, prefix, SESSION_CREATE_LIMIT="3/2second")
    setup_agents(env)
    token = make_key(env)
    with serving(env, tmp_path, workers=2) as server:
        statuses = [create(server.url, token, name=f"s{i}").status_code for i in range(3)]
        assert statuses == [201, 201, 201]
        retry_after = assert_429(create(server.url, token), 3)
        assert retry_after <= 2
        time.sleep(retry_after)
        response = create(server.url, token)
        assert response.status_code == 201, response.text
        assert response.headers["X-RateLimit-Remaining"] == "2"


def test_per_key_limit_takes_effect_without_restart(tmp_path: Path, prefix: str) -> None:
    env = service_env(tmp_path, prefix, SESSION_CREATE_LIMIT="20/minute")
    setup_agents(env)
    default_token = make_key(env)
    with serving(env, tmp_path, workers=2) as server:
        assert create(server.url, default_token).headers["X-RateLimit-Limit"] == "20"
        token = make_key(env, "--create-limit", "2/minute")  # while the server runs
        for remaining in ("1", "0"):
            response = create(server.url, token)
            assert response.status_code == 201, response.text
            assert response.headers["X-RateLimit-Limit"] == "2"
            assert response.headers["X-RateLimit-Remaining"] == remaining
        assert_429(create(server.url, token), 2)
        assert create(server.url, default_token).status_code == 201


def test_no_secret_in_logs_or_redis_keys(
    tmp_path: Path, prefix: str, redis_client: redis.Redis
) -> None:
    env = service_env(
        tmp_path, prefix, SESSION_CREATE_LIMIT="2/minute", AUTH_FAILURE_LIMIT="2/minute"
    )
    setup_agents(env)
    token = make_key(env)
    key_id, _, secret = token.partition(".")
    with serving(env, tmp_path, workers=2) as server:
        statuses = [create(server.url, token).status_code for _ in range(10)]
        assert statuses.count(429) == 8
        # A burst of failed authentications with a near-miss of the real token.
        for _ in range(5):
            create(server.url, token[:-1] + ("A" if token[-1] != "A" else "B"))
        keys = [k.decode() for k in redis_client.scan_iter(match=f"*{prefix}*")]
        logs = server.logs()
    assert keys and any(key_id in k for k in keys), keys
    assert any("/auth-failure/127.0.0.1/" in k for k in keys), keys
    for text in (*keys, logs):
        assert secret not in text
        assert secret[:12] not in text
    assert " 429 " in logs or '" 429' in logs  # the access log saw the burst


def test_one_redis_round_trip_per_request(prefix: str, redis_client: redis.Redis) -> None:
    app = create_app(
        {
            "TESTING": True,
            "STORAGE_URL": "memory://",
            "RATELIMIT_STORAGE_URI": REDIS_URL,
            "RATELIMIT_KEY_PREFIX": prefix,
            "SESSION_CREATE_LIMIT": "2/minute",
        }
    )
    try:
        now = utcnow()
        storage = app.extensions["agent_sessions"].storage
        storage.create_agent(agent=Agent(key=AGENT, name=AGENT, created_at=now, updated_at=now))
        key_id, token = Keys(app).create(("*", ("sessions:create", "sessions:read")))
        rate_limits = app.extensions["agent_sessions"].limits
        connection = rate_limits.storage.get_connection()
        commands: list[str] = []
        execute = connection.execute_command

        def counted(*args: Any, **kwargs: Any) -> Any:
            commands.append(str(args[0]))
            return execute(*args, **kwargs)

        connection.execute_command = counted
        client = app.test_client()
        headers = {"x-api-key": token}
        sessions = f"/v2/agents/{AGENT}/sessions"
        client.post(sessions, json={"name": "warm"}, headers=headers)  # loads the script
        commands.clear()
        for path_call in (
            lambda: client.post(sessions, json={"name": "a"}, headers=headers),
            lambda: client.get(sessions, headers=headers),
            lambda: client.post(sessions, json={"name": "b"}, headers=headers),
        ):
            before = len(commands)
            response = path_call()
            assert response.status_code in (200, 201, 429)
            assert "X-RateLimit-Remaining" in response.headers
            assert len(commands) - before == 1, commands[before:]
        assert set(commands) == {"EVALSHA"}
        # The counter is the one limits' own fixed-window strategy reads (Flask-Limiter's CLI too).
        item = limits.parse("2/minute")
        reset, remaining = rate_limits.strategy.get_window_stats(
            item, prefix, "create", key_id, AGENT
        )
        assert remaining == 0 and time.time() < reset <= time.time() + 61
        ttl = redis_client.pttl(f"LIMITS:{item.key_for(prefix, 'create', key_id, AGENT)}")
        assert 0 < ttl <= 60_000
        refused = client.post(sessions, json={"name": "c"}, headers=headers)
        assert_error_in_process(refused, 429, "rate_limit_exceeded")
    finally:
        app.extensions["agent_sessions"].storage.close()


# Limits that must not turn into an outage, nor into state per URL


@pytest.fixture
def redis_app(prefix: str) -> Iterator[Any]:
    """Build in-process apps on the real Redis (memory:// sessions, two agents)."""
    apps: list[Any] = []

    def make(**config: Any) -> Any:
        app = create_app(
            {
                "TESTING": True,
                "STORAGE_URL": "memory://",
                "RATELIMIT_STORAGE_URI": REDIS_URL,
                "RATELIMIT_KEY_PREFIX": prefix,
                **config,
            }
        )
        apps.append(app)
        now = utcnow()
        storage = app.extensions["agent_sessions"].storage
        for agent in (AGENT, OTHER):
            storage.create_agent(agent=Agent(key=agent, name=agent, created_at=now, updated_at=now))
        return app

    yield make
    for app in apps:
        app.extensions["agent_sessions"].storage.close()


def test_a_command_redis_refuses_is_a_bug_not_an_outage(
    redis_app: Any, prefix: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    app = redis_app(DEFAULT_LIMIT="3/minute", SESSION_CREATE_LIMIT="3/minute")
    keys = Keys(app)
    broken_id, broken = keys.create(("*", ALL_SCOPES))
    _, other = keys.create(("*", ALL_SCOPES))
    _, odd = keys.create(("*", ALL_SCOPES), create_limit=f"2/{10**45} seconds")  # stored earlier
    # A counter Redis cannot increment: INCRBY answers "value is not an integer".
    item = limits.parse("3/minute")
    redis_client.set(f"LIMITS:{item.key_for(prefix, 'api', broken_id)}", "not a number")
    client = app.test_client()
    sessions = f"/v2/agents/{AGENT}/sessions"
    for _ in range(2):
        response = client.get(sessions, headers={"x-api-key": broken})
        assert response.status_code == 200, response.get_json()
        assert "X-RateLimit-Limit" not in response.headers
    response = client.post(sessions, json={"name": "odd"}, headers={"x-api-key": odd})
    assert response.status_code == 201, response.get_json()
    assert response.headers["X-RateLimit-Limit"] == "3"
    # Everyone else is still counted, at once: no back-off, no degraded limiter.
    statuses = [client.get(sessions, headers={"x-api-key": other}).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["rate_limit"] == "ok"
    refused = [r for r in caplog.records if "refused to count" in r.getMessage()]
    assert refused and all(r.levelname == "ERROR" for r in refused)
    assert "unreachable" not in caplog.text
    assert broken.partition(".")[2] not in caplog.text


def test_made_up_agents_leave_no_counters_in_redis(
    redis_app: Any, prefix: str, redis_client: redis.Redis
) -> None:
    app = redis_app(DEFAULT_LIMIT="1000/day", SESSION_CREATE_LIMIT="1000/day")
    key_id, token = Keys(app).create(("*", ALL_SCOPES))
    client = app.test_client()
    for i in range(100):
        response = client.post(
            f"/v2/agents/{i:03d}{'x' * 60}/sessions",
            json={"name": "chat"},
            headers={"x-api-key": token},
        )
        assert response.status_code == 404
    assert (
        client.post(
            f"/v2/agents/{AGENT}/sessions", json={"name": "chat"}, headers={"x-api-key": token}
        ).status_code
        == 201
    )
    stored = sorted(k.decode() for k in redis_client.scan_iter(match=f"*{prefix}*"))
    assert len(stored) == 2, stored
    assert [k for k in stored if f"/{prefix}/api/{key_id}/" in k]
    assert [k for k in stored if f"/{prefix}/create/{key_id}/{AGENT}/" in k]


# Redis stopped or stalled, against real gunicorn workers


@pytest.mark.parametrize("kind", ["stopped", "stalled"])
@pytest.mark.parametrize("policy", ["open", "closed"])
def test_redis_failure_never_5xx_nor_hangs(tmp_path: Path, kind: str, policy: str) -> None:
    with broken_redis(kind) as uri:
        env = service_env(tmp_path, f"t-{uuid.uuid4().hex}", uri, RATELIMIT_FAILURE_POLICY=policy)
        setup_agents(env)
        token = make_key(env)
        with serving(env, tmp_path, workers=2) as server:
            slowest = 0.0
            statuses = collections.Counter()
            for i in range(12):
                started = time.monotonic()
                if i % 3 == 2:
                    response = requests.get(
                        f"{server.url}/v2/agents/{AGENT}/sessions",
                        headers={"x-api-key": token},
                        timeout=30,
                    )
                else:
                    response = create(server.url, token, name=f"s{i}")
                slowest = max(slowest, time.monotonic() - started)
                statuses[response.status_code] += 1
                if policy == "closed":
                    assert response.status_code == 503, response.text
                    assert response.json()["error"] == "unavailable"
                    assert int(response.headers["Retry-After"]) >= 1
                else:
                    assert response.status_code in (200, 201), response.text
                if i % 4 == 3:
                    time.sleep(1.1)  # past the backoff: workers try Redis again
            ready = requests.get(f"{server.url}/readyz", timeout=30)
            assert ready.json()["rate_limit"] == "degraded"
            assert ready.status_code == (503 if policy == "closed" else 200)
            logs = server.logs()
        print(f"Redis {kind}, policy {policy}: {dict(statuses)}, slowest {slowest:.3f} s")
        assert slowest < TIMEOUT + MARGIN
        assert "rate-limit storage unreachable" in logs
        assert "Traceback" not in logs


@contextlib.contextmanager
def redis_server(port: int) -> Iterator[None]:
    binary = shutil.which("redis-server")
    if binary is None:
        if IN_CI:
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    break
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        client.close()
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_exact_limiting_resumes_when_redis_returns(tmp_path: Path) -> None:
    port = free_port()
    env = service_env(
        tmp_path,
        f"t-{uuid.uuid4().hex}",
        f"redis://127.0.0.1:{port}/0",
        SESSION_CREATE_LIMIT="3/minute",
    )
    setup_agents(env)
    token = make_key(env)
    with serving(env, tmp_path, workers=2) as server:
        # Redis down, policy open: served beyond the limit, and /readyz says so.
        assert [create(server.url, token).status_code for _ in range(5)] == [201] * 5
        assert requests.get(f"{server.url}/readyz", timeout=10).json()["rate_limit"] == "degraded"
        with redis_server(port):
            time.sleep(1.2)  # every worker's backoff has passed
            statuses = [create(server.url, token).status_code for _ in range(6)]
            assert statuses == [201, 201, 201, 429, 429, 429]
            ready = requests.get(f"{server.url}/readyz", timeout=10)
            assert ready.status_code == 200 and ready.json()["rate_limit"] == "ok"
        assert "rate-limit storage answers again" in server.logs()
