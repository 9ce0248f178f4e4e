"""The storage contract: every backend passes the same tests."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import itertools
import re
import threading
import time
from collections.abc import Callable

import pytest

from storage_backends import (
    Agent,
    AgentDisabled,
    AgentNotFound,
    ApiKey,
    ApiKeyNotFound,
    Conflict,
    Event,
    EventNotFound,
    Grant,
    PreconditionFailed,
    Session,
    SessionDisabled,
    SessionNotFound,
    StaleHistory,
    StateDocument,
    TooManyEvents,
)
from storage_backends.codec import utcnow

T0 = dt.datetime(2026, 11, 28, 12, 0, 0, 123000, tzinfo=dt.UTC)


def make_agent(storage, key="bot", **kwargs):
    return storage.create_agent(
        agent=Agent(key=key, name=kwargs.pop("name", key), created_at=T0, updated_at=T0, **kwargs)
    )


def make_session(storage, key="s1", agent_key="bot", at=T0, **kwargs):
    return storage.create_session(
        session=Session(
            key=key,
            agent_key=agent_key,
            name=kwargs.pop("name", f"name {key}"),
            created_at=at,
            updated_at=at,
            **kwargs,
        )
    )


def walk(storage, agent_key="bot", limit=3, now=T0, **kwargs):
    keys, after = [], None
    while True:
        page = storage.list_sessions(
            agent_key=agent_key, limit=limit, after=after, now=now, **kwargs
        )
        keys += [s.key for s in page.items]
        if page.next_cursor is None:
            return keys
        after = page.next_cursor


# Agents


def test_agent_round_trip(storage):
    created = make_agent(storage, description="d", metadata={"a": [1, {"b": None}]}, enabled=False)
    fetched = storage.get_agent(agent_key="bot")
    assert fetched == created
    assert fetched.metadata == {"a": [1, {"b": None}]}
    assert fetched.enabled is False
    assert fetched.created_at == T0


def test_agent_key_is_unique(storage):
    make_agent(storage)
    with pytest.raises(Conflict):
        make_agent(storage, name="other")
    assert storage.get_agent(agent_key="bot").name == "bot"


def test_unknown_agent(storage):
    with pytest.raises(AgentNotFound):
        storage.get_agent(agent_key="nope")
    with pytest.raises(AgentNotFound):
        storage.update_agent(agent_key="nope", changes={"name": "x"}, now=T0)
    with pytest.raises(AgentNotFound):
        storage.delete_agent(agent_key="nope")


def test_update_agent_moves_updated_at(storage):
    make_agent(storage)
    later = T0 + dt.timedelta(seconds=5)
    updated = storage.update_agent(
        agent_key="bot", changes={"name": "New", "metadata": {"x": 1}}, now=later
    )
    assert (updated.name, updated.metadata, updated.updated_at) == ("New", {"x": 1}, later)
    assert updated.created_at == T0
    assert storage.get_agent(agent_key="bot") == updated


def test_a_disabled_agent_takes_no_new_sessions(storage):
    make_agent(storage)
    make_session(storage, "before")
    storage.update_agent(agent_key="bot", changes={"enabled": False}, now=T0)
    with pytest.raises(AgentDisabled):
        make_session(storage, "after")
    # What it has stays readable, changeable and deletable.
    assert walk(storage) == ["before"]
    storage.update_session(agent_key="bot", session_key="before", changes={"name": "x"}, now=T0)
    storage.update_agent(agent_key="bot", changes={"enabled": True}, now=T0)
    make_session(storage, "after")
    assert walk(storage) == ["before", "after"]


def test_delete_agent_deletes_its_sessions(storage):
    make_agent(storage)
    make_agent(storage, key="other")
    make_session(storage, "a")
    make_session(storage, "b", agent_key="other")
    storage.delete_agent(agent_key="bot")
    with pytest.raises(AgentNotFound):
        storage.get_agent(agent_key="bot")
    with pytest.raises(SessionNotFound):
        storage.get_session(agent_key="bot", session_key="a", now=T0)
    # Re-creating the agent does not resurrect its sessions.
    make_agent(storage)
    assert walk(storage) == []
    assert walk(storage, agent_key="other") == ["b"]


def test_list_agents_pages(storage):
    for i in range(5):
        make_agent(storage, key=f"a{i}")
    first = storage.list_agents(limit=2)
    assert [a.key for a in first.items] == ["a0", "a1"]
    second = storage.list_agents(limit=2, after=first.next_cursor)
    third = storage.list_agents(limit=2, after=second.next_cursor)
    assert [a.key for a in second.items + third.items] == ["a2", "a3", "a4"]
    assert third.next_cursor is None


# Sessions


def test_session_round_trip(storage):
    make_agent(storage)
    created = make_session(
        storage,
        description="about",
        metadata={"lang": "fr", "n": [1, 2]},
        enabled=False,
        tti_minutes=5,
    )
    fetched = storage.get_session(agent_key="bot", session_key="s1", now=T0)
    assert fetched == created
    assert (fetched.description, fetched.enabled, fetched.tti_minutes) == ("about", False, 5)
    assert fetched.metadata == {"lang": "fr", "n": [1, 2]}
    assert fetched.created_at == fetched.updated_at == T0


def test_copies_in_and_out(storage):
    make_agent(storage)
    stored = {"a": 1, "tree": {"list": [{"x": 1}]}}
    session = Session(
        key="s1",
        agent_key="bot",
        name="n",
        metadata=copy.deepcopy(stored),
        created_at=T0,
        updated_at=T0,
    )
    storage.create_session(session=session)
    session.metadata["a"] = 2
    session.metadata["tree"]["list"][0]["x"] = 2
    fetched = storage.get_session(agent_key="bot", session_key="s1", now=T0)
    fetched.metadata["a"] = 3
    fetched.metadata["tree"]["list"].append(3)
    listed = storage.list_sessions(agent_key="bot", limit=1, now=T0).items[0]
    listed.metadata["tree"]["list"][0]["x"] = 4
    listed.name = "changed"
    session = storage.get_session(agent_key="bot", session_key="s1", now=T0)
    assert (session.name, session.metadata) == ("n", stored)


def test_api_keys_are_copied_in_and_out(storage):
    grants = [Grant("bot", ("sessions:read",))]
    key = ApiKey(id="ak_1", name="k", secret_hash="h", grants=grants, created_at=T0)
    storage.create_api_key(api_key=key)
    key.grants.append(Grant("*", ("sessions:create",)))
    key.grants[0].agent = "other"
    fetched = storage.get_api_key(key_id="ak_1")
    fetched.grants[0].agent = "third"
    fetched.grants.clear()
    assert storage.get_api_key(key_id="ak_1").grants == [Grant("bot", ("sessions:read",))]


def test_session_needs_its_agent(storage):
    with pytest.raises(AgentNotFound):
        make_session(storage)


def test_session_key_unique_within_agent_only(storage):
    make_agent(storage)
    make_agent(storage, key="other")
    make_session(storage, name="first")
    with pytest.raises(Conflict):
        make_session(storage, name="second")
    assert storage.get_session(agent_key="bot", session_key="s1", now=T0).name == "first"
    make_session(storage, agent_key="other")


def test_concurrent_creates_of_one_key_have_one_winner(storage):
    make_agent(storage)
    outcomes = []
    barrier = threading.Barrier(16)

    def create(i):
        barrier.wait()
        try:
            make_session(storage, "race", name=f"n{i}")
            outcomes.append("created")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 15 + ["created"]


def test_unknown_session(storage):
    make_agent(storage)
    with pytest.raises(SessionNotFound):
        storage.get_session(agent_key="bot", session_key="nope", now=T0)
    with pytest.raises(SessionNotFound):
        storage.update_session(agent_key="bot", session_key="nope", changes={"name": "x"}, now=T0)
    with pytest.raises(SessionNotFound):
        storage.delete_session(agent_key="bot", session_key="nope", now=T0)


def test_sessions_are_scoped_by_agent(storage):
    make_agent(storage)
    make_agent(storage, key="other")
    make_session(storage, "mine")
    with pytest.raises(SessionNotFound):
        storage.get_session(agent_key="other", session_key="mine", now=T0)
    with pytest.raises(SessionNotFound):
        storage.delete_session(agent_key="other", session_key="mine", now=T0)
    assert walk(storage, agent_key="other") == []


def test_update_session(storage):
    make_agent(storage)
    make_session(storage, description="old", metadata={"a": 1, "b": 2})
    later = T0 + dt.timedelta(minutes=1)
    updated = storage.update_session(
        agent_key="bot",
        session_key="s1",
        changes={"metadata": {"c": 3}, "enabled": False, "tti_minutes": 9},
        now=later,
    )
    assert updated.metadata == {"c": 3}  # replaced, not merged
    assert (updated.enabled, updated.tti_minutes, updated.description) == (False, 9, "old")
    assert (updated.created_at, updated.updated_at) == (T0, later)
    assert storage.get_session(agent_key="bot", session_key="s1", now=later) == updated


def test_delete_session(storage):
    make_agent(storage)
    make_session(storage)
    storage.delete_session(agent_key="bot", session_key="s1", now=T0)
    with pytest.raises(SessionNotFound):
        storage.get_session(agent_key="bot", session_key="s1", now=T0)
    with pytest.raises(SessionNotFound):
        storage.delete_session(agent_key="bot", session_key="s1", now=T0)
    make_session(storage)  # the key is free again


def test_list_pages_in_creation_order(storage):
    make_agent(storage)
    keys = [f"k{i:02d}" for i in range(10)]
    for key in reversed(keys):  # creation order, not key order
        make_session(storage, key)
    assert walk(storage, limit=3) == list(reversed(keys))
    page = storage.list_sessions(agent_key="bot", limit=10, now=T0)
    assert page.next_cursor is None and len(page.items) == 10


def test_list_walk_while_inserting_sees_each_existing_once(storage):
    make_agent(storage)
    existing = [f"e{i}" for i in range(12)]
    for key in existing:
        make_session(storage, key)
    seen, after, n = [], None, 0
    while True:
        page = storage.list_sessions(agent_key="bot", limit=5, after=after, now=T0)
        seen += [s.key for s in page.items]
        make_session(storage, f"new{n}")
        n += 1
        if page.next_cursor is None:
            break
        after = page.next_cursor
    assert [k for k in seen if k.startswith("e")] == existing
    assert len(seen) == len(set(seen))


def test_list_with_pattern(storage):
    make_agent(storage)
    make_session(storage, "a", name="billing question")
    make_session(storage, "b", name="other", description="about BILLING")
    make_session(storage, "c", name="nothing")
    pattern = re.compile("(?i)billing")
    assert walk(storage, limit=1, matches=pattern) == ["a", "b"]


def test_list_unknown_agent_is_empty(storage):
    assert storage.list_sessions(agent_key="nope", limit=5, now=T0).items == []


# Idle expiry


def test_expired_session_disappears_and_is_removed(storage):
    make_agent(storage)
    make_session(storage, "short", tti_minutes=1)
    make_session(storage, "forever", tti_minutes=0)
    before = T0 + dt.timedelta(seconds=59)
    after = T0 + dt.timedelta(minutes=1)
    assert storage.get_session(agent_key="bot", session_key="short", now=before).key == "short"
    assert walk(storage, now=after) == ["forever"]
    with pytest.raises(SessionNotFound):
        storage.get_session(agent_key="bot", session_key="short", now=after)
    # Removed, not just hidden: even an earlier clock no longer finds it.
    with pytest.raises(SessionNotFound):
        storage.get_session(agent_key="bot", session_key="short", now=before)


def test_update_resets_the_idle_clock(storage):
    make_agent(storage)
    make_session(storage, tti_minutes=1)
    touched = T0 + dt.timedelta(seconds=50)
    storage.update_session(agent_key="bot", session_key="s1", changes={"name": "n"}, now=touched)
    later = T0 + dt.timedelta(seconds=100)
    assert storage.get_session(agent_key="bot", session_key="s1", now=later).name == "n"


def test_purge_expired(storage):
    make_agent(storage)
    make_session(storage, "a", tti_minutes=1)
    make_session(storage, "b", tti_minutes=10)
    make_session(storage, "c")
    assert storage.purge_expired_sessions(now=T0 + dt.timedelta(minutes=2)) == 1
    assert walk(storage, now=T0) == ["b", "c"]


def test_expired_session_key_can_be_reused(storage):
    make_agent(storage)
    make_session(storage, tti_minutes=1)
    storage.purge_expired_sessions(now=T0 + dt.timedelta(minutes=5))
    make_session(storage)


# API keys


def make_key(storage, key_id="ak_1", **kwargs):
    return storage.create_api_key(
        api_key=ApiKey(
            id=key_id,
            name=kwargs.pop("name", "k"),
            secret_hash="0" * 64,
            created_at=T0,
            **kwargs,
        )
    )


def test_api_key_round_trip(storage):
    created = make_key(
        storage,
        grants=[Grant("bot", ("sessions:read", "sessions:create")), Grant("*", ("sessions:read",))],
        admin=True,
        create_limit="30/minute",
        expires_at=T0 + dt.timedelta(days=1),
    )
    fetched = storage.get_api_key(key_id="ak_1")
    assert fetched == created
    assert fetched.grants[0] == Grant("bot", ("sessions:read", "sessions:create"))


def test_api_key_ids_unique_and_lookup(storage):
    make_key(storage)
    with pytest.raises(Conflict):
        make_key(storage)
    with pytest.raises(ApiKeyNotFound):
        storage.get_api_key(key_id="ak_nope")


def test_revoke_api_key(storage):
    make_key(storage)
    revoked = storage.revoke_api_key(key_id="ak_1", now=T0)
    assert revoked.revoked_at == T0 and not revoked.active(utcnow())
    again = storage.revoke_api_key(key_id="ak_1", now=T0 + dt.timedelta(hours=1))
    assert again.revoked_at == T0
    with pytest.raises(ApiKeyNotFound):
        storage.revoke_api_key(key_id="ak_nope", now=T0)


def test_list_api_keys(storage):
    for i in range(3):
        make_key(storage, f"ak_{i}")
    first = storage.list_api_keys(limit=2)
    second = storage.list_api_keys(limit=2, after=first.next_cursor)
    assert [k.id for k in first.items + second.items] == ["ak_0", "ak_1", "ak_2"]
    assert second.next_cursor is None


def test_check(storage):
    storage.check()


# Gone means gone: an expired session holds nothing


def test_an_expired_session_gives_its_key_to_a_create_before_any_purge(storage):
    make_agent(storage)
    make_session(storage, "old", tti_minutes=1, name="first")
    make_session(storage, "other")
    later = T0 + dt.timedelta(minutes=2)
    make_session(storage, "old", at=later, name="second")
    assert storage.get_session(agent_key="bot", session_key="old", now=later).name == "second"
    # The new session is a new one: it lists last, after the sessions created before it.
    assert walk(storage, now=later) == ["other", "old"]


def test_a_live_session_still_holds_its_key(storage):
    make_agent(storage)
    make_session(storage, "s", tti_minutes=5)
    with pytest.raises(Conflict):
        make_session(storage, "s", at=T0 + dt.timedelta(minutes=4))


def test_an_update_that_finds_the_session_expired_removes_it(storage):
    make_agent(storage)
    make_session(storage, "short", tti_minutes=1)
    with pytest.raises(SessionNotFound):
        storage.update_session(
            agent_key="bot",
            session_key="short",
            changes={"name": "late"},
            now=T0 + dt.timedelta(minutes=2),
        )
    # Removed, not just hidden: an earlier clock no longer finds it either.
    with pytest.raises(SessionNotFound):
        storage.get_session(agent_key="bot", session_key="short", now=T0)


# Grants end with their agent


def test_deleting_an_agent_ends_the_grants_naming_it(storage):
    make_agent(storage)
    make_agent(storage, "other")
    read = ("sessions:read",)
    make_key(storage, "ak_named", grants=[Grant("bot", read), Grant("other", read)])
    make_key(storage, "ak_star", grants=[Grant("*", read)])
    storage.delete_agent(agent_key="bot")
    make_agent(storage)  # a new agent with the old one's key
    named = storage.get_api_key(key_id="ak_named")
    assert named.grants == [Grant("other", read)]
    assert not named.allows("bot", "sessions:read")
    assert storage.get_api_key(key_id="ak_star").allows("bot", "sessions:read")


# The filtered list's budget


def budgeted(storage_url, **options):
    from storage_backends import storage_from_url

    return storage_from_url(storage_url, options)


@pytest.mark.parametrize(
    "options", [{"FILTER_SCAN_ROWS": 3}, {"FILTER_SCAN_SECONDS": 1e-9}], ids=["rows", "seconds"]
)
def test_a_filtered_list_ends_its_page_when_its_budget_is_spent(storage_url, options):
    storage = budgeted(storage_url, **options)
    try:
        make_agent(storage)
        for n in range(10):
            make_session(storage, f"s{n}", name="hit" if n in (4, 9) else "miss")
        pattern = re.compile("hit")
        first = storage.list_sessions(agent_key="bot", limit=5, now=T0, matches=pattern)
        # The page ended early, with the position to go on from.
        assert [s.key for s in first.items] == []
        assert first.next_cursor is not None
        assert walk(storage, limit=5, matches=pattern) == ["s4", "s9"]
    finally:
        storage.close()


# Events: a session's history


def event(n, kind="agent_output", at=T0, **fields):
    """The event ``aev_<n>`` of ``kind``, with fields of that kind."""
    if not fields:
        fields = {
            "input_message": {"messages": [{"type": "text", "content": f"in {n}"}]},
            "tool_input": {
                "tool_call_id": f"c{n}",
                "tool_configuration_name": "conf",
                "tool_name": "t",
                "tool_input": {"q": [1, {"deep": None}]},
            },
        }.get(kind, {"content": f"out {n}"})
    return Event(id=f"aev_{n}", session_key="", type=kind, fields=fields, created_at=at)


def compaction(n="c", at=T0):
    return Event(
        id=f"aev_{n}",
        session_key="",
        type="compaction",
        fields={"summary_text": "summary", "summary_key": "k"},
        created_at=at,
    )


def history(storage, *kinds, session_key="s1", at=T0):
    """Append events 1..n of ``kinds`` (a letter each: i input, o output, t tool input)."""
    names = {"i": "input_message", "o": "agent_output", "t": "tool_input"}
    events = [event(n, names[k], at=at) for n, k in enumerate(kinds, start=1)]
    storage.append_events(agent_key="bot", session_key=session_key, events=events, now=at)
    return [e.id for e in events]


def walk_events(storage, session_key="s1", limit=2, now=T0, **kwargs):
    ids, after, pages = [], None, 0
    while True:
        page = storage.list_events(
            agent_key="bot", session_key=session_key, limit=limit, after=after, now=now, **kwargs
        )
        pages += 1
        assert len(page.items) <= limit
        ids += [e.id for e in page.items]
        if page.next_cursor is None:
            return ids
        assert len(page.items) == limit
        after = page.next_cursor
        assert pages < 1000


def ids_of(storage, session_key="s1", now=T0):
    return [
        (e.id, e.hide_reason)
        for e in storage.iter_events(agent_key="bot", session_key=session_key, now=now)
    ]


@pytest.fixture
def session(storage):
    make_agent(storage)
    return make_session(storage)


def test_events_round_trip_in_the_order_written(storage, session):
    first = event(1, "tool_input")
    assert (
        storage.append_events(
            agent_key="bot", session_key="s1", events=[first, event(2)], now=T0
        ).key
        == "s1"
    )
    storage.append_events(agent_key="bot", session_key="s1", events=[event(3, "thinking")], now=T0)
    got = storage.get_event(agent_key="bot", session_key="s1", event_id="aev_1", now=T0)
    assert got == dataclasses.replace(first, session_key="s1")
    assert got.fields["tool_input"] == {"q": [1, {"deep": None}]}
    assert got.created_at == T0 and got.hide_reason is None
    assert walk_events(storage, limit=10) == ["aev_1", "aev_2", "aev_3"]
    # Copies in and out.
    got.fields["tool_input"]["q"] = "changed"
    first.fields["tool_name"] = "changed"
    again = storage.get_event(agent_key="bot", session_key="s1", event_id="aev_1", now=T0)
    assert again.fields["tool_input"]["q"] == [1, {"deep": None}]
    assert again.fields["tool_name"] == "t"


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 20])
def test_event_pages_miss_and_repeat_nothing_both_ways(storage, session, limit):
    ids = history(storage, *"iotoiootoi" * 2)
    assert walk_events(storage, limit=limit) == ids
    assert walk_events(storage, limit=limit, descending=True) == ids[::-1]


def test_hidden_events_are_listed_only_on_request_and_always_got(storage, session):
    ids = history(storage, *"ioioio")
    for hidden in ("aev_1", "aev_4", "aev_6"):
        hid = storage.set_event_hidden(
            agent_key="bot", session_key="s1", event_id=hidden, hide_reason="manual", now=T0
        )
        assert hid.hide_reason == "manual" and hid.id == hidden
    visible = ["aev_2", "aev_3", "aev_5"]
    for limit in (1, 2, 5):
        assert walk_events(storage, limit=limit) == visible
        assert walk_events(storage, limit=limit, descending=True) == visible[::-1]
        assert walk_events(storage, limit=limit, include_hidden=True) == ids
        assert walk_events(storage, limit=limit, include_hidden=True, descending=True) == ids[::-1]
    got = storage.get_event(agent_key="bot", session_key="s1", event_id="aev_4", now=T0)
    assert got.hide_reason == "manual"
    shown = storage.set_event_hidden(
        agent_key="bot", session_key="s1", event_id="aev_4", hide_reason=None, now=T0
    )
    assert shown.hide_reason is None
    assert walk_events(storage) == ["aev_2", "aev_3", "aev_4", "aev_5"]
    with pytest.raises(EventNotFound):
        storage.set_event_hidden(
            agent_key="bot", session_key="s1", event_id="aev_9", hide_reason="manual", now=T0
        )


@pytest.mark.parametrize("limit", [1, 2, 4])
def test_a_types_filter_pages_both_ways(storage, session, limit):
    history(storage, *"iotootitoo")
    storage.set_event_hidden(
        agent_key="bot", session_key="s1", event_id="aev_6", hide_reason="manual", now=T0
    )
    tools = frozenset({"tool_input"})
    both = frozenset({"tool_input", "input_message"})
    assert walk_events(storage, limit=limit, types=tools) == ["aev_3", "aev_8"]
    assert walk_events(storage, limit=limit, types=tools, include_hidden=True) == [
        "aev_3",
        "aev_6",
        "aev_8",
    ]
    assert walk_events(storage, limit=limit, types=both) == ["aev_1", "aev_3", "aev_7", "aev_8"]
    assert walk_events(storage, limit=limit, types=both, descending=True) == [
        "aev_8",
        "aev_7",
        "aev_3",
        "aev_1",
    ]
    assert walk_events(storage, limit=limit, types=both, include_hidden=True, descending=True) == [
        "aev_8",
        "aev_7",
        "aev_6",
        "aev_3",
        "aev_1",
    ]
    assert walk_events(storage, limit=limit, types=frozenset({"skill_load"})) == []
    assert walk_events(storage, limit=limit, types=frozenset()) == []


def test_delete_event(storage, session):
    history(storage, *"ioo")
    storage.delete_event(agent_key="bot", session_key="s1", event_id="aev_2", now=T0)
    assert walk_events(storage) == ["aev_1", "aev_3"]
    with pytest.raises(EventNotFound):
        storage.get_event(agent_key="bot", session_key="s1", event_id="aev_2", now=T0)
    with pytest.raises(EventNotFound):
        storage.delete_event(agent_key="bot", session_key="s1", event_id="aev_2", now=T0)
    # The id is free again, and deleting the newest events reuses no position: a
    # cursor at the deleted aev_4 still finds what is written after it.
    storage.append_events(agent_key="bot", session_key="s1", events=[event(4), event(5)], now=T0)
    page = storage.list_events(agent_key="bot", session_key="s1", limit=3, now=T0)
    assert [e.id for e in page.items] == ["aev_1", "aev_3", "aev_4"]
    for newest in ("aev_5", "aev_4"):
        storage.delete_event(agent_key="bot", session_key="s1", event_id=newest, now=T0)
    storage.append_events(agent_key="bot", session_key="s1", events=[event(2)], now=T0)
    rest = storage.list_events(
        agent_key="bot", session_key="s1", limit=5, now=T0, after=page.next_cursor
    )
    assert [e.id for e in rest.items] == ["aev_2"]


def test_events_of_an_unknown_session_or_event(storage, session):
    calls = {
        "append": lambda key: storage.append_events(
            agent_key="bot", session_key=key, events=[event(1)], now=T0
        ),
        "list": lambda key: storage.list_events(agent_key="bot", session_key=key, limit=5, now=T0),
        "get": lambda key: storage.get_event(
            agent_key="bot", session_key=key, event_id="aev_1", now=T0
        ),
        "hide": lambda key: storage.set_event_hidden(
            agent_key="bot", session_key=key, event_id="aev_1", hide_reason="manual", now=T0
        ),
        "delete": lambda key: storage.delete_event(
            agent_key="bot", session_key=key, event_id="aev_1", now=T0
        ),
        "compact": lambda key: storage.compact_events(
            agent_key="bot", session_key=key, up_to_event_id=None, compaction=compaction(), now=T0
        ),
        "iter": lambda key: storage.iter_events(agent_key="bot", session_key=key, now=T0),
    }
    for name, call in calls.items():
        with pytest.raises(SessionNotFound):
            call("nope")
        with pytest.raises(SessionNotFound):
            storage.list_events(agent_key="other", session_key="s1", limit=5, now=T0)
        if name in ("get", "hide", "delete"):
            with pytest.raises(EventNotFound):
                call("s1")
    assert ids_of(storage) == []


def test_if_last_event_id(storage, session):
    def append(n, last):
        return storage.append_events(
            agent_key="bot", session_key="s1", events=[event(n)], now=T0, if_last_event_id=last
        )

    with pytest.raises(StaleHistory):
        append(1, "aev_0")
    append(1, None)
    with pytest.raises(StaleHistory):
        append(2, None)
    with pytest.raises(Conflict):  # StaleHistory is a Conflict
        append(2, "aev_0")
    append(2, "aev_1")
    # The last event counts when hidden too.
    storage.set_event_hidden(
        agent_key="bot", session_key="s1", event_id="aev_2", hide_reason="manual", now=T0
    )
    with pytest.raises(StaleHistory):
        append(3, "aev_1")
    append(3, "aev_2")
    assert ids_of(storage) == [("aev_1", None), ("aev_2", "manual"), ("aev_3", None)]


def test_a_duplicate_id_writes_nothing_of_the_batch(storage, session):
    history(storage, "i")
    for batch in ([event(2), event(1)], [event(2), event(3), event(2)]):
        with pytest.raises(Conflict):
            storage.append_events(
                agent_key="bot",
                session_key="s1",
                events=batch,
                now=T0 + dt.timedelta(minutes=1),
                metadata_patch={"x": 1},
            )
    assert ids_of(storage) == [("aev_1", None)]
    assert storage.get_session(agent_key="bot", session_key="s1", now=T0).metadata == {}
    # Ids are unique within a session only.
    make_session(storage, "s2")
    history(storage, "i", session_key="s2")


def since(storage, n, anchor, limit=100, kind="input_message", at=T0, session_key="s1"):
    """Append the event ``n`` with :meth:`append_events_since`; the ids it answers."""
    answer = storage.append_events_since(
        agent_key="bot",
        session_key=session_key,
        events=[event(n, kind)],
        now=at,
        since=anchor,
        limit=limit,
    )
    return [e.id for e in answer]


def test_append_since_reads_the_visible_events_after_an_anchor(storage, session):
    history(storage, *"ioio")
    for hidden in ("aev_2", "aev_3"):
        storage.set_event_hidden(
            agent_key="bot", session_key="s1", event_id=hidden, hide_reason="manual", now=T0
        )
    # A hidden anchor is an anchor; hidden events after it are left out.
    assert since(storage, 5, "aev_2") == ["aev_4", "aev_5"]
    assert since(storage, 6, None) == ["aev_1", "aev_4", "aev_5", "aev_6"]
    assert since(storage, 7, "aev_6") == ["aev_7"]
    answer = storage.append_events_since(
        agent_key="bot", session_key="s1", events=[event(8)], now=T0, since="aev_7", limit=1
    )
    assert answer == [dataclasses.replace(event(8), session_key="s1")]
    stored = storage.get_event(agent_key="bot", session_key="s1", event_id="aev_5", now=T0)
    assert stored == dataclasses.replace(event(5, "input_message"), session_key="s1")
    assert walk_events(storage, limit=10) == ["aev_1", "aev_4", "aev_5", "aev_6", "aev_7", "aev_8"]


def test_append_since_is_bounded_and_refusals_write_nothing(storage):
    make_agent(storage)
    make_session(storage, tti_minutes=10)
    history(storage, *"ioio")
    storage.set_event_hidden(
        agent_key="bot", session_key="s1", event_id="aev_3", hide_reason="manual", now=T0
    )
    later = T0 + dt.timedelta(minutes=5)
    # Three visible events and the new one: four, one past a limit of 3.
    for anchor, limit in ((None, 3), ("aev_1", 2), ("aev_4", 0)):
        with pytest.raises(TooManyEvents) as refused:
            since(storage, 5, anchor, limit=limit, at=later)
        assert refused.value.limit == limit
    with pytest.raises(EventNotFound):
        since(storage, 5, "aev_9", at=later)
    with pytest.raises(Conflict):
        since(storage, 4, "aev_1", at=later)
    with pytest.raises(SessionNotFound):
        since(storage, 5, "aev_1", session_key="nope")
    assert ids_of(storage) == [(f"aev_{n}", "manual" if n == 3 else None) for n in range(1, 5)]
    # Nor was the idle clock restarted.
    with pytest.raises(SessionNotFound):
        storage.get_session(agent_key="bot", session_key="s1", now=T0 + dt.timedelta(minutes=11))
    make_session(storage, "s2", tti_minutes=10)
    history(storage, *"io", session_key="s2")
    assert since(storage, 3, None, limit=3, at=later, session_key="s2") == [
        "aev_1",
        "aev_2",
        "aev_3",
    ]
    got = storage.get_session(agent_key="bot", session_key="s2", now=later)
    assert got.active_at == later
    storage.update_session(agent_key="bot", session_key="s2", changes={"enabled": False}, now=T0)
    with pytest.raises(SessionDisabled):
        since(storage, 4, "aev_9", session_key="s2")


def test_append_since_reads_in_the_transaction_of_its_write(storage, session):
    """With another writer appending all along, each answer is the history exactly up to
    its own event: nothing written before it is missing, nothing written after it shows."""
    history(storage, "i")
    answers, errors = [], []
    start = threading.Barrier(2)

    def writer():
        start.wait()
        try:
            for n in range(100, 140):
                storage.append_events(
                    agent_key="bot", session_key="s1", events=[event(n)], now=utcnow()
                )
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=writer)
    thread.start()
    start.wait()
    for n in range(2, 42):
        answers.append(since(storage, n, None, limit=1000, at=utcnow()))
    thread.join(timeout=60)
    assert errors == []
    written = [event_id for event_id, _ in ids_of(storage, now=utcnow())]
    assert len(written) == 81
    for n, answer in zip(range(2, 42), answers, strict=True):
        assert answer == written[: written.index(f"aev_{n}") + 1]


def test_a_disabled_session_takes_no_events_but_is_read_hidden_and_deleted(storage):
    make_agent(storage)
    make_session(storage, enabled=True)
    history(storage, *"io")
    storage.update_session(agent_key="bot", session_key="s1", changes={"enabled": False}, now=T0)
    with pytest.raises(SessionDisabled):
        history(storage, "o")
    with pytest.raises(SessionDisabled):
        storage.compact_events(
            agent_key="bot", session_key="s1", up_to_event_id=None, compaction=compaction(), now=T0
        )
    storage.set_event_hidden(
        agent_key="bot", session_key="s1", event_id="aev_1", hide_reason="manual", now=T0
    )
    storage.delete_event(agent_key="bot", session_key="s1", event_id="aev_2", now=T0)
    assert ids_of(storage) == [("aev_1", "manual")]


def test_metadata_patch_is_a_merge_patch(storage):
    make_agent(storage)
    make_session(storage, metadata={"keep": 1, "drop": 2, "nested": {"a": 1, "b": 2}})
    later = T0 + dt.timedelta(minutes=1)
    seen = []
    written = storage.append_events(
        agent_key="bot",
        session_key="s1",
        events=[event(1)],
        now=later,
        metadata_patch={"drop": None, "nested": {"b": None, "c": [3]}, "new": "n", "gone": None},
        check_metadata=seen.append,
    )
    expected = {"keep": 1, "nested": {"a": 1, "c": [3]}, "new": "n"}
    assert seen == [expected]
    assert written.metadata == expected and written.updated_at == later
    stored = storage.get_session(agent_key="bot", session_key="s1", now=later)
    assert stored.metadata == expected and stored.updated_at == later
    # Events alone, or a patch that changes nothing, leave updated_at.
    for patch in (None, {"keep": 1, "absent": None}):
        written = storage.append_events(
            agent_key="bot",
            session_key="s1",
            events=[event(len(seen) + 1)],
            now=later + dt.timedelta(minutes=1),
            metadata_patch=patch,
            check_metadata=seen.append,
        )
        assert written.updated_at == later and written.metadata == expected
        seen.append(None)


def test_a_metadata_patch_of_values_python_calls_equal_is_a_change(storage):
    # True == 1, 2 == 2.0 and -0.0 == 0.0 in Python; as JSON each pair is two values.
    make_agent(storage)
    make_session(storage, metadata={"flag": 1, "off": 0, "n": 2, "z": 0.0, "deep": [1]})
    patch = {"flag": True, "off": False, "n": 2.0, "z": -0.0, "deep": [1.0]}
    for n, (key, value) in enumerate(patch.items(), start=1):
        at = T0 + dt.timedelta(minutes=n)
        written = storage.append_events(
            agent_key="bot",
            session_key="s1",
            events=[event(n)],
            now=at,
            metadata_patch={key: value},
        )
        assert written.updated_at == at, key
        stored = storage.get_session(agent_key="bot", session_key="s1", now=at)
        assert stored.updated_at == at, key
        assert repr(stored.metadata[key]) == repr(value), key
    assert repr(stored.metadata) == repr(patch)
    # The same JSON again is no change.
    written = storage.append_events(
        agent_key="bot",
        session_key="s1",
        events=[event(9)],
        now=T0 + dt.timedelta(minutes=9),
        metadata_patch=patch,
    )
    assert written.updated_at == T0 + dt.timedelta(minutes=len(patch))


def test_a_refused_metadata_patch_writes_nothing(storage):
    make_agent(storage)
    make_session(storage, tti_minutes=10, metadata={"a": 1})

    def refuse(metadata):
        assert metadata == {"a": 1, "b": 2}
        raise ValueError("too big")

    with pytest.raises(ValueError, match="too big"):
        storage.append_events(
            agent_key="bot",
            session_key="s1",
            events=[event(1)],
            now=T0 + dt.timedelta(minutes=5),
            metadata_patch={"b": 2},
            check_metadata=refuse,
        )
    assert ids_of(storage) == []
    stored = storage.get_session(agent_key="bot", session_key="s1", now=T0)
    assert stored.metadata == {"a": 1} and stored.updated_at == T0
    # Nor was the idle clock restarted.
    with pytest.raises(SessionNotFound):
        storage.get_session(agent_key="bot", session_key="s1", now=T0 + dt.timedelta(minutes=11))


class OutOfBounds(Exception):
    """What the batch's ``check_metadata`` raises for a patched metadata out of bounds."""


