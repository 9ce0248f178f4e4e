"""The clients: :class:`AgentSessions` (sync) and :class:`AsyncAgentSessions` (asyncio).

Both run the calls of :mod:`.resources`, written once (see :mod:`._core`); they
differ only in how a request is sent and a pause waited, and in how a list is
iterated (``for`` or ``async for``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import httpx

from ._core import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, NOT_GIVEN, BaseClient, Call, Pause
from .models import Page
from .resources import Agents, ApiKeys, Events, Sessions

__all__ = ["AgentSessions", "AsyncAgentSessions", "AsyncPager", "SyncPager"]

T = TypeVar("T")


class _Service(BaseClient):
    """A client with its resources."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.sessions = Sessions(self)
        self.events = Events(self)
        self.agents = Agents(self)
        self.api_keys = ApiKeys(self)


# Pagers


class SyncPager(Generic[T]):
    """The items of a list, across its pages, read as iterated."""

    def __init__(
        self,
        client: AgentSessions,
        fetch: Callable[[str | None], Call[Page[T]]],
        page_key: str | None,
    ):
        self._client = client
        self._fetch = fetch
        self._page_key = page_key

    def pages(self) -> Iterator[Page[T]]:
        """Each page, until one has no ``page_key`` (a short page is not the end)."""
        page_key = self._page_key
        while True:
            page = self._client._run(self._fetch(page_key))
            yield page
            if page.page_key is None:
                return
            page_key = page.page_key

    def __iter__(self) -> Iterator[T]:
        for page in self.pages():
            yield from page.items


class AsyncPager(Generic[T]):
    """The items of a list, across its pages, read as iterated (``async for``)."""

    def __init__(
        self,
        client: AsyncAgentSessions,
        fetch: Callable[[str | None], Call[Page[T]]],
        page_key: str | None,
    ):
        self._client = client
        self._fetch = fetch
        self._page_key = page_key

    async def pages(self) -> AsyncIterator[Page[T]]:
        """Each page, until one has no ``page_key`` (a short page is not the end)."""
        page_key = self._page_key
        while True:
            page = await self._client._run(self._fetch(page_key))
            yield page
            if page.page_key is None:
                return
            page_key = page.page_key

    async def __aiter__(self) -> AsyncIterator[T]:
        async for page in self.pages():
            for item in page.items:
                yield item


# The two clients: only how a call's requests are sent and its pauses waited


class AgentSessions(_Service):
    """The Agent Sessions client.

    ``base_url`` is the service's root (``https://sessions.example.com``, no ``/v2``).
    ``http_client``: an ``httpx.Client`` of your own (proxies, TLS, transports),
    which :meth:`close` leaves open. ``timeout`` applies to each attempt.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout: float | httpx.Timeout | None = NOT_GIVEN,
        http_client: httpx.Client | None = None,
        default_headers: Mapping[str, str] | None = None,
    ):
        super().__init__(
            base_url,
            api_key,
            max_retries=max_retries,
            timeout=timeout,
            default_headers=default_headers,
        )
        self._owns_http = http_client is None
        if http_client is None:
            http_client = httpx.Client(timeout=DEFAULT_TIMEOUT if timeout is NOT_GIVEN else timeout)
        self._http = http_client

    def _run(self, call: Call[T]) -> T:
        send: Callable[[Any], Any] = call.send
        value: Any = None
        while True:
            try:
                step = send(value)
            except StopIteration as done:
                return done.value
            send, value = call.send, None
            if isinstance(step, Pause):
                time.sleep(step.seconds)
                continue
            try:
                value = self._http.send(step)
            except httpx.TransportError as err:
                send, value = call.throw, err

    def _pager(self, fetch: Callable[[str | None], Call[Page[T]]], page_key: str | None) -> Any:
        return SyncPager(self, fetch, page_key)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Any request to the service (``path`` from the root, ``/v2/...``), with the
        client's key, retries and errors: the 2xx answer, or the typed error."""
        return self._run(self._raw(method, path, params=params, json=json, headers=headers))

    def close(self) -> None:
        """Close the connections (not those of an ``http_client`` passed in)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> AgentSessions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAgentSessions(_Service):
    """The Agent Sessions client for asyncio: the calls of :class:`AgentSessions`, awaited.

    Lists are iterated with ``async for``. ``http_client``: an
    ``httpx.AsyncClient`` of your own, which :meth:`close` leaves open.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout: float | httpx.Timeout | None = NOT_GIVEN,
        http_client: httpx.AsyncClient | None = None,
        default_headers: Mapping[str, str] | None = None,
    ):
        super().__init__(
            base_url,
            api_key,
            max_retries=max_retries,
            timeout=timeout,
            default_headers=default_headers,
        )
        self._owns_http = http_client is None
        if http_client is None:
            http_client = httpx.AsyncClient(
                timeout=DEFAULT_TIMEOUT if timeout is NOT_GIVEN else timeout
            )
        self._http = http_client

    async def _run(self, call: Call[T]) -> T:
        send: Callable[[Any], Any] = call.send
        value: Any = None
        while True:
            try:
                step = send(value)
            except StopIteration as done:
                return done.value
            send, value = call.send, None
            if isinstance(step, Pause):
                await asyncio.sleep(step.seconds)
                continue
            try:
                value = await self._http.send(step)
            except httpx.TransportError as err:
                send, value = call.throw, err

    def _pager(self, fetch: Callable[[str | None], Call[Page[T]]], page_key: str | None) -> Any:
        return AsyncPager(self, fetch, page_key)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Any request to the service, as :meth:`AgentSessions.request`."""
        return await self._run(self._raw(method, path, params=params, json=json, headers=headers))

    async def close(self) -> None:
        """Close the connections (not those of an ``http_client`` passed in)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncAgentSessions:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
