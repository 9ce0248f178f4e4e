"""A connection's socket as a request thread uses it: no read and no write waits past a deadline.

The worker (``server.HeadReadingWorker``) hands a thread a socket wrapped in
``BodyDeadline`` while it reads what is left of a request's body, and in
``SendDeadline`` while it writes the answer: a client that stalls, trickles,
or stops reading costs the thread a bounded time, never gunicorn's timeout.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from typing import Any

# Send without waiting, whatever the socket's mode (Linux, the BSDs, macOS); 0: not offered.
DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
# The request id in the head of an answer, for the line logged when it is cut off.
ANSWER_REQUEST_ID = re.compile(rb"\r\nX-Request-ID: ([!-~]{1,200})\r\n", re.IGNORECASE)


class BodyDeadline:
    """A connection's socket as a request thread reads from it: no read waits past a deadline.

    The loop hands a request to a thread before its body is all in when the
    body is over ``BODY_BUFFER_MAX`` (declared, or chunked on
    ``LARGE_BODY_ROUTE``); the thread then reads it from the socket. Without a
    deadline a client that stalls, or trickles a byte at a time, holds the
    thread until gunicorn's timeout kills the whole worker. With it, reading
    fails with ``socket.timeout`` once ``timeout`` seconds have passed since
    the thread's first read (time spent queued for a thread is the server's,
    not the client's), and bytes already received are always taken: the
    service answers 408 and the connection closes. Everything but ``recv`` is
    the socket's own.

    ``continue_first``: the request's ``Expect: 100-continue`` was held back;
    ``100 Continue`` is sent just before the first read, so a request the
    service refuses on its head alone (a 401, or a 413 on its declared
    length) gets its final answer without being invited to send the body.
    """

    __slots__ = ("continue_first", "deadline", "sock", "timeout")

    def __init__(self, sock: Any, timeout: float, continue_first: bool = False) -> None:
        self.sock = sock
        self.timeout = timeout
        self.continue_first = continue_first
        self.deadline: float | None = None

    def recv(self, size: int) -> bytes:
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + self.timeout
        if self.continue_first:
            self.continue_first = False
            with contextlib.suppress(OSError):  # the client is gone: the read says so
                self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        remaining = max(self.deadline - now, 0.0)  # 0: only what has arrived already
        prior = self.sock.gettimeout()
        self.sock.settimeout(remaining if prior is None else min(prior, remaining))
        try:
            return self.sock.recv(size)
        except BlockingIOError:
            raise TimeoutError("the request body was not received in time") from None
        finally:
            self.sock.settimeout(prior)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class AnswerNotRead(TimeoutError):
    """A write of an answer its client did not take within the send timeout: it is not reading."""


class SendDeadline:
    """A connection's socket as a request thread writes an answer to it: no write waits
    past ``timeout`` seconds, and the time spent waiting is the client's, not the request's.

    Each write (the answer's head, its body, each piece of a streamed one) must
    be taken by the client within ``timeout`` seconds; a client that does not
    read, or reads that slowly, makes the write fail with ``AnswerNotRead``,
    and the thread then closes the connection and is free. A client that
    keeps reading gets an answer of any length. While a write waits,
    ``client_time`` keeps the thread out of the worker's heartbeat, so
    gunicorn's timeout never kills a worker because a client went quiet.
    Everything but the writes is the socket's own.
    """

    __slots__ = ("client_time", "head", "sock", "timeout", "try_first")

    def __init__(self, sock: Any, timeout: float, client_time: Any) -> None:
        self.sock = sock
        self.timeout = timeout
        self.client_time = client_time
        self.head: bytes | None = None  # the first write: the answer's head
        # A plain socket is first written without waiting: most answers fit its
        # buffer, and then cost one system call, as a bare sendall does.
        self.try_first = type(sock) is socket.socket and DONTWAIT != 0

    def sendall(self, data: bytes) -> None:
        if self.head is None:
            self.head = data
        sent = 0
        if self.try_first:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                sent = self.sock.send(data, DONTWAIT)
            if sent == len(data):
                return
        self._timed(self.sock.sendall, memoryview(data)[sent:])

    @property
    def request_id(self) -> str:
        """The answer's X-Request-ID, for the line logged when it is cut off ("-": none)."""
        found = ANSWER_REQUEST_ID.search(self.head or b"")
        return found.group(1).decode("ascii") if found else "-"

    def send(self, data: bytes) -> int:
        return self._timed(self.sock.send, data)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        return self._timed(self.sock.sendfile, file, offset, count)

    def _timed(self, write: Any, *args: Any) -> Any:
        prior = self.sock.gettimeout()
        self.sock.settimeout(self.timeout if prior is None else min(prior, self.timeout))
        try:
            with self.client_time():
                return write(*args)
        except TimeoutError:  # socket.timeout: the whole of one sendall counts against it
            raise AnswerNotRead("the answer was not read in time") from None
        finally:
            self.sock.settimeout(prior)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)
