"""The ``agent-sessions`` operator CLI, run as the real console script."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sessions_app import create_app
from storage_backends import Agent, ApiKey, Grant, Session, storage_from_url
from tests.conftest import assert_error
from tests.servers import BIN, ROOT, cli, free_port

AGENT = "support-bot"


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/cli.db"


@pytest.fixture
def env(url: str) -> dict[str, str]:
    return {"AGENT_SESSIONS_STORAGE_URL": url}


@pytest.fixture
def app(url: str) -> Iterator[Any]:
    """The app over the same storage as the CLI, configured explicitly."""
    app = create_app({"TESTING": True, "STORAGE_URL": url})
    yield app
    app.extensions["agent_sessions"].storage.close()


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


def token_of(result: subprocess.CompletedProcess) -> str:
    """The secret: alone on the last line of standard output."""
    lines = result.stdout.splitlines()
    assert lines, result
    token = lines[-1]
    assert token == token.strip() and " " not in token and token.startswith("ak_"), lines
    return token


def key_id_of(token: str) -> str:
    return token.partition(".")[0]


def keys_list(env: dict[str, str]) -> dict[str, list[str]]:
    """``keys list`` as {key id: [id, name, grants, state, ...]}; one line per key."""
    lines = cli("keys", "list", env=env).stdout.splitlines()
    rows = [line.split("\t") for line in lines]
    assert len({row[0] for row in rows}) == len(rows)
    return {row[0]: row for row in rows}


def empty_database(url: str) -> None:
    """A database with the schema and no record (the CLI refuses a file that is not there)."""
    store = storage_from_url(url, {})
    try:
        store.check()
    finally:
        store.close()


def make_agent(url: str, key: str = AGENT) -> None:
    """Set-up for tests about other commands: an agent stored directly."""
    now = dt.datetime.now(dt.UTC)
    store = storage_from_url(url, {})
    try:
        store.create_agent(agent=Agent(key=key, name="Support", created_at=now, updated_at=now))
    finally:
        store.close()


def assert_cli_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """A non-zero exit with one line on standard error and no traceback anywhere."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    message = lines[0]
    assert message.startswith("Error"), message
    for word in words:
        assert word in message, (word, message)
    return message


def test_help_lists_the_command_groups() -> None:
    result = cli("--help", env={})
    commands = result.stdout.split("Commands:", 1)[1].split()
    for name in ("agents", "keys", "sessions", "run"):
        assert name in commands, result.stdout
    keys_help = cli("keys", "--help", env={}).stdout
    assert all(word in keys_help for word in ("create", "list", "revoke"))
    assert "purge-expired" in cli("sessions", "--help", env={}).stdout


def test_agents_create_and_list(env: dict[str, str], url: str) -> None:
    empty_database(url)
    assert cli("agents", "list", env=env).stdout == ""
    created = cli("agents", "create", AGENT, "--name", "Support", env=env)
    assert AGENT in created.stdout
    cli(
        "agents", "create", "billing", "--name", "Billing bot", "--description", "Invoices", env=env
    )
    lines = cli("agents", "list", env=env).stdout.splitlines()
    assert [line.split("\t") for line in lines] == [
        [AGENT, "Support", "enabled", "0", "0", "0"],
        ["billing", "Billing bot", "enabled", "0", "0", "0"],
    ]


def test_agent_created_by_the_cli_is_seen_by_the_app(env: dict[str, str], app: Any) -> None:
    cli("agents", "create", AGENT, "--name", "Support", "--description", "Help desk", env=env)
    with app.app_context():
        agent = app.extensions["agent_sessions"].storage.get_agent(agent_key=AGENT)
    assert (agent.name, agent.description, agent.enabled) == ("Support", "Help desk", True)


