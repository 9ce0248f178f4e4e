"""Every answer's ``Connection`` field says what the server then does with the connection.

An answer that says ``keep-alive`` is followed by the next request's answer on
the same socket; one the server closes after says ``close``. A pooled client
(``requests``) trusts the field: a keep-alive answer followed by a close makes
its next request fail with ``RemoteDisconnected``. Checked against a live
gunicorn for every early refusal: the service's (a body it did not read), the
event loop's and gunicorn's own.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.servers import Server, bootstrap, serving

pytestmark = pytest.mark.slow

SESSIONS = "/v2/agents/support-bot/sessions"
BIG = 70_000  # over MAX_CONTENT_LENGTH (64 KiB) and the loop's body buffer


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    tmp = tmp_path_factory.mktemp("keep-alive")
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp / 'sessions.db'}",
        "AGENT_SESSIONS_HEADER_TIMEOUT": "1",
    }
    token = bootstrap(env, grants="support-bot=sessions:create,sessions:read,events:create")
    with serving(env, Path(tmp), workers=2) as server:
        created = requests.post(
            server.url + SESSIONS,
            json={"key": "s", "name": "s"},
            headers={"x-api-key": token},
            timeout=10,
        )
        assert created.status_code == 201, created.text
        yield server, token


def post(path: str, token: str, length: int, body: bytes | None = None) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nx-api-key: {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    return head + (b"{" + b" " * (length - 2) + b"}" if body is None else body)


CHUNKED = b"POST " + SESSIONS.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"

# (request bytes, the status expected); "{token}" is the key's secret.
CASES: dict[str, tuple[Any, int]] = {
    "403-unread-body": (lambda t: post("/v2/agents/victim/sessions", t, BIG), 403),
    "404-unread-body": (lambda t: post("/v2", t, BIG), 404),
    "413-unread-body": (lambda t: post(SESSIONS, t, BIG), 413),
    "413-unread-2mb": (lambda t: post(SESSIONS, t, 2_000_000), 413),
    # The body stops short: the service's read of it ends at the header timeout.
    "408-body-stalled": (lambda t: post(SESSIONS + "/s/events", t, 200_000, b"{"), 408),
    "201-read-body": (
        lambda t: post(SESSIONS, t, 20, b'{"name": "kept"}    '),
        201,
    ),
    "400-gunicorn": (lambda t: b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "414-loop": (lambda t: b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    "431-fields": (
        lambda t: b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + b"X-A: a\r\n" * 200 + b"\r\n",
        431,
    ),
    # Past what a valid head can be, with no end in sight: refused as it arrives.
    "431-loop": (lambda t: b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + b"X-A: a\r\n" * 110_000, 431),
    "431-gunicorn": (
        lambda t: b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n",
        431,
    ),
    "413-loop-chunked": (lambda t: CHUNKED + b"\r\n10001\r\n" + b"a" * 65537, 413),
    "408-loop-head": (lambda t: b"GET /healthz HTTP/1.1\r\nHost: x\r\n", 408),
}


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str]]:
    """One answer's status and header fields, its body read to its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data[:300]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip().lower()
    while len(body) < int(fields.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "closed within the answer"
        body += chunk
    return int(lines[0].split()[1]), fields


def closed(sock: socket.socket, within: float) -> bool:
    """Whether the server closes the connection within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass  # reset: closed as well
    return True


@pytest.mark.parametrize("case", list(CASES))
def test_the_connection_field_says_what_the_server_does_next(served, case):
    server, token = served
    build, status = CASES[case]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        try:
            sock.sendall(build(token))
        except OSError:
            pass  # refused before the client is done sending: the answer is still read
        got, fields = read_answer(sock)
        assert got == status, (got, fields)
        if fields["connection"] == "keep-alive":
            # Sent at once, as a pooled client does: it is answered on the same socket.
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answer(sock)[0] == 200
        else:
            assert fields["connection"] == "close"
            assert closed(sock, within=5)
    if status == 201:
        assert fields["connection"] == "keep-alive"  # a body read whole keeps its connection
