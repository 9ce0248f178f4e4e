"""The gunicorn worker that ``gunicorn.conf.py`` names.

``HeadReadingWorker`` is gunicorn's threaded worker with three changes:

- The head of every request (request line and headers), and a body of
  declared length up to 64 KiB, are read by the worker's event loop without
  blocking; a thread is taken only once they are complete. A client that
  sends a partial request, or one byte at a time, costs a socket and a few
  bytes, not a thread; it is closed when its request is not complete
  ``header_timeout`` seconds after it started.
- Chunked bodies up to 64 KiB are read by the loop too, to their last chunk
  (a longer one is answered 413 at once), except on the routes that take
  larger bodies (``POST .../events`` and its batch, up to 256 KiB and 4 MiB):
  there a longer one goes to a thread, as a body of declared length over
  64 KiB does, and the service reads it against that route's bound, within
  ``header_timeout`` seconds of its first read (``BodyDeadline``; else 408
  and the connection closes). A chunk size that takes a body past its
  route's bound is answered 413 as soon as its line is in, by the loop or
  by the thread (``BoundedChunkedReader``), without waiting for the chunk.
  Past gunicorn's own bounds on the request line and the headers, a
  head goes to the parser at once, which answers 4xx; each byte is looked at
  once, however the head arrives.
- A connection whose request left its body unread (a 403 or 413 before a
  large upload) closes at once, instead of gunicorn waiting five seconds for
  that body, and its answer says ``Connection: close``: whether it stays is
  settled before the answer starts, never announced as kept alive and then
  closed. A closing connection lingers for the client's FIN in the loop,
  without blocking it.
- At the connection cap (``worker_connections``) the connection idle longest
  (lingering, then kept alive, then with an unfinished head) is closed to
  admit a new one, so a complete request is always admitted.
- gunicorn's own 4xx answers are in the service's JSON error shape.
- gunicorn's ``timeout`` applies to every request, as with sync workers: the
  worker's heartbeat stands still while a request runs past it, so the
  arbiter kills a worker whose request hangs (its other threads could still
  beat for it otherwise). Time spent waiting for a client to take an answer
  is not the request's, and each write of an answer must be taken by the
  client within ``SEND_TIMEOUT`` seconds (``SendDeadline``), else the
  connection is reset, one line with the request id is logged and the thread
  is free.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import socket
import struct
import threading
import time
from collections import deque
from functools import partial
from typing import Any

from gunicorn import util
from gunicorn.http.body import ChunkedReader, LengthReader
from gunicorn.http.errors import InvalidHeader, UnsupportedTransferCoding
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, ThreadWorker
from werkzeug.exceptions import RequestEntityTooLarge

from .deadlines import AnswerNotRead, BodyDeadline, SendDeadline

# Seconds a client has to send a request's head (AGENT_SESSIONS_HEADER_TIMEOUT).
HEADER_TIMEOUT = 10.0
# Seconds a thread has to write an answer (SEND_TIMEOUT, when the app does not say).
SEND_TIMEOUT = 10.0
# Bodies of a declared length up to this are read by the event loop too.
BODY_BUFFER_MAX = 65536
# The request lines of the routes whose bodies may be longer: POST /events (EVENT_MAX_BYTES)
# and its batch (EVENTS_MAX_CONTENT_LENGTH, when the group matched).
LARGE_BODY_ROUTE = re.compile(rb"POST /[^ ?#]*/events(/batch)?(?:\?[^ ]*)? HTTP/1\.[01]\r?\n")
LARGE_BODY_SETTINGS = ("EVENT_MAX_BYTES", "EVENTS_MAX_CONTENT_LENGTH")
# A chunk size as gunicorn takes it: hexadecimal digits only (int() takes "0x", "_", "+").
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]+")
# How long an answered request waits for a body it did not read, before the
# connection closes instead of staying open for the next request.
DRAIN_WAIT = 0.05
# And drains at most this much of it (gunicorn's own bound).
DRAIN_MAX_BYTES = 65536
# gunicorn takes any run of digits, leading zeros included.
CONTENT_LENGTH = re.compile(rb"\ncontent-length[ \t]*:[ \t]*([0-9]+)[ \t]*\r?\n", re.IGNORECASE)
TRANSFER_ENCODING = re.compile(rb"\ntransfer-encoding[ \t]*:", re.IGNORECASE)
CHUNKED = re.compile(rb"\ntransfer-encoding[ \t]*:[ \t]*chunked[ \t]*\r?\n", re.IGNORECASE)
# A closed connection waits this long, at most, for the client's FIN.
LINGER = 2.0
LINGER_DRAIN_MAX = 65536
# SO_LINGER on, for 0 seconds: close() resets the connection.
LINGER_RESET = struct.pack("ii", 1, 0)
# The error names of the service's JSON error shape, by gunicorn's status.
ERROR_NAMES = {
    400: "invalid_request",
    403: "forbidden",
    413: "payload_too_large",
    414: "invalid_request",
    408: "invalid_request",
    417: "invalid_request",
    431: "invalid_request",
    500: "internal_error",
    501: "invalid_request",
    503: "unavailable",
}
REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    413: "Payload Too Large",
    414: "URI Too Long",
    408: "Request Timeout",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}
# The one answer to every transfer coding but chunked, the service's as gunicorn's (501).
UNSUPPORTED_CODING = "Transfer-Encoding other than chunked is not supported."
EXPECT_CONTINUE = re.compile(rb"\nexpect[ \t]*:[ \t]*100-continue[ \t]*(\r?\n)", re.IGNORECASE)


def receive(sock: Any) -> bytes | None:
    """A readable socket's bytes (at most 64 KiB): b"" once the client is gone, None if none yet."""
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def pending(sock: Any) -> bool:
    """Whether a client's bytes (or its FIN) wait unread on a non-blocking socket."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, ValueError):  # ValueError: TLS, which cannot peek
        return False
    except OSError:
        return True  # reset: reading it says so
    return True


def head_end(data: bytearray, start: int = 0) -> int:
    """Where the body starts (after the blank line ending the head), or -1.

    The blank line is searched from ``start`` on (with bytes.find, far faster
    than a regular expression on a long head).
    """
    ends = [
        found + length
        for found, length in ((data.find(b"\n\n", start), 2), (data.find(b"\n\r\n", start), 3))
        if found >= 0
    ]
    return min(ends, default=-1)


def declared_length(head: bytes) -> int | None:
    """The one Content-Length of a head without Transfer-Encoding (0 without either), or None."""
    if TRANSFER_ENCODING.search(head):
        return None
    lengths = CONTENT_LENGTH.findall(head)
    if not lengths:
        return 0
    return int(lengths[0]) if len(lengths) == 1 else None


def chunked_end(
    data: bytearray, pos: int, walked: int = 0, bound: int | None = None
) -> tuple[int, int, bool]:
    """Walk whole chunks of a chunked body from ``pos``, ``walked`` bytes of data already
    walked: (where the walk stopped, the data bytes walked then, whether done).

    Done at the end of the last chunk and its trailer section, or at what is
    not a chunk (the parser answers that 400); otherwise the position is where
    the next chunk's size line starts, so each byte is walked once. A size
    line that takes the body past ``bound`` bytes of data raises ``Refused``
    (413) as soon as it is complete: the client need not send the chunk.
    """
    while True:
        line_end = data.find(b"\n", pos)
        if line_end < 0:
            return pos, walked, len(data) - pos > 1024  # no size line is that long
        size_text = bytes(data[pos:line_end]).split(b";", 1)[0].strip()
        if not CHUNK_SIZE.fullmatch(size_text):
            return pos, walked, True
        size = int(size_text, 16)
        if bound is not None and walked + size > bound:
            raise Refused(413, f"the body is at most {bound} bytes")
        if size == 0:
            start = line_end + 1  # the trailer section, up to an empty line
            while (end := data.find(b"\n", start)) >= 0:
                if data[start:end] in (b"", b"\r"):
                    return pos, walked, True
                start = end + 1
            return pos, walked, False
        after = line_end + 1 + size
        if len(data) < after + 2:
            return pos, walked, False
        walked += size
        pos = after + 2 if data[after : after + 2] == b"\r\n" else after + 1


class MissingHost(InvalidHeader):
    """An HTTP/1.1 request without a Host field (RFC 9112 3.2): gunicorn's 400."""

    def __init__(self, req: Any) -> None:
        super().__init__("HOST", req=req)

    def __str__(self) -> str:
        return "an HTTP/1.1 request needs one Host header field"


