"""The default gunicorn configuration against hostile clients: slow heads, forged log lines."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.servers import Server, bootstrap, serving

pytestmark = pytest.mark.slow

PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path / 'sessions.db'}"}


@contextlib.contextmanager
def open_sockets(server: Server, count: int, first: bytes) -> Iterator[list[socket.socket]]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(first)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def health_times(server: Server, seconds: float) -> list[float]:
    """How long each ``GET /healthz`` took, one after another for ``seconds``."""
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        with contextlib.suppress(requests.RequestException):
            assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
        times.append(time.monotonic() - started)
        time.sleep(0.1)
    return times


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


PARTIAL_BODY = (
    b"POST /v2/agents/support-bot/sessions HTTP/1.1\r\nHost: x\r\n"
    b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"name": '
)


# With a key that may create: the service reads the body before it answers.
KEYED_BODY = PARTIAL_BODY.replace(b"Host: x\r\n", b"Host: x\r\nx-api-key: {key}\r\n")
CHUNKED_HEAD = (
    b"POST /v2/agents/support-bot/sessions HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\n"
    b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
)
# 13 digits: gunicorn takes the leading zeros.
PADDED_LENGTH_BODY = KEYED_BODY.replace(b"Content-Length: 100", b"Content-Length: 0000000000100")


@pytest.mark.parametrize(
    "first",
    [PARTIAL_HEAD, PARTIAL_BODY, CHUNKED_HEAD + b'4\r\n{"na\r\n', PADDED_LENGTH_BODY],
    ids=["head", "body", "chunked-body", "zero-padded-length-body"],
)
def test_partial_requests_leave_the_server_answering(env, tmp_path, first):
    token = bootstrap(env)
    first = first.replace(b"{key}", token.encode())
    with serving(env, tmp_path) as server, open_sockets(server, 32, first):
        times = health_times(server, seconds=4)
        assert max(times) < 1, times
        response = requests.get(
            server.url + "/v2/agents/support-bot/sessions",
            headers={"x-api-key": token},
            timeout=5,
        )
        assert response.status_code == 200
    assert "WORKER TIMEOUT" not in server.logs()


def test_heads_sent_a_byte_at_a_time_leave_the_server_answering(env, tmp_path):
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while not stop.wait(0.3):
                sock.sendall(b"X")

    with serving(env, tmp_path) as server, open_sockets(server, 32, PARTIAL_HEAD) as socks:
        threads = [threading.Thread(target=trickle, args=(sock,)) for sock in socks]
        for thread in threads:
            thread.start()
        try:
            times = health_times(server, seconds=4)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert max(times) < 1, times
    assert "WORKER TIMEOUT" not in server.logs()


def test_a_head_not_complete_within_the_header_timeout_is_closed(env, tmp_path):
    env = {**env, "AGENT_SESSIONS_HEADER_TIMEOUT": "1"}
    with serving(env, tmp_path) as server, open_sockets(server, 4, PARTIAL_HEAD) as socks:
        started = time.monotonic()
        for sock in socks:
            sock.sendall(b"X-Slow: ")
        assert all(closed_by_server(sock, within=5) for sock in socks)
        assert time.monotonic() - started < 4
        # A complete head sent in pieces within the timeout is served.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            for piece in (
                b"GET /healthz HTTP/1.1\r\n",
                b"Host: x\r\n",
                b"Connection: close\r\n\r\n",
            ):
                sock.sendall(piece)
                time.sleep(0.2)
            answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    with sock.makefile("rb") as stream:
        return stream.read()


def send(server: Server, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        return read_all(sock)


FORGED_PATH = "/v2/agents/x%0a127.0.0.1%20-%20-%20FORGED%0a%1b%5b2J%c2%85%e2%80%a8/sessions"
HOSTILE_HEADERS = {
    "User-Agent": "agent\x1b[2J\x1b]0;pwned\x07\x85",
    "Referer": 'http://r.example/"\\" 200 0 "FORGED',
    "X-Request-ID": "id\x1b[31m",
    "X-Custom": "v\x7f\x9b",
}


def written_lines(server: Server) -> list[str]:
    return server.logs().splitlines()


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="default-format"),
        pytest.param(
            ["--access-logformat", '%(r)s %(U)s "%({x-request-id}i)s" "%({x-custom}i)s" %(a)s'],
            id="request-line-and-headers",
        ),
    ],
)
def test_no_client_can_write_a_line_or_a_control_character_into_the_logs(env, tmp_path, extra):
    with serving(env, tmp_path, extra=extra) as server:
        # Each hostile header on a request of its own: gunicorn refuses some outright.
        for name, value in [("X-Plain", "1"), *HOSTILE_HEADERS.items()]:
            head = f"GET {FORGED_PATH} HTTP/1.1\r\nHost: x\r\n{name}: {value}\r\n"
            send(server, f"{head}Connection: close\r\n\r\n".encode("latin-1"))
        # Requests gunicorn refuses itself, each logged in the error log.
        for bad in (
            b"G\x1b[2JET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /\x1b[2J\x85 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\x1b[2J\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-\x1b[2J: v\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\x1b[2J\r\n\r\n",
        ):
            assert send(server, bad).startswith(b"HTTP/1.1 400"), bad
        deadline = time.monotonic() + 5
        while "FORGED" not in server.logs() and time.monotonic() < deadline:
            time.sleep(0.1)
        logs = server.logs()
    assert "FORGED" in logs
    forged = [line for line in written_lines(server) if "FORGED" in line]
    assert forged and not [line for line in forged if line.startswith("127.0.0.1 - - FORGED")]
    # The path as sent, percent-encoded; no raw control character anywhere.
    assert all(FORGED_PATH in line for line in forged), forged
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]", logs), [
        line for line in logs.splitlines() if re.search("[\x00-\x1f\x7f-\x9f]", line)
    ]
    if not extra:
        # A quote in a field is escaped, and so is a backslash: no field ends early.
        assert '"http://r.example/\\"\\\\\\" 200 0 \\"FORGED"' in logs


@pytest.mark.parametrize("value", ["ten", "0", "-1", "nan"])
def test_a_bad_header_timeout_stops_gunicorn_with_one_line(env, tmp_path, value):
    server = Server(
        {**env, "AGENT_SESSIONS_HEADER_TIMEOUT": value}, log_path=tmp_path / "gunicorn.log"
    )
    try:
        with pytest.raises(RuntimeError, match="gunicorn exited"):
            server.start()
    finally:
        server.stop()
    logs = server.logs()
    assert "Traceback" not in logs and "Booting worker" not in logs, logs
    lines = [line for line in logs.splitlines() if "AGENT_SESSIONS_HEADER_TIMEOUT" in line]
    assert len(lines) == 1 and "configuration error" in lines[0], logs


def test_expect_100_continue_is_answered_before_the_body_is_sent(env, tmp_path):
    token = bootstrap(env)
    body = b'{"name": "n", "metadata": {"a": "' + b"n" * 2000 + b'"}}'
    head = (
        "POST /v2/agents/support-bot/sessions HTTP/1.1\r\nHost: x\r\n"
        f"x-api-key: {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    ).encode()
    with serving(env, tmp_path) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head)
            sock.settimeout(2)
            interim = sock.recv(4096)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
            sock.sendall(body)
            sock.settimeout(10)
            answer = read_all(sock)
        # One interim answer, then the final one.
        assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]
        assert b"100 Continue" not in answer


def logging_app() -> Any:
    """The service plus a test-only route that logs what the client sent, and a traceback."""
    import logging

    from flask import request

    from sessions_app import create_app

    app = create_app()

    @app.get("/test/log")
    def log_text() -> Any:
        text = request.args["text"]
        log = logging.getLogger("sessions_app")
        log.warning("client sent %s", text)
        try:
            raise ValueError(text)
        except ValueError:
            log.exception("failed on %r and %s", text, text)
        return {}

    return app


def test_error_log_lines_escape_control_characters(env, tmp_path):
    text = "x\n[2026-12-01 00:00:00 +0000] [1] [CRITICAL] FORGED\x1b[2J\x85\u2028"
    server = Server(
        env, log_path=tmp_path / "gunicorn.log", app="tests.test_server_process:logging_app()"
    )
    with server:
        response = requests.get(server.url + "/test/log", params={"text": text}, timeout=10)
        assert response.status_code == 200
    logs = server.logs()
    assert (
        "client sent x\\x0a[2026-12-01 00:00:00 +0000] [1] [CRITICAL] FORGED\\x1b[2J\\x85\\u2028"
        in logs
    )
    assert "ValueError: x\\x0a[2026" in logs  # the traceback's last line too
    assert not [
        line for line in logs.splitlines() if "FORGED" in line and "CRITICAL] FORGED" in line[:60]
    ]
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]", logs)


def test_a_chunked_body_is_read_whole_by_the_loop_and_one_too_long_is_refused(env, tmp_path):
    token = bootstrap(env)
    body = b'{"name": "chunked"}'
    head = CHUNKED_HEAD.replace(b"{key}", token.encode()).replace(
        b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"
    )
    with serving(env, tmp_path) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head)
            for piece in (b"%x\r\n" % len(body), body, b"\r\n0\r\n", b"\r\n"):
                time.sleep(0.1)
                sock.sendall(piece)
            answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head + b"10001\r\n" + b"a" * 65537)
            answer = read_all(sock)
        status, fields, payload = parse_answer(answer)
        assert status == 413 and payload["error"] == "payload_too_large", answer[:300]


def parse_answer(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), fields, json.loads(body)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, id="two-hosts"),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Request-ID: a\x1bb\r\n\r\n", 400, id="esc"
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-A: a\r\n  folded\r\n\r\n", 400, id="folded"
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n",
            431,
            id="long-header",
        ),
        pytest.param(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, id="long-line"),
        pytest.param(b"GET /healthz HTTP/1.1\nHost: a\r\n\r\n", 400, id="bare-lf"),
    ],
)
def test_gunicorn_refusals_are_in_the_error_shape(env, tmp_path, request_bytes, status):
    with serving(env, tmp_path, workers=1) as server:
        answer = send(server, request_bytes)
        logs = server.logs()
    got, fields, payload = parse_answer(answer)
    assert got == status, answer[:300]
    assert set(payload) == {"error", "messages", "request_id"}, payload
    assert payload["error"] == "invalid_request"
    assert fields["content-type"] == "application/json"
    assert fields["x-content-type-options"] == "nosniff"
    assert fields["cache-control"] == "no-store"
    assert re.fullmatch(r"[0-9a-f]{32}", fields["x-request-id"])
    assert fields["x-request-id"] == payload["request_id"]
    # The id a client reports finds the refusal in the log, as it finds any answer.
    assert f"request_id={payload['request_id']}" in logs, logs[-2000:]


def test_connections_left_open_after_a_closing_answer_leave_the_server_answering(env, tmp_path):
    closing = [
        b"GET /healthz HTTP/1.0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ]
    with serving(env, tmp_path) as server, open_sockets(server, 0, b"") as socks:
        for index in range(32):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            socks.append(sock)
            sock.sendall(closing[index % 2])
        times = health_times(server, seconds=3)
        assert max(times) < 1, times
        for sock in socks:  # each was answered, and the server's side closed
            assert sock.recv(4096).startswith(b"HTTP/1.")


def test_large_unfinished_heads_cost_the_loop_little(env, tmp_path):
    pad = (b"X-Pad: " + b"a" * 8000 + b"\r\n") * 100
    with serving(env, tmp_path) as server, open_sockets(server, 0, b"") as socks:

        def fill() -> None:
            for _ in range(128):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                socks.append(sock)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
                for start in range(0, len(pad), 4096):
                    with contextlib.suppress(OSError):
                        sock.sendall(pad[start : start + 4096])

        filler = threading.Thread(target=fill)
        filler.start()
        try:
            times = health_times(server, seconds=3)
        finally:
            filler.join()
        assert max(times) < 1, times
        # Past gunicorn's bounds (request line, plus fields times field size) a head
        # is refused, 431, without waiting for the rest.
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        socks.append(sock)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + pad + pad[:40000])
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 431 ")


def test_at_the_connection_cap_unfinished_heads_make_room(env, tmp_path):
    extra = ["--worker-connections", "100"]
    with serving(env, tmp_path, workers=1, extra=extra) as server:
        with open_sockets(server, 150, PARTIAL_HEAD) as socks:
            times = health_times(server, seconds=2)
            assert max(times) < 1, times
            # The oldest unfinished heads were closed to admit new connections.
            assert closed_by_server(socks[0], within=1)


@pytest.mark.parametrize(
    "setting",
    [
        "AGENT_SESSIONS_TIMEOUT=x",
        "AGENT_SESSIONS_THREADS=x",
        "AGENT_SESSIONS_THREADS=0",
        "AGENT_SESSIONS_WORKERS=-1",
    ],
)
def test_a_bad_process_setting_stops_gunicorn_with_one_line(env, tmp_path, setting):
    name, _, value = setting.partition("=")
    server = Server({**env, name: value}, log_path=tmp_path / "gunicorn.log")
    try:
        with pytest.raises(RuntimeError, match="gunicorn exited"):
            server.start()
    finally:
        server.stop()
    assert server.process is not None and server.process.returncode == 4
    logs = server.logs()
    assert "Traceback" not in logs and "Booting worker" not in logs, logs
    lines = [line for line in logs.splitlines() if name in line]
    assert len(lines) == 1 and "configuration error" in lines[0], logs


@pytest.mark.parametrize(
    ("coding", "expected"),
    # Every coding but chunked, known to gunicorn or not, is 501 (RFC 9112 6.1).
    [(b"gzip, chunked", 501), (b"deflate,chunked", 501), (b"x-custom, chunked", 501)],
)
def test_a_transfer_coding_other_than_chunked_is_refused_and_writes_nothing(
    env, tmp_path, coding, expected
):
    token = bootstrap(env)
    body = b'{"key": "coded", "name": "coded"}'
    head = (
        CHUNKED_HEAD.replace(b"{key}", token.encode())
        .replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
        .replace(b"Transfer-Encoding: chunked", b"Transfer-Encoding: " + coding)
    )
    assert coding in head
    with serving(env, tmp_path) as server:
        answer = send(server, head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
        status, _, payload = parse_answer(answer)
        assert status == expected and "request_id" in payload, answer[:300]
        assert payload["error"] == "invalid_request"
        listed = requests.get(
            server.url + "/v2/agents/support-bot/sessions", headers={"x-api-key": token}, timeout=5
        ).json()
    assert listed["sessions"] == []


def test_a_request_not_sent_in_time_is_answered_408_and_logged(env, tmp_path):
    env = {**env, "AGENT_SESSIONS_HEADER_TIMEOUT": "1"}
    ids: list[str] = []
    with serving(env, tmp_path) as server:
        for partial in (PARTIAL_HEAD, PARTIAL_BODY):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(partial)
                answer = read_all(sock)
            status, fields, payload = parse_answer(answer)
            assert status == 408 and payload["error"] == "invalid_request", answer[:300]
            assert fields["x-request-id"] == payload["request_id"]
            ids.append(payload["request_id"])
        # A connection that sent nothing is closed without a word, as an idle one is.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            assert read_all(sock) == b""
        logs = server.logs()
    assert logs.count("request not complete within 1.0s") == 2, logs
    assert all(f"request_id={rid}" in logs for rid in ids), logs


def test_a_chunked_input_message_past_the_loop_buffer_is_read_whole(env, tmp_path):
    # POST /events takes up to EVENT_MAX_BYTES (256 KiB), chunked as well as declared.
    token = bootstrap(env, grants="support-bot=sessions:create,sessions:read,events:create")
    headers = {"x-api-key": token, "content-type": "application/json"}
    with serving(env, tmp_path) as server:
        sessions = server.url + "/v2/agents/support-bot/sessions"
        assert requests.post(sessions, json={"key": "s", "name": "S"}, headers=headers).ok
        data = json.dumps(
            {"type": "input_message", "messages": [{"type": "text", "content": "x" * 100_000}]}
        ).encode()

        def chunks():  # slowly, so the loop sees the body grow past its buffer unfinished
            for i in range(0, len(data), 16384):
                time.sleep(0.05)
                yield data[i : i + 16384]

        answer = requests.post(sessions + "/s/events", data=chunks(), headers=headers, timeout=10)
        assert answer.status_code == 201, answer.text[:300]
        listed = requests.get(sessions + "/s/events", headers=headers, timeout=10).json()
    assert len(listed["events"][0]["messages"][0]["content"]) == 100_000


def answer_or_loss(sock: socket.socket) -> str:
    """Read one answer to a GET: ``answered``, ``closed`` (the server's FIN came before any
    byte), or ``reset`` (its RST did: it closed the connection with our request unread)."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                return "closed" if not data else "cut"
            data += piece
    except ConnectionResetError:
        return "reset" if not data else "cut"
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
    while len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            return "cut"
        body += piece
    return "answered"


