"""The storage contract of what the console needs, on every backend: its sign-ins, and an
agent's sessions newest first (keyset pages, the filter's bounded scan)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from storage_backends import Conflict, ConsoleSession, ConsoleSessionNotFound
from storage_backends.codec import compile_filter
from tests.test_storage_contract import T0, make_agent, make_session


def sign_in(token_hash: str = "h1", at: dt.datetime = T0, minutes: int = 60) -> ConsoleSession:
    return ConsoleSession(
        token_hash=token_hash,
        key_id="ak_1",
        csrf_token="csrf-" + token_hash,
        created_at=at,
        expires_at=at + dt.timedelta(minutes=minutes),
    )


def test_a_sign_in_reads_back_until_it_expires(storage):
    storage.create_console_session(console_session=sign_in())
    found = storage.get_console_session(token_hash="h1", now=T0 + dt.timedelta(minutes=59))
    assert found == sign_in()
    with pytest.raises(ConsoleSessionNotFound):
        storage.get_console_session(token_hash="h1", now=T0 + dt.timedelta(minutes=60))
    # Removed when found expired: even an earlier clock no longer finds it.
    with pytest.raises(ConsoleSessionNotFound):
        storage.get_console_session(token_hash="h1", now=T0)


def test_a_sign_in_is_a_copy_and_its_token_hash_is_unique(storage):
    record = sign_in()
    storage.create_console_session(console_session=record)
    record.key_id = "ak_other"
    assert storage.get_console_session(token_hash="h1", now=T0).key_id == "ak_1"
    with pytest.raises(Conflict):
        storage.create_console_session(console_session=dataclasses.replace(record, key_id="ak_2"))
    assert storage.get_console_session(token_hash="h1", now=T0).key_id == "ak_1"


def test_signing_out_ends_one_sign_in_and_twice_is_no_error(storage):
    storage.create_console_session(console_session=sign_in("h1"))
    storage.create_console_session(console_session=sign_in("h2"))
    storage.delete_console_session(token_hash="h1")
    storage.delete_console_session(token_hash="h1")
    with pytest.raises(ConsoleSessionNotFound):
        storage.get_console_session(token_hash="h1", now=T0)
    assert storage.get_console_session(token_hash="h2", now=T0).csrf_token == "csrf-h2"


def test_a_new_sign_in_removes_the_expired_ones(storage, storage_url):
    storage.create_console_session(console_session=sign_in("old", minutes=1))
    storage.create_console_session(console_session=sign_in("live", minutes=600))
    later = T0 + dt.timedelta(minutes=5)
    storage.create_console_session(console_session=sign_in("new", at=later))
    if storage_url.startswith("sqlite"):
        rows = storage.db.execute("SELECT token_hash FROM console_sessions").fetchall()
        assert sorted(r[0] for r in rows) == ["live", "new"]
    with pytest.raises(ConsoleSessionNotFound):
        storage.get_console_session(token_hash="old", now=T0)


def walk_recent(storage, limit=3, **kwargs):
    keys, before = [], None
    while True:
        page = storage.list_recent_sessions(
            agent_key="bot", limit=limit, now=T0, before=before, **kwargs
        )
        keys += [s.key for s in page.items]
        if page.next_cursor is None:
            return keys
        before = page.next_cursor


def test_recent_sessions_are_newest_first_in_keyset_pages(storage):
    make_agent(storage)
    make_agent(storage, "other")
    for number in range(7):
        make_session(storage, f"s{number}")
        make_session(storage, f"o{number}", agent_key="other")
    assert walk_recent(storage) == [f"s{number}" for number in reversed(range(7))]
    first = storage.list_recent_sessions(agent_key="bot", limit=3, now=T0)
    # A session deleted, another created meanwhile: the next page goes on where it was.
    storage.delete_session(agent_key="bot", session_key="s3", now=T0)
    make_session(storage, "s7")
    rest = storage.list_recent_sessions(agent_key="bot", limit=10, now=T0, before=first.next_cursor)
    assert [s.key for s in rest.items] == ["s2", "s1", "s0"]
    assert rest.next_cursor is None
    assert storage.list_recent_sessions(agent_key="nobody", limit=3, now=T0).items == []


def test_recent_sessions_leave_the_expired_out_and_filter(storage):
    make_agent(storage)
    make_session(storage, "a", name="Billing question")
    make_session(storage, "b", name="Idle", tti_minutes=1)
    make_session(storage, "c", name="other", description="about billing")
    make_session(storage, "d", name="Weather")
    later = T0 + dt.timedelta(minutes=2)
    page = storage.list_recent_sessions(agent_key="bot", limit=10, now=later)
    assert [s.key for s in page.items] == ["d", "c", "a"]
    matches = compile_filter("(?i)billing", 256)
    assert walk_recent(storage, limit=1, matches=matches) == ["c", "a"]
