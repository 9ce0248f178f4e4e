"""Storage quotas: every write path counts in an agent's usage, deleting frees it, and a
write past AGENT_MAX_BYTES or SESSION_MAX_EVENTS is 409 quota_exceeded writing nothing."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest

from sessions_app import create_app
from storage_backends import (
    Agent,
    Event,
    Session,
    SessionNotFound,
    storage_from_url,
)
from storage_backends.base import QuotaExceeded
from storage_backends.codec import dump_json
from storage_backends.sql.schema import STATE_ROW_BYTES
from storage_backends.sql.usage import event_bytes, session_bytes
from tests.conftest import assert_error

AGENT = "quota-bot"
NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
SQL = pytest.mark.parametrize("storage_url", ["sqlite", "postgres"], indirect=True)


def store_of(storage_url: str, **quotas: int) -> Any:
    store = storage_from_url(storage_url, quotas)
    now = NOW
    store.create_agent(agent=Agent(key=AGENT, name="Quota", created_at=now, updated_at=now))
    return store


@pytest.fixture
def quota_store(storage_url: str) -> Iterator[Any]:
    store = store_of(storage_url, AGENT_MAX_BYTES=0, SESSION_MAX_EVENTS=0)
    yield store
    store.close()


def session(key: str, **fields: Any) -> Session:
    return Session(
        agent_key=AGENT, key=key, name=fields.pop("name", key), created_at=NOW, updated_at=NOW,
        **fields,
    )  # fmt: skip


def output(n: int, text: str = "x", size: int = 40) -> Event:
    return Event(
        id=f"aev_{text}{n}",
        session_key="",
        type="agent_output",
        fields={"content": text * size, "metadata": {"n": n, "é": "ü"}},
        created_at=NOW,
    )


def recount(store: Any, state_keys: tuple[str, ...] = ()) -> dict[str, int]:
    """The agent's usage counted from what the storage reads back, every event included."""
    sessions = events = size = 0
    after = None
    while True:
        page = store.list_sessions(agent_key=AGENT, limit=100, after=after, now=NOW)
        for found in page.items:
            sessions += 1
            size += session_bytes(found)
            for event in store.iter_events(agent_key=AGENT, session_key=found.key, now=NOW):
                events += 1
                size += event_bytes(event)
        if page.next_cursor is None:
            break
        after = page.next_cursor
    for document in store.get_state(agent_key=AGENT, keys=list(state_keys)) if state_keys else ():
        if document.updated_at is not None:
            size += STATE_ROW_BYTES + len(dump_json(document.value).encode())
    return {"sessions": sessions, "events": events, "bytes": size}