def refuse_metadata(metadata):
    raise OutOfBounds


# What can be wrong with a batch, made on a session (metadata {"a": 1}, one event
# aev_1) or in the call; and what it raises when it is all that is wrong.
BATCH_FAILURES = {
    "unknown session": (
        lambda storage, key, call: call.update(session_key="nope"),
        SessionNotFound,
    ),
    "metadata bounds": (
        lambda storage, key, call: call.update(
            metadata_patch={"b": 2}, check_metadata=refuse_metadata
        ),
        OutOfBounds,
    ),
    "disabled session": (
        lambda storage, key, call: storage.update_session(
            agent_key="bot", session_key=key, changes={"enabled": False}, now=T0
        ),
        SessionDisabled,
    ),
    "if_last_event_id": (
        lambda storage, key, call: call.update(if_last_event_id="aev_0"),
        StaleHistory,
    ),
    "id in the session": (lambda storage, key, call: call["events"].append(event(1)), Conflict),
    "id twice in the batch": (
        lambda storage, key, call: call["events"].extend([event(3)] * 2),
        Conflict,
    ),
}
# The order of refusals, in the order of the table: the first failure a batch has is
# the one raised. What is wrong with the request (what the patch would make of the
# metadata) before the session's state; of the state, the session's own before its
# history's.
BATCH_FAILURE_PAIRS = list(itertools.combinations(BATCH_FAILURES, 2))


