"""The operator CLI beyond the basics, through the real console script: exit codes,
every command of the API, --json, export and import, the schema, backup and restore."""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import re
import select
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from storage_backends import Event, Session, storage_from_url
from storage_backends.codec import utcnow
from storage_backends.sql import SCHEMA_VERSION
from tests.conftest import POSTGRES_URL, require_server
from tests.servers import BIN, ROOT, bootstrap, cli, serving

AGENT = "support-bot"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/cli.db"}


def store_of(env: dict[str, str]) -> Any:
    return storage_from_url(env["AGENT_SESSIONS_STORAGE_URL"], {})


def one_error_line(result: subprocess.CompletedProcess, status: int, *words: str) -> str:
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("Error"), result.stderr
    for word in words:
        assert word in message, (word, message)
    return message


def test_version_and_help() -> None:
    version = cli("--version", env={})
    assert version.stdout.startswith("agent-sessions, version ")
    commands = cli("--help", env={}).stdout.split("Commands:", 1)[1].split()
    for name in ("agents", "keys", "sessions", "db", "backup", "restore", "run"):
        assert name in commands
    for hidden in ("shell", "routes", "limiter"):
        assert hidden not in commands
    assert "--app" not in cli("--help", env={}).stdout
    assert "Exit status" in cli("--help", env={}).stdout


def test_exit_codes(env: dict[str, str], tmp_path: Path) -> None:
    empty = store_of(env)
    empty.check()  # an empty database: "not found" is about the record, not the file
    empty.close()
    assert cli("agents", "frobnicate", env=env, check=False).returncode == 2
    assert cli("agents", "create", env=env, check=False).returncode == 2
    one_error_line(cli("agents", "get", "nobody", env=env, check=False), 1, "nobody", "not found")
    bad = {"AGENT_SESSIONS_STORAGE_URL": "foo://x"}
    one_error_line(cli("agents", "list", env=bad, check=False), 3, "configuration")
    missing = tmp_path / "no" / "such" / "dir"
    typo = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{missing}/x.db"}
    one_error_line(cli("agents", "list", env=typo, check=False), 3, "does not exist")
    assert not (tmp_path / "no").exists()


def test_agents_get_update_delete(env: dict[str, str]) -> None:
    cli("agents", "create", AGENT, "--name", "Support", "--description", "Help", env=env)
    got = json.loads(cli("agents", "get", AGENT, "--json", env=env).stdout)
    assert (got["key"], got["name"], got["description"], got["enabled"]) == (
        AGENT,
        "Support",
        "Help",
        True,
    )
    assert "name: Support" in cli("agents", "get", AGENT, env=env).stdout.splitlines()
    cli("agents", "update", AGENT, "--name", "Desk", "--description", "", "--disable", env=env)
    got = json.loads(cli("agents", "get", AGENT, "--json", env=env).stdout)
    assert (got["name"], got["enabled"], "description" in got) == ("Desk", False, False)
    assert cli("agents", "list", env=env).stdout == f"{AGENT}\tDesk\tdisabled\t0\t0\t0\n"
    cli("agents", "update", AGENT, "--enable", env=env)
    assert json.loads(cli("agents", "get", AGENT, "--json", env=env).stdout)["enabled"] is True
    assert cli("agents", "update", AGENT, env=env, check=False).returncode == 2
    one_error_line(cli("agents", "update", AGENT, "--name", " ", env=env, check=False), 1, "--name")

    # No terminal and no --yes: a usage error, and nothing is deleted.
    refused = cli("agents", "delete", AGENT, env=env, check=False)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert cli("agents", "get", AGENT, env=env, check=False).returncode == 0
    assert AGENT in cli("agents", "delete", AGENT, "--yes", env=env).stdout
    assert cli("agents", "get", AGENT, env=env, check=False).returncode == 1
    one_error_line(cli("agents", "delete", AGENT, "--yes", env=env, check=False), 1, "not found")