def test_usage_follows_every_write_path_and_deleting_frees_it(quota_store: Any) -> None:
    store = quota_store
    assert store.get_usage(agent_key=AGENT) == {"sessions": 0, "events": 0, "bytes": 0}
    states = ("app", "user:ü")
    steps = [
        lambda: store.create_session(session=session("s1", metadata={"user": "u-1", "n": 3})),
        lambda: store.append_events(
            agent_key=AGENT, session_key="s1", events=[output(i) for i in range(5)], now=NOW
        ),
        lambda: store.append_events(
            agent_key=AGENT,
            session_key="s1",
            events=[output(9, "y")],
            now=NOW,
            metadata_patch={"topic": "billing" * 20, "n": None},
            state_patch={"app": {"theme": "dark"}, "user:ü": {"lang": "fr" * 30}},
        ),
        lambda: store.append_events(
            agent_key=AGENT, session_key="s1", events=[], now=NOW, state_patch={"app": {"t": 1}}
        ),
        lambda: store.append_events_since(
            agent_key=AGENT,
            session_key="s1",
            events=[output(1, "z")],
            now=NOW,
            since=None,
            limit=1000,
        ),  # fmt: skip
        lambda: store.compact_events(
            agent_key=AGENT,
            session_key="s1",
            up_to_event_id="aev_x3",
            compaction=Event(
                id="aev_c1",
                session_key="s1",
                type="compaction",
                fields={"summary_text": "sum", "summary_key": "k"},
                created_at=NOW,
            ),
            now=NOW,
        ),  # fmt: skip
        lambda: store.fork_session(
            session=session("f1"), source_agent_key=AGENT, source_session_key="s1"
        ),
        lambda: store.fork_session(
            session=session("f2"),
            source_agent_key=AGENT,
            source_session_key="s1",
            compact_up_to_event_id="aev_y9",
            compaction=Event(
                id="aev_c2",
                session_key="f2",
                type="compaction",
                fields={"summary_text": "two", "summary_key": "k2"},
                created_at=NOW,
            ),
        ),  # fmt: skip
        lambda: store.import_session(
            session=session("i1", description="imported ü", metadata={"a": [1, 2]}),
            events=[output(i, "i") for i in range(30)],
        ),
        lambda: store.update_session(
            agent_key=AGENT, session_key="i1", changes={"name": "longer name " * 5}, now=NOW
        ),
        lambda: store.update_session(
            agent_key=AGENT, session_key="i1", changes={"metadata": {}}, now=NOW
        ),
        lambda: store.pop_event(agent_key=AGENT, session_key="s1", now=NOW),
        lambda: store.delete_event(agent_key=AGENT, session_key="i1", event_id="aev_i4", now=NOW),
        lambda: store.clear_events(agent_key=AGENT, session_key="f1", now=NOW),
        lambda: store.delete_session(agent_key=AGENT, session_key="s1", now=NOW),
    ]
    for number, step in enumerate(steps):
        step()
        assert store.get_usage(agent_key=AGENT) == recount(store, states), number
    usage = store.get_usage(agent_key=AGENT)
    assert usage["sessions"] == 3 and usage["events"] == 29 + 5
    for key in ("f1", "f2", "i1"):
        store.delete_session(agent_key=AGENT, session_key=key, now=NOW)
    assert store.get_usage(agent_key=AGENT)["events"] == 0
    # What is left are the state documents, and they go with their agent.
    assert store.get_usage(agent_key=AGENT) == recount(store, states)
    store.delete_agent(agent_key=AGENT)
    assert store.get_usage(agent_key=AGENT) == {"sessions": 0, "events": 0, "bytes": 0}


@SQL
def test_expiry_and_purge_free_what_a_session_held(storage_url: str) -> None:
    store = store_of(storage_url)
    try:
        for key in ("gone", "kept"):
            store.create_session(session=session(key, tti_minutes=1))
            store.append_events(agent_key=AGENT, session_key=key, events=[output(1)], now=NOW)
        later = NOW + dt.timedelta(minutes=5)
        with pytest.raises(SessionNotFound):
            store.get_session(agent_key=AGENT, session_key="gone", now=later)
        assert store.get_usage(agent_key=AGENT)["sessions"] == 1
        assert store.purge_expired_sessions(now=later) == 1
        assert store.get_usage(agent_key=AGENT) == {"sessions": 0, "events": 0, "bytes": 0}
    finally:
        store.close()


@SQL
def test_session_max_events_refuses_every_path_and_writes_nothing(storage_url: str) -> None:
    store = store_of(storage_url, SESSION_MAX_EVENTS=4)
    try:
        store.create_session(session=session("s1"))
        store.append_events(
            agent_key=AGENT, session_key="s1", events=[output(i) for i in range(3)], now=NOW
        )
        before = store.get_usage(agent_key=AGENT)
        with pytest.raises(QuotaExceeded) as refused:
            store.append_events(
                agent_key=AGENT, session_key="s1", events=[output(7), output(8)], now=NOW
            )
        assert (refused.value.quota, refused.value.usage, refused.value.adds) == (
            "SESSION_MAX_EVENTS", 3, 2,
        )  # fmt: skip
        assert refused.value.bound == 4
        with pytest.raises(QuotaExceeded):
            store.import_session(session=session("big"), events=[output(i) for i in range(5)])
        with pytest.raises(SessionNotFound):
            store.get_session(agent_key=AGENT, session_key="big", now=NOW)
        assert store.get_usage(agent_key=AGENT) == before
        assert store.count_events(agent_key=AGENT, session_key="s1", now=NOW) == 3
        # The fourth fits; then a compaction event, as any other, is one too many.
        store.append_events(agent_key=AGENT, session_key="s1", events=[output(4)], now=NOW)
        compaction = Event(
            id="aev_c", session_key="s1", type="compaction",
            fields={"summary_text": "s", "summary_key": "k"}, created_at=NOW,
        )  # fmt: skip
        with pytest.raises(QuotaExceeded):
            store.compact_events(
                agent_key=AGENT, session_key="s1", up_to_event_id=None, compaction=compaction,
                now=NOW,
            )  # fmt: skip
        # Deleting frees room in the session.
        store.pop_event(agent_key=AGENT, session_key="s1", now=NOW)
        store.append_events(agent_key=AGENT, session_key="s1", events=[output(5)], now=NOW)
        assert store.count_events(agent_key=AGENT, session_key="s1", now=NOW) == 4
    finally:
        store.close()


