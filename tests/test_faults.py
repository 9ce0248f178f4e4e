"""Storage trouble: busy past its timeout, disk full, a database file that cannot be read.

Each answers 503 ``unavailable`` with ``Retry-After`` (never 500), writes nothing
half-way, and the CLI says so in one line.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlite_utils.utils import sqlite3

from sessions_app import create_app
from tests.conftest import ALL_SCOPES, Keys, assert_error, sqlite_integrity
from tests.servers import ROOT, cli

AGENT = "support-bot"
SESSIONS = f"/v2/agents/{AGENT}/sessions"


def sqlite_app(path: Path, **config: Any) -> Any:
    return create_app({"TESTING": True, "STORAGE_URL": f"sqlite:///{path}", **config})


def prepare(app: Any) -> dict[str, str]:
    """An agent and a key with every session scope on it; returns the key's headers."""
    keys = Keys(app)
    admin = keys.headers(admin=True)
    response = app.test_client().post(
        "/v2/agents", json={"key": AGENT, "name": "Support"}, headers=admin
    )
    assert response.status_code == 201, response.get_json()
    return keys.headers((AGENT, ALL_SCOPES))


def assert_unavailable(response: Any) -> None:
    assert_error(response, 503, "unavailable")
    retry_after = response.headers.get("Retry-After", "")
    assert retry_after.isdigit() and int(retry_after) >= 1, response.headers


# Busy past the timeout


