"""Noisy neighbours against a live gunicorn with 4 workers: ``sessions import`` from a
slow pipe holds no writer (another agent's appends go on while it stalls), a line over
its bound is refused as it is read (nothing past it is read), and a flood of 3.5 MB
batches with Idempotency-Keys stops at the agent's quota while another agent appends."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.servers import BIN, ROOT, cli, serving_store

WHEN = "2026-12-01T10:00:00.000Z"
OTHER = "other-bot"


def session_line(key: str = "imported", agent: str = "support-bot") -> bytes:
    session = {
        "key": key, "agent_key": agent, "name": key, "metadata": {}, "enabled": True,
        "tti_minutes": 0, "created_at": WHEN, "updated_at": WHEN,
    }  # fmt: skip
    line = {"format": "agent-sessions/session", "version": 1, "session": session}
    return (json.dumps(line) + "\n").encode()


def event_lines(start: int, count: int, size: int = 1000) -> bytes:
    return b"".join(
        (
            json.dumps(
                {
                    "event": {
                        "id": f"aev_{n}",
                        "type": "agent_output",
                        "created_at": WHEN,
                        "content": "c" * size,
                    }
                }
            )
            + "\n"
        ).encode()  # fmt: skip
        for n in range(start, start + count)
    )


def importer(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "agent-sessions"), "sessions", "import", "-"],
        env={**os.environ, **env},
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_stalled_import_holds_no_writer(tmp_path: Path, backend: str) -> None:
    # A short busy timeout: were the writer held, the appends would be 503 at once.
    settings = {"AGENT_SESSIONS_SQLITE_BUSY_TIMEOUT_MS": "200"}
    with serving_store(backend, tmp_path, settings) as (server, _, url):
        env = {"AGENT_SESSIONS_STORAGE_URL": url, **settings}
        cli("agents", "create", OTHER, "--name", OTHER, env=env)
        grant = f"{OTHER}=sessions:create,events:append"
        token = cli("keys", "create", "--name", "o", "--grant", grant, env=env).stdout
        headers = {"x-api-key": token.strip().splitlines()[-1]}
        sessions = f"{server.url}/v2/agents/{OTHER}/sessions"
        created = requests.post(sessions, json={"key": "victim", "name": "v"}, headers=headers)
        assert created.status_code == 201, created.text
        process = importer(env)
        assert process.stdin is not None
        # More than a pipe holds: once this write returns, the importer has read most of it.
        process.stdin.write(session_line() + event_lines(0, 2000))
        process.stdin.flush()
        statuses = []
        for n in range(20):
            batch = {"events": [{"type": "agent_output", "content": f"turn {n}"}]}
            answer = requests.post(
                f"{sessions}/victim/events/batch", json=batch, headers=headers, timeout=30
            )
            statuses.append(answer.status_code)
        assert process.poll() is None  # still waiting for the rest of its input
        process.stdin.write(event_lines(2000, 10) + b'{"end": {"events": 2010}}\n')
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert b"with 2010 events" in out
        assert statuses == [201] * 20
        assert "WORKER TIMEOUT" not in server.logs()


def test_a_line_over_the_event_bound_is_refused_unread(tmp_path: Path) -> None:
    env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/s.db"}
    cli("agents", "create", "support-bot", "--name", "s", env=env)
    process = importer(env)
    assert process.stdin is not None
    sent = [0]
    chunk = b"x" * (1 << 20)

    def feed() -> None:
        # A 300 MB line, unless the importer stops reading.
        try:
            process.stdin.write(session_line() + b'{"event": {"content": "')
            for _ in range(300):
                process.stdin.write(chunk)
                sent[0] += len(chunk)
            process.stdin.close()
        except BrokenPipeError:
            pass

    feeder = threading.Thread(target=feed)
    feeder.start()
    _, err = process.communicate(timeout=120)
    feeder.join(timeout=60)
    assert process.returncode == 1
    message = err.decode()
    assert message.count("\n") == 1 and "line 2: longer than" in message, message
    # What the importer took before it stopped: its bound, a pipe and a read buffer.
    assert sent[0] < 8 * len(chunk), sent[0]
    listed = cli("sessions", "list", "support-bot", env=env).stdout
    assert listed == ""


def test_an_event_at_its_bound_is_imported(tmp_path: Path) -> Any:
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/s.db",
        "AGENT_SESSIONS_EVENT_MAX_BYTES": "2048",
    }
    cli("agents", "create", "support-bot", "--name", "s", env=env)
    # The event's own JSON at most EVENT_MAX_BYTES: its line is a little longer.
    event = event_lines(0, 1, size=1900)
    assert len(event) > 2048 - 200
    path = tmp_path / "export.jsonl"
    path.write_bytes(session_line() + event + b'{"end": {"events": 1}}\n')
    done = cli("sessions", "import", str(path), env=env)
    assert "with 1 events" in done.stdout


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_an_idempotency_key_batch_flood_is_bounded_by_the_quota(
    tmp_path: Path, backend: str
) -> None:
    bound = 16 * 1024 * 1024
    settings = {
        "AGENT_SESSIONS_AGENT_MAX_BYTES": str(bound),
        "AGENT_SESSIONS_DEFAULT_LIMIT": "100000/minute",
    }
    grants = "support-bot=sessions:create,events:append"
    with serving_store(backend, tmp_path, settings, grants=grants) as (server, noisy, url):
        env = {"AGENT_SESSIONS_STORAGE_URL": url, **settings}
        cli("agents", "create", OTHER, "--name", OTHER, env=env)
        grant = f"{OTHER}=sessions:create,events:append"
        token = cli("keys", "create", "--name", "o", "--grant", grant, env=env).stdout
        victim = {"x-api-key": token.strip().splitlines()[-1]}
        for agent, headers in (("support-bot", {"x-api-key": noisy}), (OTHER, victim)):
            made = requests.post(
                f"{server.url}/v2/agents/{agent}/sessions",
                json={"key": "s", "name": "s"},
                headers=headers,
            )
            assert made.status_code == 201, made.text
        events = [{"type": "agent_output", "content": "b" * (250 * 1024)} for _ in range(14)]
        flood: list[int] = []

        def attack(n: int) -> None:
            for round_ in range(6):
                answer = requests.post(
                    f"{server.url}/v2/agents/support-bot/sessions/s/events/batch",
                    json={"events": events},
                    headers={"x-api-key": noisy, "Idempotency-Key": f"k-{n}-{round_}"},
                    timeout=120,
                )
                flood.append(answer.status_code)
                if answer.status_code == 409:
                    assert answer.json()["error"] == "quota_exceeded", answer.text

        attackers = [threading.Thread(target=attack, args=(n,)) for n in range(4)]
        for thread in attackers:
            thread.start()
        statuses = []
        while any(thread.is_alive() for thread in attackers):
            answer = requests.post(
                f"{server.url}/v2/agents/{OTHER}/sessions/s/events/batch",
                json={"events": [{"type": "agent_output", "content": "turn"}]},
                headers=victim,
                timeout=60,
            )
            statuses.append(answer.status_code)
        for thread in attackers:
            thread.join()
        assert set(statuses) == {201}, statuses
        assert set(flood) == {201, 409}, flood
        assert "WORKER TIMEOUT" not in server.logs()
        usage = requests.get(f"{server.url}/healthz").status_code
        assert usage == 200
        if backend == "sqlite":
            # 24 batches of 3.5 MB (84 MB, twice that with their remembered answers)
            # would be on disk without the quota.
            files = [tmp_path / "sessions.db", tmp_path / "sessions.db-wal"]
            size = sum(path.stat().st_size for path in files if path.exists())
            assert size < 3 * bound, size
