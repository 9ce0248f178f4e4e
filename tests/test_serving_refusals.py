"""What the worker decides on a request's head alone, against a live gunicorn: an
HTTP/1.1 request without Host, a transfer coding it cannot decode, ``Expect:
100-continue`` on a request refused on its head; and the request id of every
error-log line about a refused request.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.servers import Server, bootstrap, serving

pytestmark = pytest.mark.slow

SESSIONS = "/v2/agents/support-bot/sessions"
UNSUPPORTED = "Transfer-Encoding other than chunked is not supported."


@pytest.fixture(scope="module", params=["text", "json"])
def served(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    tmp = tmp_path_factory.mktemp(f"refusals-{request.param}")
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp / 'sessions.db'}",
        "AGENT_SESSIONS_LOG_FORMAT": request.param,
    }
    grants = "support-bot=sessions:create,sessions:read,events:create"
    token = bootstrap(env, grants=grants)
    with serving(env, Path(tmp), workers=1) as server:
        yield server, token


def exchange(server: Server, data: bytes, first_only: bool = False) -> bytes:
    """Send ``data``; what comes back until the server closes (or its first bytes)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while piece := sock.recv(65536):
            received += piece
            if first_only:
                break
        return received


def answer(data: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), fields, json.loads(body)


def sessions(server: Server, token: str) -> list:
    got = requests.get(server.url + SESSIONS, headers={"x-api-key": token}, timeout=10)
    return got.json()["sessions"]


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET "
        + SESSIONS.encode()
        + b" HTTP/1.1\r\nx-api-key: {token}\r\nConnection: close\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    ],
    ids=["no-host", "no-host-with-key", "two-hosts"],
)
def test_an_http11_request_needs_one_host(served, head):
    server, token = served
    status, fields, body = answer(exchange(server, head.replace(b"{token}", token.encode())))
    assert status == 400, body
    assert body["error"] == "invalid_request" and body["request_id"] == fields["x-request-id"]


def test_an_http10_request_without_host_is_served(served):
    server, token = served
    head = f"GET {SESSIONS} HTTP/1.0\r\nx-api-key: {token}\r\n\r\n".encode()
    status, _, body = answer(exchange(server, head))
    assert status == 200, body


@pytest.mark.parametrize(
    "coding", ["gzip, chunked", "compress, chunked", "deflate,chunked", "foo, chunked"]
)
def test_every_unsupported_transfer_coding_is_501_alike(served, coding):
    server, token = served
    body = b'{"key": "coded", "name": "coded"}'
    data = (
        (
            f"POST {SESSIONS} HTTP/1.1\r\nHost: x\r\nx-api-key: {token}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: {coding}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        + b"%x\r\n" % len(body)
        + body
        + b"\r\n0\r\n\r\n"
    )
    status, fields, payload = answer(exchange(server, data))
    assert status == 501, payload
    assert payload["error"] == "invalid_request"
    assert payload["messages"] == [UNSUPPORTED]
    assert payload["request_id"] == fields["x-request-id"]
    assert "coded" not in [s["key"] for s in sessions(server, token)]


def logged(server: Server, rid: str) -> list[str]:
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in server.logs().splitlines() if "Invalid request from" in line]
        mine = [line for line in lines if rid in line]
        if mine or time.monotonic() > deadline:
            return mine
        time.sleep(0.05)


@pytest.mark.parametrize(
    "data",
    [
        b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\nHost: x\r\n\r\n",
        b"GET /\x01\x02 HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["asterisk", "long-line", "bare-lf", "control-bytes"],
)
def test_gunicorns_warning_about_a_refused_request_has_its_request_id(served, data):
    server, _ = served
    status, fields, body = answer(exchange(server, data))
    assert 400 <= status < 500, body
    rid = fields["x-request-id"]
    lines = logged(server, rid)
    assert len(lines) == 1, server.logs()[-2000:]
    if lines[0].startswith("{"):
        assert json.loads(lines[0])["request_id"] == rid
    else:
        assert lines[0].endswith(f"request_id={rid}")


@pytest.mark.parametrize(
    ("path", "key", "length", "status"),
    [
        (SESSIONS, "{token}", 9_999_999, 413),
        (SESSIONS, "wrong", 9_999_999, 401),
        (SESSIONS + "/s/events", "wrong", 100_000, 401),
    ],
    ids=["too-long", "unknown-key", "unknown-key-events"],
)
def test_expect_100_continue_gets_the_final_answer_of_a_refused_head(
    served, path, key, length, status
):
    server, token = served
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nx-api-key: {key.replace('{token}', token)}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()
    first = exchange(server, head, first_only=True)
    assert first.startswith(f"HTTP/1.1 {status} ".encode()), first[:200]
    assert b"100 Continue" not in first


def test_expect_100_continue_still_invites_a_body_the_service_reads(served):
    server, token = served
    created = requests.post(
        server.url + SESSIONS,
        json={"key": "big", "name": "big"},
        headers={"x-api-key": token},
        timeout=10,
    )
    assert created.status_code in (201, 409), created.text
    event = {"type": "input_message", "messages": [{"type": "text", "content": "x" * 90_000}]}
    body = json.dumps(event).encode()
    head = (
        f"POST {SESSIONS}/big/events HTTP/1.1\r\nHost: x\r\nx-api-key: {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Expect: 100-continue\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        assert sock.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        rest = b""
        while piece := sock.recv(65536):
            rest += piece
    status, _, payload = answer(rest)
    assert status == 201, payload
