"""A body over 64 KiB that stalls or trickles, against a live gunicorn.

The event loop reads a request's head, and a body of up to 64 KiB, before a
thread takes it; a larger body (``POST .../events`` and its batch) is read by
the thread, from the socket. That read ends at ``HEADER_TIMEOUT`` after the
head (``server.BodyDeadline``): a client that stalls, or trickles a byte at a
time, gets a 408 and its connection closes, instead of holding the thread
until gunicorn's ``TIMEOUT`` kills the worker with every request it serves.
"""

from __future__ import annotations

import contextlib
import socket
import time

import pytest
import requests

from sessions_app.serving.server import BodyDeadline, HeadReadingWorker
from tests.servers import serving_store

GRANTS = "support-bot=sessions:create,sessions:read,events:create"


@pytest.mark.slow
@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickled"])
def test_a_slow_large_body_is_closed_without_killing_its_worker(tmp_path, trickle):
    settings = {"AGENT_SESSIONS_HEADER_TIMEOUT": "2", "AGENT_SESSIONS_TIMEOUT": "5"}
    with serving_store("sqlite", tmp_path, settings, grants=GRANTS) as (server, token, _):
        created = requests.post(
            f"{server.url}/v2/agents/support-bot/sessions",
            json={"name": "slow", "key": "slow"},
            headers={"x-api-key": token},
            timeout=10,
        )
        assert created.status_code == 201, created.text
        workers = server.worker_pids()
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.settimeout(30)
        sock.sendall(
            b"POST /v2/agents/support-bot/sessions/slow/events HTTP/1.1\r\nHost: x\r\n"
            + f"x-api-key: {token}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 200000\r\n\r\n"
            + b'{"type": "input_message", "messages": ['
        )
        started = time.monotonic()
        answer = b""
        try:
            # A byte every half second: each read waits little, the whole never ends.
            while trickle and time.monotonic() - started < 8:
                sock.sendall(b" ")
                sock.settimeout(0.5)
                with contextlib.suppress(TimeoutError):
                    answer += sock.recv(4096)
                if answer:
                    break
            sock.settimeout(30)
            while chunk := sock.recv(4096):
                answer += chunk
        except OSError:
            pass
        finally:
            sock.close()
        time.sleep(1)  # a killed worker's replacement has booted by now
        logs = server.logs()
        assert "WORKER TIMEOUT" not in logs, logs[-3000:]
        assert server.worker_pids() == workers
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"error":"invalid_request"' in answer and b"not sent in time" in answer
        assert time.monotonic() - started < 5  # the deadline, not gunicorn's timeout
        # The same worker serves on.
        again = requests.get(f"{server.url}/healthz", timeout=5)
        assert again.status_code == 200


def test_the_body_deadline_starts_at_the_first_read_and_takes_what_has_arrived():
    reader, writer = socket.socketpair()
    try:
        sock = BodyDeadline(reader, 0.2)
        time.sleep(0.3)  # queued for a thread: the client's time has not begun
        writer.sendall(b"abc")
        assert sock.recv(10) == b"abc"
        time.sleep(0.3)  # past the deadline, with bytes waiting: they are taken
        writer.sendall(b"def")
        assert sock.recv(10) == b"def"
        with pytest.raises(TimeoutError):
            sock.recv(10)  # past it, nothing waiting
        assert reader.gettimeout() is None  # the socket is left as it was
    finally:
        reader.close()
        writer.close()


@pytest.mark.parametrize("body", [b"", b"{}"], ids=["no-body", "body-read"])
def test_an_answered_request_keeps_its_connection_however_late_its_thread_drains(monkeypatch, body):
    # After the answer, the thread drains what the application left of the body. Its
    # clock jumps 0.1 s at every look, as when the thread waits that long for the
    # interpreter between two lines: with the body all read, nothing is waited for,
    # and the connection stays open for the next request its client may be sending.
    from gunicorn.config import Config
    from gunicorn.http.parser import RequestParser

    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        head = f"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        client_side.sendall(head.encode() + body)
        parser = RequestParser(Config(), server_side, ("127.0.0.1", 1))
        request = next(parser)
        assert request.body.read() == body
        started = time.monotonic()
        ticks = iter(range(1, 1000))
        monkeypatch.setattr(time, "monotonic", lambda: started + 0.1 * next(ticks))
        conn = type("Conn", (), {"parser": parser})()
        assert HeadReadingWorker._keepalive_after(None, conn, True) is True


def test_a_body_left_unread_and_not_sent_closes_its_connection(monkeypatch):
    from gunicorn.config import Config
    from gunicorn.http.parser import RequestParser

    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        client_side.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        parser = RequestParser(Config(), server_side, ("127.0.0.1", 1))
        next(parser)  # answered without reading its body, 99 bytes of which never come
        conn = type("Conn", (), {"parser": parser})()
        started = time.monotonic()
        assert HeadReadingWorker._keepalive_after(None, conn, True) is False
        assert time.monotonic() - started < 1
