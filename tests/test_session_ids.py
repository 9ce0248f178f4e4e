"""Session row ids on the SQL backends: never given again, and never used apart from
the agent and session keys they were found by.

A call on a session's events finds the session's row in the statement that
reads or changes the events. The races below put a session's deletion, and a
session of another agent created with an event of the same id, right before
the first statement on events that a call runs: that is just after the
session's lookup, where the lookup is a statement of its own.
"""

from __future__ import annotations

import datetime as dt

import pytest

from storage_backends import Agent, Event, Session
from tests.conftest import ALL_SCOPES, assert_error

T0 = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
SQL = pytest.mark.parametrize("storage_url", ["sqlite", "postgres"], indirect=True)


def row_id(storage, table: str, **where: str) -> int:
    columns = " AND ".join(f"{column} = ?" for column in where)
    with storage._reading() as conn:
        query = storage._sql(f"SELECT id FROM {table} WHERE {columns}")
        return conn.execute(query, list(where.values())).fetchone()[0]


def agent(storage, key: str) -> None:
    storage.create_agent(agent=Agent(key=key, name=key, created_at=T0, updated_at=T0))


def session(storage, agent_key: str, key: str) -> None:
    storage.create_session(
        session=Session(key=key, agent_key=agent_key, name=key, created_at=T0, updated_at=T0)
    )


@SQL
def test_the_id_of_a_deleted_session_or_agent_is_never_given_again(storage):
    agent(storage, "a")
    session(storage, "a", "s1")
    session(storage, "a", "s2")
    newest = row_id(storage, "sessions", key="s2")
    storage.delete_session(agent_key="a", session_key="s2", now=T0)
    session(storage, "a", "s3")
    assert row_id(storage, "sessions", key="s3") > newest

    agent(storage, "b")
    newest = row_id(storage, "agents", key="b")
    storage.delete_agent(agent_key="b")
    agent(storage, "c")
    assert row_id(storage, "agents", key="c") > newest


@pytest.fixture
def race(app, client, keys, admin, monkeypatch):
    """Agent ``mine`` with session ``s`` holding ``aev_same``; ``arm()`` makes the next
    statement on events run after ``s`` is deleted and agent ``theirs`` got a new
    session with its own ``aev_same``. Yields the storage, the headers and ``arm``."""
    storage = app.extensions["agent_sessions"].storage
    for key in ("mine", "theirs"):
        response = client.post("/v2/agents", json={"key": key, "name": key}, headers=admin)
        assert response.status_code == 201, response.json
    headers = keys.headers(("*", (*ALL_SCOPES, "events:append")))
    session(storage, "mine", "s")
    mine = Event(
        id="aev_same",
        session_key="",
        type="agent_output",
        fields={"content": "mine"},
        created_at=T0,
    )
    storage.append_events(agent_key="mine", session_key="s", events=[mine], now=T0)
    sql = storage._sql
    armed = []

    def swap() -> None:
        storage.delete_session(agent_key="mine", session_key="s", now=T0)
        session(storage, "theirs", "t")
        theirs = Event(
            id="aev_same",
            session_key="",
            type="agent_output",
            fields={"content": "theirs"},
            created_at=T0,
        )
        storage.append_events(agent_key="theirs", session_key="t", events=[theirs], now=T0)

    def paused(statement: str) -> str:
        if armed and " events" in statement:
            armed.clear()
            swap()
        return sql(statement)

    monkeypatch.setattr(storage, "_sql", paused)
    yield storage, headers, lambda: armed.append(True)


def theirs(storage) -> Event:
    return storage.get_event(agent_key="theirs", session_key="t", event_id="aev_same", now=T0)


MINE = "/v2/agents/mine/sessions/s/events"


@SQL
def test_a_get_racing_a_deletion_never_reads_another_agents_event(race, client):
    storage, headers, arm = race
    arm()
    response = client.get(f"{MINE}/aev_same", headers=headers)
    assert_error(response, 404, "session_not_found")


@SQL
def test_a_list_racing_a_deletion_never_reads_another_agents_events(race, client):
    storage, headers, arm = race
    arm()
    response = client.get(MINE, headers=headers)
    assert_error(response, 404, "session_not_found")


@SQL
def test_a_hide_racing_a_deletion_never_hides_another_agents_event(race, client):
    storage, headers, arm = race
    arm()
    response = client.post(f"{MINE}/aev_same/hide", headers=headers)
    assert_error(response, 404, "session_not_found")
    assert theirs(storage).hide_reason is None


@SQL
def test_a_delete_racing_a_deletion_never_removes_another_agents_event(race, client):
    storage, headers, arm = race
    arm()
    response = client.delete(f"{MINE}/aev_same", headers=headers)
    assert_error(response, 404, "session_not_found")
    assert theirs(storage).fields == {"content": "theirs"}


@SQL
def test_without_the_race_the_calls_act_on_their_own_session(race, client):
    storage, headers, _ = race
    response = client.get(f"{MINE}/aev_same", headers=headers)
    assert response.status_code == 200 and response.json["content"] == "mine"
    assert client.post(f"{MINE}/aev_same/hide", headers=headers).json["hide_reason"] == "manual"
    listed = client.get(MINE, headers=headers, query_string={"include_hidden": "true"})
    assert [e["content"] for e in listed.json["events"]] == ["mine"]
    assert client.delete(f"{MINE}/aev_same", headers=headers).status_code == 204
    assert_error(client.get(f"{MINE}/aev_same", headers=headers), 404, "event_not_found")