def check_head(req: Any) -> None:
    """Refuse what gunicorn's parser lets through and RFC 9112 does not: an HTTP/1.1
    request without Host (two are gunicorn's own 400), a transfer coding other than
    chunked (gunicorn passes gzip, deflate and compress on, still coded)."""
    if req.version >= (1, 1) and not any(name == "HOST" for name, _ in req.headers):
        raise MissingHost(req)
    for name, value in req.headers:
        codings = (v.strip(" \t").lower() for v in value.split(","))
        if name == "TRANSFER-ENCODING" and any(c not in ("chunked", "identity") for c in codings):
            raise UnsupportedTransferCoding(value)


class BoundedChunkedReader(ChunkedReader):
    """gunicorn's reader of a chunked body, refusing a size line past ``bound`` bytes of data.

    A request thread reads the rest of a chunked body the loop handed over
    unfinished (on ``LARGE_BODY_ROUTE``); without this, a size such as
    ``FFFFFFFF`` would have it wait for the chunk until the body's deadline
    (408). The refusal is Werkzeug's 413, which the service answers in its
    error shape; the body is marked failed, so the connection closes.
    """

    def __init__(self, req: Any, unreader: Any, bound: int) -> None:
        self.bound = bound
        self.declared = 0
        super().__init__(req, unreader)

    def parse_chunk_size(self, unreader: Any, data: Any = None) -> tuple[int, Any]:
        size, rest = super().parse_chunk_size(unreader, data)
        self.declared += size
        if self.declared > self.bound:
            raise RequestEntityTooLarge(f"The body is at most {self.bound} bytes.")
        return size, rest


