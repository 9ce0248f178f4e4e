"""A body over 64 KiB that never finishes, against a live gunicorn.

The event loop hands a request whose declared body is over 64 KiB to a
request thread at once, and the thread's read has no deadline: a client with
an ``events:create`` key that declares a 200 KB event body, sends a few bytes
and stalls, holds the thread until gunicorn's ``TIMEOUT`` kills the whole
worker, with every other request it was serving. Sixteen such connections
(four workers of four threads) stop the server; ``/healthz`` waits too.

Reproduction against a server on :8000 (KEY with events:create on bot, a
session ``s`` there), in Python::

    import socket
    head = (b"POST /v2/agents/bot/sessions/s/events HTTP/1.1\\r\\nHost: x\\r\\n"
            b"x-api-key: " + KEY.encode() + b"\\r\\nContent-Type: application/json\\r\\n"
            b"Content-Length: 200000\\r\\n\\r\\n{\\"type\\":")
    held = [socket.create_connection(("127.0.0.1", 8000)) for _ in range(20)]
    for s in held:
        s.sendall(head)
    # now: curl -m 20 http://127.0.0.1:8000/healthz times out, and after 30 s
    # the log shows WORKER TIMEOUT and SIGKILL for every worker.

A slow head, or a slow body of up to 64 KiB, is closed after HEADER_TIMEOUT
with a 408; a slow larger body should be too, not cost a worker.
"""

from __future__ import annotations

import socket
import time

import requests

from tests.servers import serving_store

GRANTS = "support-bot=sessions:create,sessions:read,events:create"


def test_a_stalled_large_body_is_closed_without_killing_its_worker(tmp_path):
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
        answer = b""
        try:
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
