"""Hostile input against a real gunicorn: each gets its documented 4xx, nothing is
stored, and the worker that read it lives on.

tests/test_create_session.py covers the same bodies in-process; here they go
through gunicorn's parser and sockets, with the raw bytes a client can send.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.servers import Server, bootstrap, cli, serving

AGENT = "support-bot"
SESSIONS = f"/v2/agents/{AGENT}/sessions"
OTHER = "patch-bot"  # holds the one session the PATCH cases aim at
LIMIT = 64 * 1024  # MAX_CONTENT_LENGTH's default


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("hostile")
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp / 'sessions.db'}",
        "AGENT_SESSIONS_SESSION_CREATE_LIMIT": "1000000/minute",
        "AGENT_SESSIONS_DEFAULT_LIMIT": "1000000/minute",
    }
    bootstrap(env)
    cli("agents", "create", OTHER, "--name", OTHER, env=env)
    scopes = "sessions:create,sessions:read,sessions:update,sessions:delete"
    out = cli("keys", "create", "--name", "all", "--grant", f"*={scopes}", env=env).stdout
    token = out.strip().splitlines()[-1]
    with serving(env, Path(tmp), workers=2) as server:
        headers = {"x-api-key": token}
        fixed = requests.post(
            f"{server.url}/v2/agents/{OTHER}/sessions",
            json={"key": "fixed", "name": "Fixed", "metadata": {"a": 1}},
            headers=headers,
            timeout=10,
        )
        assert fixed.status_code == 201, fixed.text
        yield {
            "server": server,
            "env": env,
            "token": token,
            "headers": headers,
            "fixed": fixed.json(),
            "workers": server.worker_pids(),
        }


@pytest.fixture
def server(served: dict[str, Any]) -> Iterator[Server]:
    """The shared server; after each test, the same workers still serve and nothing leaked."""
    server = served["server"]
    yield server
    headers = served["headers"]
    assert requests.get(server.url + SESSIONS, headers=headers, timeout=10).json()["sessions"] == []
    fixed = requests.get(f"{server.url}/v2/agents/{OTHER}/sessions/fixed", headers=headers)
    assert fixed.json() == served["fixed"]
    # A valid write still works, and no worker died or was replaced.
    created = requests.post(server.url + SESSIONS, json={"name": "ok"}, headers=headers)
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    assert requests.delete(f"{server.url}{SESSIONS}/{key}", headers=headers).status_code == 204
    assert server.worker_pids() == served["workers"]
    logs = server.logs()
    for sign in ("Traceback", "WORKER TIMEOUT", "was sent", "Worker exiting", " 500 "):
        assert sign not in logs, (sign, logs[-3000:])


def raw(server: Server, data: bytes, *, body_chunks: Any = (), timeout: float = 10) -> tuple:
    """Send raw bytes, optionally more afterwards; return (status, headers, body, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server answered and stopped reading: fine
        received = b""
        while True:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            received += piece
    elapsed = time.monotonic() - started
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return status, {k.lower(): v for k, v in headers.items()}, body, elapsed


def request_head(method: str, path: str, token: str, extra: str = "") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {token}\r\n"
        f"Content-Type: application/json\r\n{extra}"
    ).encode()