def test_key_with_grants_works_against_the_app(env: dict[str, str], client: Any) -> None:
    cli("agents", "create", AGENT, "--name", "Support", env=env)
    cli("agents", "create", "other-bot", "--name", "Other", env=env)
    result = cli(
        "keys",
        "create",
        "--name",
        "support frontend",
        "--grant",
        f"{AGENT}=sessions:create,sessions:read",
        "--grant",
        "*=sessions:read",
        env=env,
    )
    token = token_of(result)
    # Everything before the secret describes the key without repeating the secret.
    secret = token.partition(".")[2]
    assert secret not in "\n".join(result.stdout.splitlines()[:-1])
    assert secret not in result.stderr

    headers = {"x-api-key": token}
    created = client.post(f"/v2/agents/{AGENT}/sessions", json={"name": "Hi"}, headers=headers)
    assert created.status_code == 201, created.get_json()
    assert client.get(created.headers["Location"], headers=headers).status_code == 200
    bearer = {"Authorization": f"Bearer {token}"}
    assert client.get(f"/v2/agents/{AGENT}/sessions", headers=bearer).status_code == 200
    # "*=sessions:read" reads every agent, but creates only where granted.
    assert client.get("/v2/agents/other-bot/sessions", headers=headers).status_code == 200
    forbidden = client.post("/v2/agents/other-bot/sessions", json={"name": "x"}, headers=headers)
    assert_error(forbidden, 403, "forbidden")
    update = client.patch(created.headers["Location"], json={"name": "y"}, headers=headers)
    assert_error(update, 403, "forbidden")
    # Not an admin key.
    agent = {"key": "third", "name": "Third"}
    assert_error(client.post("/v2/agents", json=agent, headers=headers), 403, "forbidden")


def test_keys_with_event_scopes(env: dict[str, str], client: Any) -> None:
    cli("agents", "create", AGENT, "--name", "Support", env=env)
    admin = {"x-api-key": token_of(cli("keys", "create", "--name", "ops", "--admin", env=env))}
    bot = {
        "x-api-key": token_of(
            cli("keys", "create", "--name", "runtime", "--grant", f"{AGENT}=events:append", env=env)
        )
    }
    user = {
        "x-api-key": token_of(
            cli(
                "keys",
                "create",
                "--name",
                "front",
                "--grant",
                f"{AGENT}=events:create,sessions:create",
                env=env,
            )
        )
    }
    row = keys_list(env)[key_id_of(bot["x-api-key"])]
    assert "events:append" in "\t".join(row)
    sessions = f"/v2/agents/{AGENT}/sessions"
    assert client.post(sessions, json={"key": "s", "name": "S"}, headers=user).status_code == 201
    message = {"type": "input_message", "messages": [{"type": "text", "content": "hi"}]}
    assert client.post(f"{sessions}/s/events", json=message, headers=user).status_code == 201
    answer = {"events": [{"type": "agent_output", "content": "hello"}]}
    assert client.post(f"{sessions}/s/events/batch", json=answer, headers=bot).status_code == 201
    assert_error(
        client.post(f"{sessions}/s/events/batch", json=answer, headers=user), 403, "forbidden"
    )
    assert_error(client.post(f"{sessions}/s/events", json=message, headers=bot), 403, "forbidden")
    assert client.get(f"{sessions}/s/events", headers=admin).status_code == 200
    assert_error(client.get(f"{sessions}/s/events", headers=bot), 403, "forbidden")
    bad = cli(
        "keys", "create", "--name", "x", "--grant", f"{AGENT}=events:delete", env=env, check=False
    )
    assert bad.returncode != 0 and "events:append" in bad.stderr


def test_admin_key(env: dict[str, str], client: Any) -> None:
    result = cli("keys", "create", "--name", "ops", "--admin", env=env)
    headers = {"x-api-key": token_of(result)}
    created = client.post("/v2/agents", json={"key": "new-bot", "name": "New"}, headers=headers)
    assert created.status_code == 201, created.get_json()
    assert client.get("/v2/api_keys", headers=headers).status_code == 200
    session = client.post("/v2/agents/new-bot/sessions", json={"name": "x"}, headers=headers)
    assert session.status_code == 201
    row = keys_list(env)[key_id_of(headers["x-api-key"])]
    assert row[1:4] == ["ops", "admin", "active"]


