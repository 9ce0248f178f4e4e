"""Fixtures of the client's tests: one live gunicorn of this repository, fresh agents
and keys, and each test run with the sync client and with the async one.

This directory is not a package (a second ``tests`` package would shadow the
main suite's): pytest imports its modules by their file names, so each starts
with ``test_client_``. The server comes from the main suite's helpers
(``tests.servers``), importable through the root's ``pythonpath``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlite_utils.utils import sqlite3

from agent_sessions_client import AgentSessions, AsyncAgentSessions, AsyncPager
from tests.servers import cli, serving

EVERY_SCOPE = [
    "sessions:create",
    "sessions:read",
    "sessions:update",
    "sessions:delete",
    "events:create",
    "events:append",
]


@dataclasses.dataclass
class Live:
    """The server every client test talks to."""

    url: str
    admin: str  # an admin key's token
    db: Path
    log: Callable[[], str]


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("client-server")
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp}/sessions.db",
        # A write held up by a lock the test takes answers 503 soon.
        "AGENT_SESSIONS_SQLITE_BUSY_TIMEOUT_MS": "200",
        # Limits out of the way, but for the test that meets one on purpose.
        "AGENT_SESSIONS_DEFAULT_LIMIT": "100000/minute",
        "AGENT_SESSIONS_ADMIN_LIMIT": "100000/minute",
        "AGENT_SESSIONS_AUTH_FAILURE_LIMIT": "1000/minute",
    }
    out = cli("keys", "create", "--name", "admin", "--admin", env=env).stdout
    admin = out.strip().splitlines()[-1]
    with serving(env, tmp, workers=2) as server:
        yield Live(server.url, admin, tmp / "sessions.db", server.logs)


@pytest.fixture
def admin(live: Live) -> Iterator[AgentSessions]:
    """A sync client with the admin key, for setting tests up."""
    with AgentSessions(live.url, live.admin) as client:
        yield client


@pytest.fixture
def agent(admin: AgentSessions) -> Iterator[str]:
    """A fresh agent of the test's own."""
    key = f"agent-{uuid.uuid4().hex[:12]}"
    admin.agents.create(key, name="Support")
    yield key
    with contextlib.suppress(Exception):
        admin.agents.delete(key)


@pytest.fixture
def make_key(admin: AgentSessions) -> Callable[..., str]:
    """``make_key({agent: [scopes]}, create_limit=None)``: a new key's token."""

    def make(grants: dict[str, list[str]], **options: Any) -> str:
        return admin.api_keys.create(name="test", grants=grants, **options).secret

    return make


@pytest.fixture
def token(make_key: Callable[..., str], agent: str) -> str:
    """A key with every scope on the test's agent."""
    return make_key({agent: EVERY_SCOPE})


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as loop:
        yield loop


class Synced:
    """An async client (or one of its resources) driven from a sync test: each call's
    coroutine run to its end on the test's loop, each list read whole with ``async for``."""

    def __init__(self, target: Any, runner: asyncio.Runner):
        self._target = target
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if hasattr(value, "_client"):  # a resource
            return Synced(value, self._runner)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            result = value(*args, **kwargs)
            if inspect.iscoroutine(result):
                return self._runner.run(result)
            if isinstance(result, AsyncPager):
                return SyncedPager(result, self._runner)
            return result

        return call


class SyncedPager:
    def __init__(self, pager: AsyncPager, runner: asyncio.Runner):
        self._pager = pager
        self._runner = runner

    def __iter__(self) -> Iterator[Any]:
        async def read() -> list[Any]:
            return [item async for item in self._pager]

        return iter(self._runner.run(read()))

    def pages(self) -> list[Any]:
        async def read() -> list[Any]:
            return [page async for page in self._pager.pages()]

        return self._runner.run(read())


@dataclasses.dataclass
class Sent:
    """What a client sent and got, attempt by attempt (its httpx event hooks')."""

    requests: list[httpx.Request] = dataclasses.field(default_factory=list)
    times: list[float] = dataclasses.field(default_factory=list)  # when each was sent
    responses: list[httpx.Response] = dataclasses.field(default_factory=list)

    def keys(self) -> list[str | None]:
        return [r.headers.get("Idempotency-Key") for r in self.requests]

    def statuses(self) -> list[int]:
        return [r.status_code for r in self.responses]