def test_a_batch_is_refused_for_its_first_failure_in_the_contract_order(storage):
    make_agent(storage)
    for n, names in enumerate(BATCH_FAILURE_PAIRS):
        key = f"s{n}"
        make_session(storage, key, metadata={"a": 1})
        storage.append_events(agent_key="bot", session_key=key, events=[event(1)], now=T0)
        call = {"agent_key": "bot", "session_key": key, "events": [event(2)], "now": T0}
        for name in names:
            BATCH_FAILURES[name][0](storage, key, call)
        with pytest.raises(Exception) as raised:  # its type is checked exactly below
            storage.append_events(**call)
        assert type(raised.value) is BATCH_FAILURES[names[0]][1], (names, raised.value)
        assert ids_of(storage, key) == [("aev_1", None)], names
        assert storage.get_session(agent_key="bot", session_key=key, now=T0).metadata == {"a": 1}


def test_events_restart_the_idle_clock(storage):
    make_agent(storage)
    make_session(storage, tti_minutes=1)
    at = T0 + dt.timedelta(seconds=50)
    written = storage.append_events(agent_key="bot", session_key="s1", events=[event(1)], now=at)
    assert written.active_at == at and written.updated_at == T0
    assert written.expires_at == at + dt.timedelta(minutes=1)
    later = T0 + dt.timedelta(seconds=100)
    got = storage.get_session(agent_key="bot", session_key="s1", now=later)
    assert got.active_at == at and got.expires_at == at + dt.timedelta(minutes=1)
    assert walk(storage, now=later) == ["s1"]
    # A compaction too.
    at2 = T0 + dt.timedelta(seconds=105)
    storage.compact_events(
        agent_key="bot", session_key="s1", up_to_event_id=None, compaction=compaction(), now=at2
    )
    assert storage.purge_expired_sessions(now=at2 + dt.timedelta(seconds=59)) == 0
    # An update after events restarts it from the update.
    at3 = T0 + dt.timedelta(seconds=150)
    storage.update_session(agent_key="bot", session_key="s1", changes={"name": "x"}, now=at3)
    got = storage.get_session(agent_key="bot", session_key="s1", now=at3)
    assert got.expires_at == at3 + dt.timedelta(minutes=1)
    assert storage.purge_expired_sessions(now=at3 + dt.timedelta(seconds=59)) == 0
    assert storage.purge_expired_sessions(now=at3 + dt.timedelta(seconds=60)) == 1


