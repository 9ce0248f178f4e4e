"""The gunicorn worker and logger that ``gunicorn.conf.py`` names.

``HeadReadingWorker`` is gunicorn's threaded worker with three changes:

- The head of every request (request line and headers), and a body of
  declared length up to 64 KiB, are read by the worker's event loop without
  blocking; a thread is taken only once they are complete. A client that
  sends a partial request, or one byte at a time, costs a socket and a few
  bytes, not a thread; it is closed when its request is not complete
  ``header_timeout`` seconds after it started.
- A connection whose answered request left its body unread closes at once,
  instead of gunicorn waiting five seconds for that body.
- gunicorn's ``timeout`` applies to every request, as with sync workers: the
  worker's heartbeat stands still while a request runs past it, so the
  arbiter kills a worker whose request hangs (its other threads could still
  beat for it otherwise).

``EscapingLogger`` logs the path as the client sent it (percent-encoded) and
escapes control characters in every field of the access log and in every
error-log message, so no client can write a line or a terminal sequence into
either log.
"""

from __future__ import annotations

import logging
import os
import re
import selectors
import threading
import time
import traceback
from collections import deque
from functools import partial
from typing import Any

from gunicorn.glogging import Logger
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import ThreadWorker

from .text import escape_controls

# Seconds a client has to send a request's head (AGENT_SESSIONS_HEADER_TIMEOUT).
HEADER_TIMEOUT = 10.0
# Bodies of a declared length up to this are read by the event loop too.
BODY_BUFFER_MAX = 65536
# How long an answered request waits for a body it did not read, before the
# connection closes instead of staying open for the next request.
DRAIN_WAIT = 0.05
HEAD_END = re.compile(rb"\r?\n\r?\n")
CONTENT_LENGTH = re.compile(rb"\ncontent-length[ \t]*:[ \t]*(\d{1,12})[ \t]*\r?\n", re.IGNORECASE)
TRANSFER_ENCODING = re.compile(rb"\ntransfer-encoding[ \t]*:", re.IGNORECASE)
EXPECT_CONTINUE = re.compile(rb"\nexpect[ \t]*:[ \t]*100-continue[ \t]*(\r?\n)", re.IGNORECASE)


def head_end(data: bytearray) -> int:
    """Where the body starts (after the blank line ending the head), or -1."""
    match = HEAD_END.search(data)
    return match.end() if match else -1


def declared_length(head: bytes) -> int | None:
    """The one Content-Length of a head without Transfer-Encoding (0 without either), or None."""
    if TRANSFER_ENCODING.search(head):
        return None
    lengths = CONTENT_LENGTH.findall(head)
    if not lengths:
        return 0
    return int(lengths[0]) if len(lengths) == 1 else None


def header_timeout() -> float:
    """``AGENT_SESSIONS_HEADER_TIMEOUT``, checked: ValueError names the setting."""
    value = os.environ.get("AGENT_SESSIONS_HEADER_TIMEOUT") or str(HEADER_TIMEOUT)
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= 3600:
        raise ValueError(f"AGENT_SESSIONS_HEADER_TIMEOUT={value!r}: expected seconds, 0 to 3600")
    return seconds