@pytest.fixture
def connect(live: Live, kind: str, runner: asyncio.Runner) -> Iterator[Callable[..., Any]]:
    """``connect(token, **options)``: a client of the test's kind on the live server.

    ``on_request(request, attempt)`` runs before each attempt is sent;
    ``transport`` is a (sync, async) pair of httpx transports (or one serving
    both, such as ``httpx.MockTransport``). The client's ``sent`` (a
    :class:`Sent`) records every attempt and answer. Closed when the test ends.
    """
    opened: list[Any] = []

    def make(
        token: str,
        *,
        base_url: str | None = None,
        on_request: Callable[[httpx.Request, int], None] | None = None,
        transport: Any = None,
        **options: Any,
    ) -> Any:
        record = Sent()
        if transport is not None and not isinstance(transport, tuple):
            transport = (transport, transport)

        def before(request: httpx.Request) -> None:
            record.requests.append(request)
            record.times.append(time.monotonic())
            if on_request is not None:
                on_request(request, len(record.requests))

        def after(response: httpx.Response) -> None:
            record.responses.append(response)

        url = base_url or live.url
        if kind == "sync":
            http = httpx.Client(
                event_hooks={"request": [before], "response": [after]},
                transport=transport[0] if transport else None,
            )
            client = AgentSessions(url, token, http_client=http, **options)
            client.sent = record
            opened.append(http.close)
            return client

        async def before_async(request: httpx.Request) -> None:
            before(request)

        async def after_async(response: httpx.Response) -> None:
            after(response)

        http = httpx.AsyncClient(
            event_hooks={"request": [before_async], "response": [after_async]},
            transport=transport[1] if transport else None,
        )
        client = AsyncAgentSessions(url, token, http_client=http, **options)
        opened.append(lambda: runner.run(http.aclose()))
        synced = Synced(client, runner)
        synced.sent = record
        return synced

    yield make
    for close in opened:
        close()


@pytest.fixture
def api(connect: Callable[..., Any], token: str) -> Any:
    """A client of the test's kind with every scope on the test's agent."""
    return connect(token)


class WriteLock:
    """Holds SQLite's write lock on the server's database, as a long writer would."""

    def __init__(self, path: Path):
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.held = False

    def take(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        self.held = True

    def release(self) -> None:
        if self.held:
            self.conn.execute("ROLLBACK")
            self.held = False


@pytest.fixture
def write_lock(live: Live) -> Iterator[WriteLock]:
    lock = WriteLock(live.db)
    yield lock
    lock.release()
    lock.conn.close()


class Forwarder:
    """A port that refuses connections until :meth:`open`, then forwards them to ``target``."""

    def __init__(self, target: str):
        host, _, port = target.removeprefix("http://").partition(":")
        self.target = (host, int(port))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.closed = threading.Event()
        self.connections: list[socket.socket] = []

    def open(self) -> None:
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.connections += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: Any, dst: Any) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(1)

    def close(self) -> None:
        self.closed.set()
        self.sock.close()
        for conn in self.connections:
            conn.close()


class LoseAnswers(httpx.BaseTransport):
    """Sends each request for real, then loses the first ``count`` answers, as a
    connection that breaks once the server has answered."""

    def __init__(self, count: int = 1):
        self.inner = httpx.HTTPTransport()
        self.count = count

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        response.read()
        if self.count > 0:
            self.count -= 1
            response.close()
            raise httpx.ReadError("connection reset after the answer was sent", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


class AsyncLoseAnswers(httpx.AsyncBaseTransport):
    def __init__(self, count: int = 1):
        self.inner = httpx.AsyncHTTPTransport()
        self.count = count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        await response.aread()
        if self.count > 0:
            self.count -= 1
            await response.aclose()
            raise httpx.ReadError("connection reset after the answer was sent", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
def lose_answers() -> Callable[[int], tuple[LoseAnswers, AsyncLoseAnswers]]:
    """``lose_answers(n)``: the (sync, async) transports losing the first n answers."""
    return lambda count=1: (LoseAnswers(count), AsyncLoseAnswers(count))


@pytest.fixture
def forwarder(live: Live) -> Iterator[Forwarder]:
    """A port in front of the server that refuses connections until ``open()``."""
    port = Forwarder(live.url)
    yield port
    port.close()
