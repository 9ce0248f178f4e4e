"""PostgreSQL backend specifics: query plans and the pool's handling of dead connections."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time

import psycopg
import pytest

from storage_backends import Agent, Event, SchemaTooNew, Session, storage_from_url
from storage_backends.postgres import SCHEMA_VERSION, SESSION_PAGE
from storage_backends.sql import MIGRATIONS

from .conftest import postgres_schema, require_server

pytestmark = pytest.mark.postgres

T0 = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def test_a_page_reads_the_agent_index_in_order_before_any_statistics():
    require_server("PostgreSQL", "127.0.0.1", 5432)
    with postgres_schema() as url:
        storage = storage_from_url(url, {})
        try:
            for agent in ("bot", "big"):
                storage.create_agent(
                    agent=Agent(key=agent, name=agent, created_at=T0, updated_at=T0)
                )
            with storage._connection() as conn:
                insert = (
                    "INSERT INTO sessions (agent_key, key, name, metadata, enabled, tti_minutes, "
                    "created_at, updated_at) SELECT %s, 's' || n, 'n', '{}', true, 0, %s, %s "
                    "FROM generate_series(0, %s) AS n"
                )
                # A fresh table that autovacuum has not analyzed yet, with agents
                # far bigger than the planner's default guess.
                conn.execute(insert, ["big", T0, T0, 20000])
                conn.execute(insert, ["bot", T0, T0, 20000])
                query = f"EXPLAIN {SESSION_PAGE} LIMIT %s"
                plan = "\n".join(row[0] for row in conn.execute(query, ["bot", 0, T0, 11]))
            page = storage.list_sessions(agent_key="bot", limit=10, now=T0)
        finally:
            storage.close()
    assert "Index Scan using sessions_agent_id" in plan, plan
    assert "Sort" not in plan and "Bitmap" not in plan, plan
    assert [s.key for s in page.items] == [f"s{n}" for n in range(10)]


def test_a_connection_the_server_ended_is_replaced_at_checkout_without_a_failure():
    require_server("PostgreSQL", "127.0.0.1", 5432)
    with postgres_schema() as url:
        storage = storage_from_url(url, {"POSTGRES_POOL_MIN": 1, "POSTGRES_POOL_MAX": 1})
        try:
            storage.create_agent(agent=Agent(key="bot", name="bot", created_at=T0, updated_at=T0))
            with storage._connection() as conn:
                pid = conn.info.backend_pid
            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", [pid])
                # The server ends the session and closes the socket; wait until it has.
                for _ in range(100):
                    gone = admin.execute(
                        "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = %s", [pid]
                    ).fetchone()[0]
                    if gone:
                        break
                    time.sleep(0.02)
            # The pool's only connection is dead; the next call gets a new one.
            assert storage.get_agent(agent_key="bot").name == "bot"
            with storage._connection() as conn:
                assert conn.info.backend_pid != pid
        finally:
            storage.close()


def test_a_schema_1_database_moves_its_json_to_text_as_written_and_keeps_its_rows():
    require_server("PostgreSQL", "127.0.0.1", 5432)
    with postgres_schema() as url:
        # What release 1 left behind: jsonb columns, version 1 recorded.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for statement in MIGRATIONS[0].postgres:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (1)")
            conn.execute(
                "INSERT INTO agents (key, name, metadata, enabled, created_at, updated_at) "
                "VALUES ('bot', 'bot', '{\"b\": 1, \"a\": 2}', true, %s, %s)",
                [T0, T0],
            )
        storage = storage_from_url(url, {})
        try:
            assert storage.get_agent(agent_key="bot").metadata == {"a": 2, "b": 1}
            metadata = {"z": -0.0, "a": 1e16}
            storage.create_agent(
                agent=Agent(key="new", name="n", metadata=metadata, created_at=T0, updated_at=T0)
            )
            metadata = storage.get_agent(agent_key="new").metadata
        finally:
            storage.close()
        with psycopg.connect(url, autocommit=True) as conn:
            versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
            types = dict(
                conn.execute(
                    "SELECT table_name || '.' || column_name, data_type FROM "
                    "information_schema.columns WHERE table_schema = current_schema() "
                    "AND column_name IN ('metadata', 'grants')"
                ).fetchall()
            )
            text = conn.execute("SELECT metadata::text FROM agents WHERE key = 'new'").fetchone()
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert types == {
        "agents.metadata": "json",
        "sessions.metadata": "json",
        "api_keys.grants": "json",
    }
    # Stored as written: key order and the sign of zero kept, as SQLite keeps them.
    assert text[0] == '{"z":-0.0,"a":1e+16}'
    assert list(metadata) == ["z", "a"] and str(metadata["z"]) == "-0.0"


def test_a_database_migrated_by_a_newer_release_is_refused():
    require_server("PostgreSQL", "127.0.0.1", 5432)
    with postgres_schema() as url:
        storage = storage_from_url(url, {})
        storage.check()
        storage.close()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO schema_migrations (version) VALUES (%s)", [SCHEMA_VERSION + 1]
            )
        newer = storage_from_url(url, {})
        try:
            with pytest.raises(SchemaTooNew, match="newer than this release"):
                newer.check()
        finally:
            newer.close()


def _event(n: int, kind: str) -> Event:
    fields = {"messages": [{"type": "text", "content": f"in {n}"}]}
    if kind != "input_message":
        fields = {"content": f"out {n}"}
    return Event(id=f"aev_{n}", session_key="", type=kind, fields=fields, created_at=T0)


def _waiting_on_sessions(url: str, schema: str) -> bool:
    """Whether a backend waits for a row of the schema's sessions table (a row lock)."""
    with psycopg.connect(url, autocommit=True) as conn:
        return (
            conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                "WHERE l.locktype = 'tuple' AND l.relation = %s::regclass "
                "AND a.wait_event_type = 'Lock'",
                [f"{schema}.sessions"],
            ).fetchone()[0]
            > 0
        )


