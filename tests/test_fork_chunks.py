"""SQLite's fork: copied in chunks from a snapshot, behind a placeholder (sql/forks.py).

- The copy is several transactions of at most FORK_CHUNK_MAX rows, and the fork
  holds the source's visible events, in order, with their ids.
- Until it is published, nothing of the fork is seen: not in the list, not by
  its key; writes to the source meanwhile are not in it.
- A key taken meanwhile is 409 and a failure mid-copy leaves nothing behind; a
  crash mid-copy leaves a placeholder that only purge-expired, once it is older
  than FORK_PLACEHOLDER_GRACE, removes, with its rows.
"""

from __future__ import annotations

import datetime as dt

import pytest

from storage_backends import (
    Agent,
    Conflict,
    Event,
    Session,
    SessionNotFound,
    Unavailable,
    storage_from_url,
)
from storage_backends.sql import forks
from storage_backends.sqlite import REQUEST_AUTOCHECKPOINT_PAGES

T0 = dt.datetime(2026, 11, 28, 12, 0, 0, 123000, tzinfo=dt.UTC)
COUNT = 2_000


@pytest.fixture
def store(tmp_path):
    storage = storage_from_url(f"sqlite:///{tmp_path}/sessions.db", options={})
    storage.create_agent(agent=Agent(key="bot", name="bot", created_at=T0, updated_at=T0))
    storage.create_session(
        session=Session(key="src", agent_key="bot", name="src", created_at=T0, updated_at=T0)
    )
    storage.load_events(
        agent_key="bot",
        session_key="src",
        events=(
            Event(
                id=f"aev_{i}",
                session_key="src",
                type="agent_output",
                fields={"content": f"{i} " + "x" * 300},
                created_at=T0,
            )
            for i in range(COUNT)
        ),
    )
    storage.set_event_hidden(
        agent_key="bot", session_key="src", event_id="aev_5", hide_reason="manual", now=T0
    )
    yield storage
    storage.close()


def fork(store, key="f", **kwargs):
    return store.fork_session(
        session=Session(key=key, agent_key="bot", name=key, created_at=T0, updated_at=T0),
        source_agent_key="bot",
        source_session_key="src",
        **kwargs,
    )


def ids(store, key, include_hidden=True):
    return [
        e.id
        for e in store.iter_events(agent_key="bot", session_key=key, now=T0)
        if include_hidden or e.hide_reason is None
    ]


def rows(store, table):
    with store._reading() as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def between_chunks(monkeypatch, action):
    """Run ``action`` at the pause after each chunk of a fork's copy."""
    calls = []

    def pause():
        calls.append(action(len(calls)))

    monkeypatch.setattr(forks, "_pause", pause)
    return calls


def test_a_large_fork_is_copied_in_chunks_and_holds_the_visible_history(store, monkeypatch):
    sizes = []
    execute_many = store._execute_many

    def counted(conn, statement, params):
        sizes.append(len(params))
        return execute_many(conn, statement, params)

    monkeypatch.setattr(store, "_execute_many", counted)
    forked = fork(store)

    expected = [f"aev_{i}" for i in range(COUNT) if i != 5]
    assert ids(store, "f") == expected
    assert forked.forked_from == {"agent_key": "bot", "session_key": "src", "event_id": "aev_1999"}
    assert sum(sizes) == COUNT - 1
    assert len(sizes) > 1
    assert max(sizes) <= forks.FORK_CHUNK_MAX
    assert store.get_session(agent_key="bot", session_key="f", now=T0).forked_from is not None
    # The chunks checkpointed nothing in their turns; requests after do again, past the bound.
    autocheckpoint = store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    assert autocheckpoint == REQUEST_AUTOCHECKPOINT_PAGES


def test_nothing_of_a_fork_is_seen_before_it_appears_and_later_writes_are_not_in_it(
    store, monkeypatch
):
    def look(n):
        keys = [s.key for s in store.list_sessions(agent_key="bot", limit=100, now=T0).items]
        with pytest.raises(SessionNotFound):
            store.get_session(agent_key="bot", session_key="f", now=T0)
        if n == 0:
            store.append_events(
                agent_key="bot",
                session_key="src",
                events=[
                    Event(
                        id="aev_late",
                        session_key="src",
                        type="agent_output",
                        fields={"content": "late"},
                        created_at=T0,
                    )
                ],
                now=T0,
            )
            store.set_event_hidden(
                agent_key="bot", session_key="src", event_id="aev_1", hide_reason="manual", now=T0
            )
        return keys

    seen = between_chunks(monkeypatch, look)
    fork(
        store,
        compact_up_to_event_id="aev_100",
        compaction=Event(
            id="aev_summary",
            session_key="f",
            type="compaction",
            fields={"summary_text": "s", "summary_key": "k"},
            created_at=T0,
        ),
    )

    assert seen and all(keys == ["src"] for keys in seen)
    events = list(store.iter_events(agent_key="bot", session_key="f", now=T0))
    assert [e.id for e in events] == [f"aev_{i}" for i in range(COUNT) if i != 5] + ["aev_summary"]
    hidden = [e.id for e in events if e.hide_reason == "compaction"]
    assert hidden == [f"aev_{i}" for i in range(101) if i != 5]
    assert events[-1].fields["events_compacted"] == 100


def test_a_key_taken_during_the_copy_is_a_conflict_and_leaves_nothing(store, monkeypatch):
    def take(n):
        if n == 0:
            store.create_session(
                session=Session(
                    key="f", agent_key="bot", name="first", created_at=T0, updated_at=T0
                )
            )

    between_chunks(monkeypatch, take)
    with pytest.raises(Conflict):
        fork(store)
    assert store.get_session(agent_key="bot", session_key="f", now=T0).name == "first"
    assert rows(store, "sessions") == 2
    assert rows(store, "events") == COUNT
    assert rows(store, "released_sessions") == 0


def test_a_failure_mid_copy_leaves_nothing(store, monkeypatch):
    def fail(n):
        if n == 1:
            raise Unavailable("the disk went away")

    between_chunks(monkeypatch, fail)
    with pytest.raises(Unavailable):
        fork(store)
    assert rows(store, "sessions") == 1
    assert rows(store, "events") == COUNT


def test_a_placeholder_a_crash_left_is_purged_once_older_than_any_copy(store, monkeypatch):
    class Crash(BaseException):
        pass

    def crash(n):
        raise Crash

    between_chunks(monkeypatch, crash)
    # A process that dies mid-copy runs no clean-up.
    monkeypatch.setattr(store, "_drop_placeholder", lambda placeholder: None)
    with pytest.raises(Crash):
        fork(store)
    monkeypatch.undo()

    assert rows(store, "sessions") == 2
    assert [s.key for s in store.list_sessions(agent_key="bot", limit=10, now=T0).items] == ["src"]
    assert store.purge_expired_sessions(now=T0 + dt.timedelta(minutes=5)) == 0
    assert rows(store, "sessions") == 2

    later = T0 + forks.FORK_PLACEHOLDER_GRACE + dt.timedelta(seconds=1)
    # Removed, and not counted: purge-expired reports sessions, which it never was.
    assert store.purge_expired_sessions(now=later) == 0
    assert rows(store, "sessions") == 1
    assert rows(store, "events") == COUNT
    assert rows(store, "released_sessions") == 0
