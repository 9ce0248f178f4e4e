"""The client's calls for the agent-framework features, with the sync and the async client:
event metadata, the session list's metadata query, a batch's state_patch and create_session,
the agent's state documents, and a page of history with its session and state."""

from __future__ import annotations

import pytest

from agent_sessions_client import Conflict, EventPage, InvalidRequest, Session, StateDocument


def test_event_metadata_is_a_field_of_its_own(api, agent):
    api.sessions.create(agent, key="s", name="S")
    plain, tagged = api.events.append(
        agent,
        "s",
        [
            {"type": "agent_output", "content": "a"},
            {"type": "agent_output", "content": "b", "metadata": {"author": "bot", "n": [1]}},
        ],
    )
    assert plain.metadata is None and tagged.metadata == {"author": "bot", "n": [1]}
    assert "metadata" not in tagged.fields and tagged.content == "b"
    assert [e.metadata for e in api.events.list(agent, "s")] == [None, {"author": "bot", "n": [1]}]


def test_the_session_list_by_metadata(api, agent):
    for key, metadata in [
        ("a", {"user_id": "u-1", "vip": True, "turns": 17}),
        ("b", {"user_id": "u-1"}),
        ("c", {"user_id": "u-2", "vip": True}),
    ]:
        api.sessions.create(agent, key=key, name=key, metadata=metadata)
    assert [s.key for s in api.sessions.list(agent, metadata={"user_id": "u-1"})] == ["a", "b"]
    found = api.sessions.list(agent, metadata={"vip": True, "turns": 17}, limit=1)
    assert [s.key for s in found] == ["a"]
    assert [s.key for s in api.sessions.list(agent, metadata={"user_id": "nobody"})] == []
    with pytest.raises(TypeError):
        api.sessions.list(agent, metadata={"user_id": None})
    with pytest.raises(InvalidRequest):
        list(api.sessions.list(agent, metadata={f"k{n}": "1" for n in range(5)}))


def test_a_batch_creates_its_session_and_patches_shared_state(api, agent):
    written = api.events.append(
        agent,
        "new",
        [{"type": "agent_output", "content": "hi"}],
        create_session={"name": "New", "metadata": {"user_id": "u-1"}},
        state_patch={"app": {"theme": "dark"}, "user:u-1": {"lang": "fr"}},
        if_last_event_id=None,
    )
    assert [e.content for e in written] == ["hi"]
    assert api.sessions.get(agent, "new").metadata == {"user_id": "u-1"}
    app, user, never = api.agents.state(agent, ["app", "user:u-1", "user:u-2"])
    assert isinstance(app, StateDocument) and app.value == {"theme": "dark"}
    assert app.updated_at is not None and user.value == {"lang": "fr"}
    assert (never.key, never.value, never.updated_at) == ("user:u-2", {}, None)
    assert api.agents.state(agent, "app")[0].value == {"theme": "dark"}
    with pytest.raises(Conflict):
        api.events.append(agent, "new", [], create_session={"name": "New", "exclusive": True})
    assert api.agents.state(agent, ["app"])[0].value == {"theme": "dark"}


def test_a_page_with_its_session_and_state(api, agent):
    api.events.append(
        agent,
        "s",
        [{"type": "agent_output", "content": str(n)} for n in range(3)],
        create_session={"name": "S"},
        state_patch={"app": {"a": 1}},
    )
    page = api.events.page(
        agent, "s", order="desc", limit=2, include_session=True, include_state=["app", "user:x"]
    )
    assert isinstance(page, EventPage) and [e.content for e in page.items] == ["2", "1"]
    assert isinstance(page.session, Session) and page.session.key == "s"
    assert [(d.key, d.value) for d in page.state] == [("app", {"a": 1}), ("user:x", {})]
    rest = api.events.page(agent, "s", order="desc", limit=2, page_key=page.page_key)
    assert [e.content for e in rest.items] == ["0"]
    assert rest.page_key is None and rest.session is None and rest.state is None