def test_keys_list_shows_every_key_without_its_secret(env: dict[str, str]) -> None:
    tokens = [
        token_of(cli("keys", "create", "--name", "reader", "--grant", "*=sessions:read", env=env)),
        token_of(
            cli(
                "keys",
                "create",
                "--name",
                "writer",
                "--grant",
                f"{AGENT}=sessions:create,sessions:update",
                "--grant",
                "*=sessions:read",
                env=env,
            )
        ),
        token_of(cli("keys", "create", "--name", "root", "--admin", env=env)),
    ]
    output = cli("keys", "list", env=env).stdout
    lines = output.splitlines()
    assert len(lines) == 3
    for line, token in zip(lines, tokens, strict=True):
        assert line.startswith(key_id_of(token) + "\t")
        assert token.partition(".")[2] not in output
    rows = keys_list(env)
    reader, writer, root = (rows[key_id_of(t)] for t in tokens)
    assert reader[1:4] == ["reader", "*=sessions:read", "active"]
    assert writer[1:4] == [
        "writer",
        f"{AGENT}=sessions:create,sessions:update *=sessions:read",
        "active",
    ]
    assert root[1:4] == ["root", "admin", "active"]


def test_create_limit_shows_in_keys_list(env: dict[str, str], url: str, client: Any) -> None:
    make_agent(url)
    limited = token_of(
        cli(
            "keys",
            "create",
            "--name",
            "limited",
            "--grant",
            f"{AGENT}=sessions:create",
            "--create-limit",
            "2/minute",
            env=env,
        )
    )
    plain = token_of(
        cli("keys", "create", "--name", "plain", "--grant", "*=sessions:read", env=env)
    )
    rows = keys_list(env)
    assert "2/minute" in "\t".join(rows[key_id_of(limited)])
    assert "/minute" not in "\t".join(rows[key_id_of(plain)])
    # And the app enforces it: the third create is refused.
    headers = {"x-api-key": limited}
    for _ in range(2):
        response = client.post(f"/v2/agents/{AGENT}/sessions", json={"name": "s"}, headers=headers)
        assert response.status_code == 201
    response = client.post(f"/v2/agents/{AGENT}/sessions", json={"name": "s"}, headers=headers)
    assert_error(response, 429, "rate_limit_exceeded")
    assert response.headers["X-RateLimit-Limit"] == "2"


def test_create_limit_of_30_per_minute(env: dict[str, str]) -> None:
    token = token_of(cli("keys", "create", "--name", "n", "--create-limit", "30/minute", env=env))
    assert "30/minute" in "\t".join(keys_list(env)[key_id_of(token)])


def test_revoke(env: dict[str, str], url: str, client: Any) -> None:
    make_agent(url)
    token = token_of(cli("keys", "create", "--name", "k", "--grant", "*=sessions:read", env=env))
    other = token_of(cli("keys", "create", "--name", "o", "--grant", "*=sessions:read", env=env))
    url = f"/v2/agents/{AGENT}/sessions"
    assert client.get(url, headers={"x-api-key": token}).status_code == 200

    result = cli("keys", "revoke", key_id_of(token), env=env)
    revoked = time.monotonic()
    assert key_id_of(token) in result.stdout
    rows = keys_list(env)
    assert rows[key_id_of(token)][3] == "revoked"
    assert rows[key_id_of(other)][3] == "active"
    # The server trusts a key it read for up to a second (KeyCache): no longer.
    time.sleep(max(0.0, revoked + 1.0 - time.monotonic()))
    assert_error(client.get(url, headers={"x-api-key": token}), 401, "unauthorized")
    assert client.get(url, headers={"x-api-key": other}).status_code == 200
    # Revoking again is harmless.
    cli("keys", "revoke", key_id_of(token), env=env)
    assert keys_list(env)[key_id_of(token)][3] == "revoked"


