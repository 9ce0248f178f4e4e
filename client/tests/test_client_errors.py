"""One exception class per error code: each raised by the live server where a client call
can lead it there, the rest read from answers in the service's error shape."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

import agent_sessions_client as sdk
from agent_sessions_client import errors

# (error class, code, status, field named in field_errors, what leads the server there)
FROM_THE_SERVER = [
    (sdk.InvalidRequest, "invalid_request", 400, "name",
     lambda c: c.api.sessions.create(c.agent, name="   ")),
    (sdk.InvalidMetadata, "invalid_metadata", 400, "metadata",
     lambda c: c.api.sessions.create(c.agent, name="n", metadata={"k" * 200: 1})),
    (sdk.Unauthorized, "unauthorized", 401, None,
     lambda c: list(c.connect("ak_0123456789abcdef.wrong").sessions.list(c.agent))),
    (sdk.Forbidden, "forbidden", 403, None,
     lambda c: c.reader.sessions.create(c.agent, name="n")),
    (sdk.AgentNotFound, "agent_not_found", 404, None,
     lambda c: list(c.everywhere.sessions.list(c.agent + "-gone"))),
    (sdk.SessionNotFound, "session_not_found", 404, None,
     lambda c: c.api.sessions.get(c.agent, "gone")),
    (sdk.EventNotFound, "event_not_found", 404, None,
     lambda c: c.api.events.get(c.agent, "s", "aev_000000000000000000000000")),
    (sdk.NotFound, "not_found", 404, None,
     lambda c: c.api.events.get(c.agent, "s", "not-an-event-id")),
    (sdk.MethodNotAllowed, "method_not_allowed", 405, None,
     lambda c: c.api.request("PUT", f"/v2/agents/{c.agent}/sessions", json={})),
    (sdk.Conflict, "conflict", 409, None,
     lambda c: c.api.sessions.create(c.agent, key="s", name="again")),
    (sdk.SessionDisabled, "session_disabled", 409, None,
     lambda c: c.api.events.create(c.agent, "off", "hello?")),
    (sdk.AgentDisabled, "agent_disabled", 409, None,
     lambda c: c.creator.sessions.create(c.disabled_agent, name="n")),
    (sdk.PreconditionFailed, "precondition_failed", 412, None,
     lambda c: c.api.sessions.update(c.agent, "s", name="m", if_match='"stale"')),
    (sdk.PayloadTooLarge, "payload_too_large", 413, None,
     lambda c: c.api.sessions.create(c.agent, name="x" * 70_000)),
    (sdk.UnsupportedMediaType, "unsupported_media_type", 415, None,
     lambda c: c.api.request("POST", f"/v2/agents/{c.agent}/sessions", json={"name": "n"},
                             headers={"Content-Type": "text/plain"})),
    (sdk.IdempotencyKeyMismatch, "idempotency_key_mismatch", 422, None,
     lambda c: c.api.sessions.create(c.agent, name="other", idempotency_key=c.used_key)),
]  # fmt: skip


class Context:
    def __init__(self, **values):
        vars(self).update(values)


@pytest.fixture
def context(api, agent, admin, connect, make_key, kind):
    api.sessions.create(agent, key="s", name="S")
    api.sessions.create(agent, key="off", name="Off", enabled=False)
    used_key = f"used-{kind}"
    api.sessions.create(agent, name="first", idempotency_key=used_key)
    disabled_agent = f"{agent}-off"
    admin.agents.create(disabled_agent, name="Off", enabled=False)
    yield Context(
        api=api,
        agent=agent,
        connect=connect,
        reader=connect(make_key({agent: ["sessions:read"]})),
        everywhere=connect(make_key({"*": ["sessions:read"]})),
        disabled_agent=disabled_agent,
        creator=connect(make_key({disabled_agent: ["sessions:create"]})),
        used_key=used_key,
    )
    admin.agents.delete(disabled_agent)


@pytest.mark.parametrize(
    ("cls", "code", "status", "field", "action"),
    FROM_THE_SERVER,
    ids=[row[1] for row in FROM_THE_SERVER],
)
def test_each_error_the_server_answers_raises_its_class(context, cls, code, status, field, action):
    with pytest.raises(sdk.APIStatusError) as raised:
        action(context)
    err = raised.value
    assert type(err) is cls and isinstance(err, sdk.AgentSessionsError)
    assert (err.status, err.code) == (status, code) == (cls.status, cls.code)
    assert err.messages and err.message == " ".join(err.messages)
    assert err.request_id and err.request_id == err.headers["X-Request-ID"]
    assert str(err).startswith(f"{status} {code}: ") and err.request_id in str(err)
    if field is not None:
        assert field in err.field_errors
    else:
        assert err.field_errors == {}


def test_every_code_has_its_class():
    codes = {row[1] for row in FROM_THE_SERVER}
    # Reached in the retry tests, or not by any request a client can make on purpose.
    codes |= {"rate_limit_exceeded", "unavailable", "idempotency_key_in_use", "quota_exceeded"}
    codes |= {"internal_error"}
    assert set(errors.BY_CODE) == codes
    assert all(errors.BY_CODE[code].code == code for code in codes)


def answer(status: int, body=None, content: bytes = b"", headers=None) -> httpx.Response:
    request = httpx.Request("GET", "http://service/v2/agents")
    if body is not None:
        return httpx.Response(status, json=body, headers=headers, request=request)
    return httpx.Response(status, content=content, headers=headers, request=request)


@pytest.mark.parametrize("code", sorted(errors.BY_CODE))
def test_an_answer_in_the_error_shape_raises_the_class_of_its_code(code):
    cls = errors.BY_CODE[code]
    body = {"error": code, "messages": ["a", "b"], "request_id": "r-1"}
    err = errors.error_from_response(answer(cls.status, body, headers={"Retry-After": "3"}))
    assert type(err) is cls
    assert (err.status, err.code, err.message, err.request_id) == (cls.status, code, "a b", "r-1")
    assert err.retry_after == 3.0


def test_the_404s_share_one_base_and_unknown_codes_fall_back_on_their_status():
    assert issubclass(sdk.SessionNotFound, sdk.NotFound)
    assert issubclass(sdk.InvalidMetadata, sdk.InvalidRequest)
    newer = errors.error_from_response(
        answer(404, {"error": "skill_not_found", "messages": ["No skill."], "request_id": "r"})
    )
    assert type(newer) is sdk.NotFound and newer.code == "skill_not_found"
    teapot = errors.error_from_response(answer(418, {"error": "teapot", "messages": ["short"]}))
    assert type(teapot) is sdk.APIStatusError and teapot.status == 418


def test_an_answer_not_in_the_error_shape_still_raises_by_status():
    proxy = errors.error_from_response(
        answer(502, content=b"<html>Bad gateway</html>", headers={"X-Request-ID": "lb-7"})
    )
    assert type(proxy) is sdk.InternalError and proxy.code is None
    assert proxy.message == "<html>Bad gateway</html>" and proxy.request_id == "lb-7"
    empty = errors.error_from_response(answer(503))
    assert type(empty) is sdk.Unavailable and empty.message == "Service Unavailable"
    assert empty.request_id is None and empty.retry_after is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("7", 7.0), ("0", 0.0), (" 2 ", 2.0), ("soon", None), ("-1", None), ("1.5", None)],
)
def test_retry_after_in_seconds(value, seconds):
    assert errors.parse_retry_after(value) == seconds


def test_retry_after_as_an_http_date():
    assert errors.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # past: at once
    later = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= errors.parse_retry_after(later) <= 60