@pytest.fixture
def busy(tmp_path: Path) -> Iterator[tuple[Any, dict[str, str], Path]]:
    path = tmp_path / "sessions.db"
    app = sqlite_app(path, SQLITE_BUSY_TIMEOUT_MS=200)
    headers = prepare(app)
    yield app, headers, path
    app.extensions["agent_sessions"].storage.close()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", SESSIONS, {"key": "new", "name": "New"}),
        ("POST", SESSIONS, {"name": "Generated key"}),
        ("PATCH", f"{SESSIONS}/kept", {"name": "Changed", "metadata": {"x": 1}}),
        ("DELETE", f"{SESSIONS}/kept", None),
    ],
)
def test_busy_past_its_timeout_is_503_quickly_and_writes_nothing(busy, method, path, body):
    app, headers, db_path = busy
    client = app.test_client()
    kept = client.post(SESSIONS, json={"key": "kept", "name": "Kept"}, headers=headers)
    assert kept.status_code == 201
    # Another process holds the write lock, past the 200 ms busy timeout.
    blocker = sqlite3.connect(db_path, timeout=0, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        response = client.open(path, method=method, json=body, headers=headers)
        elapsed = time.monotonic() - started
        assert_unavailable(response)
        assert elapsed < 2, elapsed  # the busy timeout, not the default five seconds
        # Readers are not blocked by a writer (WAL): the service still answers reads.
        listing = client.get(SESSIONS, headers=headers)
        assert listing.status_code == 200
        assert listing.get_json()["sessions"] == [kept.get_json()]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # Nothing was written, and the same request succeeds once the lock is gone.
    assert client.get(SESSIONS, headers=headers).get_json()["sessions"] == [kept.get_json()]
    again = client.open(path, method=method, json=body, headers=headers)
    assert again.status_code in (200, 201, 204), again.get_json()


def test_readiness_while_a_writer_holds_the_lock(busy):
    app, _, db_path = busy
    blocker = sqlite3.connect(db_path, timeout=0, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        # Readiness reads; a long write elsewhere does not make the service unready.
        assert app.test_client().get("/readyz").status_code == 200
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


# Disk full

# Runs in a child process whose files may not grow past RLIMIT_FSIZE: SQLite
# gets EFBIG (SIGXFSZ is ignored) exactly as on a full disk.
DISK_FULL_SCRIPT = """
import json, sys
from sessions_app import create_app

url, token, attempts = sys.argv[1], sys.argv[2], int(sys.argv[3])
app = create_app({"TESTING": True, "STORAGE_URL": url, "SESSION_CREATE_LIMIT": "100000/minute"})
client = app.test_client()
headers = {"x-api-key": token}
results = []
for i in range(attempts):
    body = {"key": f"s{i:03d}", "name": f"Session {i}", "metadata": {"pad": "x" * 12000}}
    response = client.post("/v2/agents/support-bot/sessions", json=body, headers=headers)
    results.append({
        "key": body["key"],
        "status": response.status_code,
        "body": response.get_json(),
        "retry_after": response.headers.get("Retry-After"),
    })
    if sum(r["status"] == 503 for r in results) >= 5:
        break
# Reads of what is stored keep working with the disk full.
listing = client.get("/v2/agents/support-bot/sessions?limit=100", headers=headers)
print(json.dumps({"results": results, "list_status": listing.status_code}))
"""


def limit_file_size(limit: int) -> Any:
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_disk_full_is_503_and_never_half_written(tmp_path):
    path = tmp_path / "sessions.db"
    url = f"sqlite:///{path}"
    app = sqlite_app(path)
    token = prepare(app)["x-api-key"]
    app.extensions["agent_sessions"].storage.close()  # checkpoints and removes the WAL
    limit = path.stat().st_size + 256 * 1024
    child = subprocess.run(
        [sys.executable, "-c", DISK_FULL_SCRIPT, url, token, "200"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_file_size(limit),
    )
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.splitlines()[-1])
    results = report["results"]
    statuses = [r["status"] for r in results]
    print(f"disk full: {statuses.count(201)} created, then {statuses.count(503)} x 503")
    assert set(statuses) <= {201, 503}, statuses
    assert statuses.count(201) >= 1 and statuses.count(503) >= 1, statuses
    assert "Traceback" not in child.stderr, child.stderr[-3000:]
    for result in results:
        if result["status"] == 503:
            assert result["body"]["error"] == "unavailable", result
            assert result["retry_after"] and int(result["retry_after"]) >= 1, result
    assert report["list_status"] == 200

    # With room again: every 201 is there as answered, no refused create left a trace.
    assert sqlite_integrity(path) == "ok"
    app = sqlite_app(path)
    try:
        client = app.test_client()
        headers = {"x-api-key": token}
        created = [r["body"] for r in results if r["status"] == 201]
        listing = client.get(f"{SESSIONS}?limit=100", headers=headers).get_json()
        assert listing["sessions"] == created
        for result in results:
            if result["status"] == 503:
                response = client.get(f"{SESSIONS}/{result['key']}", headers=headers)
                assert_error(response, 404, "session_not_found")
        # And the service writes again.
        response = client.post(SESSIONS, json={"key": "after", "name": "After"}, headers=headers)
        assert response.status_code == 201, response.get_json()
    finally:
        app.extensions["agent_sessions"].storage.close()


# A database file that cannot be read


def corrupt_file(tmp_path: Path) -> Path:
    path = tmp_path / "sessions.db"
    path.write_bytes(b"this is no database" + os.urandom(8192))
    return path


def parent_is_a_file(tmp_path: Path) -> Path:
    (tmp_path / "not-a-directory").write_text("a regular file")
    return tmp_path / "not-a-directory" / "sessions.db"


def path_is_a_directory(tmp_path: Path) -> Path:
    path = tmp_path / "sessions.db"
    path.mkdir()
    return path


UNREADABLE = [corrupt_file, parent_is_a_file, path_is_a_directory]


@pytest.mark.parametrize("make_path", UNREADABLE, ids=lambda f: f.__name__)
def test_unreadable_database_is_503_and_not_ready(tmp_path, make_path):
    app = sqlite_app(make_path(tmp_path))  # building the app does not touch the file
    client = app.test_client()
    headers = {"x-api-key": "ak_0123456789abcdef.secret"}
    for method, path, body in [
        ("POST", SESSIONS, {"name": "n"}),
        ("GET", SESSIONS, None),
        ("GET", f"{SESSIONS}/s", None),
        ("PATCH", f"{SESSIONS}/s", {"name": "m"}),
        ("DELETE", f"{SESSIONS}/s", None),
        ("GET", "/v2/agents", None),
    ]:
        assert_unavailable(client.open(path, method=method, json=body, headers=headers))
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["storage"] == "unavailable"
    assert client.get("/healthz").status_code == 200  # alive, only not ready
    app.extensions["agent_sessions"].storage.close()


@pytest.mark.parametrize("make_path", UNREADABLE, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "args",
    [("agents", "list"), ("keys", "create", "--name", "n", "--admin"), ("keys", "list")],
)
def test_cli_says_unavailable_in_one_line(tmp_path, make_path, args):
    env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{make_path(tmp_path)}"}
    result = cli(*args, env=env, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error") and "unavailable" in lines[0], lines
