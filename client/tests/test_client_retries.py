"""Retries against the live server (a real 429, a real 503, a refused connection, a lost
answer replayed through its Idempotency-Key), conditional writes, and the retry rules
on answers the server cannot be led to give on purpose."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

import agent_sessions_client as sdk
from agent_sessions_client import _core


def test_a_429_from_the_rate_limit_is_waited_out_and_sent_again(connect, make_key, agent):
    token = make_key({agent: ["sessions:create", "sessions:read"]}, create_limit="1/second")
    strict = connect(token, max_retries=0)
    patient = connect(token)
    strict.sessions.create(agent, key="a", name="A")
    with pytest.raises(sdk.RateLimitExceeded) as raised:
        strict.sessions.create(agent, key="b", name="B")
    assert raised.value.status == 429 and raised.value.request_id
    assert raised.value.retry_after >= 1
    assert raised.value.headers["X-RateLimit-Remaining"] == "0"

    patient.sessions.create(agent, key="c", name="C")  # the window is still the same
    sent = patient.sent
    assert sent.statuses() == [429, 201]
    waited = float(sent.responses[0].headers["Retry-After"])
    assert sent.times[1] - sent.times[0] >= waited - 0.05
    assert sent.keys()[0] and sent.keys()[0] == sent.keys()[1]
    assert [s.key for s in patient.sessions.list(agent)] == ["a", "c"]


def test_a_503_is_sent_again_with_the_same_idempotency_key(connect, token, agent, write_lock):
    def release(request: httpx.Request, attempt: int) -> None:
        if attempt == 2:
            write_lock.release()

    api = connect(token, on_request=release)
    write_lock.take()
    session = api.sessions.create(agent, name="After the outage")
    assert api.sent.statuses() == [503, 201]
    refused = api.sent.responses[0]
    assert refused.json()["error"] == "unavailable" and "Retry-After" in refused.headers
    assert len(set(api.sent.keys())) == 1 and api.sent.keys()[0]
    assert [s.key for s in api.sessions.list(agent)] == [session.key]


def test_retries_are_bounded(connect, token, agent, write_lock):
    api = connect(token, max_retries=1)
    write_lock.take()
    with pytest.raises(sdk.Unavailable) as raised:
        api.sessions.create(agent, name="Never")
    assert api.sent.statuses() == [503, 503]
    assert raised.value.retry_after is not None and raised.value.request_id
    write_lock.release()
    assert list(api.sessions.list(agent)) == []


def test_a_refused_connection_is_tried_again(connect, token, agent, forwarder):
    strict = connect(token, base_url=forwarder.url, max_retries=0)
    with pytest.raises(sdk.APIConnectionError) as raised:
        strict.sessions.create(agent, name="Early")
    assert not isinstance(raised.value, sdk.APITimeoutError)
    assert isinstance(raised.value.__cause__, httpx.ConnectError)

    def open_port(request: httpx.Request, attempt: int) -> None:
        if attempt == 2:
            forwarder.open()

    api = connect(token, base_url=forwarder.url, on_request=open_port)
    session = api.sessions.create(agent, name="Once up")
    assert len(api.sent.requests) == 2 and api.sent.statuses() == [201]
    assert [s.key for s in api.sessions.list(agent)] == [session.key]


def test_a_lost_answer_is_replayed_not_written_twice(connect, token, agent, lose_answers):
    api = connect(token, transport=lose_answers(1))
    session = api.sessions.create(agent, name="Written once")
    assert len(api.sent.requests) == 2 and len(set(api.sent.keys())) == 1
    assert api.sent.responses[0].headers["Idempotent-Replayed"] == "true"
    assert [s.key for s in api.sessions.list(agent)] == [session.key]

    api = connect(token, transport=lose_answers(1))
    turn = [{"type": "agent_output", "content": "Hello"}, {"type": "thinking"}]
    written = api.events.append(agent, session.key, turn, if_last_event_id=None)
    assert api.sent.responses[0].headers["Idempotent-Replayed"] == "true"
    assert [e.id for e in api.events.list(agent, session.key)] == [e.id for e in written]

    api = connect(token, transport=lose_answers(1))
    asked = api.events.create(agent, session.key, "And again?")
    assert [e.id for e in api.events.list(agent, session.key)][-1] == asked.id
    assert len(list(api.events.list(agent, session.key))) == 3


def test_an_api_key_create_is_not_sent_twice(connect, live, lose_answers):
    # The service takes no Idempotency-Key there: a second request would make a second key.
    admin = connect(live.admin, transport=lose_answers(1))
    name = f"lost-{uuid.uuid4().hex[:8]}"
    with pytest.raises(sdk.APIConnectionError):
        admin.api_keys.create(name=name)
    assert len(admin.sent.requests) == 1
    assert "Idempotency-Key" not in admin.sent.requests[0].headers
    assert [k.name for k in connect(live.admin).api_keys.list(limit=100)].count(name) == 1


def test_each_create_has_a_key_of_its_own(api, agent):
    api.sessions.create(agent, name="One")
    api.sessions.create(agent, name="Two", idempotency_key="mine-2")
    api.events.create(agent, "one", "hi")
    first, given, third = api.sent.keys()
    assert uuid.UUID(first) and uuid.UUID(third) and first != third
    assert given == "mine-2"
    assert api.sent.requests[0].headers["User-Agent"].startswith("agent-sessions-client/")


def test_if_match_guards_session_updates_and_deletes(api, agent):
    session = api.sessions.create(agent, name="Guarded")
    renamed = api.sessions.update(agent, session.key, name="Renamed", if_match=session.etag)
    assert renamed.name == "Renamed" and renamed.etag not in (None, session.etag)
    with pytest.raises(sdk.PreconditionFailed) as raised:
        api.sessions.update(agent, session.key, name="Lost update", if_match=session.etag)
    assert raised.value.status == 412
    with pytest.raises(sdk.PreconditionFailed):
        api.sessions.delete(agent, session.key, if_match=session.etag)
    assert api.sessions.get(agent, session.key).name == "Renamed"
    assert api.sessions.update(agent, session.key, tti_minutes=5, if_match="*").tti_minutes == 5
    current = api.sessions.get(agent, session.key).etag
    api.sessions.delete(agent, session.key, if_match=current)
    with pytest.raises(sdk.SessionNotFound):
        api.sessions.get(agent, session.key)


# The rules on answers the live server gives only by accident


def replying(*answers):
    """A mock transport giving ``answers`` in turn: (status, body, headers) or an exception."""
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(item, Exception):
            raise item
        status, body, headers = item
        return httpx.Response(status, json=body, headers=headers)

    return httpx.MockTransport(handle)


SESSION = {
    "key": "s",
    "agent_key": "a",
    "name": "S",
    "metadata": {},
    "enabled": True,
    "tti_minutes": 0,
    "created_at": "2026-11-28T17:49:52.123Z",
    "updated_at": "2026-11-28T17:49:52.123Z",
}
KEY = {"id": "ak_1", "name": "k", "grants": [], "admin": False, "state": "active"}


def error(code: str) -> dict:
    return {"error": code, "messages": [code], "request_id": "r"}


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(_core, "INITIAL_RETRY_DELAY", 0.001)


def test_5xx_is_retried_max_retries_times_then_raised(connect, quick):
    api = connect("ak_x.y", max_retries=3, transport=replying((500, error("internal_error"), {})))
    with pytest.raises(sdk.InternalError):
        api.sessions.get("a", "s")
    assert len(api.sent.requests) == 4


def test_a_timeout_is_retried_then_raised_as_a_timeout(connect, quick):
    timeout = httpx.ReadTimeout("slow")
    api = connect("ak_x.y", transport=replying(timeout, (200, SESSION, {"ETag": '"t"'})))
    assert api.sessions.get("a", "s").etag == '"t"'
    api = connect("ak_x.y", max_retries=1, transport=replying(timeout))
    with pytest.raises(sdk.APITimeoutError):
        api.sessions.get("a", "s")
    assert len(api.sent.requests) == 2


def test_a_retry_after_past_the_bound_is_raised_at_once(connect):
    limited = (429, error("rate_limit_exceeded"), {"Retry-After": "3600"})
    api = connect("ak_x.y", transport=replying(limited))
    with pytest.raises(sdk.RateLimitExceeded) as raised:
        api.sessions.get("a", "s")
    assert raised.value.retry_after == 3600 and len(api.sent.requests) == 1


def test_an_idempotency_key_in_use_is_waited_for(connect):
    in_use = (409, error("idempotency_key_in_use"), {"Retry-After": "0"})
    api = connect("ak_x.y", transport=replying(in_use, (201, SESSION, {})))
    assert api.sessions.create("a", name="S").key == "s"
    assert len(api.sent.requests) == 2 and len(set(api.sent.keys())) == 1
    conflict = connect("ak_x.y", transport=replying((409, error("conflict"), {})))
    with pytest.raises(sdk.Conflict):
        conflict.sessions.create("a", key="s", name="S")
    assert len(conflict.sent.requests) == 1


def test_a_request_without_an_idempotency_key_is_retried_only_when_refused(connect, quick):
    api = connect("ak_x.y", transport=replying((503, error("unavailable"), {})))
    with pytest.raises(sdk.Unavailable):
        api.api_keys.create(name="k")
    assert len(api.sent.requests) == 1
    limited = (429, error("rate_limit_exceeded"), {"Retry-After": "0"})
    api = connect("ak_x.y", transport=replying(limited, (201, KEY | {"secret": "ak_1.s"}, {})))
    assert api.api_keys.create(name="k").secret == "ak_1.s"
    assert len(api.sent.requests) == 2


def test_an_unreadable_success_raises_unexpected_response(connect):
    api = connect("ak_x.y", transport=replying((200, {"not": "a session"}, {"X-Request-ID": "r9"})))
    with pytest.raises(sdk.UnexpectedResponse) as raised:
        api.sessions.get("a", "s")
    assert raised.value.status == 200 and raised.value.request_id == "r9"


def test_the_backoff_doubles_up_to_its_bound():
    assert 0.375 <= _core._backoff(0) <= 0.5
    assert 0.75 <= _core._backoff(1) <= 1.0
    assert 6.0 <= _core._backoff(10) <= 8.0


def test_a_record_tolerates_fields_it_does_not_know():
    newer = sdk.Session.from_dict(SESSION | {"usage": {"events": 3}}, etag='"e"')
    assert newer.extra == {"usage": {"events": 3}} and newer.etag == '"e"'
    event = sdk.Event.from_dict(
        {"id": "aev_1", "session_key": "s", "type": "handoff", "to": "billing", "metadata": {}}
    )
    assert (event.type, event.to, event.metadata) == ("handoff", "billing", {})
    with pytest.raises(AttributeError):
        event.content  # noqa: B018
    assert json.loads(json.dumps(event.fields)) == {"to": "billing"}  # metadata: a field of its own