def test_compaction_by_default_keeps_the_last_input_message_and_what_follows(storage, session):
    history(storage, *"iotoiot")
    storage.set_event_hidden(
        agent_key="bot", session_key="s1", event_id="aev_2", hide_reason="manual", now=T0
    )
    at = T0 + dt.timedelta(seconds=1)
    stored = storage.compact_events(
        agent_key="bot", session_key="s1", up_to_event_id=None, compaction=compaction(at=at), now=at
    )
    assert stored.id == "aev_c" and stored.type == "compaction" and stored.session_key == "s1"
    assert stored.created_at == at and stored.hide_reason is None
    # aev_2 was hidden already: not counted.
    assert stored.fields == {
        "summary_text": "summary",
        "summary_key": "k",
        "turns_compacted": 1,
        "events_compacted": 3,
    }
    assert ids_of(storage) == [
        ("aev_1", "compaction"),
        ("aev_2", "manual"),
        ("aev_3", "compaction"),
        ("aev_4", "compaction"),
        ("aev_5", None),
        ("aev_6", None),
        ("aev_7", None),
        ("aev_c", None),
    ]
    assert storage.get_event(agent_key="bot", session_key="s1", event_id="aev_c", now=T0) == stored
    # Again: the last input message stays, the compaction before it goes.
    again = storage.compact_events(
        agent_key="bot", session_key="s1", up_to_event_id=None, compaction=compaction("d"), now=at
    )
    assert (again.fields["events_compacted"], again.fields["turns_compacted"]) == (0, 0)