def test_keep_alive_connections_reused_as_they_time_out_are_answered(env, tmp_path):
    # Many clients send their next request on a kept-alive connection just as its
    # keep-alive time (1 s) runs out, on a machine kept busy. Linux closes a socket
    # with unread bytes by a reset, and one without by a FIN: so a client that gets
    # a reset was dropped with its request in the server's buffer, while one that
    # gets a FIN sent it after the server closed (never read; a client may retry).
    # Before a close, the worker looked at no socket since its last poll.
    clients, seconds = 48, 10.0
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def client(number: int) -> None:
        rnd = random.Random(number)
        end = time.monotonic() + seconds
        sock = None
        while time.monotonic() < end:
            if sock is not None and select.select([sock], [], [], 0)[0]:
                sock.close()  # closed by the server before this request: as urllib3 does
                sock = None
                outcome = "reconnected"
                with lock:
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            try:
                sock.sendall(request)
            except OSError:
                outcome = "reset"
            else:
                outcome = answer_or_loss(sock)
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if outcome != "answered":
                sock.close()
                sock = None
                continue
            time.sleep(1.0 + rnd.uniform(-0.03, 0.03))
        if sock is not None:
            sock.close()

    burn = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass"
    extra = ["--keep-alive", "1"]
    with serving(env, tmp_path, workers=1, extra=extra) as server:
        hogs = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2)]
        try:
            threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
    print(outcomes)
    # The race was run: many connections were closed at their time, many were reused.
    assert outcomes.get("reconnected", 0) > 50, outcomes
    assert outcomes.get("answered", 0) > 300, outcomes
    assert not outcomes.get("reset") and not outcomes.get("cut"), outcomes


