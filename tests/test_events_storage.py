"""Session events in the SQL backends: the migration from schema 2, concurrent
writers of one history, and the query plans that keep a page's cost flat.
"""

from __future__ import annotations

import datetime as dt
import threading
import time

import psycopg
import pytest
from sqlite_utils.utils import sqlite3

from storage_backends import Event, StaleHistory, storage_from_url
from storage_backends.sql import MIGRATIONS
from storage_backends.sql.schema import LAST_EVENT_ID, SCHEMA_VERSION, event_page_query

from .conftest import postgres_schema, require_server

T0 = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
STAMP = "2026-11-28T12:00:00.000Z"


def event(event_id: str, kind: str = "agent_output") -> Event:
    return Event(
        id=event_id, session_key="", type=kind, fields={"content": event_id}, created_at=T0
    )


@pytest.fixture(params=["sqlite", "postgres"])
def sql_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/sessions.db"
    else:
        require_server("PostgreSQL", "127.0.0.1", 5432)
        with postgres_schema() as url:
            yield url


# The migration


def build_schema_2(url: str) -> None:
    """What the release at schema version 2 left: its migrations, an agent and a session."""
    rows = [
        "INSERT INTO agents (key, name, metadata, enabled, created_at, updated_at) "
        "VALUES ('bot', 'bot', '{}', {true}, {ts}, {ts})",
        "INSERT INTO sessions (agent_key, key, name, metadata, enabled, tti_minutes, "
        "created_at, updated_at, expires_at) "
        "VALUES ('bot', 'old', 'old', '{\"a\": 1}', {true}, 0, {ts}, {ts}, NULL)",
    ]
    if url.startswith("sqlite:"):
        with sqlite3.connect(url[len("sqlite:///") :]) as conn:
            for migration in MIGRATIONS[:2]:
                for statement in migration.sqlite:
                    conn.execute(statement)
            conn.execute("PRAGMA user_version = 2")
            for row in rows:
                conn.execute(row.replace("{true}", "1").replace("{ts}", "?"), [STAMP, STAMP])
        return
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in MIGRATIONS[:2]:
            for statement in migration.postgres:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", [migration.version])
        for row in rows:
            conn.execute(row.replace("{true}", "true").replace("{ts}", "%s"), [T0, T0])


def test_a_schema_2_database_takes_events_on_its_sessions(sql_url):
    assert [m.version for m in MIGRATIONS[:2]] == [1, 2]
    build_schema_2(sql_url)
    storage = storage_from_url(sql_url, {})
    try:
        old = storage.get_session(agent_key="bot", session_key="old", now=T0)
        assert old.forked_from is None and old.active_at is None and old.metadata == {"a": 1}
        written = storage.append_events(
            agent_key="bot",
            session_key="old",
            events=[event("aev_1", "input_message"), event("aev_2")],
            now=T0 + dt.timedelta(minutes=1),
            if_last_event_id=None,
            metadata_patch={"b": 2},
        )
        assert written.metadata == {"a": 1, "b": 2}
        page = storage.list_events(agent_key="bot", session_key="old", limit=10, now=T0)
        assert [e.id for e in page.items] == ["aev_1", "aev_2"]
        storage.delete_session(agent_key="bot", session_key="old", now=T0)
    finally:
        storage.close()
    if sql_url.startswith("sqlite:"):
        with sqlite3.connect(sql_url[len("sqlite:///") :]) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    else:
        with psycopg.connect(sql_url, autocommit=True) as conn:
            versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
            assert versions == list(range(1, SCHEMA_VERSION + 1))
            assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0


# Concurrent writers of one history