@SQL
def test_agent_max_bytes_refuses_every_growth_and_deleting_frees(storage_url: str) -> None:
    probe = store_of(storage_url, AGENT_MAX_BYTES=0)
    probe.create_session(session=session("s1"))
    one = event_bytes(output(0))
    base = probe.get_usage(agent_key=AGENT)["bytes"]
    probe.delete_agent(agent_key=AGENT)
    probe.close()
    bound = base + 3 * one  # room for three events and nothing more
    store = store_of(storage_url, AGENT_MAX_BYTES=bound)
    try:
        store.create_session(session=session("s1"))
        store.append_events(
            agent_key=AGENT, session_key="s1", events=[output(i) for i in range(3)], now=NOW
        )
        full = store.get_usage(agent_key=AGENT)
        assert full["bytes"] == bound
        refusals = [
            lambda: store.append_events(
                agent_key=AGENT, session_key="s1", events=[output(3)], now=NOW
            ),
            lambda: store.create_session(session=session("s2")),
            lambda: store.update_session(
                agent_key=AGENT, session_key="s1", changes={"metadata": {"k": "v"}}, now=NOW
            ),
            lambda: store.append_events(
                agent_key=AGENT,
                session_key="s1",
                events=[],
                now=NOW,
                metadata_patch={"k": "v"},
            ),  # fmt: skip
            lambda: store.append_events(
                agent_key=AGENT,
                session_key="s1",
                events=[],
                now=NOW,
                state_patch={"app": {"k": "v"}},
            ),  # fmt: skip
            lambda: store.fork_session(
                session=session("f1"), source_agent_key=AGENT, source_session_key="s1"
            ),
            lambda: store.import_session(session=session("i1"), events=[]),
        ]
        for number, refusal in enumerate(refusals):
            with pytest.raises(QuotaExceeded) as refused:
                refusal()
            assert refused.value.quota == "AGENT_MAX_BYTES", number
            assert (refused.value.usage, refused.value.bound) == (bound, bound), number
            assert store.get_usage(agent_key=AGENT) == full, number
        # A write that shrinks is never refused, and what it frees can be used again.
        store.update_session(agent_key=AGENT, session_key="s1", changes={"name": "s"}, now=NOW)
        store.delete_event(agent_key=AGENT, session_key="s1", event_id="aev_x0", now=NOW)
        store.append_events(agent_key=AGENT, session_key="s1", events=[output(3)], now=NOW)
        assert store.get_usage(agent_key=AGENT) == recount(store)
    finally:
        store.close()


# Over HTTP


@pytest.fixture
def quota_app(storage_url: str) -> Iterator[Any]:
    app = create_app(
        {"TESTING": True, "STORAGE_URL": storage_url, "SESSION_MAX_EVENTS": 3,
         "AGENT_MAX_BYTES": 40_000}
    )  # fmt: skip
    yield app
    app.extensions["agent_sessions"].storage.close()


