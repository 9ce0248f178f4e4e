"""The SQLite schema: created on first use, migrated from older releases, indexed for use."""

from __future__ import annotations

import datetime as dt

import pytest
import requests
from sqlite_utils.utils import sqlite3

from sessions_app import create_app
from storage_backends import Agent, SchemaTooNew, Session, Unavailable
from storage_backends.sql import MIGRATIONS
from storage_backends.sqlite import SCHEMA_VERSION, SQLiteStorage
from tests.servers import cli

T0 = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def indexes(path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'sessions'"
            )
        }


def user_version(path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def write_sessions(storage: SQLiteStorage, *tti: int) -> None:
    storage.create_agent(agent=Agent(key="bot", name="bot", created_at=T0, updated_at=T0))
    for n, minutes in enumerate(tti):
        storage.create_session(
            session=Session(
                key=f"s{n}",
                agent_key="bot",
                name="n",
                tti_minutes=minutes,
                created_at=T0,
                updated_at=T0,
            )
        )


def old_database(path, version: int, *tti: int) -> None:
    """A database as the release at schema ``version`` left it, with an agent and sessions.

    Built by that release's own migrations (the first ``version`` of the list,
    which only ever grows at its end), with rows of the columns it had.
    """
    with sqlite3.connect(path) as conn:
        for migration in MIGRATIONS[:version]:
            for statement in migration.sqlite:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version}")
        stamp = "2026-11-28T12:00:00.000Z"
        conn.execute(
            "INSERT INTO agents (key, name, metadata, enabled, created_at, updated_at) "
            "VALUES ('bot', 'bot', '{}', 1, ?, ?)",
            [stamp, stamp],
        )
        for n, minutes in enumerate(tti):
            conn.execute(
                "INSERT INTO sessions (agent_key, key, name, metadata, enabled, tti_minutes, "
                "created_at, updated_at, expires_at) VALUES ('bot', ?, 'n', '{}', 1, ?, ?, ?, ?)",
                [
                    f"s{n}",
                    minutes,
                    stamp,
                    stamp,
                    f"2026-11-28T12:{minutes:02}:00.000Z" if minutes else None,
                ],
            )


def test_a_schema_1_database_is_migrated_and_keeps_its_sessions(tmp_path):
    path = tmp_path / "old.db"
    # What release 1 left behind: every session in the expires_at index, user_version 1.
    old_database(path, 1, 0, 5, 0)
    assert "idx_sessions_expires_at" in indexes(path)

    migrated = SQLiteStorage(str(path))
    page = migrated.list_sessions(agent_key="bot", limit=10, now=T0)

    assert [s.key for s in page.items] == ["s0", "s1", "s2"]
    assert user_version(path) == SCHEMA_VERSION == 5
    with sqlite3.connect(path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"console_sessions", "idx_console_sessions_expires_at"} <= tables
    assert "idx_sessions_expires_at" not in indexes(path)
    assert "idx_sessions_expiring" in indexes(path)
    assert migrated.purge_expired_sessions(now=T0 + dt.timedelta(minutes=5)) == 1
    assert [s.key for s in migrated.list_sessions(agent_key="bot", limit=10, now=T0).items] == [
        "s0",
        "s2",
    ]


def test_the_sweep_reads_the_partial_index_which_holds_only_expiring_sessions(tmp_path):
    path = tmp_path / "s.db"
    storage = SQLiteStorage(str(path))
    write_sessions(storage, 0, 0, 3)
    with sqlite3.connect(path) as conn:
        plan = " ".join(
            str(row[-1])
            for row in conn.execute(
                "EXPLAIN QUERY PLAN DELETE FROM sessions "
                "WHERE expires_at IS NOT NULL AND expires_at <= ?",
                ["2027-01-01T00:00:00.000Z"],
            )
        )
        indexed = conn.execute(
            "SELECT count(*) FROM sessions INDEXED BY idx_sessions_expiring "
            "WHERE expires_at IS NOT NULL"
        ).fetchone()[0]
    assert "idx_sessions_expiring" in plan
    assert indexed == 1


def test_a_database_from_a_newer_release_is_refused_not_written(tmp_path):
    path = tmp_path / "new.db"
    storage = SQLiteStorage(str(path))
    write_sessions(storage, 0)
    storage.close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    newer = SQLiteStorage(str(path))
    with pytest.raises(SchemaTooNew, match="newer than this release"):
        newer.check()
    with pytest.raises(Unavailable):
        newer.create_agent(agent=Agent(key="x", name="x", created_at=T0, updated_at=T0))
    newer.close()
    assert user_version(path) == SCHEMA_VERSION + 1


def test_a_newer_database_is_one_line_from_the_cli_and_503_from_readyz(tmp_path):
    path = tmp_path / "new.db"
    SQLiteStorage(str(path)).check()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    url = f"sqlite:///{path}"

    result = cli("agents", "list", env={"AGENT_SESSIONS_STORAGE_URL": url}, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "newer than this release" in result.stderr

    app = create_app({"TESTING": True, "STORAGE_URL": url})
    try:
        response = app.test_client().get("/readyz")
    finally:
        app.extensions["agent_sessions"].storage.close()
    assert response.status_code == 503
    assert response.get_json()["storage"] == "unavailable"


def test_the_server_logs_once_that_it_made_a_new_database(tmp_path):
    """A new, empty database is a line in the error log, with its path; an existing one is not."""
    from tests.servers import serving

    path = tmp_path / "fresh.db"
    env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{path}"}
    with serving(env, tmp_path, workers=2) as server:
        for _ in range(4):  # each worker opens the database
            assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200
        logs = server.logs()
    made = [line for line in logs.splitlines() if "new, empty database" in line]
    assert len(made) == 1, logs
    assert "[WARNING]" in made[0] and str(path) in made[0]
    assert user_version(path) == SCHEMA_VERSION
    with serving(env, tmp_path, workers=1) as server:
        assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200
        again = server.logs()
    assert "storage: SQLite" in again and "new, empty database" not in again