def test_writers_of_one_history_take_turns(sql_url):
    """8 writers append with if_last_event_id, retrying when another got there first.

    Every acknowledged event is stored exactly once, and each one directly
    follows the event its writer named as the last: the check and the write
    were one step.
    """
    storage = storage_from_url(sql_url, {"POSTGRES_POOL_MAX": 10})
    from storage_backends import Agent, Session

    storage.create_agent(agent=Agent(key="bot", name="bot", created_at=T0, updated_at=T0))
    storage.create_session(
        session=Session(key="s", agent_key="bot", name="s", created_at=T0, updated_at=T0)
    )
    writers, each = 8, 12
    acknowledged: dict[str, str | None] = {}
    stale = []
    errors = []
    start = threading.Barrier(writers)

    def last_id() -> str | None:
        page = storage.list_events(
            agent_key="bot", session_key="s", limit=1, now=T0, descending=True, include_hidden=True
        )
        return page.items[0].id if page.items else None

    def write(writer: int) -> None:
        try:
            start.wait()
            for n in range(each):
                event_id = f"aev_w{writer}n{n}"
                while True:
                    last = last_id()
                    # Let another writer in between the read and the write, so that
                    # the writers race even on a loaded machine.
                    time.sleep(0.0005)
                    try:
                        storage.append_events(
                            agent_key="bot",
                            session_key="s",
                            events=[event(event_id)],
                            now=T0,
                            if_last_event_id=last,
                        )
                    except StaleHistory:
                        stale.append(event_id)
                        continue
                    acknowledged[event_id] = last
                    break
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    try:
        assert not errors, errors
        stored = [e.id for e in storage.iter_events(agent_key="bot", session_key="s", now=T0)]
    finally:
        storage.close()
    assert len(acknowledged) == writers * each
    assert sorted(stored) == sorted(acknowledged)  # each once, none lost
    for previous, event_id in zip([None, *stored], stored, strict=False):
        assert acknowledged[event_id] == previous
    for writer in range(writers):
        mine = [i for i in stored if i.startswith(f"aev_w{writer}n")]
        assert mine == [f"aev_w{writer}n{n}" for n in range(each)]
    assert stale, "the writers never raced: the test proved nothing"


# Query plans


def load(storage, session_key: str, count: int, *, hide_most: bool = False) -> None:
    kinds = ("input_message", "agent_output", "tool_input", "tool_output", "thinking")

    def events():
        for n in range(count):
            # Seven in ten hidden; the visible ones of three types.
            hidden = "compaction" if hide_most and n % 10 not in (1, 2, 4) else None
            yield Event(
                id=f"aev_{n}",
                session_key="",
                type=kinds[n % len(kinds)],
                fields={"content": "x"},
                created_at=T0,
                hide_reason=hidden,
            )

    assert storage.load_events(agent_key="bot", session_key=session_key, events=events()) == count


def page_statements(now):
    """Every shape of page: (description, statement, parameters) for the session "big"."""
    shapes = []
    for descending in (False, True):
        for hidden in (False, True):
            for types in ((), ("tool_input",), ("tool_input", "input_message")):
                query, union = event_page_query(descending, hidden, len(types), True)
                params = []
                for kind in types or (None,):
                    params += ["bot", "big", now, *([kind] if kind else []), 30_000, 11]
                if union:
                    params.append(11)
                name = f"desc={descending} hidden={hidden} types={len(types)}"
                shapes.append((name, query, params))
    return shapes


@pytest.fixture
def loaded(sql_url):
    from storage_backends import Agent, Session

    storage = storage_from_url(sql_url, {})
    storage.create_agent(agent=Agent(key="bot", name="bot", created_at=T0, updated_at=T0))
    for key in ("big", "other"):
        storage.create_session(
            session=Session(key=key, agent_key="bot", name=key, created_at=T0, updated_at=T0)
        )
    # Most of the big session hidden: a visible page must not read past them.
    load(storage, "big", 60_000, hide_most=True)
    load(storage, "other", 20_000)
    yield storage, sql_url
    storage.close()


