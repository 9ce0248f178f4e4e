"""A removed session's events are freed after its removal, in short chunks, on SQLite and
PostgreSQL (storage_backends/sql/released.py).

- Deleting a session, purging expired ones and deleting an agent leave no event row
  and no note behind, and each chunk of the freeing is a transaction of its own that
  deletes at most FREE_CHUNK_MAX rows.
- A removal whose freeing never ran (a crash between the two) is gone for every reader
  at once, its key takes a new session with an empty history, and the next purge frees
  the rows left behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt

import pytest

from storage_backends import Agent, Event, Session, SessionNotFound, storage_from_url
from storage_backends.sql import released

T0 = dt.datetime(2026, 11, 28, 12, 0, 0, 123000, tzinfo=dt.UTC)
EVENTS = 3_000


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path):
    from tests.conftest import postgres_schema, require_server

    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path}/sessions.db"
        else:
            require_server("PostgreSQL", "127.0.0.1", 5432)
            url = stack.enter_context(postgres_schema())
        storage = storage_from_url(url, options={})
        stack.callback(storage.close)
        storage.create_agent(agent=Agent(key="bot", name="bot", created_at=T0, updated_at=T0))
        yield storage


def big_session(storage, key: str, count: int = EVENTS, tti: int = 0) -> None:
    storage.create_session(
        session=Session(
            key=key, agent_key="bot", name=key, tti_minutes=tti, created_at=T0, updated_at=T0
        )
    )
    storage.load_events(
        agent_key="bot",
        session_key=key,
        events=(
            Event(
                id=f"aev_{key.replace('-', '')}{i}",
                session_key=key,
                type="agent_output",
                fields={"content": "x" * 500},
                created_at=T0,
            )
            for i in range(count)
        ),
    )


def rows(storage, table: str) -> int:
    with storage._reading() as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@pytest.fixture
def chunks(store, monkeypatch):
    """The rows each transaction of the freeing deleted, in order."""
    seen: list[int] = []
    free = store._free_session

    def counted(session_id, chunk):
        transaction = store._transaction

        @contextlib.contextmanager
        def watched():
            with transaction() as conn:
                execute = conn.execute

                class Watched:
                    def __getattr__(self, name):
                        return getattr(conn, name)

                    def execute(self, statement, params=()):
                        cursor = execute(statement, params)
                        if statement.startswith("DELETE FROM events"):
                            seen.append(cursor.rowcount)
                        return cursor

                yield Watched()

        monkeypatch.setattr(store, "_transaction", watched)
        try:
            return free(session_id, chunk)
        finally:
            monkeypatch.setattr(store, "_transaction", transaction)

    monkeypatch.setattr(store, "_free_session", counted)
    return seen


def test_deleting_a_session_frees_its_events_in_chunks(store, chunks):
    big_session(store, "big")
    big_session(store, "kept", 10)

    store.delete_session(agent_key="bot", session_key="big", now=T0)

    assert rows(store, "events") == 10
    assert rows(store, "released_sessions") == 0
    assert sum(chunks) == EVENTS
    assert len(chunks) > 1
    assert max(chunks) <= released.FREE_CHUNK_MAX
    assert store.count_events(agent_key="bot", session_key="kept", now=T0) == 10


def test_purge_and_agent_deletion_free_every_removed_history(store):
    for i in range(3):
        big_session(store, f"idle-{i}", 400, tti=1)
    big_session(store, "live", 50)

    assert store.purge_expired_sessions(now=T0 + dt.timedelta(minutes=2)) == 3
    assert rows(store, "events") == 50
    assert rows(store, "released_sessions") == 0

    store.delete_agent(agent_key="bot")
    assert rows(store, "events") == 0
    assert rows(store, "sessions") == 0
    assert rows(store, "released_sessions") == 0


def test_a_purge_removes_more_sessions_than_one_chunk(store):
    count = 2 * 500 + 7  # past PURGE_CHUNK twice
    store.load_sessions(
        Session(key=f"s{i}", agent_key="bot", name="s", tti_minutes=1, created_at=T0, updated_at=T0)
        for i in range(count)
    )
    assert store.purge_expired_sessions(now=T0 + dt.timedelta(minutes=2)) == count
    assert rows(store, "sessions") == 0


def test_a_removal_whose_freeing_never_ran_is_gone_and_the_next_purge_frees_it(store, monkeypatch):
    big_session(store, "crashed")
    # The process dies after the removal committed, before any chunk was freed.
    monkeypatch.setattr(store, "_free_released", lambda session_ids=None: 0)
    store.delete_session(agent_key="bot", session_key="crashed", now=T0)
    monkeypatch.undo()

    assert rows(store, "events") == EVENTS
    assert rows(store, "released_sessions") == 1
    with pytest.raises(SessionNotFound):
        store.list_events(agent_key="bot", session_key="crashed", limit=10, now=T0)
    with pytest.raises(SessionNotFound):
        store.get_event(agent_key="bot", session_key="crashed", event_id="aev_crashed1", now=T0)
    store.create_session(
        session=Session(key="crashed", agent_key="bot", name="again", created_at=T0, updated_at=T0)
    )
    page = store.list_events(
        agent_key="bot", session_key="crashed", limit=10, now=T0, include_hidden=True
    )
    assert page.items == []
    assert store.count_events(agent_key="bot", session_key="crashed", now=T0) == 0

    assert store.purge_expired_sessions(now=T0) == 0
    assert rows(store, "events") == 0
    assert rows(store, "released_sessions") == 0


def test_a_session_without_events_leaves_no_note(store):
    store.create_session(
        session=Session(key="empty", agent_key="bot", name="e", created_at=T0, updated_at=T0)
    )
    store._free_released = lambda session_ids=None: 0
    store.delete_session(agent_key="bot", session_key="empty", now=T0)
    assert rows(store, "released_sessions") == 0
