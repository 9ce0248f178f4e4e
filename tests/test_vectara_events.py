"""The official ``vectara`` client's agent-event calls, and fork, against a live gunicorn server."""

from __future__ import annotations

import json
import logging

import pytest

from tests.servers import bootstrap, cli, serving

vectara = pytest.importorskip("vectara")
import httpx  # noqa: E402
from vectara import AgentInput_Text, Vectara  # noqa: E402
from vectara.agent_events import (  # noqa: E402
    CreateAgentEventsRequestBody_InputMessage,
    CreateAgentEventsRequestBody_Interrupt,
    CreateAgentEventsStreamRequestBody_InputMessage,
    CreateAgentEventsStreamRequestBody_Interrupt,
)
from vectara.agent_sessions.types import CreateAgentSessionRequestFromSession  # noqa: E402
from vectara.environment import VectaraEnvironment  # noqa: E402
from vectara.errors import BadRequestError, ForbiddenError, NotFoundError  # noqa: E402
from vectara.types import (  # noqa: E402  # noqa: E402
    AgentEvent_AgentOutput,
    AgentEvent_InputMessage,
    AgentEvent_SessionInterrupted,
    AgentEvent_ToolInput,
    AgentStreamedResponse_End,
    AgentStreamedResponse_InputMessage,  # noqa: E402
    AgentStreamedResponse_SessionInterrupted,
)

pytestmark = pytest.mark.slow
AGENT = "support-bot"
SCOPES = "sessions:create,sessions:read,sessions:update,sessions:delete,events:create"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vectara-events")
    env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp}/sessions.db"}
    token = bootstrap(env, grants=f"{AGENT}={SCOPES}")
    runtime = cli(
        "keys", "create", "--name", "runtime", "--grant", f"{AGENT}=events:append", env=env
    )
    with serving(env, tmp, workers=2) as server, httpx.Client(timeout=60) as http:
        yield server, token, runtime.stdout.strip().splitlines()[-1], http


def connect(server, token):
    url = server[0].url
    return Vectara(
        api_key=token, environment=VectaraEnvironment(default=url, auth=url), httpx_client=server[3]
    )


def text(content: str) -> list:
    return [AgentInput_Text(content=content)]


def test_history_through_the_official_client(server):
    client = connect(server, server[1])
    client.agent_sessions.create(AGENT, key="chat", name="Chat")

    answer = client.agent_events.create(
        AGENT, "chat", request=CreateAgentEventsRequestBody_InputMessage(messages=text("hello"))
    )
    assert answer.session_key == "chat"
    [first] = answer.events
    assert isinstance(first, AgentEvent_InputMessage) and first.messages[0].content == "hello"

    streamed = list(
        client.agent_events.create_stream(
            AGENT,
            "chat",
            request=CreateAgentEventsStreamRequestBody_InputMessage(
                messages=text("again"), stream_response=True
            ),
        )
    )
    assert [type(item) for item in streamed] == [
        AgentStreamedResponse_InputMessage,
        AgentStreamedResponse_End,
    ]
    second = streamed[0]
    assert second.messages[0].content == "again" and second.id.startswith("aev_")

    # The agent runtime writes its part over plain HTTP (the client has no batch call),
    # in a body past the usual 64 KiB, once with a declared length and once chunked.
    runtime = {"x-api-key": server[2], "content-type": "application/json"}
    url = f"{server[0].url}/v2/agents/{AGENT}/sessions/chat/events/batch"
    outputs = [{"type": "agent_output", "content": f"{i} " + "x" * 3000} for i in range(30)]
    body = {
        "events": [
            {
                "type": "tool_input",
                "tool_call_id": "c1",
                "tool_configuration_name": "kb",
                "tool_name": "search",
                "tool_input": {"q": "x"},
                "metadata": {"adk": {"author": "agent", "invocation_id": "i-1"}},
            },  # fmt: skip
            *outputs[:15],
        ],
        "if_last_event_id": second.id,
    }
    response = server[3].post(url, content=json.dumps(body).encode(), headers=runtime)
    assert response.status_code == 201, response.text
    last = response.json()["events"][-1]["id"]

    def chunks():
        data = json.dumps({"events": outputs[15:], "if_last_event_id": last}).encode()
        for start in range(0, len(data), 16384):
            yield data[start : start + 16384]

    response = server[3].post(url, content=chunks(), headers=runtime)
    assert response.status_code == 201, response.text
    stale = server[3].post(url, content=json.dumps(body).encode(), headers=runtime)
    assert stale.status_code == 409 and stale.json()["error"] == "conflict"

    ids = [first.id, second.id]
    every = list(client.agent_events.list(AGENT, "chat", limit=7))
    assert [e.id for e in every][:2] == ids and len(every) == 33
    assert isinstance(every[2], AgentEvent_ToolInput) and every[2].tool_input == {"q": "x"}
    # An event's metadata (beyond Vectara) is an extra field its models accept and keep.
    assert every[2].metadata == {"adk": {"author": "agent", "invocation_id": "i-1"}}
    assert getattr(every[3], "metadata", None) is None
    assert all(isinstance(e, AgentEvent_AgentOutput) for e in every[3:])

    hidden = client.agent_events.hide(AGENT, "chat", every[3].id)
    assert hidden.id == every[3].id and hidden.hide_reason == "manual"
    visible = list(client.agent_events.list(AGENT, "chat", limit=10, include_hidden=False))
    assert every[3].id not in [e.id for e in visible] and len(visible) == 32
    pages = list(
        client.agent_events.list(AGENT, "chat", limit=10, include_hidden=True).iter_pages()
    )
    assert len(pages) == 4 and sum(len(page.items) for page in pages) == 33
    assert client.agent_events.get(AGENT, "chat", every[3].id).hide_reason == "manual"
    shown = client.agent_events.unhide(AGENT, "chat", every[3].id)
    assert getattr(shown, "hide_reason", None) is None

    assert client.agent_events.delete(AGENT, "chat", every[4].id) is None
    with pytest.raises(NotFoundError) as missing:
        client.agent_events.get(AGENT, "chat", every[4].id)
    assert missing.value.body["error"] == "event_not_found"

    fork = client.agent_sessions.create(
        AGENT,
        key="chat-fork",
        name="Fork",
        from_session=CreateAgentSessionRequestFromSession(
            session_key="chat", include_up_to_event_id=every[2].id
        ),
    )
    assert fork.key == "chat-fork"
    assert fork.forked_from == {"agent_key": AGENT, "session_key": "chat", "event_id": every[2].id}
    assert [e.id for e in client.agent_events.list(AGENT, "chat-fork")] == [e.id for e in every[:3]]

    # The user's key cannot write what the agent did.
    user = {"x-api-key": server[1], "content-type": "application/json"}
    refused = server[3].post(
        url, content=json.dumps({"events": outputs[:1]}).encode(), headers=user
    )
    assert refused.status_code == 403
    with pytest.raises(ForbiddenError):
        connect(server, server[2]).agent_events.list(AGENT, "chat")