def test_compaction_with_no_input_message_hides_everything(storage, session):
    history(storage, *"oto")
    stored = storage.compact_events(
        agent_key="bot", session_key="s1", up_to_event_id=None, compaction=compaction(), now=T0
    )
    assert (stored.fields["events_compacted"], stored.fields["turns_compacted"]) == (3, 0)
    assert walk_events(storage) == ["aev_c"]


def test_compaction_up_to_an_anchor(storage, session):
    history(storage, *"ioioio")
    stored = storage.compact_events(
        agent_key="bot", session_key="s1", up_to_event_id="aev_3", compaction=compaction(), now=T0
    )
    assert (stored.fields["events_compacted"], stored.fields["turns_compacted"]) == (3, 2)
    assert walk_events(storage) == ["aev_4", "aev_5", "aev_6", "aev_c"]
    with pytest.raises(EventNotFound):
        storage.compact_events(
            agent_key="bot",
            session_key="s1",
            up_to_event_id="aev_9",
            compaction=compaction("d"),
            now=T0,
        )
    # A hidden anchor is no anchor, as a fork refuses it: nothing is hidden or added.
    storage.set_event_hidden(
        agent_key="bot", session_key="s1", event_id="aev_5", hide_reason="manual", now=T0
    )
    for hidden in ("aev_5", "aev_2"):  # hidden by hand, hidden by the compaction
        with pytest.raises(EventNotFound):
            storage.compact_events(
                agent_key="bot",
                session_key="s1",
                up_to_event_id=hidden,
                compaction=compaction("e"),
                now=T0,
            )
    assert walk_events(storage) == ["aev_4", "aev_6", "aev_c"]
    storage.set_event_hidden(
        agent_key="bot", session_key="s1", event_id="aev_5", hide_reason=None, now=T0
    )
    # A compaction id the session has is a conflict, and nothing is hidden.
    with pytest.raises(Conflict):
        storage.compact_events(
            agent_key="bot",
            session_key="s1",
            up_to_event_id="aev_5",
            compaction=compaction(4),
            now=T0,
        )
    assert walk_events(storage) == ["aev_4", "aev_5", "aev_6", "aev_c"]


def fork(storage, key="f1", source="s1", **kwargs):
    return storage.fork_session(
        session=Session(
            key=key,
            agent_key=kwargs.pop("agent_key", "bot"),
            name="fork",
            created_at=T0 + dt.timedelta(minutes=1),
            updated_at=T0 + dt.timedelta(minutes=1),
        ),
        source_agent_key="bot",
        source_session_key=source,
        **kwargs,
    )


def test_fork_copies_the_visible_events(storage, session):
    at = [T0 + dt.timedelta(seconds=n) for n in range(5)]
    for n, kind in enumerate(("input_message", "agent_output", "tool_input", "agent_output")):
        storage.append_events(
            agent_key="bot", session_key="s1", events=[event(n + 1, kind, at=at[n])], now=at[n]
        )
    storage.set_event_hidden(
        agent_key="bot", session_key="s1", event_id="aev_2", hide_reason="manual", now=T0
    )
    forked = fork(storage)
    assert forked.forked_from == {"agent_key": "bot", "session_key": "s1", "event_id": "aev_4"}
    got = storage.get_session(agent_key="bot", session_key="f1", now=T0)
    assert got.forked_from == forked.forked_from
    assert storage.get_session(agent_key="bot", session_key="s1", now=T0).forked_from is None
    copies = list(storage.iter_events(agent_key="bot", session_key="f1", now=T0))
    originals = [
        storage.get_event(agent_key="bot", session_key="s1", event_id=i, now=T0)
        for i in ("aev_1", "aev_3", "aev_4")
    ]
    assert copies == [dataclasses.replace(e, session_key="f1") for e in originals]
    assert [e.created_at for e in copies] == [at[0], at[2], at[3]]
    # Two histories: writing one leaves the other.
    history_f1 = storage.append_events(
        agent_key="bot", session_key="f1", events=[event(5)], now=T0, if_last_event_id="aev_4"
    )
    assert history_f1.key == "f1"
    storage.delete_event(agent_key="bot", session_key="s1", event_id="aev_1", now=T0)
    assert [e for e, _ in ids_of(storage, "f1")] == ["aev_1", "aev_3", "aev_4", "aev_5"]


def test_fork_up_to_an_event(storage, session):
    history(storage, *"ioio")
    forked = fork(storage, include_up_to_event_id="aev_2")
    assert forked.forked_from["event_id"] == "aev_2"
    assert ids_of(storage, "f1") == [("aev_1", None), ("aev_2", None)]
    storage.set_event_hidden(
        agent_key="bot", session_key="s1", event_id="aev_3", hide_reason="manual", now=T0
    )
    for anchor in ("aev_3", "aev_9"):
        with pytest.raises(EventNotFound):
            fork(storage, "f2", include_up_to_event_id=anchor)
        with pytest.raises(EventNotFound):
            fork(storage, "f2", compact_up_to_event_id=anchor, compaction=compaction())
    with pytest.raises(SessionNotFound):
        storage.get_session(agent_key="bot", session_key="f2", now=T0)


def test_fork_with_compaction(storage, session):
    history(storage, *"iotoio")
    forked = fork(storage, compact_up_to_event_id="aev_4", compaction=compaction())
    assert forked.forked_from["event_id"] == "aev_6"
    assert ids_of(storage, "f1") == [
        ("aev_1", "compaction"),
        ("aev_2", "compaction"),
        ("aev_3", "compaction"),
        ("aev_4", "compaction"),
        ("aev_5", None),
        ("aev_6", None),
        ("aev_c", None),
    ]
    summary = storage.get_event(agent_key="bot", session_key="f1", event_id="aev_c", now=T0)
    assert (summary.fields["events_compacted"], summary.fields["turns_compacted"]) == (4, 1)
    assert summary.fields["summary_text"] == "summary"
    # The source is untouched.
    assert [h for _, h in ids_of(storage)] == [None] * 6


def test_fork_of_an_empty_session_names_no_event(storage, session):
    forked = fork(storage)
    assert forked.forked_from == {"agent_key": "bot", "session_key": "s1"}
    assert storage.get_session(agent_key="bot", session_key="f1", now=T0).forked_from == {
        "agent_key": "bot",
        "session_key": "s1",
    }
    assert ids_of(storage, "f1") == []


def test_fork_raises_what_create_raises(storage, session):
    history(storage, *"io")
    with pytest.raises(SessionNotFound):
        fork(storage, source="nope")
    with pytest.raises(Conflict):
        fork(storage, "s1")
    with pytest.raises(AgentNotFound):
        fork(storage, agent_key="nobody")
    make_agent(storage, "off", enabled=False)
    with pytest.raises(AgentDisabled):
        fork(storage, agent_key="off")
    assert ids_of(storage) == [("aev_1", None), ("aev_2", None)]
    make_agent(storage, "other")
    fork(storage, agent_key="other")
    assert [e for e, _ in ids_of_agent(storage, "other", "f1")] == ["aev_1", "aev_2"]


def ids_of_agent(storage, agent_key, session_key):
    return [
        (e.id, e.hide_reason)
        for e in storage.iter_events(agent_key=agent_key, session_key=session_key, now=T0)
    ]


def test_events_go_with_their_session(storage):
    make_agent(storage)
    for key in ("gone", "kept"):
        make_session(storage, key)
        history(storage, *"io", session_key=key)
    storage.delete_session(agent_key="bot", session_key="gone", now=T0)
    make_session(storage, "gone")
    assert ids_of(storage, "gone") == []
    assert len(ids_of(storage, "kept")) == 2


def test_events_go_with_their_agent(storage):
    make_agent(storage)
    make_session(storage)
    history(storage, *"io")
    storage.delete_agent(agent_key="bot")
    make_agent(storage)
    make_session(storage)
    assert ids_of(storage) == []


@pytest.mark.parametrize("noticed_by", ["get", "list_events", "update", "purge", "create"])
def test_events_go_with_an_expired_session(storage, noticed_by):
    make_agent(storage)
    make_session(storage, tti_minutes=1)
    history(storage, *"io")
    late = T0 + dt.timedelta(minutes=2)
    with contextlib.suppress(SessionNotFound):
        {
            "get": lambda: storage.get_session(agent_key="bot", session_key="s1", now=late),
            "list_events": lambda: storage.list_events(
                agent_key="bot", session_key="s1", limit=5, now=late
            ),
            "update": lambda: storage.update_session(
                agent_key="bot", session_key="s1", changes={"name": "x"}, now=late
            ),
            "purge": lambda: storage.purge_expired_sessions(now=late),
            "create": lambda: None,
        }[noticed_by]()
    # The key taken again: the new session inherits nothing.
    make_session(storage, at=late)
    assert ids_of(storage, now=late) == []
    storage.append_events(
        agent_key="bot", session_key="s1", events=[event(1)], now=late, if_last_event_id=None
    )


def test_iter_events_reads_every_event_in_batches(storage, session):
    count = 2_345
    for start in range(0, count, 100):
        storage.append_events(
            agent_key="bot",
            session_key="s1",
            events=[event(n) for n in range(start, min(start + 100, count))],
            now=T0,
        )
    storage.set_event_hidden(
        agent_key="bot", session_key="s1", event_id="aev_1500", hide_reason="manual", now=T0
    )
    events = storage.iter_events(agent_key="bot", session_key="s1", now=T0)
    first = next(events)
    assert first.id == "aev_0"
    rest = list(events)
    assert [e.id for e in rest] == [f"aev_{n}" for n in range(1, count)]
    assert rest[1499].hide_reason == "manual"


