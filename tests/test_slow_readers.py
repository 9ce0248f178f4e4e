"""Clients that stop reading their answers hold no request thread and kill no worker.

An answer is written by a request thread; one its client does not read fills
the socket's buffers and blocks the write. ``serving.deadlines.SendDeadline``
bounds that write to ``SEND_TIMEOUT`` seconds from its first byte (then the
connection is reset and logged with the request id), and keeps the time spent
waiting out of the worker's heartbeat, so gunicorn's ``TIMEOUT`` does not kill
a worker, and every request in flight on it, because a client went quiet.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from sessions_app.serving.deadlines import AnswerNotRead, SendDeadline
from tests.servers import cli, serving_store

AGENT = "support-bot"
GRANTS = f"{AGENT}=sessions:create,sessions:read,events:create,events:append"
BIG_EVENT = {"type": "input_message", "messages": [{"type": "text", "content": "x" * 255_000}]}
HI = {"type": "input_message", "messages": [{"type": "text", "content": "hi"}]}


@contextlib.contextmanager
def unread_answers(port: int, request: bytes, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that each send ``request`` and never read a byte of the answer."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
            sock.connect(("127.0.0.1", port))
            sock.sendall(request)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "send_timeout", "timeout"),
    [
        pytest.param("sqlite", 2, 5, id="sqlite"),
        # A send timeout past gunicorn's: the threads' waits are not in the heartbeat.
        pytest.param("postgres", 4, 3, id="postgres-send-timeout-past-timeout"),
    ],
)
def test_answers_never_read_hold_no_thread_and_kill_no_worker(
    tmp_path, backend, send_timeout, timeout
):
    settings = {
        "AGENT_SESSIONS_SEND_TIMEOUT": str(send_timeout),
        "AGENT_SESSIONS_TIMEOUT": str(timeout),
        # Pages of 4 MiB, four times the default: too large for the sockets' buffers,
        # so every thread that writes one waits on its client.
        "AGENT_SESSIONS_EVENTS_PAGE_MAX_BYTES": str(4 << 20),
        "AGENT_SESSIONS_DEFAULT_LIMIT": "100000/minute",
    }
    with serving_store(backend, tmp_path, settings, grants=GRANTS) as (server, token, url):
        env = {"AGENT_SESSIONS_STORAGE_URL": url}
        cli("agents", "create", "other", "--name", "other", env=env)
        other_grant = "other=sessions:create,sessions:read,events:create"
        out = cli("keys", "create", "--name", "o", "--grant", other_grant, env=env).stdout
        other = {"x-api-key": out.strip().splitlines()[-1]}
        own = {"x-api-key": token}
        sessions = f"{server.url}/v2/agents/{AGENT}/sessions"
        assert requests.post(sessions, json={"key": "big", "name": "big"}, headers=own).ok
        for count in (15, 5):  # 20 events of 255 KB: a page of 16 fills 4 MiB
            written = requests.post(
                f"{sessions}/big/events/batch",
                json={"events": [BIG_EVENT] * count},
                headers=own,
                timeout=60,
            )
            assert written.status_code == 201, written.text[:300]
        others = f"{server.url}/v2/agents/other/sessions"
        assert requests.post(others, json={"key": "o", "name": "o"}, headers=other).ok
        workers = server.worker_pids()

        request = (
            f"GET /v2/agents/{AGENT}/sessions/big/events?limit=100 HTTP/1.1\r\n"
            f"Host: x\r\nx-api-key: {token}\r\n\r\n"
        ).encode()
        timed: list[tuple[str, int | str, float]] = []
        kw = {"headers": other, "timeout": 30}
        with unread_answers(server.port, request, 16):
            # Past TIMEOUT and SEND_TIMEOUT several times, and on until the other tenant
            # has been answered 31 times (a request queued behind a worker's unread
            # answers waits for them to be cut off: the slowest is bounded below).
            end = time.monotonic() + 9
            give_up = end + 6 * send_timeout
            while time.monotonic() < end or (len(timed) <= 30 and time.monotonic() < give_up):
                for name, call in (
                    ("append", lambda: requests.post(f"{others}/o/events", json=HI, **kw)),
                    ("read", lambda: requests.get(f"{others}/o/events?limit=5", **kw)),
                    ("health", lambda: requests.get(f"{server.url}/healthz", timeout=30)),
                ):
                    started = time.monotonic()
                    try:
                        status: int | str = call().status_code
                    except requests.RequestException as err:
                        status = type(err).__name__
                    timed.append((name, status, time.monotonic() - started))
            # The last answers are cut off SEND_TIMEOUT after their first byte.
            deadline = time.monotonic() + 4 * send_timeout
            while server.logs().count("answer not read") < 16 and time.monotonic() < deadline:
                time.sleep(0.2)
        logs = server.logs()
        assert "WORKER TIMEOUT" not in logs, logs[-3000:]
        assert server.worker_pids() == workers
        assert {status for _, status, _ in timed} <= {200, 201}, timed
        assert len(timed) > 30
        slowest = max(seconds for _, _, seconds in timed)
        # Each thread is free SEND_TIMEOUT after its answer's first byte; a worker
        # may have taken more than its four threads' share of the 16.
        assert slowest < 3 * send_timeout + 4, sorted(timed, key=lambda t: -t[2])[:5]
        cut = re.findall(
            rf"answer not read by the client within {send_timeout:.1f}s: connection closed "
            r"request_id=([0-9a-f]{32})",
            logs,
        )
        assert len(set(cut)) == 16, logs[-3000:]
        for request_id in cut:  # the access log line of each carries the same id
            assert re.search(
                rf'"GET /v2/agents/{AGENT}/sessions/big/events [^\n]*'
                rf"request_id={request_id}",
                logs,
            )
        # The events read by the other tenant were all appended, once each.
        answered = requests.get(f"{others}/o/events?limit=100", headers=other, timeout=10)
        appended = sum(1 for name, status, _ in timed if name == "append" and status == 201)
        assert len(answered.json()["events"]) == min(appended, 100)


def test_a_write_not_taken_in_time_fails_and_its_wait_is_the_clients():
    server_side, client_side = socket.socketpair()
    waits = []

    @contextlib.contextmanager
    def client_time():
        started = time.monotonic()
        try:
            yield
        finally:
            waits.append(time.monotonic() - started)

    with server_side, client_side:
        server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock = SendDeadline(server_side, 0.3, client_time)
        sock.sendall(b"HTTP/1.1 200 OK\r\nX-Request-ID: abc123\r\n\r\n")
        assert sock.request_id == "abc123"
        started = time.monotonic()
        with pytest.raises(AnswerNotRead):
            sock.sendall(b"x" * (8 << 20))  # never read
        assert 0.2 < time.monotonic() - started < 1
        assert sum(waits) > 0.2  # spent out of the heartbeat
        assert server_side.gettimeout() is None  # the socket is left as it was


def test_a_client_that_keeps_reading_gets_an_answer_longer_than_the_timeout():
    # Each write has the timeout, not the whole answer: a streamed answer to a
    # client that reads steadily takes as long as it takes.
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        sock = SendDeadline(server_side, 0.5, contextlib.nullcontext)
        received = bytearray()

        def read_slowly() -> None:
            with contextlib.suppress(OSError):  # closed under it when the test fails
                while chunk := client_side.recv(32768):
                    received.extend(chunk)
                    time.sleep(0.03)

        reader = threading.Thread(target=read_slowly)
        reader.start()
        started = time.monotonic()
        for _ in range(8):
            sock.sendall(b"y" * (256 << 10))
        server_side.shutdown(socket.SHUT_WR)
        reader.join(30)
        assert time.monotonic() - started > 1.0  # twice the timeout, and no write failed
        assert bytes(received) == b"y" * (2 << 20)
