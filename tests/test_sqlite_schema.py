"""The SQLite schema: created on first use, migrated from older releases, indexed for use."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import requests
from sqlite_utils.utils import sqlite3

from sessions_app import create_app
from storage_backends import Agent, Conflict, SchemaTooNew, Session, Unavailable
from storage_backends.sql import MIGRATIONS
from storage_backends.sqlite import SCHEMA_VERSION, SQLiteStorage
from tests.conftest import sqlite_integrity
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
    assert user_version(path) == SCHEMA_VERSION == 10
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


def schema_objects(path) -> dict[tuple[str, str], str]:
    """Every index and trigger of the agents and sessions tables: (type, name) to its SQL."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT type, name, sql FROM sqlite_master "
            "WHERE tbl_name IN ('agents', 'sessions') AND type IN ('index', 'trigger')"
        ).fetchall()
    return {(kind, name): sql for kind, name, sql in rows}


def test_a_schema_5_database_is_rebuilt_with_ids_never_reused(tmp_path):
    path = tmp_path / "old.db"
    old_database(path, 5, 0, 7, 0)
    with sqlite3.connect(path) as conn:
        session_ids = dict(conn.execute("SELECT key, id FROM sessions").fetchall())
        stamp = "2026-11-28T12:00:00.000Z"
        conn.executemany(
            "INSERT INTO events (session_id, id, type, created_at, fields) "
            "VALUES (?, ?, 'agent_output', ?, '{}')",
            [(session_ids["s0"], "aev_a", stamp), (session_ids["s2"], "aev_b", stamp)],
        )
    fresh = tmp_path / "fresh.db"
    SQLiteStorage(str(fresh)).check()

    migrated = SQLiteStorage(str(path))
    migrated.check()

    assert user_version(path) == SCHEMA_VERSION == 10
    with sqlite3.connect(path) as conn:
        assert dict(conn.execute("SELECT key, id FROM sessions").fetchall()) == session_ids
        tables = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
        sequence = dict(conn.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
        expiring = conn.execute(
            "SELECT count(*) FROM sessions INDEXED BY idx_sessions_expiring "
            "WHERE expires_at IS NOT NULL"
        ).fetchone()[0]
    assert "AUTOINCREMENT" in tables["agents"] and "AUTOINCREMENT" in tables["sessions"]
    assert not {"agents_rebuilt", "sessions_rebuilt"} & tables.keys()
    assert sequence["sessions"] == max(session_ids.values()) and sequence["agents"] == 1
    # Every index and the trigger, as a database created by this release has them.
    assert schema_objects(path) == schema_objects(fresh)
    assert expiring == 1
    assert sqlite_integrity(path) == "ok"
    # The rows and their events, where they were.
    assert migrated.get_agent(agent_key="bot").name == "bot"
    got = migrated.get_event(agent_key="bot", session_key="s2", event_id="aev_b", now=T0)
    assert got.session_key == "s2"
    with pytest.raises(Conflict):
        write_sessions_again(migrated, "s1")
    # The trigger still takes a session's events with it.
    migrated.delete_session(agent_key="bot", session_key="s0", now=T0)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT id FROM events").fetchall() == [("aev_b",)]
    # The newest session deleted, the next one takes a new id, not its id.
    migrated.delete_session(agent_key="bot", session_key="s2", now=T0)
    write_sessions_again(migrated, "s3")
    with sqlite3.connect(path) as conn:
        new_id = conn.execute("SELECT id FROM sessions WHERE key = 's3'").fetchone()[0]
    assert new_id == max(session_ids.values()) + 1
    migrated.close()


def write_sessions_again(storage: SQLiteStorage, key: str) -> None:
    storage.create_session(
        session=Session(key=key, agent_key="bot", name="n", created_at=T0, updated_at=T0)
    )


def test_a_schema_6_database_gets_its_metadata_index_backfilled(tmp_path):
    from tests.test_postgres_backend import BACKFILL_QUERIES, BACKFILLED

    path = tmp_path / "old.db"
    old_database(path, 6)
    with sqlite3.connect(path) as conn:
        for n, metadata in enumerate(BACKFILLED):
            conn.execute(
                "INSERT INTO sessions (agent_key, key, name, metadata, enabled, tti_minutes, "
                "created_at, updated_at) VALUES ('bot', ?, 'n', ?, 1, 0, ?, ?)",
                [
                    f"s{n}",
                    json.dumps(metadata),
                    "2026-11-28T12:00:00.000Z",
                    "2026-11-28T12:00:00.000Z",
                ],
            )
    storage = SQLiteStorage(str(path))
    try:
        found = {
            query: [
                s.key
                for s in storage.list_sessions(
                    agent_key="bot", limit=10, now=T0, metadata=dict([query])
                ).items
            ]
            for query in BACKFILL_QUERIES
        }
    finally:
        storage.close()
    assert found == BACKFILL_QUERIES
    assert user_version(path) == SCHEMA_VERSION


def test_a_schema_8_database_frees_a_deleted_session_s_events_after_its_deletion(tmp_path):
    path = tmp_path / "old.db"
    old_database(path, 8, 0, 0)
    with sqlite3.connect(path) as conn:
        session_ids = dict(conn.execute("SELECT key, id FROM sessions").fetchall())
        conn.executemany(
            "INSERT INTO events (session_id, id, type, created_at, fields) "
            "VALUES (?, ?, 'agent_output', '2026-11-28T12:00:00.000Z', '{}')",
            [(session_ids["s0"], f"aev_{n}") for n in range(300)] + [(session_ids["s1"], "aev_k")],
        )
    fresh = tmp_path / "fresh.db"
    SQLiteStorage(str(fresh)).check()

    migrated = SQLiteStorage(str(path))
    migrated.delete_session(agent_key="bot", session_key="s0", now=T0)

    assert user_version(path) == SCHEMA_VERSION
    # The trigger that removed the events with their session is gone; the one that notes
    # them for the freeing is there, as in a database this release created.
    assert schema_objects(path) == schema_objects(fresh)
    assert ("trigger", "sessions_delete_events") not in schema_objects(path)
    with sqlite3.connect(path) as conn:
        left = conn.execute("SELECT session_id, count(*) FROM events GROUP BY session_id")
        assert dict(left.fetchall()) == {session_ids["s1"]: 1}
        assert conn.execute("SELECT count(*) FROM released_sessions").fetchone()[0] == 0
    assert sqlite_integrity(path) == "ok"