@pytest.mark.parametrize("in_unit", [False, True], ids=["alone", "in-atomic"])
def test_a_fork_reads_its_source_whole_while_a_compaction_commits(monkeypatch, in_unit):
    """A compaction of the source between the fork's statements: the fork holds the
    history from before it or from after it, each whole, never a mix."""
    require_server("PostgreSQL", "127.0.0.1", 5432)
    with postgres_schema() as url:
        schema = url.rsplit("%3D", 1)[1]
        storage = storage_from_url(url, {})
        try:
            storage.create_agent(agent=Agent(key="bot", name="bot", created_at=T0, updated_at=T0))
            storage.create_session(
                session=Session(key="src", agent_key="bot", name="n", created_at=T0, updated_at=T0)
            )
            kinds = ("input_message", "agent_output", "input_message", "agent_output")
            events = [_event(n, kind) for n, kind in enumerate(kinds, start=1)]
            storage.append_events(agent_key="bot", session_key="src", events=events, now=T0)
            summary = {"summary_text": "the first turn", "summary_key": "aev_sum"}
            compaction = Event("aev_sum", "", "compaction", summary, T0)
            compacted = threading.Event()

            def compact() -> None:
                storage.compact_events(
                    agent_key="bot",
                    session_key="src",
                    up_to_event_id=None,
                    compaction=compaction,
                    now=T0,
                )
                compacted.set()

            insert = storage._insert_session
            worker = threading.Thread(target=compact)

            def paused(conn, session):
                # Between reading the source's last event and copying its history.
                worker.start()
                deadline = time.monotonic() + 10
                while not compacted.is_set() and not _waiting_on_sessions(url, schema):
                    assert time.monotonic() < deadline, "the compaction neither ran nor waited"
                    time.sleep(0.02)
                return insert(conn, session)

            monkeypatch.setattr(storage, "_insert_session", paused)
            fork = Session(key="fork", agent_key="bot", name="fork", created_at=T0, updated_at=T0)
            with storage.atomic() if in_unit else contextlib.nullcontext():
                forked = storage.fork_session(
                    session=fork, source_agent_key="bot", source_session_key="src"
                )
            worker.join(10)
            assert compacted.is_set()
            copied = list(storage.iter_events(agent_key="bot", session_key="fork", now=T0))
        finally:
            storage.close()
    ids = [e.id for e in copied]
    assert ids in (["aev_1", "aev_2", "aev_3", "aev_4"], ["aev_3", "aev_4", "aev_sum"])
    assert forked.forked_from == {"agent_key": "bot", "session_key": "src", "event_id": ids[-1]}
    assert all(e.hide_reason is None for e in copied)
    if "aev_sum" in ids:
        assert copied[-1].fields["summary_text"] == "the first turn"


def test_a_schema_6_database_gets_its_metadata_index_backfilled():
    require_server("PostgreSQL", "127.0.0.1", 5432)
    with postgres_schema() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for migration in MIGRATIONS[:6]:
                for statement in migration.postgres:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version) VALUES (%s)", [migration.version]
                )
            conn.execute(
                "INSERT INTO agents (key, name, metadata, enabled, created_at, updated_at) "
                "VALUES ('bot', 'bot', '{}', true, %s, %s)",
                [T0, T0],
            )
            for n, metadata in enumerate(BACKFILLED):
                conn.execute(
                    "INSERT INTO sessions (agent_key, key, name, metadata, enabled, tti_minutes, "
                    "created_at, updated_at) VALUES ('bot', %s, 'n', %s, true, 0, %s, %s)",
                    [f"s{n}", json.dumps(metadata), T0, T0],
                )
        storage = storage_from_url(url, {})
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


