"""scripts/serve, as a newcomer runs it: the key it prints works, for sessions and history,
and nothing warns about the SQLite it installs; a restart installs nothing when nothing
changed and revokes the key it made before; a taken port stops it at once, with a hint."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.servers import ROOT, cli, free_port

SERVE = ROOT / "scripts" / "serve"
STAMP = ROOT / ".venv" / ".serve-installed"
INSTALLING = "scripts/serve: installing into .venv"


def serve_env(bind: str, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AGENT_SESSIONS_BIND": bind,
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/serve.db",
        "AGENT_SESSIONS_WORKERS": "2",
    }


def start(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """scripts/serve, up to gunicorn listening; its output so far."""
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            [str(SERVE)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = log.read_text()
        if "Listening at" in text:
            return serve, text
        if serve.poll() is not None:
            raise AssertionError(text)
        time.sleep(0.2)
    stop(serve)
    raise AssertionError(log.read_text())


def stop(serve: subprocess.Popen) -> None:
    if serve.poll() is None:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)


def printed_key(text: str) -> str:
    found = re.search(r"API key \(shown once\): (\S+)", text)
    assert found is not None, text
    return found.group(1)


@pytest.mark.slow
def test_the_printed_curl_line_and_key_create_a_session_and_write_its_history(tmp_path):
    bind = f"127.0.0.1:{free_port()}"
    # As after an edit of setup.cfg: the first start installs, and records what it installed.
    STAMP.write_text("stale\n")
    serve, text = start(serve_env(bind, tmp_path), tmp_path / "serve.log")
    try:
        assert INSTALLING in text
        wanted = hashlib.sha256(
            (ROOT / "setup.cfg").read_bytes() + (ROOT / "pyproject.toml").read_bytes()
        )
        assert STAMP.read_text().strip() == wanted.hexdigest()
        curl = re.search(r"  (curl .*?)\n\n", text, re.S)
        assert curl is not None, text
        created = subprocess.run(
            ["bash", "-c", curl.group(1)], capture_output=True, text=True, timeout=30
        )
        session = json.loads(created.stdout)
        assert session["agent_key"] == "demo-agent", created.stdout
        key = printed_key(text)
        url = f"http://{bind}/v2/agents/demo-agent/sessions/{session['key']}/events"
        said = requests.post(
            url,
            json={"type": "input_message", "messages": [{"type": "text", "content": "Hi"}]},
            headers={"x-api-key": key},
            timeout=10,
        )
        assert said.status_code == 201, said.text
        replied = requests.post(
            url + "/batch",
            json={"events": [{"type": "agent_output", "content": "Hello"}]},
            headers={"x-api-key": key},
            timeout=10,
        )
        assert replied.status_code == 201, replied.text
        listed = requests.get(url, headers={"x-api-key": key}, timeout=10).json()
        assert [e["type"] for e in listed["events"]] == ["input_message", "agent_output"]
        text = (tmp_path / "serve.log").read_text()
        assert "unknown setting" not in text
        # The default install's SQLite, as the server reports it, needs no warning.
        version = re.search(r"storage: SQLite (\d+)\.(\d+)\.(\d+)", text)
        assert version is not None, text
        assert tuple(map(int, version.groups())) >= (3, 51, 3), text
        assert "walresetbug" not in text and "WAL-reset" not in text, text
    finally:
        stop(serve)

    # Started again on the same storage: no install, a new key, the old one revoked.
    serve, again = start(serve_env(bind, tmp_path), tmp_path / "again.log")
    try:
        assert INSTALLING not in again, again
        new_key = printed_key(again)
        assert new_key != key
        sessions = f"http://{bind}/v2/agents/demo-agent/sessions"
        old = requests.get(sessions, headers={"x-api-key": key}, timeout=10)
        assert old.status_code == 401, old.text
        assert requests.get(sessions, headers={"x-api-key": new_key}, timeout=10).status_code == 200
        listed = json.loads(cli("keys", "list", "--json", env=serve_env(bind, tmp_path)).stdout)[
            "api_keys"
        ]
        active = [k["id"] for k in listed if k["name"] == "demo key" and k["state"] == "active"]
        assert active == [new_key.split(".")[0]], listed
    finally:
        stop(serve)


def test_a_taken_port_stops_it_at_once_with_a_free_one_to_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = subprocess.run(
            [str(SERVE)],
            env=serve_env(f"127.0.0.1:{port}", tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert ran.returncode == 1, ran.stdout + ran.stderr
    # Before anything else: no banner, no key, no database made.
    assert ran.stdout == ""
    assert not (tmp_path / "serve.db").exists()
    lines = ran.stderr.splitlines()
    assert len(lines) == 1, ran.stderr
    assert lines[0].startswith(f"scripts/serve: 127.0.0.1:{port} is already in use"), lines
    hint = re.search(r"AGENT_SESSIONS_BIND=127\.0\.0\.1:(\d+) scripts/serve$", lines[0])
    assert hint is not None, lines
    assert int(hint.group(1)) != port
    with socket.socket() as free:
        free.bind(("127.0.0.1", int(hint.group(1))))


def test_a_bind_that_is_not_host_and_port_is_a_configuration_error(tmp_path):
    ran = subprocess.run(
        [str(SERVE)],
        env=serve_env("127.0.0.1:http", tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 3, ran.stdout + ran.stderr
    assert ran.stdout == ""
    assert ran.stderr == (
        "scripts/serve: AGENT_SESSIONS_BIND='127.0.0.1:http' is not HOST:PORT"
        " (such as 127.0.0.1:8000)\n"
    )