def test_at_the_connection_cap_a_connection_that_sent_nothing_goes_first(env, tmp_path):
    # Room for three connections: one that sent nothing is closed before a head under
    # way, and a head under way is answered (503) before its connection closes.
    env = {**env, "AGENT_SESSIONS_THREADS": "1"}
    extra = ["--worker-connections", "4"]

    def connect(first: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        socks.append(sock)
        sock.sendall(first)
        time.sleep(0.3)  # the loop accepts it, and reads what it sent
        return sock

    with (
        serving(env, tmp_path, workers=1, extra=extra) as server,
        open_sockets(server, 0, b"") as socks,
    ):
        oldest = connect(PARTIAL_HEAD)
        silent = connect(b"")
        middle = connect(PARTIAL_HEAD)
        connect(PARTIAL_HEAD)  # the cap: the one that sent nothing makes room
        assert read_all(silent) == b""
        assert not closed_by_server(oldest, within=0.3)
        connect(PARTIAL_HEAD)  # the cap again: the oldest head is answered
        status, fields, payload = parse_answer(read_all(oldest))
        assert status == 503 and payload["error"] == "unavailable", payload
        assert fields["x-request-id"] == payload["request_id"]
        assert not closed_by_server(middle, within=0.3)
        middle.sendall(b"\r\n")  # its head ends: it is served
        assert middle.recv(4096).startswith(b"HTTP/1.1 200 ")
        logs = server.logs()
    assert f"request_id={payload['request_id']}" in logs, logs[-2000:]


def test_a_stopping_worker_answers_a_head_under_way(env, tmp_path):
    with (
        serving(env, tmp_path, workers=1) as server,
        open_sockets(server, 1, PARTIAL_HEAD) as socks,
    ):
        time.sleep(0.3)
        os.kill(server.process.pid, signal.SIGTERM)  # the master stops its worker
        time.sleep(0.5)
        socks[0].sendall(b"\r\n")
        answer = read_all(socks[0])
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        assert b"\r\nConnection: close\r\n" in answer