def test_purge_expired(env: dict[str, str], url: str) -> None:
    make_agent(url)
    long_ago = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=2)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    store = storage_from_url(url, {})
    try:
        for key, stamp, tti in [
            ("idle", long_ago, 1),
            ("fresh", now, 60),
            ("forever", long_ago, 0),
        ]:
            store.create_session(
                session=Session(
                    key=key,
                    agent_key=AGENT,
                    name=key,
                    tti_minutes=tti,
                    created_at=stamp,
                    updated_at=stamp,
                )
            )
        for key, expires in [("old", long_ago), ("live", now + dt.timedelta(hours=1))]:
            store.claim_idempotency_key(
                scope="ak_1",
                key=key,
                fingerprint="f",
                token="t",
                now=long_ago,
                locked_until=long_ago,
                expires_at=expires,
            )
    finally:
        store.close()
    first = cli("sessions", "purge-expired", env=env).stdout
    assert "removed 1 expired sessions" in first and "removed 1 expired idempotency keys" in first
    again = cli("sessions", "purge-expired", env=env).stdout
    assert "removed 0 expired sessions" in again and "removed 0 expired idempotency keys" in again
    store = storage_from_url(url, {})
    try:
        page = store.list_sessions(agent_key=AGENT, limit=10, now=long_ago)
        assert sorted(s.key for s in page.items) == ["forever", "fresh"]
    finally:
        store.close()


def test_purge_expired_removes_idempotency_keys_past_their_ttl(
    env: dict[str, str], url: str
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    hour = dt.timedelta(hours=1)
    store = storage_from_url(url, {})
    try:
        for key, expires_at in [("old", now - hour), ("live", now + hour)]:
            store.claim_idempotency_key(
                scope="ak_1",
                key=key,
                fingerprint="f1",
                token=f"t-{key}",
                now=now - 2 * hour,
                locked_until=now - 2 * hour,
                expires_at=expires_at,
            )
    finally:
        store.close()
    out = cli("sessions", "purge-expired", env=env).stdout
    assert "removed 0 expired sessions" in out and "removed 1 expired idempotency keys" in out
    assert "removed 0 expired idempotency keys" in cli("sessions", "purge-expired", env=env).stdout
    store = storage_from_url(url, {})
    try:
        # A claim as of long ago: only a record still stored refuses another request.
        claims = {
            key: store.claim_idempotency_key(
                scope="ak_1",
                key=key,
                fingerprint="f2",
                token="t-new",
                now=now - 2 * hour,
                locked_until=now,
                expires_at=now + hour,
            )
            for key in ("old", "live")
        }
    finally:
        store.close()
    assert claims["old"].token == "t-new" and claims["live"].token == "t-live"


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], str]:
    """One store with an agent and a key, shared by the error cases (which change nothing)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('errors')}/cli.db"
    env = {"AGENT_SESSIONS_STORAGE_URL": url}
    make_agent(url)
    cli("keys", "create", "--name", "k", "--grant", "*=sessions:read", env=env)
    return env, url


def snapshot(url: str) -> tuple[list, list]:
    store = storage_from_url(url, {})
    try:
        return store.list_agents(limit=100).items, store.list_api_keys(limit=100).items
    finally:
        store.close()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("agents", "create", AGENT, "--name", "Again"), (AGENT, "exists")),
        (("agents", "create", "bad key!", "--name", "X"), ("AGENT_KEY",)),
        (("agents", "create", "k" * 65, "--name", "X"), ("AGENT_KEY",)),
        (("keys", "create", "--name", "n", "--grant", AGENT), ("--grant", "AGENT=SCOPE")),
        (("keys", "create", "--name", "n", "--grant", f"{AGENT}="), ("--grant",)),
        (("keys", "create", "--name", "n", "--grant", "=sessions:read"), ("--grant",)),
        (("keys", "create", "--name", "n", "--grant", "bad key=sessions:read"), ("--grant",)),
        (
            ("keys", "create", "--name", "n", "--grant", f"{AGENT}=sessions:read,sessions:fly"),
            ("unknown scope", "sessions:fly"),
        ),
        (("keys", "create", "--name", "n", "--create-limit", "lots"), ("lots",)),
        (("keys", "create", "--name", "n", "--create-limit", "30/fortnight"), ("fortnight",)),
        (("keys", "create", "--name", "n", "--create-limit", "5/2day"), ("5/2day", "bounds")),
        (
            ("keys", "create", "--name", "n", "--create-limit", "1/second;5/minute"),
            ("1/second;5/minute",),
        ),
        (("keys", "revoke", "ak_0000000000000000"), ("ak_0000000000000000", "not found")),
    ],
)
def test_errors_are_one_line(
    populated: tuple[dict[str, str], str], args: tuple[str, ...], words: tuple
) -> None:
    env, url = populated
    before = snapshot(url)
    assert_cli_error(cli(*args, env=env, check=False), *words)
    # A refused command changed nothing.
    assert snapshot(url) == before


@pytest.mark.parametrize(
    ("variables", "words"),
    [
        ({"AGENT_SESSIONS_STORAGE_URL": "foo://x"}, ("'foo'", "scheme")),
        ({"AGENT_SESSIONS_STORAGE_URL": "sqlite:///"}, ("sqlite",)),
        ({"AGENT_SESSIONS_SESSION_CREATE_LIMIT": "often"}, ("often",)),
    ],
)
def test_configuration_errors_are_one_line(
    env: dict[str, str], variables: dict[str, str], words: tuple
) -> None:
    for args in (("agents", "list"), ("keys", "create", "--name", "n", "--admin")):
        assert_cli_error(cli(*args, env={**env, **variables}, check=False), *words)


def test_environment_prefix_configures_the_app(
    env: dict[str, str], url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AGENT_SESSIONS_X sets config key X, with JSON values parsed, for the CLI and the app."""
    make_agent(url)
    token = token_of(cli("keys", "create", "--name", "k", "--grant", "*=sessions:create", env=env))
    monkeypatch.setenv("AGENT_SESSIONS_STORAGE_URL", url)
    monkeypatch.setenv("AGENT_SESSIONS_SESSION_CREATE_LIMIT", "3/minute")
    monkeypatch.setenv("AGENT_SESSIONS_METADATA_MAX_KEYS", "1")
    app = create_app({"TESTING": True})
    try:
        assert app.config["STORAGE_URL"] == url
        assert app.config["METADATA_MAX_KEYS"] == 1
        client = app.test_client()
        headers = {"x-api-key": token}
        sessions = f"/v2/agents/{AGENT}/sessions"
        body = {"name": "x", "metadata": {"a": 1, "b": 2}}
        assert_error(client.post(sessions, json=body, headers=headers), 400, "invalid_metadata")
        for _ in range(2):
            response = client.post(sessions, json={"name": "x"}, headers=headers)
            assert response.status_code == 201, response.get_json()
        response = client.post(sessions, json={"name": "x"}, headers=headers)
        assert_error(response, 429, "rate_limit_exceeded")
    finally:
        app.extensions["agent_sessions"].storage.close()