def test_count_events_counts_the_whole_history_of_a_live_session(storage, session):
    assert storage.count_events(agent_key="bot", session_key="s1", now=T0) == 0
    history(storage, *"ioiot")
    storage.set_event_hidden(
        agent_key="bot", session_key="s1", event_id="aev_2", hide_reason="manual", now=T0
    )
    make_session(storage, key="other")
    history(storage, "i", session_key="other")
    assert storage.count_events(agent_key="bot", session_key="s1", now=T0) == 5
    storage.delete_event(agent_key="bot", session_key="s1", event_id="aev_5", now=T0)
    assert storage.count_events(agent_key="bot", session_key="s1", now=T0) == 4
    for agent_key, session_key in (("bot", "nothing"), ("nobody", "s1")):
        with pytest.raises(SessionNotFound):
            storage.count_events(agent_key=agent_key, session_key=session_key, now=T0)
    make_session(storage, key="idle", tti_minutes=1)
    later = T0 + dt.timedelta(minutes=2)
    with pytest.raises(SessionNotFound):
        storage.count_events(agent_key="bot", session_key="idle", now=later)


def test_iter_events_of_a_session_deleted_meanwhile_stops_with_session_not_found(storage, session):
    """An export under way never goes on into another session: the one deleted
    while it was read ends it with SessionNotFound, never with a whole-looking end."""
    make_agent(storage, "other")
    for start in range(0, 1_200, 100):
        storage.append_events(
            agent_key="bot",
            session_key="s1",
            events=[event(n) for n in range(start, start + 100)],
            now=T0,
        )
    events = storage.iter_events(agent_key="bot", session_key="s1", now=T0)
    assert next(events).id == "aev_0"
    storage.delete_session(agent_key="bot", session_key="s1", now=T0)
    make_session(storage, "theirs", agent_key="other")
    storage.append_events(agent_key="other", session_key="theirs", events=[event(5_000)], now=T0)
    read = []
    with pytest.raises(SessionNotFound):
        for got in events:
            read.append(got)
    assert "aev_5000" not in {e.id for e in read}
    assert {e.session_key for e in read} <= {"s1"}


def test_import_session_keeps_ids_times_and_hide_reasons(storage, session):
    history(storage, *"ioio")
    storage.set_event_hidden(
        agent_key="bot", session_key="s1", event_id="aev_2", hide_reason="manual", now=T0
    )
    exported = list(storage.iter_events(agent_key="bot", session_key="s1", now=T0))
    copy_of = Session(
        key="copy",
        agent_key="bot",
        name="copy",
        enabled=False,
        metadata={"m": 1},
        created_at=T0,
        updated_at=T0,
        forked_from={"agent_key": "a", "session_key": "b"},
    )
    assert storage.import_session(session=copy_of, events=iter(exported)) == 4
    imported = list(storage.iter_events(agent_key="bot", session_key="copy", now=T0))
    assert imported == [dataclasses.replace(e, session_key="copy") for e in exported]
    got = storage.get_session(agent_key="bot", session_key="copy", now=T0)
    assert got.forked_from == {"agent_key": "a", "session_key": "b"}
    assert got.enabled is False and got.metadata == {"m": 1}


def test_import_session_is_all_or_nothing(storage, session):
    events = [event(1), event(2), event(1)]
    for target, raised in (("s1", Conflict), ("new", Conflict)):
        with pytest.raises(raised):
            storage.import_session(
                session=Session(
                    key=target, agent_key="bot", name="n", created_at=T0, updated_at=T0
                ),
                events=events,
            )
    with pytest.raises(SessionNotFound):
        storage.get_session(agent_key="bot", session_key="new", now=T0)
    with pytest.raises(AgentNotFound):
        storage.import_session(
            session=Session(key="x", agent_key="nobody", name="n", created_at=T0, updated_at=T0),
            events=[event(1)],
        )
    assert ids_of(storage) == []


# Preconditions (If-Match): checked on the record as stored, in the write's transaction


def test_a_precondition_sees_the_stored_record_and_a_refusal_writes_nothing(storage):
    make_agent(storage, description="d")
    make_session(storage, metadata={"a": 1})
    seen = []

    def refuse(record):
        seen.append(record)
        return False

    later = T0 + dt.timedelta(minutes=1)
    for write in (
        lambda: storage.update_session(
            agent_key="bot", session_key="s1", changes={"name": "x"}, now=later, precondition=refuse
        ),
        lambda: storage.delete_session(
            agent_key="bot", session_key="s1", now=later, precondition=refuse
        ),
        lambda: storage.update_agent(
            agent_key="bot", changes={"name": "x"}, now=later, precondition=refuse
        ),
        lambda: storage.delete_agent(agent_key="bot", precondition=refuse),
    ):
        with pytest.raises(PreconditionFailed):
            write()
    assert [type(r) for r in seen] == [Session, Session, Agent, Agent]
    assert seen[0] == storage.get_session(agent_key="bot", session_key="s1", now=later)
    assert seen[2] == storage.get_agent(agent_key="bot")
    # Nothing changed: not the fields, not updated_at, not the idle clock.
    session = storage.get_session(agent_key="bot", session_key="s1", now=later)
    assert (session.name, session.updated_at, session.metadata) == ("name s1", T0, {"a": 1})
    assert session.active_at in (None, T0)
    agent = storage.get_agent(agent_key="bot")
    assert (agent.name, agent.updated_at) == ("bot", T0)
    # A mutated record handed to the precondition changes nothing stored.
    storage.update_session(
        agent_key="bot",
        session_key="s1",
        changes={"name": "y"},
        now=later,
        precondition=lambda record: record.metadata.update(b=2) is None,
    )
    assert storage.get_session(agent_key="bot", session_key="s1", now=later).metadata == {"a": 1}


def test_a_precondition_that_holds_lets_every_write_through(storage):
    make_agent(storage)
    make_session(storage)
    later = T0 + dt.timedelta(minutes=1)
    updated = storage.update_session(
        agent_key="bot",
        session_key="s1",
        changes={"name": "x"},
        now=later,
        precondition=lambda record: record.name == "name s1",
    )
    assert (updated.name, updated.updated_at) == ("x", later)
    assert storage.get_session(agent_key="bot", session_key="s1", now=later) == updated
    storage.delete_session(
        agent_key="bot", session_key="s1", now=later, precondition=lambda record: True
    )
    with pytest.raises(SessionNotFound):
        storage.get_session(agent_key="bot", session_key="s1", now=later)
    agent = storage.update_agent(
        agent_key="bot", changes={"enabled": False}, now=later, precondition=lambda r: r.enabled
    )
    assert agent.enabled is False and storage.get_agent(agent_key="bot") == agent
    storage.delete_agent(agent_key="bot", precondition=lambda record: not record.enabled)
    with pytest.raises(AgentNotFound):
        storage.get_agent(agent_key="bot")


def test_a_missing_or_expired_record_is_not_found_before_any_precondition(storage):
    make_agent(storage)
    make_session(storage, key="idle", tti_minutes=1)
    later = T0 + dt.timedelta(minutes=2)
    called = []

    def never(record):
        called.append(record)
        return False

    for key in ("idle", "nope"):
        with pytest.raises(SessionNotFound):
            storage.update_session(
                agent_key="bot",
                session_key=key,
                changes={"name": "x"},
                now=later,
                precondition=never,
            )
        with pytest.raises(SessionNotFound):
            storage.delete_session(agent_key="bot", session_key=key, now=later, precondition=never)
    with pytest.raises(AgentNotFound):
        storage.update_agent(agent_key="nope", changes={"name": "x"}, now=T0, precondition=never)
    with pytest.raises(AgentNotFound):
        storage.delete_agent(agent_key="nope", precondition=never)
    assert called == []
    # Gone means gone: the expired session was removed by the call that noticed it.
    make_session(storage, key="idle", at=later)


@pytest.mark.parametrize("operation", ["update_session", "delete_session", "update_agent"])
def test_two_writers_with_one_precondition_one_wins(storage, operation):
    """The check and the write are one step: while the first writer's precondition
    runs (slowly), the second cannot read the version the first is replacing."""
    make_agent(storage)
    make_session(storage)
    start = threading.Barrier(2)
    outcomes = []

    def unchanged_name(record):
        time.sleep(0.2)  # wide open, were the check and the write apart
        return record.name == ("name s1" if operation != "update_agent" else "bot")

    def write(n):
        now = utcnow()
        start.wait()
        try:
            if operation == "update_session":
                storage.update_session(
                    agent_key="bot",
                    session_key="s1",
                    changes={"name": f"w{n}"},
                    now=now,
                    precondition=unchanged_name,
                )
            elif operation == "delete_session":
                storage.delete_session(
                    agent_key="bot", session_key="s1", now=now, precondition=unchanged_name
                )
            else:
                storage.update_agent(
                    agent_key="bot",
                    changes={"name": f"w{n}"},
                    now=now,
                    precondition=unchanged_name,
                )
            outcomes.append("ok")
        except (PreconditionFailed, SessionNotFound) as err:
            outcomes.append(type(err).__name__)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    expected_loser = "SessionNotFound" if operation == "delete_session" else "PreconditionFailed"
    assert sorted(outcomes) == sorted(["ok", expected_loser])


# Beyond Vectara: what agent-framework adapters need


def test_an_events_metadata_is_kept_by_every_copy(storage, session):
    meta = {"adk": {"invocation_id": "i-1", "partial": False}, "tags": ["a", 1, None]}
    with_meta = event(1, "tool_input")
    with_meta.fields["metadata"] = meta
    storage.append_events(agent_key="bot", session_key="s1", events=[with_meta, event(2)], now=T0)
    got = storage.get_event(agent_key="bot", session_key="s1", event_id="aev_1", now=T0)
    assert got.fields["metadata"] == meta
    assert (
        "metadata"
        not in storage.list_events(agent_key="bot", session_key="s1", limit=5, now=T0)
        .items[1]
        .fields
    )
    fork(storage)
    copied = list(storage.iter_events(agent_key="bot", session_key="f1", now=T0))
    assert copied[0].fields == got.fields
    imported = Session(key="copy", agent_key="bot", name="copy", created_at=T0, updated_at=T0)
    storage.import_session(session=imported, events=iter(copied))
    again = storage.get_event(agent_key="bot", session_key="copy", event_id="aev_1", now=T0)
    assert again.fields["metadata"] == meta