def error_answer(status: int, message: str, rid: str) -> bytes:
    """An HTTP/1.1 answer in the service's error shape, closing the connection."""
    error = ERROR_NAMES.get(status, "invalid_request")
    body = json.dumps({"error": error, "messages": [message], "request_id": rid}).encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Bad Request')}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Request-ID: {rid}\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        "Cache-Control: no-store\r\n\r\n"
    )
    return head.encode("latin-1") + body


class CapturedAnswer:
    """Stands for a client socket while gunicorn writes its HTML error answer."""

    def __init__(self) -> None:
        self.data = bytearray()

    def gettimeout(self) -> float:
        return 0.0

    def send(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def sendall(self, data: bytes) -> None:
        self.data += data


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


class Refused(Exception):
    """A request the loop answers itself, at once: its head or chunked body is too long."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HeadReadingWorker(ThreadWorker):
    """gunicorn's ``gthread`` worker that reads request heads in its event loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout()
        self.reading_heads: deque[Any] = deque()
        self.lingering: deque[Any] = deque()
        self.request_started: dict[int, float] = {}
        self.request_lock = threading.Lock()
        self.serving = threading.local()  # the request and connection a thread serves
        # The service's bounds on the large routes' bodies (load_wsgi); None: unknown.
        self.large_body_bounds: tuple[int | None, int | None] = (None, None)
        self.send_timeout = SEND_TIMEOUT
        cfg = self.cfg
        # Past this many bytes without a complete head the parser has what it
        # needs to answer 4xx (a request line or headers over their limits).
        self.head_max = (
            cfg.limit_request_line
            + 2
            + (cfg.limit_request_fields + 1) * (cfg.limit_request_field_size + 2)
        )

    def load_wsgi(self) -> None:
        super().load_wsgi()
        config = getattr(self.wsgi, "config", None) or {}
        self.large_body_bounds = tuple(config.get(name) for name in LARGE_BODY_SETTINGS)
        self.send_timeout = config.get("SEND_TIMEOUT", SEND_TIMEOUT)
        self.wsgi = partial(self.settled_first, self.wsgi)

    def settled_first(self, app: Any, environ: dict, start_response: Any) -> Any:
        """Call the application; before its answer starts, settle whether the connection stays.

        A body the application left unread (a 403 or a 413 before a large
        upload) is drained then, within ``DRAIN_WAIT`` and ``DRAIN_MAX_BYTES``;
        if it cannot be, the answer says ``Connection: close``, as the
        connection will, instead of the keep-alive its client would reuse.
        """
        req, conn = getattr(self.serving, "req", None), getattr(self.serving, "conn", None)
        if req is None:  # HTTP/2: no connection of its own to keep or close
            return app(environ, start_response)

        def start(status: str, headers: list, exc_info: Any = None) -> Any:
            reader = getattr(req.body, "reader", None)
            if type(reader) is LengthReader and reader.length == 0:
                pass  # the body is off the socket (most requests): nothing to drain
            elif not req.should_close() and not self._keepalive_after(conn, True):
                req.must_close = True
            return start_response(status, headers, exc_info)

        return app(environ, start)

    def body_bound(self, head: bytes) -> tuple[bool, int | None]:
        """Whether the request (its head) is on ``LARGE_BODY_ROUTE``, and the most bytes of data
        its chunked body may declare: ``BODY_BUFFER_MAX``, else the route's own setting."""
        large = LARGE_BODY_ROUTE.match(head)
        if large is None:
            return False, BODY_BUFFER_MAX
        return True, self.large_body_bounds[large.group(1) is not None]

    # Heads: read by the event loop (the main thread), never by a pool thread.

    def enqueue_req(self, conn: Any) -> None:
        if getattr(conn, "head_read", False) or self.cfg.is_ssl or self.speaks_h2c(conn):
            conn.head_read = False  # the next request on this connection has its own head
            super().enqueue_req(conn)
            return
        held = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        conn.head = bytearray(held)
        conn.scanned = 0  # bytes searched for the head's end
        conn.line_ended = False  # whether the request line is complete
        conn.body_start = -1
        conn.body_length = None  # declared; None for a chunked body
        conn.chunk_pos = 0  # where the next chunk's size line starts
        conn.chunk_data = 0  # the data bytes of the chunks walked
        conn.large_body = False  # on LARGE_BODY_ROUTE
        conn.body_bound = None  # the most data bytes a chunked body may declare
        conn.continue_on_read = False  # 100 Continue at the first read of the body
        conn.sock.setblocking(False)
        # A stopping worker gives a head the time it gives a kept-alive connection.
        wait = (
            self.header_timeout if self.alive else min(self.header_timeout, STOP_KEEPALIVE_LINGER)
        )
        conn.head_deadline = time.monotonic() + wait
        self.reading_heads.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.read_head, conn))
        self.check_ready(conn)

    def speaks_h2c(self, conn: Any) -> bool:
        """HTTP/2 with prior knowledge starts with a preface gunicorn reads itself."""
        return negotiation.prior_knowledge_allowed(self.cfg, conn.client)

    def check_ready(self, conn: Any) -> None:
        try:
            ready = self.ready(conn)
        except Refused as refusal:
            self.stop_reading(conn)
            answer = self.refusal(
                refusal.status, str(refusal), f"refused {refusal.status}: {refusal}"
            )
            with contextlib.suppress(OSError):
                conn.sock.send(answer)
            self.linger(conn)
            return
        if ready:
            self.stop_reading(conn)
            self.hand_over(conn)

    def ready(self, conn: Any) -> bool:
        """Whether a thread can serve the request read so far without waiting on the client.

        True once the head is complete and so is a body of declared length up
        to ``BODY_BUFFER_MAX`` (a longer one is read by the thread, against the
        route's bound) or a chunked one (or, on ``LARGE_BODY_ROUTE``, once a
        chunked one is past it). Raises ``Refused`` once the data is past what
        a valid head (or a chunked body the loop reads) can be, or a chunk's
        size line takes the body past its route's bound. Only the bytes
        received since the last call are searched.
        """
        data = conn.head
        if conn.body_start < 0:
            end = head_end(data, max(conn.scanned - 3, 0))
            if end < 0:
                if not conn.line_ended:
                    conn.line_ended = data.find(b"\n", conn.scanned) >= 0
                conn.scanned = len(data)
                # Past gunicorn's bounds the parser would wait for more first.
                if not conn.line_ended and len(data) > self.cfg.limit_request_line + 2:
                    raise Refused(414, "the request line is too long")
                if len(data) > self.head_max:
                    raise Refused(431, "the request's header fields are too large")
                return False
            head = bytes(data[:end])
            length = declared_length(head)
            if length is None:
                if not CHUNKED.search(head) or CONTENT_LENGTH.search(head):
                    return True  # the parser answers what it makes of the framing
                if len(TRANSFER_ENCODING.findall(head)) != 1:
                    return True
            elif length > BODY_BUFFER_MAX:
                self.defer_continue(conn, end, length)
                return True
            if (length is None or len(data) - end < length) and self.answer_expect_continue(
                conn, end
            ):
                end = head_end(conn.head)
            conn.body_start = conn.chunk_pos = end
            conn.body_length = length
            if length is None:
                conn.large_body, conn.body_bound = self.body_bound(head)
        if conn.body_length is not None:
            return len(conn.head) - conn.body_start >= conn.body_length
        conn.chunk_pos, conn.chunk_data, done = chunked_end(
            conn.head, conn.chunk_pos, conn.chunk_data, conn.body_bound
        )
        if not done and len(conn.head) - conn.body_start > BODY_BUFFER_MAX:
            if conn.large_body:
                return True  # the service reads the rest against the route's bound
            raise Refused(413, f"a chunked body is at most {BODY_BUFFER_MAX} bytes")
        return done

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

    def defer_continue(self, conn: Any, end: int, length: int) -> None:
        """Hold back ``100 Continue`` for a body a thread reads: it is sent at the
        thread's first read of the body (``BodyDeadline``), so an answer decided on
        the head alone (401, 403, 413) is the only one (RFC 9110 10.1.1)."""
        expect = EXPECT_CONTINUE.search(conn.head, 0, end)
        if expect is None or b"HTTP/1.0" in conn.head[: conn.head.find(b"\n")]:
            return
        del conn.head[expect.start() + 1 : expect.end()]
        conn.continue_on_read = len(conn.head) - head_end(conn.head) < length

    def read_head(self, conn: Any, sock: Any) -> None:
        data = receive(sock)
        if data is None:
            return
        if not data:
            self.stop_reading(conn)
            self.nr_conns -= 1
            conn.close()
            return
        conn.head += data
        self.check_ready(conn)

    def stop_reading(self, conn: Any) -> None:
        self.reading_heads.remove(conn)
        self.poller.unregister(conn.sock)

    def hand_over(self, conn: Any) -> None:
        """The head is complete: the parser gets it back, and a thread serves the request
        (reading what is left of its body by ``BodyDeadline``)."""
        conn.init()
        unreader = conn.parser.unreader
        sock = getattr(unreader, "sock", None)
        if sock is not None:
            real = sock.sock if isinstance(sock, BodyDeadline) else sock
            unreader.sock = BodyDeadline(real, self.header_timeout, conn.continue_on_read)
        unreader.unread(bytes(conn.head))
        conn.head = bytearray()
        conn.data_ready = True
        conn.head_read = True
        self.enqueue_req(conn)

    # Closing: the loop waits for the client's FIN without blocking on it.

    def finish_request(self, conn: Any, fs: Any) -> None:
        if getattr(conn, "answer_cut", False):
            # The answer was cut off: a reset, so its unsent bytes are dropped at once.
            with contextlib.suppress(OSError):
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            self.nr_conns -= 1
            conn.close()
            return
        if not fs.cancelled() and fs.exception() is None and not fs.result():
            self.linger(conn)  # gunicorn's close_graceful would block the loop
            return
        super().finish_request(conn, fs)

    def linger(self, conn: Any) -> None:
        """Send FIN, then read what the client still sends until its FIN (RFC 9112 9.6)."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
            conn.linger_deadline = time.monotonic() + LINGER
            conn.drained = 0
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.drain, conn))
        except (OSError, ValueError):
            self.nr_conns -= 1
            conn.close()
            return
        self.lingering.append(conn)

    def drain(self, conn: Any, sock: Any) -> None:
        data = receive(sock)
        if data is None:
            return
        conn.drained += len(data)
        if not data or conn.drained >= LINGER_DRAIN_MAX:
            self.end_linger(conn)

    def end_linger(self, conn: Any) -> None:
        self.lingering.remove(conn)
        self.poller.unregister(conn.sock)
        self.nr_conns -= 1
        conn.close()

    def murder_keepalived(self, force: bool = False) -> None:
        """Close the kept-alive connections and heads past their time (all of them: ``force``).

        A kept-alive connection whose client sent its next request just as its
        time ran out (after the loop's last look at the sockets) is served, not
        closed: closing it would drop a request in its buffer unanswered.
        """
        now = float("inf") if force else time.monotonic()
        while self.keepalived_conns and self.keepalived_conns[0].timeout <= now:
            conn = self.keepalived_conns.popleft()
            self.poller.unregister(conn.sock)
            # Looked at just before the close: a request that comes after it is never read.
            if not force and pending(conn.sock):
                self.enqueue_req(conn)  # as when the poller finds it readable
                continue
            self.nr_conns -= 1
            conn.close()
        while self.reading_heads and self.reading_heads[0].head_deadline <= now:
            conn = self.reading_heads[0]
            self.stop_reading(conn)
            self.nr_conns -= 1
            if self.alive:
                message, within = "The request was not sent in time.", self.header_timeout
                self.answer_unfinished(conn, 408, message, f" within {within}s")
            else:
                message = "The server is restarting: send the request again."
                self.answer_unfinished(conn, 503, message, " when the worker stopped")
            conn.close()
        while self.lingering and self.lingering[0].linger_deadline <= now:
            self.end_linger(self.lingering[0])

    def _cap_keepalive(self, deadline: float) -> None:
        # A stopping worker gives unfinished heads the time it gives kept-alive
        # connections, so a request under way is answered (Connection: close).
        super()._cap_keepalive(deadline)
        for conn in self.reading_heads:
            conn.head_deadline = min(conn.head_deadline, deadline)

    def answer_unfinished(self, conn: Any, status: int, message: str, when: str) -> None:
        """Answer ``status`` to a request whose head is not all in, if the client sent any.

        Best effort (the client may not read), with a line for the operator.
        What the client sent is read first, so the close that follows does not
        reset the connection over the answer.
        """
        with contextlib.suppress(OSError):
            while (data := receive(conn.sock)) and len(conn.head) < self.head_max:
                conn.head += data
        if not conn.head:
            return  # nothing was sent: nothing to answer
        note = f"request not complete{when} ({len(conn.head)} bytes received): {status}"
        with contextlib.suppress(OSError):
            conn.sock.send(self.refusal(status, message, note))

    # The connection cap: the connection idle longest makes room for a new one.

    def accept(self, listener: Any) -> None:
        if self.nr_conns >= self.worker_connections - 1:
            self.make_room()
        super().accept(listener)

    def make_room(self) -> None:
        """Close one connection: lingering, else kept alive, else the oldest unfinished head.

        Only a connection with nothing in flight is closed as it is: a kept-alive
        one whose next request has come is served instead, and a head begun
        is answered (503) before its connection closes.
        """
        if self.lingering:
            self.end_linger(self.lingering[0])
            return
        while self.keepalived_conns:
            conn = self.keepalived_conns.popleft()
            self.poller.unregister(conn.sock)
            if pending(conn.sock):
                self.enqueue_req(conn)  # its next request has come: served, not closed
                continue
            self.nr_conns -= 1
            conn.close()
            return
        if not self.reading_heads:
            return
        idle = next((c for c in self.reading_heads if not c.head and not pending(c.sock)), None)
        conn = idle or self.reading_heads[0]
        self.stop_reading(conn)
        self.nr_conns -= 1
        if idle is None:
            message = "The server is at its connection limit: send the request again."
            self.answer_unfinished(conn, 503, message, " at the connection limit")
        conn.close()

    # gunicorn's own error answers, in the service's error shape.

    def refusal(self, status: int, message: str, note: str, rid: str | None = None) -> bytes:
        """The answer to a request refused before the service saw it, and its log line:
        ``note`` with the request id the answer carries, so a client's id finds it."""
        rid = rid or os.urandom(16).hex()
        self.log.warning("%s request_id=%s", note, rid, extra={"request_id": rid})
        return error_answer(status, message, rid)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        rid = os.urandom(16).hex()
        captured = CapturedAnswer()  # gunicorn logs, and writes its HTML answer here
        tagging = getattr(self.log, "tagged", None)  # gunicorn's lines get the answer's id
        with tagging(rid) if tagging is not None else contextlib.nullcontext():
            super().handle_error(req, captured, addr, exc)
        try:
            status = int(bytes(captured.data).split(b" ", 2)[1])
        except (IndexError, ValueError):
            status = 500
        message = REASONS.get(status, "Bad Request")
        if isinstance(exc, UnsupportedTransferCoding):
            message = UNSUPPORTED_CODING
        elif status < 500 and str(exc):
            message = f"{message}: {str(exc)[:200]}"
        answer = self.refusal(status, message, f"answered {status} to an unreadable request", rid)
        with contextlib.suppress(Exception):
            util.write_nonblock(client, answer)

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        # gunicorn waits up to five seconds for a body the application did not
        # read (a 413 before a large upload arrives); the connection closes instead,
        # unless the rest comes within DRAIN_WAIT of the first look at the socket.
        # Not a deadline from now: gunicorn checks one before it reads anything, so
        # a thread that got the interpreter back late would close a connection it
        # has just answered as kept alive, with its client's next request on the
        # way. What has arrived (most often the whole body, which the loop read) is
        # always taken.
        if not keepalive:
            return False
        unreader = conn.parser.unreader
        sock = getattr(unreader, "sock", None)
        if sock is not None:
            real = sock.sock if isinstance(sock, BodyDeadline) else sock
            unreader.sock = BodyDeadline(real, DRAIN_WAIT)
        try:
            return bool(conn.parser.finish_body(max_bytes=DRAIN_MAX_BYTES))
        finally:
            if sock is not None:
                unreader.sock = sock

    # The timeout: the heartbeat is as old as the oldest running request.

    def handle_request(self, req: Any, conn: Any) -> Any:
        check_head(req)  # raised: handle_error answers it, before the application sees it
        bound = getattr(conn, "body_bound", None)
        body = getattr(req, "body", None)
        if bound is not None and type(getattr(body, "reader", None)) is ChunkedReader:
            body.reader = BoundedChunkedReader(req, req.unreader, bound)  # nothing read yet
        thread = threading.get_ident()
        with self.request_lock:
            self.request_started[thread] = time.monotonic()
        self.serving.req, self.serving.conn = req, conn
        sock = conn.sock
        conn.sock = writer = SendDeadline(sock, self.send_timeout, self.client_time)
        try:
            return super().handle_request(req, conn)
        except AnswerNotRead:
            conn.answer_cut = True
            self.log.warning(
                "answer not read by the client within %ss: connection closed request_id=%s",
                self.send_timeout,
                writer.request_id,
            )
            return False
        finally:
            conn.sock = sock
            self.serving.req = self.serving.conn = None
            with self.request_lock:
                del self.request_started[thread]

    @contextlib.contextmanager
    def client_time(self) -> Any:
        """While a thread waits for its client to take an answer, it is not in the heartbeat."""
        thread = threading.get_ident()
        with self.request_lock:
            started = self.request_started.pop(thread, None)
        paused = time.monotonic()
        try:
            yield
        finally:
            if started is not None:
                with self.request_lock:
                    self.request_started[thread] = started + (time.monotonic() - paused)

    def notify(self) -> None:
        with self.request_lock:
            oldest = min(self.request_started.values(), default=None)
        if oldest is None:
            super().notify()
        else:
            os.utime(self.tmp.fileno(), (oldest, oldest))