def test_every_page_reads_an_index_in_order(loaded):
    storage, url = loaded
    if url.startswith("sqlite:"):
        db = storage.db
        db.execute("ANALYZE")
        for name, query, params in page_statements(storage.encode_ts(T0)):
            parts = [r[-1] for r in db.execute(f"EXPLAIN QUERY PLAN {storage._sql(query)}", params)]
            plan = " | ".join(parts)
            # The session: one probe of its unique key, once per branch.
            sessions = [p for p in parts if "sessions" in p]
            assert sessions and all(
                p.startswith("SEARCH sessions USING INDEX idx_sessions_agent_key_key")
                for p in sessions
            ), (name, plan)
            searches = [p for p in parts if p.startswith(("SEARCH events", "SCAN events"))]
            assert searches and all(p.startswith("SEARCH events USING INDEX") for p in searches)
            # The only sorting: of a union branch's own limit + 1 rows (SCAN t0: its
            # result), before the merge. Never of the rows an index search read.
            for at, part in enumerate(parts):
                if "TEMP B-TREE" in part:
                    assert "UNION" in plan and parts[at - 1].startswith("SCAN t"), (name, plan)
            wanted = "idx_events_" + ("type" if "type = ?" in query else "session_seq")
            if "hide_reason IS NULL" in query:
                wanted = wanted.replace("idx_events_", "idx_events_visible_").replace(
                    "_session_seq", ""
                )
            assert wanted in plan, (name, plan)
        plan = " ".join(
            r[-1]
            for r in db.execute(
                "EXPLAIN QUERY PLAN " + storage._sql(LAST_EVENT_ID),
                [1],
            )
        )
        assert "idx_events_session_seq" in plan and "TEMP" not in plan
        return
    with storage._connection() as conn:
        conn.execute("ANALYZE events")
        conn.execute("SET enable_bitmapscan = off")
        for name, query, params in page_statements(T0):
            rows = conn.execute("EXPLAIN (FORMAT TEXT) " + storage._sql(query), params).fetchall()
            plan = " | ".join(r[0] for r in rows)
            # Merge Append keeps the branches' order ("Sort Key" names it): no sort node.
            nodes = [r[0].strip().removeprefix("->  ") for r in rows]
            sorts = [n for n in nodes if n.startswith(("Seq Scan", "Sort  (", "Incremental Sort"))]
            assert not sorts, (name, plan)
            wanted = "events_" + ("type" if "type = ?" in query else "session_seq")
            if "hide_reason IS NULL" in query:
                wanted = wanted.replace("events_", "events_visible_").replace("_session_seq", "")
            wanted = wanted.replace("events_session_seq", "events_pkey")
            assert f"using {wanted} " in plan.lower() or f"on {wanted} " in plan.lower(), (
                name,
                plan,
            )


def test_a_deep_page_is_as_full_as_the_first(loaded):
    """Pages deep in a mostly hidden history, through the plans checked above."""
    storage, url = loaded
    big = storage._session_id("bot", "big", T0)
    cases = []
    for descending in (False, True):
        for types in (None, frozenset({"tool_input"}), frozenset({"tool_input", "thinking"})):
            cases.append((descending, types))
    for descending, types in cases:
        first = storage.list_events(
            agent_key="bot", session_key="big", limit=20, now=T0, descending=descending, types=types
        )
        assert len(first.items) == 20
        # Deep: a cursor in the middle of the session's 6,000 visible events.
        deep = storage.list_events(
            agent_key="bot",
            session_key="big",
            limit=20,
            now=T0,
            descending=descending,
            types=types,
            after=_seq_of(storage, big, "aev_30000"),
        )
        assert len(deep.items) == 20
        assert all(e.hide_reason is None for e in deep.items)
        if types:
            assert {e.type for e in deep.items} <= types


def _seq_of(storage, session_id, event_id):
    with storage._reading() as conn:
        query = storage._sql("SELECT seq FROM events WHERE session_id = ? AND id = ?")
        return conn.execute(query, [session_id, event_id]).fetchone()[0]