def test_clear_events_empties_the_history_and_keeps_the_session(storage, session):
    make_session(storage, "s2")
    history(storage, *"ioto")
    other = history(storage, "i", session_key="s2")
    storage.set_event_hidden(
        agent_key="bot", session_key="s1", event_id="aev_2", hide_reason="manual", now=T0
    )
    before = storage.get_session(agent_key="bot", session_key="s1", now=T0)
    later = T0 + dt.timedelta(seconds=1)
    assert storage.clear_events(agent_key="bot", session_key="s1", now=later) == 4
    assert ids_of(storage) == []
    assert storage.get_session(agent_key="bot", session_key="s1", now=later) == before
    assert [e for e, _ in ids_of(storage, "s2")] == other  # another session's stay
    assert storage.clear_events(agent_key="bot", session_key="s1", now=later) == 0
    # An empty history again: "no event yet", and its ids free.
    storage.append_events(
        agent_key="bot", session_key="s1", events=[event(1)], now=later, if_last_event_id=None
    )
    assert [e for e, _ in ids_of(storage)] == ["aev_1"]


def test_clear_events_of_a_missing_expired_or_disabled_session(storage, session):
    with pytest.raises(SessionNotFound):
        storage.clear_events(agent_key="bot", session_key="nope", now=T0)
    with pytest.raises(SessionNotFound):
        storage.clear_events(agent_key="nobot", session_key="s1", now=T0)
    make_session(storage, "idle", tti_minutes=1)
    with pytest.raises(SessionNotFound):
        storage.clear_events(agent_key="bot", session_key="idle", now=T0 + dt.timedelta(minutes=2))
    make_session(storage, "idle", at=T0 + dt.timedelta(minutes=3))  # its key is free
    history(storage, *"io")
    storage.update_session(agent_key="bot", session_key="s1", changes={"enabled": False}, now=T0)
    assert storage.clear_events(agent_key="bot", session_key="s1", now=T0) == 2


# The session list's metadata query, through its index


def by_metadata(storage, agent_key="bot", limit=3, now=T0, **kwargs):
    return walk(storage, agent_key=agent_key, limit=limit, now=now, **kwargs)


def test_metadata_query_matches_strings_numbers_and_booleans(storage):
    make_agent(storage)
    make_agent(storage, "other")
    long_value = "v" * 200
    sessions = {
        "a": {"user_id": "u-17", "n": 17, "ok": True, "long": long_value},
        "b": {"user_id": "u-17", "n": "17", "ok": "true", "x": None},
        "c": {"user_id": "u-18", "n": 17.5, "ok": False, "obj": {"user_id": "u-17"}},
        "d": {"nested": ["u-17"], "x": "null"},
        "e": {},
    }
    for key, metadata in sessions.items():
        make_session(storage, key, metadata=metadata)
    make_session(storage, "elsewhere", agent_key="other", metadata={"user_id": "u-17"})
    expected = [
        ({"user_id": "u-17"}, ["a", "b"]),
        ({"n": "17"}, ["a", "b"]),
        ({"n": "17.5"}, ["c"]),
        ({"n": "17.0"}, []),
        ({"ok": "true"}, ["a", "b"]),
        ({"ok": "false"}, ["c"]),
        ({"ok": "True"}, []),
        ({"long": long_value}, ["a"]),
        ({"long": "v" * 199}, []),
        ({"x": "null"}, ["d"]),  # JSON null is no value; the string "null" is one
        ({"obj": "{}"}, []),
        ({"nested": '["u-17"]'}, []),
        ({"missing": "u-17"}, []),
        ({"user_id": "u-17", "n": "17", "ok": "true"}, ["a", "b"]),
        ({"user_id": "u-17", "long": long_value}, ["a"]),
        ({"user_id": "u-17", "n": "17", "ok": "true", "x": "null"}, []),
    ]
    for query, keys in expected:
        assert by_metadata(storage, metadata=query) == keys, query
        assert by_metadata(storage, metadata=query, limit=1) == keys, query
    assert by_metadata(storage, agent_key="other", metadata={"user_id": "u-17"}) == ["elsewhere"]
    assert by_metadata(storage, agent_key="nobody", metadata={"user_id": "u-17"}) == []
    # With the filter too.
    pattern = re.compile("name b")
    assert by_metadata(storage, metadata={"user_id": "u-17"}, matches=pattern) == ["b"]


def test_metadata_query_pages_in_creation_order(storage):
    make_agent(storage)
    for n in range(25):
        make_session(storage, f"s{n:02}", metadata={"team": "red" if n % 3 else "blue"})
    red = [f"s{n:02}" for n in range(25) if n % 3]
    for limit in (1, 2, 5, 16, 17, 100):
        assert by_metadata(storage, metadata={"team": "red"}, limit=limit) == red
    page = storage.list_sessions(agent_key="bot", limit=4, now=T0, metadata={"team": "blue"})
    assert [s.key for s in page.items] == ["s00", "s03", "s06", "s09"]
    assert page.items[0] == storage.get_session(agent_key="bot", session_key="s00", now=T0)
    # Sessions created meanwhile come after; none is missed or listed twice.
    make_session(storage, "late", metadata={"team": "blue"})
    rest = by_metadata(storage, metadata={"team": "blue"}, limit=4)
    assert rest == ["s00", "s03", "s06", "s09", "s12", "s15", "s18", "s21", "s24", "late"]


def test_the_metadata_index_follows_every_write(storage):
    make_agent(storage)
    make_session(storage, "s1", metadata={"user_id": "u-1", "stage": "new"})
    make_session(storage, "s2", metadata={"user_id": "u-2"})
    q = {"user_id": "u-1"}
    assert by_metadata(storage, metadata=q) == ["s1"]
    storage.update_session(
        agent_key="bot", session_key="s2", changes={"metadata": {"user_id": "u-1"}}, now=T0
    )
    assert by_metadata(storage, metadata=q) == ["s1", "s2"]
    storage.update_session(agent_key="bot", session_key="s2", changes={"name": "x"}, now=T0)
    assert by_metadata(storage, metadata=q) == ["s1", "s2"]
    # A batch's metadata_patch: a key changed, one removed, one added.
    storage.append_events(
        agent_key="bot",
        session_key="s1",
        events=[event(1)],
        now=T0,
        metadata_patch={"user_id": "u-9", "stage": None, "tier": 2},
    )
    assert by_metadata(storage, metadata=q) == ["s2"]
    assert by_metadata(storage, metadata={"user_id": "u-9", "tier": "2"}) == ["s1"]
    assert by_metadata(storage, metadata={"stage": "new"}) == []
    # A refused patch changes nothing, the index included.
    with pytest.raises(ValueError):
        storage.append_events(
            agent_key="bot",
            session_key="s1",
            events=[event(2)],
            now=T0,
            metadata_patch={"user_id": "u-1"},
            check_metadata=lambda metadata: (_ for _ in ()).throw(ValueError("no")),
        )
    assert by_metadata(storage, metadata=q) == ["s2"]
    # Fork and import write the new session's rows.
    fork(storage, key="f1", source="s2")
    storage.update_session(
        agent_key="bot", session_key="f1", changes={"metadata": {"user_id": "u-1"}}, now=T0
    )
    copy_of = Session(
        key="imported", agent_key="bot", name="i", metadata=q, created_at=T0, updated_at=T0
    )
    storage.import_session(session=copy_of, events=iter([]))
    assert by_metadata(storage, metadata=q) == ["s2", "f1", "imported"]
    # Deleting a session, an expired one, and an agent take their rows with them.
    storage.delete_session(agent_key="bot", session_key="s2", now=T0)
    assert by_metadata(storage, metadata=q) == ["f1", "imported"]
    make_session(storage, "idle", metadata=q, tti_minutes=1)
    later = T0 + dt.timedelta(minutes=5)
    assert by_metadata(storage, metadata=q, now=later) == ["f1", "imported"]
    make_session(storage, "idle", at=later, metadata={"user_id": "u-5"})  # takes the key
    assert by_metadata(storage, metadata=q, now=later) == ["f1", "imported"]
    assert by_metadata(storage, metadata={"user_id": "u-5"}, now=later) == ["idle"]
    storage.delete_agent(agent_key="bot")
    make_agent(storage)
    make_session(storage, "fresh")
    assert by_metadata(storage, metadata=q) == []


@pytest.mark.parametrize(
    "options", [{"FILTER_SCAN_ROWS": 3}, {"FILTER_SCAN_SECONDS": 1e-9}], ids=["rows", "seconds"]
)
def test_a_metadata_query_of_several_keys_ends_its_page_when_its_budget_is_spent(
    storage_url, options
):
    storage = budgeted(storage_url, **options)
    try:
        make_agent(storage)
        for n in range(10):
            make_session(storage, f"s{n}", metadata={"a": "1", "b": "2" if n in (4, 9) else "0"})
        query = {"a": "1", "b": "2"}
        first = storage.list_sessions(agent_key="bot", limit=5, now=T0, metadata=query)
        assert [s.key for s in first.items] == [] and first.next_cursor is not None
        assert walk(storage, limit=5, metadata=query) == ["s4", "s9"]
        # One key, every entry a match: the page is whole within the budget of rows.
        if "FILTER_SCAN_ROWS" in options:
            page = storage.list_sessions(agent_key="bot", limit=2, now=T0, metadata={"a": "1"})
            assert [s.key for s in page.items] == ["s0", "s1"]
    finally:
        storage.close()