class HeadReadingWorker(ThreadWorker):
    """gunicorn's ``gthread`` worker that reads request heads in its event loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout()
        self.reading_heads: deque[Any] = deque()
        self.request_started: dict[int, float] = {}
        self.request_lock = threading.Lock()
        cfg = self.cfg
        # Past this many bytes without a complete head the parser has what it
        # needs to answer 4xx (a request line or headers over their limits).
        self.head_max = (
            cfg.limit_request_line
            + 2
            + (cfg.limit_request_fields + 1) * (cfg.limit_request_field_size + 2)
        )

    # Heads: read by the event loop (the main thread), never by a pool thread.

    def enqueue_req(self, conn: Any) -> None:
        if getattr(conn, "head_read", False) or self.cfg.is_ssl or self.speaks_h2c(conn):
            conn.head_read = False  # the next request on this connection has its own head
            super().enqueue_req(conn)
            return
        held = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        conn.head = bytearray(held)
        conn.sock.setblocking(False)
        if self.ready(conn):
            self.hand_over(conn)
            return
        conn.head_deadline = time.monotonic() + self.header_timeout
        self.reading_heads.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.read_head, conn))

    def speaks_h2c(self, conn: Any) -> bool:
        """HTTP/2 with prior knowledge starts with a preface gunicorn reads itself."""
        return negotiation.prior_knowledge_allowed(self.cfg, conn.client)

    def ready(self, conn: Any) -> bool:
        """Whether a thread can serve the request read so far without waiting on the client.

        True once the head is complete and so is a body of declared length up
        to ``BODY_BUFFER_MAX`` (a longer one is refused by the service before
        it is read), or once the data is past what a valid head can be, when
        the parser answers 4xx from what it has.
        """
        data = conn.head
        end = head_end(data)
        if end < 0:
            if data.find(b"\n") < 0:
                return len(data) > self.cfg.limit_request_line + 2
            return len(data) > self.head_max
        length = declared_length(data[:end])
        if length is None or length > BODY_BUFFER_MAX:
            return True
        if len(data) - end < length and self.answer_expect_continue(conn, end):
            end = head_end(conn.head)
        return len(conn.head) - end >= length

    def answer_expect_continue(self, conn: Any, end: int) -> bool:
        """Send ``100 Continue`` for a body the loop waits for, as a buffering proxy does.

        The Expect field is taken out of the head, so gunicorn does not send a
        second one once a thread has the request.
        """
        expect = EXPECT_CONTINUE.search(conn.head, 0, end)
        if expect is None or b"HTTP/1.0" in conn.head[: conn.head.find(b"\n")]:
            return False
        del conn.head[expect.start() + 1 : expect.end()]
        try:
            conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        except OSError:
            pass  # the client is gone: reading its head ends the connection
        return True

    def read_head(self, conn: Any, sock: Any) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.stop_reading(conn)
            self.nr_conns -= 1
            conn.close()
            return
        conn.head += data
        if self.ready(conn):
            self.stop_reading(conn)
            self.hand_over(conn)

    def stop_reading(self, conn: Any) -> None:
        self.reading_heads.remove(conn)
        self.poller.unregister(conn.sock)

    def hand_over(self, conn: Any) -> None:
        """The head is complete: the parser gets it back, and a thread serves the request."""
        conn.init()
        conn.parser.unreader.unread(bytes(conn.head))
        conn.head = bytearray()
        conn.data_ready = True
        conn.head_read = True
        self.enqueue_req(conn)

    def murder_keepalived(self, *args: Any, **kwargs: Any) -> None:
        super().murder_keepalived(*args, **kwargs)
        # A stopping worker closes them at once: their request has not begun.
        now = time.monotonic() if self.alive else float("inf")
        while self.reading_heads and self.reading_heads[0].head_deadline <= now:
            conn = self.reading_heads[0]
            self.stop_reading(conn)
            self.nr_conns -= 1
            conn.close()

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        # gunicorn waits up to five seconds for a body the application did not
        # read (a 413 before a large upload arrives); the connection closes instead.
        if not keepalive:
            return False
        return bool(conn.parser.finish_body(deadline=time.monotonic() + DRAIN_WAIT))

    # The timeout: the heartbeat is as old as the oldest running request.

    def handle_request(self, req: Any, conn: Any) -> Any:
        thread = threading.get_ident()
        with self.request_lock:
            self.request_started[thread] = time.monotonic()
        try:
            return super().handle_request(req, conn)
        finally:
            with self.request_lock:
                del self.request_started[thread]

    def notify(self) -> None:
        with self.request_lock:
            oldest = min(self.request_started.values(), default=None)
        if oldest is None:
            super().notify()
        else:
            os.utime(self.tmp.fileno(), (oldest, oldest))


class EscapingFormatter(logging.Formatter):
    """Control characters in a message or a traceback are written as escapes."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape_controls(record.message, backslash=False)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        # An exception's message may hold a newline of the client's: escaped
        # before the traceback is laid out, so only the layout's newlines stay.
        report = traceback.TracebackException(*ei)
        seen = set()
        pending = [report]
        while pending:
            current = pending.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            if isinstance(getattr(current, "_str", None), str):
                current._str = escape_controls(current._str, backslash=False)
            pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        lines = "".join(report.format()).rstrip("\n").split("\n")
        return "\n".join(escape_controls(line, backslash=False) for line in lines)


class EscapingLogger(Logger):
    """gunicorn's logger; every access-log field and error-log line on one line, as text."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if getattr(handler, "_gunicorn", False) and handler.formatter is not None:
                    handler.setFormatter(
                        EscapingFormatter(handler.formatter._fmt, handler.formatter.datefmt)
                    )

    def atoms(self, resp: Any, req: Any, environ: dict, request_time: Any) -> dict:
        atoms = super().atoms(resp, req, environ, request_time)
        # The path as received, percent-encoded (PATH_INFO is decoded).
        atoms["U"] = environ.get("RAW_URI", "").partition("?")[0] or "-"
        return {
            name: escape_controls(value) if isinstance(value, str) else value
            for name, value in atoms.items()
        }