def check_error(response: Any, status: int, code: str, field: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert body["error"] == code, body
    assert body["request_id"] == response.headers["X-Request-ID"]
    if field is not None:
        assert field in body["field_errors"], body
    return body


HOSTILE_BODIES = [
    ("nested-arrays", b"[" * 1000 + b"]" * 1000),
    ("nested-objects", b'{"name": "n", "metadata": ' + b'{"a":' * 1000 + b"1" + b"}" * 1001),
    ("deep-in-a-string-field", b'{"name": ' + b"[" * 1000 + b"]" * 1000 + b"}"),
    ("invalid-utf8", b'{"name": "\xff\xfe\xc3("}'),
    ("overlong-utf8", b'{"name": "\xc0\xaf"}'),
    ("utf16", '{"name": "n"}'.encode("utf-16")),
    ("escaped-nul", b'{"name": "a\\u0000b"}'),
    ("raw-nul", b'{"name": "a\x00b"}'),
    ("nul-in-metadata-key", b'{"name": "n", "metadata": {"k\\u0000": 1}}'),
    ("lone-surrogate", b'{"name": "\\udc00"}'),
    ("int-over-64-bits", b'{"name": "n", "metadata": {"x": 9223372036854775808}}'),
    ("int-under-64-bits", b'{"name": "n", "metadata": {"x": -9223372036854775809}}'),
    ("huge-int", b'{"name": "n", "tti_minutes": 1' + b"0" * 5000 + b"}"),
    ("float-overflow", b'{"name": "n", "metadata": {"x": 1e400}}'),
    ("nan", b'{"name": "n", "metadata": {"x": NaN}}'),
    ("duplicate-keys", b'{"name": "n", "name": "m"}'),
    ("duplicate-nested-keys", b'{"name": "n", "metadata": {"a": 1, "a": 2}}'),
    ("trailing-garbage", b'{"name": "n"} {"name": "m"}'),
    ("truncated", b'{"name": "n"'),
    ("not-an-object", b'["name", "n"]'),
    ("empty", b""),
]


@pytest.mark.parametrize(("label", "raw_body"), HOSTILE_BODIES, ids=[b[0] for b in HOSTILE_BODIES])
@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_hostile_bodies(server, served, method, label, raw_body):
    path = SESSIONS if method == "POST" else f"/v2/agents/{OTHER}/sessions/fixed"
    response = requests.request(
        method,
        server.url + path,
        data=raw_body,
        headers=served["headers"] | {"Content-Type": "application/json"},
        timeout=10,
    )
    check_error(response, 400, "invalid_request")
    assert "Traceback" not in response.text


WRONG_TYPES = {
    "key": [5, True, [], {}, "a b", "k" * 65],
    "name": [5, True, [], {}, "", "   "],
    "description": [5, False, [], {}, "x" * 2001],
    "metadata": [[], "text", 5, True],
    "enabled": ["true", 1, 0, [], {}],
    "tti_minutes": ["5", 1.5, True, -1, [], {}, 2**31],
    "agent_key": ["other"],
    "created_at": ["2020-01-01T00:00:00.000Z"],
    "unknown": [1],
}
CASES = [
    (method, field, value)
    for method in ("POST", "PATCH")
    for field, values in WRONG_TYPES.items()
    for value in values
    if not (method == "PATCH" and field == "key")  # not an update field: see below
]


@pytest.mark.parametrize(
    ("method", "field", "value"), CASES, ids=[f"{m}-{f}={v!r}"[:48] for m, f, v in CASES]
)
def test_every_field_of_the_wrong_type(server, served, method, field, value):
    body = {"name": "n", field: value} if method == "POST" else {field: value}
    path = SESSIONS if method == "POST" else f"/v2/agents/{OTHER}/sessions/fixed"
    response = requests.request(
        method, server.url + path, json=body, headers=served["headers"], timeout=10
    )
    code = "invalid_metadata" if field == "metadata" else "invalid_request"
    check_error(response, 400, code, field)


def test_key_in_an_update_is_refused(server, served):
    response = requests.patch(
        f"{server.url}/v2/agents/{OTHER}/sessions/fixed",
        json={"key": "renamed"},
        headers=served["headers"],
        timeout=10,
    )
    check_error(response, 400, "invalid_request", "key")


def test_ten_megabytes_declared_is_413_before_the_body_is_read(server, served):
    # Only the head is sent: a server that waited for the ten megabytes would hang.
    head = request_head("POST", SESSIONS, served["token"], f"Content-Length: {10 * 2**20}\r\n")
    status, headers, body, elapsed = raw(server, head + b"\r\n", timeout=10)
    assert status == 413
    assert json.loads(body)["error"] == "payload_too_large"
    assert headers["x-content-type-options"] == "nosniff"
    assert elapsed < 5


def test_ten_megabytes_sent_is_413(server, served):
    head = request_head("POST", SESSIONS, served["token"], f"Content-Length: {10 * 2**20}\r\n")
    chunks = [b"x" * 65536] * 160  # ten megabytes, for as long as the server reads
    status, _, body, elapsed = raw(server, head + b"\r\n", body_chunks=chunks, timeout=20)
    assert status == 413
    assert json.loads(body)["error"] == "payload_too_large"


def test_chunked_body_over_the_limit_is_413(server, served):
    head = request_head("POST", SESSIONS, served["token"], "Transfer-Encoding: chunked\r\n")
    piece = b"x" * 16384
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    chunks = [chunk] * (2 * LIMIT // len(piece)) + [b"0\r\n\r\n"]  # twice the limit
    status, _, body, _ = raw(server, head + b"\r\n", body_chunks=chunks, timeout=20)
    assert status == 413
    assert json.loads(body)["error"] == "payload_too_large"


def test_endless_chunked_body_is_cut_off(server, served):
    head = request_head("POST", SESSIONS, served["token"], "Transfer-Encoding: chunked\r\n")
    piece = b"{" * 16384
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    # Ten megabytes that never end: the server stops at the limit.
    status, _, body, elapsed = raw(server, head + b"\r\n", body_chunks=[chunk] * 640, timeout=20)
    assert status == 413
    assert elapsed < 15


def test_chunked_body_under_the_limit_is_accepted(server, served):
    head = request_head("POST", SESSIONS, served["token"], "Transfer-Encoding: chunked\r\n")
    payload = json.dumps({"key": "chunked", "name": "n"}).encode()
    chunks = [f"{len(payload):x}\r\n".encode() + payload + b"\r\n", b"0\r\n\r\n"]
    status, _, body, _ = raw(server, head + b"\r\n", body_chunks=chunks)
    assert status == 201, body
    response = requests.delete(f"{server.url}{SESSIONS}/chunked", headers=served["headers"])
    assert response.status_code == 204


FIXED_EVENTS = f"/v2/agents/{OTHER}/sessions/fixed/events"
# Every POST route, with the bound on its body's bytes (config.py's defaults).
POST_ROUTES = {
    "session": (SESSIONS, LIMIT),
    "agent": ("/v2/agents", LIMIT),
    "api-key": ("/v2/api_keys", LIMIT),
    "event": (FIXED_EVENTS, 256 * 1024),
    "batch": (FIXED_EVENTS + "/batch", 4 * 1024 * 1024),
    "hide": (FIXED_EVENTS + "/aev_0123456789/hide", LIMIT),
    "unhide": (FIXED_EVENTS + "/aev_0123456789/unhide", LIMIT),
}


@pytest.mark.parametrize("size", ["FFFFFFFF", "past-the-bound"])
@pytest.mark.parametrize("route", list(POST_ROUTES))
def test_a_chunk_size_past_the_bound_is_413_at_once(server, served, route, size):
    # Only the size line is sent: a server that waited for the chunk would answer 408
    # when the head's timeout (10 s) ran out.
    path, bound = POST_ROUTES[route]
    line = "FFFFFFFF" if size == "FFFFFFFF" else f"{bound + 1:x}"
    head = request_head("POST", path, served["token"], "Transfer-Encoding: chunked\r\n")
    status, headers, body, elapsed = raw(
        server, head + b"\r\n" + f"{line}\r\n".encode() + b"{", timeout=20
    )
    assert status == 413, (status, body, elapsed)
    answer = json.loads(body)
    assert answer["error"] == "payload_too_large", answer
    assert answer["request_id"] == headers["x-request-id"]
    assert elapsed < 2


@pytest.mark.parametrize("route", ["event", "batch"])
def test_a_chunk_size_past_the_bound_after_the_loop_buffer_is_413_at_once(server, served, route):
    # The first chunk takes the body past what the loop buffers: a request thread reads
    # the rest, and refuses the next size line as soon as it has it.
    path, _ = POST_ROUTES[route]
    scopes = "sessions:read,events:create,events:append"
    out = cli(
        "keys", "create", "--name", "events", "--grant", f"{OTHER}={scopes}", env=served["env"]
    ).stdout
    token = out.strip().splitlines()[-1]
    head = request_head("POST", path, token, "Transfer-Encoding: chunked\r\n")
    first = b'{"events": [' if route == "batch" else b'{"type": "input_message", '
    first += b" " * (LIMIT + 4096)
    chunks = [f"{len(first):x}\r\n".encode() + first + b"\r\n", b"FFFFFFFF\r\n"]

    def slowly():
        yield chunks[0]
        time.sleep(0.5)  # the loop hands the request over before the next line comes
        started.append(time.monotonic())
        yield chunks[1]

    started: list[float] = []
    status, headers, body, _ = raw(server, head + b"\r\n", body_chunks=slowly(), timeout=20)
    elapsed = time.monotonic() - started[0]
    assert status == 413, (status, body, elapsed)
    assert json.loads(body)["error"] == "payload_too_large"
    assert elapsed < 2


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param("X-Big: " + "a" * 100_000 + "\r\n", id="100KB-header"),
        pytest.param("x-api-key: " + "k" * 100_000 + "\r\n", id="100KB-api-key"),
        pytest.param("".join(f"X-H{i}: v\r\n" for i in range(500)), id="500-headers"),
        pytest.param("X-Bad\x00Name: v\r\n", id="nul-in-header-name"),
        pytest.param("X-Bad: a\x00b\r\n", id="nul-in-header-value"),
    ],
)
def test_huge_or_broken_headers_get_a_4xx_from_gunicorn(server, served, extra):
    head = (f"GET {SESSIONS} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n").encode("latin-1")
    status, _, _, _ = raw(server, head)
    assert 400 <= status < 500, status


