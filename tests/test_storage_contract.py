"""The storage contract: every backend passes the same tests."""

from __future__ import annotations

import copy
import datetime as dt
import re
import threading

import pytest

from storage_backends import (
    Agent,
    AgentDisabled,
    AgentNotFound,
    ApiKey,
    ApiKeyNotFound,
    Conflict,
    Grant,
    Session,
    SessionNotFound,
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