def test_keys_expires_warnings_and_revoking_twice(env: dict[str, str]) -> None:
    cli("agents", "create", AGENT, "--name", "Support", env=env)
    ok = cli("keys", "create", "--name", "k", "--grant", f"{AGENT}=sessions:read", env=env)
    assert ok.stderr == ""
    ghost = cli("keys", "create", "--name", "g", "--grant", "nobody=sessions:read", env=env)
    assert ghost.stderr.count("\n") == 1 and "nobody" in ghost.stderr
    assert ghost.stderr.startswith("Warning")
    bare = cli("keys", "create", "--name", "bare", env=env)
    assert bare.stderr.startswith("Warning") and "no grant" in bare.stderr
    admin = cli("keys", "create", "--name", "root", "--admin", env=env)
    assert admin.stderr == ""

    expiring = cli(
        "keys", "create", "--name", "e", "--grant", "*=sessions:read", "--expires", "2d", env=env
    )
    key_id = expiring.stdout.splitlines()[-1].partition(".")[0]
    listed = {
        k["id"]: k for k in json.loads(cli("keys", "list", "--json", env=env).stdout)["api_keys"]
    }
    expires = dt.datetime.fromisoformat(listed[key_id]["expires_at"].replace("Z", "+00:00"))
    assert (
        dt.timedelta(days=2) - dt.timedelta(minutes=5) < expires - utcnow() <= dt.timedelta(days=2)
    )
    assert listed[key_id]["state"] == "active"
    when = cli(
        "keys", "create", "--name", "t", "--admin", "--expires", "2999-01-01T00:00:00Z", env=env
    )
    stamped = when.stdout.splitlines()[-1].partition(".")[0]
    listed = {
        k["id"]: k for k in json.loads(cli("keys", "list", "--json", env=env).stdout)["api_keys"]
    }
    assert listed[stamped]["expires_at"] == "2999-01-01T00:00:00.000Z"
    for bad in ("yesterday", "2000-01-01T00:00:00Z", "2030-01-01T00:00:00", "0d"):
        args = ("keys", "create", "--name", "x", "--admin", "--expires", bad)
        one_error_line(cli(*args, env=env, check=False), 1, "--expires")

    first = cli("keys", "revoke", key_id, env=env)
    assert first.stdout.startswith(f"revoked API key {key_id}")
    again = cli("keys", "revoke", key_id, env=env)
    assert again.returncode == 0 and "already revoked" in again.stdout


def make_session(env: dict[str, str], key: str, events: int = 0, name: str | None = None) -> None:
    store = store_of(env)
    try:
        now = utcnow()
        store.create_session(
            session=Session(
                key=key,
                agent_key=AGENT,
                name=name or key,
                metadata={"customer": "c-17"},
                tti_minutes=60,
                created_at=now,
                updated_at=now,
            )
        )
        batch = [
            Event(
                id=f"aev_{key.replace('-', '')}{i}",
                session_key=key,
                type="agent_output" if i % 2 else "input_message",
                fields={"content": f"answer {i}"}
                if i % 2
                else {"messages": [{"type": "text", "content": f"question {i} \u2028\n"}]},
                created_at=now,
            )
            for i in range(events)
        ]
        if batch:
            store.append_events(agent_key=AGENT, session_key=key, events=batch, now=now)
            store.set_event_hidden(
                agent_key=AGENT,
                session_key=key,
                event_id=batch[0].id,
                hide_reason="manual",
                now=now,
            )
    finally:
        store.close()


def test_sessions_list_get_delete(env: dict[str, str]) -> None:
    cli("agents", "create", AGENT, "--name", "Support", env=env)
    make_session(env, "billing", name="Billing question")
    make_session(env, "other", name="Other")
    rows = [
        line.split("\t") for line in cli("sessions", "list", AGENT, env=env).stdout.splitlines()
    ]
    assert [row[:3] for row in rows] == [
        ["billing", "Billing question", "enabled"],
        ["other", "Other", "enabled"],
    ]
    assert all(row[4] != "-" for row in rows)  # tti_minutes=60: an expiry
    found = json.loads(
        cli("sessions", "list", AGENT, "--filter", "(?i)BILL", "--json", env=env).stdout
    )
    assert [s["key"] for s in found["sessions"]] == ["billing"]
    one_error_line(
        cli("sessions", "list", AGENT, "--filter", "(", env=env, check=False), 1, "--filter"
    )
    one_error_line(cli("sessions", "list", "nobody", env=env, check=False), 1, "nobody")
    got = json.loads(cli("sessions", "get", AGENT, "billing", "--json", env=env).stdout)
    assert got["metadata"] == {"customer": "c-17"} and got["tti_minutes"] == 60
    assert cli("sessions", "delete", AGENT, "billing", env=env, check=False).returncode == 2
    cli("sessions", "delete", AGENT, "billing", "--yes", env=env)
    one_error_line(cli("sessions", "get", AGENT, "billing", env=env, check=False), 1, "not found")
    assert json.loads(cli("sessions", "list", AGENT, "--json", env=env).stdout) == {
        "sessions": [json.loads(cli("sessions", "get", AGENT, "other", "--json", env=env).stdout)]
    }