def test_huge_request_line_gets_a_4xx(server):
    status, _, _, _ = raw(server, f"GET {SESSIONS}?q={'a' * 20_000} HTTP/1.1\r\n\r\n".encode())
    assert 400 <= status < 500, status


ODD_KEYS = [
    "k" * 65,
    "k" * 5000,
    "%00",
    "a%00b",
    "%C3%BC%C3%B1%C3%AF",  # üñï
    "%F0%9F%8E%89",  # an emoji
    "%FF%FE",  # not UTF-8
    "a%2Fb",
    "..",
    "%2E%2E",
    "a%20b",
    "%0A",
    "'%20OR%201=1--",
]


@pytest.mark.parametrize("odd", ODD_KEYS)
@pytest.mark.parametrize(
    ("method", "template"),
    [
        ("GET", "/v2/agents/{odd}/sessions"),
        ("POST", "/v2/agents/{odd}/sessions"),
        ("GET", "/v2/agents/{odd}/sessions/s"),
        ("GET", "/v2/agents/" + AGENT + "/sessions/{odd}"),
        ("PATCH", "/v2/agents/" + AGENT + "/sessions/{odd}"),
        ("DELETE", "/v2/agents/" + AGENT + "/sessions/{odd}"),
    ],
)
def test_odd_path_parameters_are_4xx(server, served, odd, method, template):
    url = server.url + template.format(odd=odd)
    body = {"name": "n"} if method in ("POST", "PATCH") else None
    response = requests.request(method, url, json=body, headers=served["headers"], timeout=10)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.json()["error"] in ("agent_not_found", "session_not_found", "not_found")


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([b"zz\r\n{}\r\n", b"0\r\n\r\n"], id="size-not-hex"),
        pytest.param([b'2\r\n{"name": "n"}\r\n', b"0\r\n\r\n"], id="size-shorter-than-data"),
        pytest.param([b"5\r\n{}\r\n0\r\n\r\n"], id="size-longer-than-data"),
    ],
)
def test_malformed_chunked_body_is_400(server, served, chunks):
    head = request_head("POST", SESSIONS, served["token"], "Transfer-Encoding: chunked\r\n")
    status, headers, body, _ = raw(server, head + b"\r\n", body_chunks=chunks)
    assert status == 400, body
    assert json.loads(body)["error"] == "invalid_request"
    assert headers["content-type"] == "application/json"