def test_pop_event_takes_the_newest_and_answers_it(storage, session):
    history(storage, *"iot")
    storage.set_event_hidden(
        agent_key="bot", session_key="s1", event_id="aev_3", hide_reason="manual", now=T0
    )
    popped = storage.pop_event(agent_key="bot", session_key="s1", now=T0)
    assert popped.id == "aev_3" and popped.hide_reason == "manual"  # hidden or not
    assert popped.fields == event(3, "tool_input").fields and popped.session_key == "s1"
    with pytest.raises(StaleHistory):
        storage.pop_event(agent_key="bot", session_key="s1", now=T0, if_last_event_id="aev_1")
    assert [e for e, _ in ids_of(storage)] == ["aev_1", "aev_2"]
    second = storage.pop_event(agent_key="bot", session_key="s1", now=T0, if_last_event_id="aev_2")
    assert second.id == "aev_2"
    storage.update_session(agent_key="bot", session_key="s1", changes={"enabled": False}, now=T0)
    assert storage.pop_event(agent_key="bot", session_key="s1", now=T0).id == "aev_1"
    assert storage.pop_event(agent_key="bot", session_key="s1", now=T0) is None
    with pytest.raises(StaleHistory):
        storage.pop_event(agent_key="bot", session_key="s1", now=T0, if_last_event_id="aev_1")
    with pytest.raises(SessionNotFound):
        storage.pop_event(agent_key="bot", session_key="nope", now=T0)
    make_session(storage, "idle", tti_minutes=1)
    with pytest.raises(SessionNotFound):
        storage.pop_event(agent_key="bot", session_key="idle", now=T0 + dt.timedelta(minutes=2))


def test_concurrent_pops_take_each_event_once(storage, session):
    ids = history(storage, *"io" * 10)
    popped, errors = [], []

    def pop() -> None:
        try:
            for _ in range(5):
                event_ = storage.pop_event(agent_key="bot", session_key="s1", now=T0)
                if event_ is not None:
                    popped.append(event_.id)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=pop) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(popped) == sorted(ids) and ids_of(storage) == []


def new_session(key="s1", **fields):
    fields.setdefault("name", f"new {key}")
    return Session(key=key, agent_key="bot", created_at=T0, updated_at=T0, **fields)


def test_a_batch_creates_its_session_when_missing(storage):
    make_agent(storage)
    created = storage.append_events(
        agent_key="bot",
        session_key="s1",
        events=[event(1)],
        now=T0,
        if_last_event_id=None,
        metadata_patch={"b": 2},
        create=new_session(metadata={"a": 1, "user_id": "u-1"}, tti_minutes=5),
    )
    assert created.key == "s1" and created.metadata == {"a": 1, "user_id": "u-1", "b": 2}
    got = storage.get_session(agent_key="bot", session_key="s1", now=T0)
    assert (got.name, got.tti_minutes, got.metadata) == ("new s1", 5, created.metadata)
    assert by_metadata(storage, metadata={"user_id": "u-1", "b": "2"}) == ["s1"]
    # It exists now: the next batch appends, and create_session changes nothing.
    storage.append_events(
        agent_key="bot",
        session_key="s1",
        events=[event(2)],
        now=T0,
        if_last_event_id="aev_1",
        create=new_session(name="other", metadata={"x": 1}),
    )
    assert storage.get_session(agent_key="bot", session_key="s1", now=T0).name == "new s1"
    assert [e for e, _ in ids_of(storage)] == ["aev_1", "aev_2"]


def test_a_refused_batch_creates_nothing(storage):
    make_agent(storage)
    refusals = [
        (StaleHistory, {"if_last_event_id": "aev_9"}, new_session()),
        (Conflict, {"events": [event(1), event(1)]}, new_session()),
        (SessionDisabled, {}, new_session(enabled=False)),
        (ValueError, {"metadata_patch": {"a": 1}, "check_metadata": _refuse}, new_session()),
    ]
    for raised, options, create in refusals:
        with pytest.raises(raised):
            storage.append_events(
                agent_key="bot",
                session_key="s1",
                **{"events": [event(1)], "now": T0, **options},
                create=create,
            )
        with pytest.raises(SessionNotFound):
            storage.get_session(agent_key="bot", session_key="s1", now=T0)
    with pytest.raises(AgentNotFound):
        storage.append_events(
            agent_key="nobot",
            session_key="s1",
            events=[event(1)],
            now=T0,
            create=dataclasses.replace(new_session(), agent_key="nobot"),
        )
    storage.update_agent(agent_key="bot", changes={"enabled": False}, now=T0)
    with pytest.raises(AgentDisabled):
        storage.append_events(
            agent_key="bot", session_key="s1", events=[event(1)], now=T0, create=new_session()
        )
    assert walk(storage) == []


def _refuse(metadata):
    raise ValueError("refused")


def at_once(write: Callable[[int], None], count: int) -> None:
    """``write(n)`` for n in range(count), each in a thread of its own, all at once."""
    threads = [threading.Thread(target=write, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)


def test_batches_creating_one_session_at_once_make_one(storage):
    make_agent(storage)
    outcomes, errors = [], []

    def write(n: int) -> None:
        try:
            storage.append_events(
                agent_key="bot",
                session_key="s1",
                events=[event(100 + n)],
                now=T0,
                create=new_session(name=f"writer {n}"),
            )
            outcomes.append(n)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    at_once(write, 6)
    assert errors == [] and sorted(outcomes) == list(range(6))
    assert walk(storage) == ["s1"]
    assert sorted(e for e, _ in ids_of(storage)) == sorted(f"aev_{100 + n}" for n in range(6))


def test_an_exclusive_create_refuses_a_live_session_and_writes_nothing(storage):
    make_agent(storage)
    storage.append_events(
        agent_key="bot",
        session_key="s1",
        events=[],
        now=T0,
        create=new_session(metadata={"v": 1}),
        create_exclusive=True,
    )
    with pytest.raises(Conflict):
        storage.append_events(
            agent_key="bot",
            session_key="s1",
            events=[event(1)],
            now=T0,
            metadata_patch={"v": 2},
            state_patch={"app": {"a": 1}},
            create=new_session(name="other"),
            create_exclusive=True,
        )
    got = storage.get_session(agent_key="bot", session_key="s1", now=T0)
    assert (got.name, got.metadata) == ("new s1", {"v": 1})
    assert ids_of(storage) == []
    assert storage.get_state(agent_key="bot", keys=["app"]) == [StateDocument("app")]


def test_of_exclusive_creates_of_one_key_at_once_one_wins(storage):
    make_agent(storage)
    outcomes, refused, errors = [], [], []

    def write(n: int) -> None:
        try:
            storage.append_events(
                agent_key="bot",
                session_key="s1",
                events=[event(100 + n)],
                now=T0,
                state_patch={"app": {f"k{n}": n}},
                create=new_session(name=f"writer {n}"),
                create_exclusive=True,
            )
            outcomes.append(n)
        except Conflict:
            refused.append(n)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    at_once(write, 6)
    assert errors == [] and len(outcomes) == 1 and len(refused) == 5
    (winner,) = outcomes
    assert storage.get_session(agent_key="bot", session_key="s1", now=T0).name == f"writer {winner}"
    assert [e for e, _ in ids_of(storage)] == [f"aev_{100 + winner}"]
    assert storage.get_state(agent_key="bot", keys=["app"])[0].value == {f"k{winner}": winner}


# An agent's state documents, written with a batch


def test_state_documents_are_patched_with_their_batch(storage, session):
    make_session(storage, "s2")
    assert storage.get_state(agent_key="bot", keys=["app", "user:u-1"]) == [
        StateDocument("app"),
        StateDocument("user:u-1"),
    ]
    later = T0 + dt.timedelta(seconds=1)
    storage.append_events(
        agent_key="bot",
        session_key="s1",
        events=[event(1)],
        now=later,
        state_patch={"app": {"theme": "dark", "n": 1}, "user:u-1": {"lang": "fr"}},
    )
    # Another session of the agent sees and patches the same documents.
    storage.append_events(
        agent_key="bot",
        session_key="s2",
        events=[event(2)],
        now=later,
        state_patch={"app": {"n": 2, "theme": None, "deep": {"a": [1]}}},
    )
    app, user, other = storage.get_state(agent_key="bot", keys=["app", "user:u-1", "user:u-2"])
    assert app == StateDocument("app", {"n": 2, "deep": {"a": [1]}}, later)
    assert user == StateDocument("user:u-1", {"lang": "fr"}, later)
    assert other == StateDocument("user:u-2")
    app.value["n"] = 99  # a copy
    assert storage.get_state(agent_key="bot", keys=["app"])[0].value["n"] == 2
    with pytest.raises(AgentNotFound):
        storage.get_state(agent_key="nobot", keys=["app"])


def test_a_refused_batch_writes_no_state(storage, session):
    storage.append_events(
        agent_key="bot", session_key="s1", events=[event(1)], now=T0, state_patch={"app": {"a": 1}}
    )
    refusals = [
        (StaleHistory, {"if_last_event_id": "aev_9"}),
        (Conflict, {"events": [event(1)]}),
        (ValueError, {"check_state": lambda key, value: _refuse(value)}),
        (ValueError, {"metadata_patch": {"m": 1}, "check_metadata": _refuse}),
    ]
    for raised, options in refusals:
        with pytest.raises(raised):
            storage.append_events(
                agent_key="bot",
                session_key="s1",
                **{"events": [event(2)], "now": T0, **options},
                state_patch={"app": {"a": 2}, "other": {"b": 1}},
            )
    assert [d.value for d in storage.get_state(agent_key="bot", keys=["app", "other"])] == [
        {"a": 1},
        {},
    ]
    with pytest.raises(SessionNotFound):
        storage.append_events(
            agent_key="bot", session_key="nope", events=[], now=T0, state_patch={"x": {"a": 1}}
        )
    assert storage.get_state(agent_key="bot", keys=["x"])[0] == StateDocument("x")


def test_state_goes_with_its_agent(storage, session):
    storage.append_events(
        agent_key="bot", session_key="s1", events=[], now=T0, state_patch={"app": {"a": 1}}
    )
    storage.delete_agent(agent_key="bot")
    make_agent(storage)
    assert storage.get_state(agent_key="bot", keys=["app"]) == [StateDocument("app")]


def test_concurrent_state_patches_lose_nothing(storage, session):
    for n in range(4):
        make_session(storage, f"w{n}")
    errors = []

    def write(n: int) -> None:
        try:
            for i in range(10):
                storage.append_events(
                    agent_key="bot",
                    session_key=f"w{n}",
                    events=[event(f"{n}x{i}")],
                    now=T0,
                    state_patch={"app": {f"w{n}-{i}": i}, "shared": {f"w{n}-{i}": True}},
                )
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    app, shared = storage.get_state(agent_key="bot", keys=["app", "shared"])
    assert len(app.value) == 40 and len(shared.value) == 40