# Sessions an older release stored, and what their backfilled index finds.
BACKFILLED = [
    {"user_id": "u-17", "n": 17},
    {"user_id": "u-18", "n": 17.5, "flag": True},
    {"user_id": "u-17", "long": "x" * 300, "obj": {"user_id": "u-17"}},
    {},
]
BACKFILL_QUERIES = {
    ("user_id", "u-17"): ["s0", "s2"],
    ("n", "17"): ["s0"],
    ("n", "17.5"): ["s1"],
    ("flag", "true"): ["s1"],
    ("long", "x" * 300): ["s2"],
    ("obj", "{}"): [],
}


def test_a_metadata_page_reads_the_lookup_index_in_order():
    require_server("PostgreSQL", "127.0.0.1", 5432)
    from storage_backends.sql.dialect import to_pyformat
    from storage_backends.sql.schema import METADATA_PAGE

    with postgres_schema() as url:
        storage = storage_from_url(url, {})
        try:
            storage.create_agent(agent=Agent(key="bot", name="bot", created_at=T0, updated_at=T0))
            with storage._connection() as conn:
                conn.execute(
                    "INSERT INTO sessions (agent_key, key, name, metadata, enabled, tti_minutes, "
                    "created_at, updated_at) SELECT 'bot', 's' || n, 'n', "
                    "json_build_object('user_id', 'u-' || mod(n, 100)), true, 0, %s, %s "
                    "FROM generate_series(0, 20000) AS n",
                    [T0, T0],
                )
                storage._index_sessions_after(conn, 0)
                plan = "\n".join(
                    row[0]
                    for row in conn.execute(
                        "EXPLAIN " + to_pyformat(METADATA_PAGE),
                        ["bot", "user_id", "u-7", 0, T0, 11],
                    )
                )
            page = storage.list_sessions(
                agent_key="bot", limit=10, now=T0, metadata={"user_id": "u-7"}
            )
        finally:
            storage.close()
    assert "session_metadata_lookup" in plan, plan
    assert "Sort" not in plan and "Seq Scan" not in plan, plan
    assert [s.key for s in page.items] == [f"s{n}" for n in range(7, 1000, 100)]


def test_a_schema_8_database_frees_a_deleted_session_s_events_after_its_deletion():
    require_server("PostgreSQL", "127.0.0.1", 5432)
    with postgres_schema() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for migration in MIGRATIONS[:8]:
                for statement in migration.postgres:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version) VALUES (%s)", [migration.version]
                )
            conn.execute(
                "INSERT INTO agents (key, name, metadata, enabled, created_at, updated_at) "
                "VALUES ('bot', 'bot', '{}', true, %s, %s)",
                [T0, T0],
            )
            ids = {}
            for key in ("gone", "kept"):
                ids[key] = conn.execute(
                    "INSERT INTO sessions (agent_key, key, name, metadata, enabled, tti_minutes, "
                    "created_at, updated_at) VALUES ('bot', %s, 'n', '{}', true, 0, %s, %s) "
                    "RETURNING id",
                    [key, T0, T0],
                ).fetchone()[0]
            for n in range(300):
                conn.execute(
                    "INSERT INTO events (session_id, id, type, created_at, fields) "
                    "VALUES (%s, %s, 'agent_output', %s, '{}')",
                    [ids["gone" if n else "kept"], f"aev_{n}", T0],
                )
        storage = storage_from_url(url, {})
        try:
            storage.delete_session(agent_key="bot", session_key="gone", now=T0)
        finally:
            storage.close()
        with psycopg.connect(url, autocommit=True) as conn:
            left = dict(conn.execute("SELECT session_id, count(*) FROM events GROUP BY 1"))
            notes = conn.execute("SELECT count(*) FROM released_sessions").fetchone()[0]
            # No cascade from sessions to events any more: the trigger notes, the freeing deletes.
            references = conn.execute(
                "SELECT count(*) FROM pg_constraint WHERE contype = 'f' "
                "AND conrelid = 'events'::regclass"
            ).fetchone()[0]
            triggers = [
                row[0]
                for row in conn.execute(
                    "SELECT tgname FROM pg_trigger WHERE tgrelid = 'sessions'::regclass "
                    "AND NOT tgisinternal"
                )
            ]
    assert left == {ids["kept"]: 1}
    assert notes == 0
    assert references == 0
    # The usage triggers of migration 10 beside it; none deletes events.
    assert sorted(triggers) == [
        "sessions_delete_usage",
        "sessions_insert_usage",
        "sessions_release_events",
        "sessions_update_usage",
    ]