def test_run_serves_the_same_storage(env: dict[str, str], url: str) -> None:
    make_agent(url)
    token = token_of(cli("keys", "create", "--name", "k", "--grant", "*=sessions:read", env=env))
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "agent-sessions"), "run", "--port", str(port), "--no-reload"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            assert process.poll() is None, "agent-sessions run exited"
            assert time.monotonic() < deadline, "agent-sessions run did not come up"
            time.sleep(0.1)
        response = requests.get(
            f"{base}/v2/agents/{AGENT}/sessions", headers={"x-api-key": token}, timeout=5
        )
        assert response.status_code == 200
        assert response.json()["sessions"] == []
    finally:
        process.terminate()
        process.wait(timeout=10)


EVIL_NAME = "Evil\nfake-agent\tFake\tenabled\u001b[2J\u001b]0;pwned\u0007\u0085\u2028\u202e\x7f"
RAW_CONTROLS = "[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]"


def assert_no_raw_controls(text: str) -> None:
    assert not re.search(RAW_CONTROLS, text), repr(text)


def test_agents_list_escapes_control_characters_in_names(env: dict[str, str], url: str) -> None:
    # The CLI refuses such names, as the API does ...
    assert_cli_error(cli("agents", "create", "evil", "--name", EVIL_NAME, env=env, check=False))
    # ... but rows written before names were checked, straight into storage, show as safely.
    now = dt.datetime.now(dt.UTC)
    store = storage_from_url(url, {})
    try:
        for key, name in (("evil", EVIL_NAME), ("older", "Old\r\nkey\tx")):
            store.create_agent(agent=Agent(key=key, name=name, created_at=now, updated_at=now))
    finally:
        store.close()
    output = cli("agents", "list", env=env).stdout
    assert_no_raw_controls(output)
    rows = [line.split("\t") for line in output.splitlines()]
    assert rows == [
        [
            "evil",
            "Evil\\x0afake-agent\\x09Fake\\x09enabled\\x1b[2J\\x1b]0;pwned\\x07\\x85\\u2028\\u202e\\x7f",
            "enabled",
            "0",
            "0",
            "0",
        ],
        ["older", "Old\\x0d\\x0akey\\x09x", "enabled", "0", "0", "0"],
    ]


