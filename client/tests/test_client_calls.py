"""Every call of the client against a live server, with the sync and the async client."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from agent_sessions_client import (
    Agent,
    AgentNotFound,
    ApiKey,
    Conflict,
    Event,
    EventNotFound,
    ForkedFrom,
    Grant,
    PreconditionFailed,
    Session,
    SessionNotFound,
    Unauthorized,
)

TOOL = {"tool_call_id": "c1", "tool_configuration_name": "billing", "tool_name": "find_invoice"}
TURN = [
    {"type": "tool_input", **TOOL, "tool_input": {"customer": "c-17"}},
    {"type": "tool_output", **TOOL, "tool_output": {"invoice": "INV-9"}},
    {"type": "agent_output", "content": "Invoice INV-9 was sent on Monday."},
]


def test_sessions_create_get_list_update_delete(api, agent):
    session = api.sessions.create(
        agent, name="Billing question", metadata={"customer": "c-17"}, tti_minutes=60
    )
    assert isinstance(session, Session)
    assert (session.key, session.agent_key, session.name) == (
        "billing-question",
        agent,
        "Billing question",
    )
    assert session.metadata == {"customer": "c-17"} and session.tti_minutes == 60
    assert session.enabled is True and session.description is None
    assert session.forked_from is None and session.extra == {}
    assert session.created_at.tzinfo == dt.UTC
    assert session.etag and session.etag.startswith('"')

    got = api.sessions.get(agent, session.key)
    assert got == session and got.etag == session.etag

    refund = api.sessions.create(agent, key="refund", name="Refund", description="money back")
    assert refund.key == "refund" and refund.description == "money back"
    assert [s.key for s in api.sessions.list(agent)] == ["billing-question", "refund"]
    assert [s.key for s in api.sessions.list(agent, filter="(?i)MONEY")] == ["refund"]

    updated = api.sessions.update(agent, "refund", enabled=False, description="")
    assert updated.enabled is False and updated.description is None
    assert updated.name == "Refund"  # left as it was
    assert updated.etag != refund.etag

    assert api.sessions.delete(agent, "refund") is None
    with pytest.raises(SessionNotFound):
        api.sessions.get(agent, "refund")
    assert [s.key for s in api.sessions.list(agent)] == ["billing-question"]


def test_fork_copies_or_compacts_the_history(api, agent):
    api.sessions.create(agent, key="source", name="Source")
    first, second, third = api.events.append(agent, "source", TURN)

    copy = api.sessions.fork(agent, "source", name="Copy", include_up_to_event_id=second.id)
    assert copy.forked_from == ForkedFrom(agent_key=agent, session_key="source", event_id=second.id)
    assert [e.id for e in api.events.list(agent, copy.key)] == [first.id, second.id]

    compacted = api.sessions.fork(
        agent,
        "source",
        key="compacted",
        name="Compacted",
        source_agent_key=agent,
        compact_up_to_event_id=second.id,
        summary_text="Looked the invoice up.",
    )
    visible = list(api.events.list(agent, compacted.key))
    assert [e.type for e in visible] == ["agent_output", "compaction"]
    assert visible[1].summary_text == "Looked the invoice up."
    everything = list(api.events.list(agent, compacted.key, include_hidden=True))
    assert [e.hide_reason for e in everything] == ["compaction", "compaction", None, None]


def test_events_create_append_list_get_hide_unhide_delete_compact(api, agent):
    api.sessions.create(agent, key="chat", name="Chat")
    asked = api.events.create(agent, "chat", "Where is my invoice?")
    assert isinstance(asked, Event) and asked.type == "input_message"
    assert asked.id.startswith("aev_") and asked.session_key == "chat"
    assert asked.messages == [{"type": "text", "content": "Where is my invoice?"}]
    assert asked.created_at.tzinfo == dt.UTC and not asked.hidden

    turn = api.events.append(
        agent,
        "chat",
        TURN,
        if_last_event_id=asked.id,
        metadata_patch={"last_invoice": "INV-9"},
    )
    assert [e.type for e in turn] == ["tool_input", "tool_output", "agent_output"]
    assert turn[1].tool_output == {"invoice": "INV-9"} and turn[1].error is False
    assert turn[2].content == "Invoice INV-9 was sent on Monday."
    assert api.sessions.get(agent, "chat").metadata == {"last_invoice": "INV-9"}
    # The history moved on: a batch written against the old last event is refused whole.
    for stale in (asked.id, None):
        with pytest.raises(Conflict):
            api.events.append(agent, "chat", TURN[2:], if_last_event_id=stale)
    ids = [asked.id, *(e.id for e in turn)]
    assert [e.id for e in api.events.list(agent, "chat")] == ids

    assert [e.id for e in api.events.list(agent, "chat", order="desc")] == ids[::-1]
    tools = api.events.list(agent, "chat", types=["tool_input", "tool_output"])
    assert [e.type for e in tools] == ["tool_input", "tool_output"]
    assert [e.type for e in api.events.list(agent, "chat", types="agent_output")] == [
        "agent_output"
    ]
    assert api.events.get(agent, "chat", turn[0].id) == turn[0]

    hidden = api.events.hide(agent, "chat", turn[0].id)
    assert hidden.hide_reason == "manual" and hidden.hidden
    assert turn[0].id not in [e.id for e in api.events.list(agent, "chat")]
    assert turn[0].id in [e.id for e in api.events.list(agent, "chat", include_hidden=True)]
    assert api.events.get(agent, "chat", turn[0].id).hide_reason == "manual"
    assert api.events.unhide(agent, "chat", turn[0].id).hide_reason is None

    assert api.events.delete(agent, "chat", turn[1].id) is None
    with pytest.raises(EventNotFound):
        api.events.get(agent, "chat", turn[1].id)

    api.events.create(agent, "chat", ["Thanks!", {"type": "skill", "skill_name": "survey"}])
    summary = api.events.compact(agent, "chat", summary_text="Invoice INV-9 found.")
    assert summary.type == "compaction" and summary.summary_text == "Invoice INV-9 found."
    assert summary.summary_key == summary.id
    assert [e.type for e in api.events.list(agent, "chat")] == ["input_message", "compaction"]
    again = api.events.compact(agent, "chat", summary_text="All of it.", up_to_event_id=summary.id)
    assert [e.id for e in api.events.list(agent, "chat")] == [again.id]

    # A history without events: "no last event yet" is None.
    api.sessions.create(agent, key="empty", name="Empty")
    written = api.events.append(agent, "empty", TURN[2:], if_last_event_id=None)
    assert [e.type for e in written] == ["agent_output"]


def test_events_append_creating_the_session_pop_and_clear(api, agent, lose_answers, connect, token):
    written = api.events.append(
        agent,
        "new-chat",
        TURN,
        if_last_event_id=None,
        create_session={"name": "New chat", "metadata": {"user_id": "u-17"}},
    )
    made = api.sessions.get(agent, "new-chat")
    assert (made.name, made.metadata) == ("New chat", {"user_id": "u-17"})
    # The session exists now: create_session is ignored, the events are appended.
    more = api.events.append(agent, "new-chat", TURN[2:], create_session={"name": "Other"})
    assert api.sessions.get(agent, "new-chat").name == "New chat"

    assert api.events.pop(agent, "new-chat") == more[0]
    with pytest.raises(Conflict):
        api.events.pop(agent, "new-chat", if_last_event_id=written[0].id)
    assert api.events.pop(agent, "new-chat", if_last_event_id=written[2].id) == written[2]
    # A pop whose answer is lost is sent again with its Idempotency-Key: one event goes.
    lossy = connect(token, transport=lose_answers(1))
    assert lossy.events.pop(agent, "new-chat") == written[1]
    assert len(set(lossy.sent.keys())) == 1 and len(lossy.sent.requests) == 2
    assert [e.id for e in api.events.list(agent, "new-chat")] == [written[0].id]

    assert api.events.clear(agent, "new-chat") is None
    assert list(api.events.list(agent, "new-chat")) == []
    assert api.events.pop(agent, "new-chat") is None
    assert api.sessions.get(agent, "new-chat").name == "New chat"  # the session stays
    with pytest.raises(SessionNotFound):
        api.events.clear(agent, "no-such-chat")


def test_agents_and_api_keys(connect, live, agent):
    api = connect(live.admin)
    other = f"{agent}-triage"
    created = api.agents.create(other, name="Triage", description="first line")
    assert isinstance(created, Agent) and created.etag
    assert (created.key, created.description, created.enabled) == (other, "first line", True)
    got = api.agents.get(other)
    assert got == created and got.etag == created.etag
    assert {other, agent} <= {a.key for a in api.agents.list(limit=1)}

    renamed = api.agents.update(other, name="Triage desk", if_match=got.etag)
    assert renamed.name == "Triage desk" and renamed.etag != got.etag
    with pytest.raises(PreconditionFailed):
        api.agents.update(other, enabled=False, if_match=got.etag)
    with pytest.raises(PreconditionFailed):
        api.agents.delete(other, if_match=got.etag)
    assert api.agents.get(other).enabled is True
    assert api.agents.delete(other, if_match=renamed.etag) is None
    with pytest.raises(AgentNotFound):
        api.agents.get(other)

    key = api.api_keys.create(
        name="reader", grants={agent: ["sessions:read"]}, create_limit="30/minute"
    )
    assert isinstance(key, ApiKey) and key.secret.startswith(key.id + ".")
    assert key.grants == [Grant(agent=agent, scopes=["sessions:read"])]
    assert (key.state, key.admin, key.create_limit) == ("active", False, "30/minute")
    expiring = api.api_keys.create(
        name="expiring", expires_at=dt.datetime(2099, 1, 1, tzinfo=dt.UTC)
    )
    assert expiring.expires_at == dt.datetime(2099, 1, 1, tzinfo=dt.UTC)
    listed = {k.id: k for k in api.api_keys.list(limit=2)}
    assert listed[key.id].secret is None and listed[key.id].name == "reader"
    assert expiring.id in listed

    reader = connect(key.secret)
    assert list(reader.sessions.list(agent)) == []
    api.api_keys.revoke(key.id)
    assert {k.id: k for k in api.api_keys.list()}[key.id].state == "revoked"
    deadline = time.monotonic() + 3  # revocation reaches every worker within a second
    while True:
        try:
            list(reader.sessions.list(agent))
        except Unauthorized:
            break
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(0.1)
