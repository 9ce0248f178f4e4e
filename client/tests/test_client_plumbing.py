"""The clients as objects: context managers, an httpx client of one's own, headers, and the
async client used as an application would, with ``async with`` and ``async for``."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from agent_sessions_client import AgentSessions, AsyncAgentSessions, NotFound, SessionNotFound


def test_the_sync_client_closes_what_it_opened_only(live, token, agent):
    with AgentSessions(live.url, token) as client:
        assert list(client.sessions.list(agent)) == []
    assert client._http.is_closed

    own = httpx.Client()
    with AgentSessions(live.url + "/", token, http_client=own) as client:
        assert client.base_url == live.url
        assert list(client.sessions.list(agent)) == []
    assert not own.is_closed  # the caller's to close
    own.close()


def test_the_async_client_in_an_application(live, token, agent):
    async def main() -> list[str]:
        async with AsyncAgentSessions(live.url, token) as client:
            session = await client.sessions.create(agent, name="Async chat")
            asked = await client.events.create(agent, session.key, "Hello?")
            await client.events.append(
                agent,
                session.key,
                [{"type": "agent_output", "content": f"part {i}"} for i in range(5)],
                if_last_event_id=asked.id,
            )
            pages = [page async for page in client.events.list(agent, session.key, limit=2).pages()]
            assert [len(page.items) for page in pages] == [2, 2, 2]
            types = [event.type async for event in client.events.list(agent, session.key)]
            # Calls from several tasks at once share the client's connections.
            again = await asyncio.gather(
                *(client.sessions.get(agent, session.key) for _ in range(5))
            )
            assert {s.etag for s in again} == {session.etag}
        assert client._http.is_closed
        return types

    assert asyncio.run(main()) == ["input_message"] + ["agent_output"] * 5


def test_the_user_agent_reaches_the_server(live, token, agent):
    with AgentSessions(live.url, token) as client:
        list(client.sessions.list(agent))
    assert f'"GET /v2/agents/{agent}/sessions HTTP/1.1" 200' in live.log()
    assert '"agent-sessions-client/0.1.0 httpx/' in live.log()


def test_default_headers_are_sent_with_every_request(connect, token, agent):
    api = connect(token, default_headers={"X-Request-ID": "trace-17"})
    with pytest.raises(SessionNotFound) as raised:
        api.sessions.get(agent, "nope")
    assert raised.value.request_id == "trace-17"  # the server took the caller's id


@pytest.mark.parametrize(
    ("base_url", "api_key", "options"),
    [
        ("127.0.0.1:8000", "ak_x.y", {}),
        ("http://127.0.0.1:8000", "", {}),
        ("http://127.0.0.1:8000", "ak_x.y", {"max_retries": -1}),
    ],
)
def test_bad_settings_are_refused_at_once(base_url, api_key, options):
    with pytest.raises(ValueError):
        AgentSessions(base_url, api_key, **options)


def test_a_path_segment_is_quoted_and_a_non_string_refused(api, agent):
    # Quoted whole, "../" cannot climb to another route: a key outside the pattern is a 404.
    with pytest.raises(NotFound) as raised:
        api.sessions.get(agent, "../../../api_keys")
    assert raised.value.code == "not_found"
    assert "%2F" in str(api.sent.requests[-1].url)
    with pytest.raises(TypeError):
        api.sessions.get(agent, None)