def test_behavior_since_and_interrupt_through_the_official_client(server, caplog):
    client = connect(server, server[1])
    client.agent_sessions.create(AGENT, key="running", name="Running")

    def say(content, **extra):
        return client.agent_events.create(
            AGENT,
            "running",
            request=CreateAgentEventsRequestBody_InputMessage(messages=text(content), **extra),
        )

    [first] = say("hello", behavior="follow_up").events
    assert isinstance(first, AgentEvent_InputMessage) and first.behavior == "follow_up"
    runtime = {"x-api-key": server[2], "content-type": "application/json"}
    reply = {"events": [{"type": "agent_output", "content": "Working on it"}]}
    url = f"{server[0].url}/v2/agents/{AGENT}/sessions/running/events/batch"
    response = server[3].post(url, content=json.dumps(reply).encode(), headers=runtime)
    assert response.status_code == 201, response.text
    output = response.json()["events"][0]["id"]

    caught_up = say("stop, the other one", behavior="steer", since=first.id)
    assert caught_up.session_key == "running"
    assert [type(e) for e in caught_up.events] == [AgentEvent_AgentOutput, AgentEvent_InputMessage]
    assert caught_up.events[0].id == output and caught_up.events[0].content == "Working on it"
    assert caught_up.events[1].behavior == "steer"
    everything = say("from the top", since="start").events
    assert [e.id for e in everything] == [e.id for e in client.agent_events.list(AGENT, "running")]
    assert [e.id for e in everything[:3]] == [first.id, output, caught_up.events[1].id]
    with pytest.raises(NotFoundError) as missing:
        say("lost", since="aev_missing")
    assert missing.value.body["error"] == "event_not_found"
    with pytest.raises(BadRequestError) as refused:
        say("odd", behavior="queue")
    assert set(refused.value.body["field_errors"]) == {"behavior"}

    interrupted = client.agent_events.create(
        AGENT, "running", request=CreateAgentEventsRequestBody_Interrupt()
    )
    [event] = interrupted.events
    assert isinstance(event, AgentEvent_SessionInterrupted) and event.session_key == "running"
    got = client.agent_events.get(AGENT, "running", event.id)
    assert isinstance(got, AgentEvent_SessionInterrupted) and got.created_at == event.created_at
    listed = list(client.agent_events.list(AGENT, "running"))
    assert listed[-1] == got and len(listed) == 5
    streamed = list(
        client.agent_events.create_stream(
            AGENT,
            "running",
            request=CreateAgentEventsStreamRequestBody_Interrupt(stream_response=True),
        )
    )
    assert [type(item) for item in streamed] == [
        AgentStreamedResponse_SessionInterrupted,
        AgentStreamedResponse_End,
    ]

    def stream_since(anchor):
        request = CreateAgentEventsStreamRequestBody_InputMessage(
            messages=text("streamed"), since=anchor, stream_response=True
        )
        return list(client.agent_events.create_stream(AGENT, "running", request=request))

    caught = stream_since(output)
    assert [item.type for item in caught] == [
        "input_message", "input_message", "session_interrupted", "session_interrupted",
        "input_message", "end",
    ]  # fmt: skip
    assert caught[0].id == caught_up.events[1].id and caught[0].behavior == "steer"
    # Its stream models have no stored agent_output (Vectara streams it in pieces).
    with caplog.at_level(logging.WARNING):
        skipped = stream_since(first.id)
    assert [item.id for item in skipped[:-2]] == [item.id for item in caught[:-1]]
    assert [item.type for item in skipped[-2:]] == ["input_message", "end"]
    assert "agent_output" in caplog.text