@SQL
def test_http_quota_exceeded_and_the_agents_usage(quota_app: Any) -> None:
    from tests.conftest import Keys

    client = quota_app.test_client()
    keys = Keys(quota_app)
    admin = keys.headers(admin=True)
    assert client.post("/v2/agents", json={"key": AGENT, "name": "Q"}, headers=admin).status_code
    scopes = ("sessions:create", "sessions:read", "sessions:update", "events:append")
    full = keys.headers(("*", scopes))
    sessions = f"/v2/agents/{AGENT}/sessions"
    assert client.post(sessions, json={"key": "s1", "name": "s1"}, headers=full).status_code == 201
    got = client.get(f"/v2/agents/{AGENT}", headers=admin)
    etag = got.headers["ETag"]
    assert got.json["usage"]["sessions"] == 1 and got.json["usage"]["events"] == 0
    batch = f"{sessions}/s1/events/batch"
    events = [{"type": "agent_output", "content": "a" * 100} for _ in range(3)]
    assert client.post(batch, json={"events": events}, headers=full).status_code == 201
    refused = client.post(batch, json={"events": events[:1]}, headers=full)
    body = assert_error(refused, 409, "quota_exceeded")
    assert "SESSION_MAX_EVENTS" in body["messages"][0]
    assert "3 events" in body["messages"][0] and "bound is 3" in body["messages"][0]
    got = client.get(f"/v2/agents/{AGENT}", headers=admin)
    assert got.json["usage"]["events"] == 3 and got.json["usage"]["bytes"] > 300
    # The usage is not part of the agent's ETag: an If-Match read before the appends holds.
    assert got.headers["ETag"] == etag
    patched = client.patch(
        f"/v2/agents/{AGENT}", json={"description": "d"}, headers={**admin, "If-Match": etag}
    )
    assert patched.status_code == 200, patched.json
    # A PATCH that grows the metadata past the agent's bytes.
    big = {f"k{i}": "v" * 1000 for i in range(15)}
    created = client.post(sessions, json={"key": "s2", "name": "s2", "metadata": big}, headers=full)
    assert created.status_code == 201, created.json
    refused = client.patch(f"{sessions}/s1", json={"metadata": big}, headers=full)
    body = assert_error(refused, 409, "quota_exceeded")
    assert "AGENT_MAX_BYTES" in body["messages"][0] and "40000" in body["messages"][0]
    assert client.get(f"{sessions}/s1", headers=full).json["metadata"] == {}


def test_a_schema_9_database_gets_its_usage_counted(tmp_path: Any) -> None:
    from storage_backends.sqlite import SQLiteStorage
    from tests.test_sqlite_schema import old_database

    path = tmp_path / "old.db"
    old_database(path, 9, 0, 0)
    from sqlite_utils.utils import sqlite3

    with sqlite3.connect(path) as conn:
        for n in range(5):
            conn.execute(
                "INSERT INTO events (session_id, id, type, fields, created_at) "
                "VALUES (1, ?, 'agent_output', ?, '2026-11-28T12:00:00.000Z')",
                [f"aev_{n}", dump_json({"content": "é" * n})],
            )
        conn.execute(
            "INSERT INTO agent_state (agent_key, key, value, updated_at) "
            "VALUES ('bot', 'app', '{\"a\":1}', '2026-11-28T12:00:00.000Z')"
        )
    store = SQLiteStorage(str(path))
    try:
        usage = store.get_usage(agent_key="bot")
        assert (usage["sessions"], usage["events"]) == (2, 5)
        sessions = store.list_sessions(agent_key="bot", limit=10, now=NOW).items
        expected = sum(session_bytes(s) for s in sessions) + STATE_ROW_BYTES + len('{"a":1}')
        expected += sum(
            event_bytes(e) for e in store.iter_events(agent_key="bot", session_key="s0", now=NOW)
        )
        assert usage["bytes"] == expected
    finally:
        store.close()


@SQL
def test_idempotency_records_count_until_they_expire(quota_app: Any) -> None:
    from tests.conftest import Keys

    client = quota_app.test_client()
    keys = Keys(quota_app)
    admin = keys.headers(admin=True)
    client.post("/v2/agents", json={"key": AGENT, "name": "Q"}, headers=admin)
    full = keys.headers(("*", ("sessions:create", "events:append")))
    sessions = f"/v2/agents/{AGENT}/sessions"
    assert client.post(sessions, json={"key": "s1", "name": "s1"}, headers=full).status_code == 201
    store = quota_app.extensions["agent_sessions"].storage
    batch = {"events": [{"type": "agent_output", "content": "a" * 2000}]}
    sent = client.post(
        f"{sessions}/s1/events/batch", json=batch, headers={**full, "Idempotency-Key": "k-1"}
    )
    assert sent.status_code == 201
    usage = store.get_usage(agent_key=AGENT)
    held = usage["bytes"] - recount(store)["bytes"]
    assert held >= len(sent.get_data()) > 2000
    store.purge_expired_idempotency_keys(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    assert store.get_usage(agent_key=AGENT) == recount(store)