def test_keys_list_escapes_control_characters_in_names(env: dict[str, str], url: str) -> None:
    cli("agents", "create", AGENT, "--name", "Support", env=env)
    forged = "x\nak_forged\tadmin\tadmin\tactive\tcreate-limit=default"
    refused = cli("keys", "create", "--name", forged, env=env, check=False)
    assert_cli_error(refused, "--name")
    assert_no_raw_controls(refused.stderr)
    # Stored before names were checked: listed on one line, its fields escaped.
    store = storage_from_url(url, {})
    try:
        key = store.create_api_key(
            api_key=ApiKey(
                id="ak_00000000000000aa",
                name=forged,
                secret_hash="0" * 64,
                grants=[Grant(AGENT, ("sessions:read",))],
                created_at=dt.datetime.now(dt.UTC),
            )
        )
    finally:
        store.close()
    token = f"{key.id}.unused"
    output = cli("keys", "list", env=env).stdout
    assert_no_raw_controls(output)
    lines = output.splitlines()
    assert len(lines) == 1, lines
    row = lines[0].split("\t")
    assert row[0] == key_id_of(token)
    assert row[1] == "x\\x0aak_forged\\x09admin\\x09admin\\x09active\\x09create-limit=default"
    assert row[2:] == [f"{AGENT}=sessions:read", "active", "create-limit=default"]


def test_error_lines_escape_control_characters(env: dict[str, str], url: str) -> None:
    empty_database(url)
    result = cli("keys", "revoke", "ak_x\n\x1b[2Jforged", env=env, check=False)
    message = assert_cli_error(result, "not found")
    assert "ak_x\\x0a\\x1b[2Jforged" in message
    assert_no_raw_controls(result.stderr)


@pytest.mark.parametrize(
    "args",
    [
        ("agents", "list"),
        ("agents", "create", "bot", "--name", "Bot"),
        ("keys", "create", "--name", "k", "--admin"),
        ("keys", "list"),
        ("sessions", "purge-expired"),
    ],
)
def test_memory_storage_is_refused_by_the_cli(args: tuple[str, ...]) -> None:
    """memory:// lives inside each server process: a CLI command on it would act on nothing."""
    result = cli(*args, env={"AGENT_SESSIONS_STORAGE_URL": "memory://"}, check=False)
    assert_cli_error(result, "memory://")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("agents", "create", "bot", "--name", ""), ("--name",)),
        (("agents", "create", "bot", "--name", " \u200b "), ("--name", "blank")),
        (("agents", "create", "bot", "--name", "a\nb\x1b[2J"), ("--name", "control")),
        (("agents", "create", "bot", "--name", "n" * 256), ("--name",)),
        (
            ("agents", "create", "bot", "--name", "n", "--description", "d" * 2001),
            ("--description",),
        ),
        (("keys", "create", "--name", ""), ("--name",)),
        (("keys", "create", "--name", "k\u0085"), ("--name", "control")),
        (("keys", "create", "--name", "k", "--create-limit", "5/0 seconds"), ("5/0 seconds",)),
    ],
)
def test_the_cli_refuses_what_the_api_refuses(
    env: dict[str, str], url: str, args: tuple[str, ...], words: tuple[str, ...]
) -> None:
    empty_database(url)
    assert_cli_error(cli(*args, env=env, check=False), *words)
    assert cli("agents", "list", env=env).stdout == ""
    assert cli("keys", "list", env=env).stdout == ""