def run_on_terminal(args: list[str], env: dict[str, str], answer: bytes = b"") -> tuple[int, str]:
    """Run the console script with a pseudo-terminal as stdin, stdout and stderr."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [str(BIN / "agent-sessions"), *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        cwd=ROOT,
        env={**os.environ, **env, "COLUMNS": "200"},
    )
    os.close(follower)
    output = b""
    sent = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
            if answer and not sent and b"[y/N]" in output:
                os.write(leader, answer)
                sent = True
        elif process.poll() is not None:
            break
    process.wait(timeout=10)
    os.close(leader)
    return process.returncode, output.decode(errors="replace")


def test_on_a_terminal_lists_have_a_header_and_deletes_ask(env: dict[str, str]) -> None:
    cli("agents", "create", AGENT, "--name", "Support", env=env)
    status, output = run_on_terminal(["agents", "list"], env)
    assert status == 0
    assert output.splitlines()[0].split() == ["KEY", "NAME", "STATE", "SESSIONS", "EVENTS", "BYTES"]
    status, output = run_on_terminal(["agents", "delete", AGENT], env, answer=b"n\n")
    assert status == 1 and "Aborted" in output
    assert cli("agents", "get", AGENT, env=env, check=False).returncode == 0
    status, output = run_on_terminal(["agents", "delete", AGENT], env, answer=b"y\n")
    assert status == 0 and f"deleted agent {AGENT}" in output
    # --json stays one document on a terminal too: no header.
    status, output = run_on_terminal(["agents", "list", "--json"], env)
    assert json.loads(output) == {"agents": []}


def test_export_and_import_round_trip(env: dict[str, str], tmp_path: Path) -> None:
    cli("agents", "create", AGENT, "--name", "Support", env=env)
    cli("agents", "create", "archive", "--name", "Archive", env=env)
    make_session(env, "chat", events=250)
    exported = cli("sessions", "export", AGENT, "chat", env=env).stdout
    lines = [json.loads(line) for line in exported.splitlines()]
    assert lines[0]["session"]["key"] == "chat" and lines[0]["format"] == "agent-sessions/session"
    events = [line["event"] for line in lines[1:-1]]
    assert lines[-1] == {"end": {"events": 250}}
    assert len(events) == 250 and len({e["id"] for e in events}) == 250
    assert events[0]["hide_reason"] == "manual"  # hidden events are exported, marked
    assert all("hide_reason" not in e for e in events[1:])
    assert events[0]["messages"][0]["content"] == "question 0 \u2028\n"
    # Nothing in the file is a raw line separator: one event, one line.
    assert len(exported.splitlines()) == 252

    path = tmp_path / "chat.jsonl"
    path.write_text(exported)
    # Into the same key: refused, nothing written.
    taken = cli("sessions", "import", str(path), env=env, check=False)
    one_error_line(taken, 1, "exists")
    imported = cli("sessions", "import", str(path), "--agent", "archive", env=env)
    assert "250 events" in imported.stdout
    again = cli("sessions", "export", "archive", "chat", env=env).stdout.splitlines()
    original = exported.splitlines()
    assert again[1:] == original[1:]  # every event, its id, time and hide_reason kept
    copied = json.loads(again[0])["session"]
    # The same session, but for its agent and its idle clock, which the import restarted.
    assert copied["active_at"] > lines[0]["session"]["active_at"]
    assert copied | {"agent_key": AGENT, "active_at": None} == lines[0]["session"] | {
        "active_at": None
    }

    # Standard input, under a new key.
    piped = subprocess.run(
        [str(BIN / "agent-sessions"), "sessions", "import", "-", "--key", "copy"],
        input=exported,
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.returncode == 0, piped.stderr


@pytest.mark.parametrize(
    ("mangle", "words"),
    [
        (lambda lines: lines[:-1], ("end line",)),
        (lambda lines: lines[:10], ("end line",)),
        (lambda lines: [*lines[:-1], '{"end": {"events": 3}}'], ("counts",)),
        (lambda lines: [*lines[:5], "{not json", *lines[5:]], ("line 6", "JSON")),
        (
            lambda lines: [*lines[:5], lines[4], *lines[5:-1], '{"end": {"events": 21}}'],
            ("event id",),
        ),
        (lambda lines: [lines[0].replace('"name": "chat"', '"name": " "'), *lines[1:]], ("name",)),
        (lambda lines: [lines[1], *lines], ("line 1",)),
        (
            lambda lines: [
                *lines[:3],
                lines[3].replace('"type": "', '"type": "magic', 1),
                *lines[4:],
            ],
            ("magic",),
        ),
        (
            lambda lines: [
                *lines[:3],
                lines[3].replace('"type": "input_message"', '"type": ["input_message"]', 1),
                *lines[4:],
            ],
            ("type: Must be one of",),
        ),
        (lambda lines: [], ("empty",)),
    ],
)
def test_a_bad_import_stores_nothing(env: dict[str, str], tmp_path: Path, mangle, words) -> None:
    cli("agents", "create", AGENT, "--name", "Support", env=env)
    make_session(env, "chat", events=20)
    lines = cli("sessions", "export", AGENT, "chat", env=env).stdout.splitlines()
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(mangle(lines)) + "\n")
    result = cli("sessions", "import", str(path), "--key", "copy", env=env, check=False)
    one_error_line(result, 1, *words)
    assert cli("sessions", "get", AGENT, "copy", env=env, check=False).returncode == 1


def test_db_status_and_upgrade(env: dict[str, str], tmp_path: Path) -> None:
    status = cli("db", "status", env=env).stdout
    assert "none (no database yet)" in status and "upgrade" in status
    assert not (tmp_path / "cli.db").exists()  # status changes nothing
    upgraded = cli("db", "upgrade", env=env).stdout
    assert f"to {SCHEMA_VERSION}" in upgraded
    status = cli("db", "status", env=env).stdout
    assert f"database schema version: {SCHEMA_VERSION}" in status and "up to date" in status
    assert "pending" not in status
    assert "up to date" in cli("db", "upgrade", env=env).stdout


def test_db_status_on_a_newer_database(env: dict[str, str], tmp_path: Path) -> None:
    from sessions_app.ops.maintenance import sqlite_connect

    cli("db", "upgrade", env=env)
    conn = sqlite_connect(str(tmp_path / "cli.db"))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    one_error_line(cli("db", "status", env=env, check=False), 1, "newer")


@pytest.mark.postgres
def test_postgres_db_status_and_backup_advice(tmp_path: Path) -> None:
    require_server("PostgreSQL", "127.0.0.1", 5432)
    from tests.conftest import postgres_schema

    with postgres_schema() as url:
        env = {"AGENT_SESSIONS_STORAGE_URL": url}
        assert "none (no database yet)" in cli("db", "status", env=env).stdout
        cli("db", "upgrade", env=env)
        assert "up to date" in cli("db", "status", env=env).stdout
        one_error_line(cli("backup", str(tmp_path / "b.db"), env=env, check=False), 1, "pg_dump")
        one_error_line(
            cli("restore", str(tmp_path / "b.db"), env=env, check=False), 1, "pg_restore"
        )
        assert not (tmp_path / "b.db").exists()
    assert POSTGRES_URL


@pytest.mark.slow
def test_backup_under_concurrent_writes_then_restore(tmp_path: Path) -> None:
    """Backed up while 4 workers take writes; restored: every write acknowledged before is there."""
    db_path = tmp_path / "live.db"
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{db_path}",
        "AGENT_SESSIONS_SESSION_CREATE_LIMIT": "1000000/minute",
        "AGENT_SESSIONS_DEFAULT_LIMIT": "1000000/minute",
    }
    token = bootstrap(env, AGENT)
    backup = tmp_path / "backup.db"
    acknowledged: list[tuple[float, str]] = []
    stop = threading.Event()
    with serving(env, tmp_path, workers=4) as server:
        url = f"{server.url}/v2/agents/{AGENT}/sessions"

        def write(worker: int) -> None:
            http = requests.Session()
            n = 0
            while not stop.is_set():
                key = f"w{worker}-{n}"
                n += 1
                response = http.post(
                    url, json={"key": key, "name": key}, headers={"x-api-key": token}, timeout=10
                )
                assert response.status_code == 201, response.text
                acknowledged.append((time.monotonic(), key))

        threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.5)
            started = time.monotonic()
            result = cli("backup", str(backup), env=env, check=False)
            finished = time.monotonic()
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        assert result.returncode == 0, result.stderr
        # The database is in use: restore refuses, and says what to do.
        busy = cli("restore", str(backup), "--yes", env=env, check=False)
        one_error_line(busy, 1, "in use", "stop the server")

    before = {key for at, key in acknowledged if at < started}
    after = {key for at, key in acknowledged if at > finished}
    assert len(before) > 50 and after, (len(before), len(after))
    copy = storage_from_url(f"sqlite:///{backup}", {})
    try:
        in_backup = {s.key for s in _all_sessions(copy)}
    finally:
        copy.close()
    assert before <= in_backup  # every write acknowledged before the backup began
    assert in_backup <= {key for _, key in acknowledged}  # and nothing that was not written

    restored = cli("restore", str(backup), "--yes", env=env)
    assert restored.returncode == 0
    store = store_of(env)
    try:
        live = {s.key for s in _all_sessions(store)}
        assert live == in_backup  # the restore replaced the database whole
        assert store.get_agent(agent_key=AGENT).key == AGENT
    finally:
        store.close()
    # Served again after the restore, with the keys the backup holds.
    with serving(env, tmp_path, workers=2) as server:
        listed = requests.get(
            f"{server.url}/v2/agents/{AGENT}/sessions?limit=1",
            headers={"x-api-key": token},
            timeout=10,
        )
        assert listed.status_code == 200


def _all_sessions(store: Any) -> list[Any]:
    found, after = [], None
    while True:
        page = store.list_sessions(agent_key=AGENT, limit=100, now=utcnow(), after=after)
        found += page.items
        if page.next_cursor is None:
            return found
        after = page.next_cursor


def test_backup_refusals(env: dict[str, str], tmp_path: Path) -> None:
    one_error_line(cli("backup", str(tmp_path / "b.db"), env=env, check=False), 1, "does not exist")
    cli("agents", "create", AGENT, "--name", "Support", env=env)
    target = tmp_path / "b.db"
    cli("backup", str(target), env=env)
    one_error_line(cli("backup", str(target), env=env, check=False), 1, "exists")
    one_error_line(
        cli("backup", str(tmp_path / "x" / "b.db"), env=env, check=False), 1, "directory"
    )
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    one_error_line(cli("restore", str(junk), "--yes", env=env, check=False), 1, "not a SQLite")
    one_error_line(cli("restore", str(tmp_path / "none.db"), "--yes", env=env, check=False), 1)
    assert (
        cli("restore", str(target), env=env, check=False).returncode == 2
    )  # no --yes, no terminal
    # A backup holds everything, also what is still in the WAL.
    cli("keys", "create", "--name", "k", "--admin", env=env)
    newer = tmp_path / "newer.db"
    cli("backup", str(newer), env=env)
    assert not Path(str(newer) + "-wal").exists()
    copy = storage_from_url(f"sqlite:///{newer}", {})
    try:
        assert [k.name for k in copy.list_api_keys(limit=10).items] == ["k"]
    finally:
        copy.close()


def _event_at(lines: list[str], index: int, change: Any) -> list[str]:
    """``lines`` with the event on line ``index`` replaced by ``change(event)``."""
    event = json.loads(lines[index])["event"]
    return [*lines[:index], json.dumps({"event": change(event)}), *lines[index + 1 :]]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        # What the API refuses in a request body, an import refuses too.
        (lambda e: {**e, "messages": [{"type": "text", "content": "a\u0000b"}]}, ("NUL",)),
        (lambda e: {**e, "messages": [{"type": "text", "content": "a\ud800b"}]}, ("surrogate",)),
        (lambda e: {**e, "messages": [{"type": "text", "content": "x"}] * 101}, ("messages",)),
        (lambda e: {**e, "messages": [{"type": "image", "content": "x"}]}, ("messages.0.type",)),
        (lambda e: {**e, "session_key": "elsewhere"}, ("session_key", "Unknown")),
        (lambda e: {**e, "bogus": 1}, ("bogus", "Unknown")),
        (lambda e: {**e, "metadata": [1]}, ("metadata", "object")),
        (lambda e: {**e, "metadata": {"k" * 129: 1}}, ("metadata", "Keys")),
        (
            lambda e: {"id": e["id"], "type": "agent_output", "created_at": e["created_at"]},
            ("content",),
        ),
        (
            lambda e: {**e, "messages": [{"type": "text", "content": "x" * 300_000}]},
            ("262144",),
        ),
        (
            lambda e: {
                "id": e["id"],
                "type": "compaction",
                "created_at": e["created_at"],
                "turns_compacted": "many",
                "events_compacted": 1,
                "summary_text": "s",
                "summary_key": "k",
            },
            ("turns_compacted",),
        ),
    ],
)
def test_an_import_checks_each_event_as_the_api_does(
    env: dict[str, str], tmp_path: Path, change, words
) -> None:
    cli("agents", "create", AGENT, "--name", "Support", env=env)
    make_session(env, "chat", events=5)
    lines = cli("sessions", "export", AGENT, "chat", env=env).stdout.splitlines()
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(_event_at(lines, 3, change)) + "\n", errors="surrogatepass")
    result = cli("sessions", "import", str(path), "--key", "copy", env=env, check=False)
    one_error_line(result, 1, "line 4", *words)
    assert cli("sessions", "get", AGENT, "copy", env=env, check=False).returncode == 1


def test_an_events_metadata_is_exported_and_imported(env: dict[str, str], tmp_path: Path) -> None:
    cli("agents", "create", AGENT, "--name", "Support", env=env)
    make_session(env, "chat", events=3)
    lines = cli("sessions", "export", AGENT, "chat", env=env).stdout.splitlines()
    meta = {"adk": {"invocation_id": "i-1"}, "author": "user"}
    lines = _event_at(lines, 2, lambda e: {**e, "metadata": meta})
    path = tmp_path / "meta.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cli("sessions", "import", str(path), "--key", "copy", env=env)
    again = cli("sessions", "export", AGENT, "copy", env=env).stdout.splitlines()
    events = [json.loads(line)["event"] for line in again[1:-1]]
    assert events[1]["metadata"] == meta
    assert all("metadata" not in e for i, e in enumerate(events) if i != 1)
    assert [json.loads(x) for x in again[1:]] == [json.loads(x) for x in lines[1:]]


def test_an_export_with_compactions_and_interruptions_imports_unchanged(
    env: dict[str, str], tmp_path: Path
) -> None:
    cli("agents", "create", AGENT, "--name", "Support", env=env)
    make_session(env, "chat", events=5)
    store = store_of(env)
    try:
        now = utcnow()
        steer = {"messages": [{"type": "text", "content": "stop"}], "behavior": "steer"}
        store.append_events(
            agent_key=AGENT,
            session_key="chat",
            events=[
                Event(
                    id="aev_int1",
                    session_key="chat",
                    type="session_interrupted",
                    fields={},
                    created_at=now,
                ),
                Event(
                    id="aev_steer1",
                    session_key="chat",
                    type="input_message",
                    fields=steer,
                    created_at=now,
                ),
            ],  # fmt: skip
            now=now,
        )
        summary = {"summary_text": "sum", "summary_key": "aev_sum1"}
        compaction = Event(
            id="aev_sum1", session_key="chat", type="compaction", fields=summary, created_at=now
        )
        store.compact_events(
            agent_key=AGENT, session_key="chat", up_to_event_id=None, compaction=compaction, now=now
        )
    finally:
        store.close()
    exported = cli("sessions", "export", AGENT, "chat", env=env).stdout
    path = tmp_path / "chat.jsonl"
    path.write_text(exported)
    assert '"type": "compaction"' in exported and '"hide_reason": "compaction"' in exported
    assert '"type": "session_interrupted"' in exported and '"behavior": "steer"' in exported
    cli("sessions", "import", str(path), "--key", "copy", env=env)
    again = cli("sessions", "export", AGENT, "copy", env=env).stdout.splitlines()
    assert again[1:] == exported.splitlines()[1:]


@pytest.mark.parametrize(
    ("change", "args", "words"),
    [
        (lambda s: {k: v for k, v in s.items() if k != "key"}, (), ("no key", "--key")),
        (lambda s: {**s, "forked_from": {"x": "y"}}, ("--key", "copy"), ("forked_from",)),
        (lambda s: {**s, "forked_from": {}}, ("--key", "copy"), ("forked_from",)),
        (
            lambda s: {**s, "forked_from": {"agent_key": AGENT, "session_key": 3}},
            ("--key", "copy"),
            ("forked_from",),
        ),
    ],
    ids=["no-key", "forked-from-unknown", "forked-from-empty", "forked-from-not-string"],
)
def test_an_import_refuses_a_session_line_the_api_could_not_answer(
    env: dict[str, str], tmp_path: Path, change, args, words
) -> None:
    cli("agents", "create", AGENT, "--name", "Support", env=env)
    make_session(env, "chat", events=1)
    lines = cli("sessions", "export", AGENT, "chat", env=env).stdout.splitlines()
    first = json.loads(lines[0])
    first["session"] = change(first["session"])
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    result = cli("sessions", "import", str(path), *args, env=env, check=False)
    one_error_line(result, 1, "line 1", *words)
    assert "Traceback" not in result.stderr
    listed = cli("sessions", "list", AGENT, "--json", env=env).stdout
    assert [s["key"] for s in json.loads(listed)["sessions"]] == ["chat"]


def _database_with_agent(path: Path, agent: str) -> None:
    from storage_backends import Agent

    store = storage_from_url(f"sqlite:///{path}", {})
    try:
        now = utcnow()
        store.create_agent(agent=Agent(key=agent, name=agent, created_at=now, updated_at=now))
    finally:
        store.close()


def _agents_in(path: Path) -> list[str]:
    store = storage_from_url(f"sqlite:///{path}", {})
    try:
        return [a.key for a in store.list_agents(limit=10).items]
    finally:
        store.close()


@pytest.mark.parametrize(
    "mark", ["#", "?", "%41", " "], ids=["hash", "question", "percent", "space"]
)
def test_backup_and_restore_open_the_file_named_whatever_it_holds(
    tmp_path: Path, mark: str
) -> None:
    """A path is quoted where it becomes a SQLite URI: '#', '?', '%' and ' ' open that file."""
    from sessions_app.ops import maintenance

    live, backup = tmp_path / f"prod{mark}1.db", tmp_path / f"good{mark}copy.db"
    _database_with_agent(live, "from-live")
    maintenance.sqlite_backup(str(live), str(backup))
    assert _agents_in(backup) == ["from-live"]
    assert maintenance.check_backup(str(backup)) == SCHEMA_VERSION
    other = tmp_path / f"other{mark}2.db"
    _database_with_agent(other, "from-other")
    maintenance.sqlite_restore(str(backup), str(other))
    assert _agents_in(other) == ["from-live"]
    # Nothing beside them: no empty file named after the part before the mark.
    names = {p.name for p in tmp_path.iterdir()}
    assert {n.split(mark)[0].split(".")[0] for n in names} == {"prod", "good", "other"}, names
    assert all(mark in name for name in names), names


def test_backup_and_restore_of_a_path_with_a_hash_through_the_cli(tmp_path: Path) -> None:
    live = tmp_path / "prod#1.db"
    env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{live}"}
    cli("agents", "create", AGENT, "--name", "Support", env=env)
    backup = tmp_path / "good#copy.db"
    assert "integrity ok" in cli("backup", str(backup), env=env).stdout
    assert _agents_in(backup) == [AGENT]
    cli("agents", "delete", AGENT, "--yes", env=env)
    restored = cli("restore", str(backup), "--yes", env=env)
    assert f"restored {backup}" in restored.stdout
    assert json.loads(cli("agents", "get", AGENT, "--json", env=env).stdout)["key"] == AGENT
    assert not (tmp_path / "prod").exists() and not (tmp_path / "good").exists()


READING_COMMANDS = [
    ["agents", "list"],
    ["agents", "get", AGENT],
    ["agents", "update", AGENT, "--name", "Desk"],
    ["agents", "delete", AGENT, "--yes"],
    ["keys", "list", "--json"],
    ["keys", "revoke", "ak_0123456789abcdef", "--yes"],
    ["sessions", "list", AGENT],
    ["sessions", "get", AGENT, "chat"],
    ["sessions", "delete", AGENT, "chat", "--yes"],
    ["sessions", "export", AGENT, "chat"],
    ["sessions", "purge-expired"],
    ["backup", "{elsewhere}/copy.db"],
]


def test_commands_on_records_refuse_a_database_that_does_not_exist(tmp_path: Path) -> None:
    """A mistyped path is refused, not made into a new empty database (only creates make one)."""
    from sessions_app import create_app

    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    export = elsewhere / "chat.jsonl"
    export.write_text('{"format": "agent-sessions/session"}\n')
    app = create_app({"TESTING": True, "STORAGE_URL": f"sqlite:///{data}/typo.db"})
    runner = app.test_cli_runner()
    for args in [*READING_COMMANDS, ["sessions", "import", str(export)]]:
        args = [arg.format(elsewhere=elsewhere) for arg in args]
        result = runner.invoke(args=args)
        assert result.exit_code == 1, (args, result.output, result.stderr)
        assert result.stderr.count("\n") == 1, (args, result.stderr)
        assert f"{data}/typo.db does not exist" in result.stderr, (args, result.stderr)
        assert list(data.iterdir()) == [], args  # nothing made: no database, no -wal, no -writer
    assert sorted(p.name for p in elsewhere.iterdir()) == ["chat.jsonl"]
    # What makes a database still does; then the same commands read it.
    assert runner.invoke(args=["agents", "create", AGENT, "--name", "Support"]).exit_code == 0
    listed = runner.invoke(args=["agents", "list"])
    assert listed.exit_code == 0 and listed.output.startswith(AGENT)
    app.extensions["agent_sessions"].storage.close()


def test_a_missing_database_through_the_console_script(tmp_path: Path) -> None:
    env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/sesions.db"}
    message = one_error_line(cli("agents", "list", env=env, check=False), 1, "does not exist")
    assert f"{tmp_path}/sesions.db" in message and "STORAGE_URL" in message
    assert list(tmp_path.iterdir()) == []
    assert "none (no database yet)" in cli("db", "status", env=env).stdout
    assert list(tmp_path.iterdir()) == []


def progress_on_a_terminal(args: list[str], env: dict[str, str], out: Path) -> str:
    """Run the console script with standard error on a pseudo-terminal, standard output
    into ``out``; return what the terminal showed."""
    leader, follower = pty.openpty()
    with open(out, "wb") as stdout:
        process = subprocess.Popen(
            [str(BIN / "agent-sessions"), *args],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=follower,
            cwd=ROOT,
            env={**os.environ, **env, "COLUMNS": "200"},
        )
    os.close(follower)
    shown = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        try:
            chunk = os.read(leader, 65536) if ready else b""
        except OSError:  # the other end closed
            chunk = b""
        if not chunk:
            break
        shown += chunk
    assert process.wait(timeout=60) == 0, shown
    os.close(leader)
    return shown.decode(errors="replace")


def test_export_and_import_show_the_total_and_the_rate_on_a_terminal(
    env: dict[str, str], tmp_path: Path
) -> None:
    cli("agents", "create", AGENT, "--name", "Support", env=env)
    make_session(env, "chat", events=250)
    exported = tmp_path / "chat.jsonl"
    shown = progress_on_a_terminal(["sessions", "export", AGENT, "chat"], env, exported)
    assert re.search(r"exporting chat +\[#+\] +250/250 +100% +[\d,]+ events/s", shown), shown
    assert "exported session chat with 250 events" in shown
    assert exported.read_text().count("\n") == 252  # standard output holds the export alone
    shown = progress_on_a_terminal(
        ["sessions", "import", str(exported), "--key", "copy"], env, tmp_path / "out"
    )
    # The total from the file's end line, before the import reaches it.
    assert re.search(r"importing copy +\[-+\] +0/250 +0%", shown), shown
    assert re.search(r"importing copy +\[#+\] +250/250 +100% +[\d,]+ events/s", shown), shown
    # Piped, neither shows anything on standard error.
    assert cli("sessions", "export", AGENT, "copy", env=env).stderr == ""
