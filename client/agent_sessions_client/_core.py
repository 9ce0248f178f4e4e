"""What every call shares, written once for the sync and the async client.

Each call is a generator that yields what it needs done (an ``httpx.Request``
to send, a :class:`Pause` before a retry) and returns what the caller gets;
:mod:`.client` runs it with ``httpx.Client`` and ``time.sleep``, or with
``httpx.AsyncClient`` and ``asyncio.sleep``: the same requests, retries,
parsing and errors either way.

Retries (``max_retries``, default 2) cover a connection that could not be made,
429 and 409 ``idempotency_key_in_use`` (the server refused before doing
anything), and, for a request that is safe to send again, a broken connection,
a timeout and 5xx. Safe to send again: GET, PATCH and DELETE, hide and unhide,
and every create, since creates carry an ``Idempotency-Key`` (a fresh UUID per
call, the same on each retry) and the server answers a repeat with the first
answer instead of writing twice. ``POST /v2/api_keys`` takes no key (a replay
would show a secret twice), so it is retried only when nothing was sent or it
was refused. A ``Retry-After`` is honoured (up to :data:`MAX_RETRY_AFTER`
seconds; a longer one is raised at once); otherwise the pause doubles from
0.5 s up to 8 s, with jitter.
"""

from __future__ import annotations

import functools
import platform
import random
import uuid
from collections.abc import Callable, Generator, Mapping
from typing import Any, NamedTuple, ParamSpec, TypeVar
from urllib.parse import quote

import httpx

from ._version import __version__
from .errors import (
    APIConnectionError,
    APITimeoutError,
    UnexpectedResponse,
    error_from_response,
    parse_retry_after,
)
from .models import Page

T = TypeVar("T")
P = ParamSpec("P")

DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
#: The longest ``Retry-After`` waited for; a longer one raises at once.
MAX_RETRY_AFTER = 60.0
IDEMPOTENCY_HEADER = "Idempotency-Key"
USER_AGENT = (
    f"agent-sessions-client/{__version__} httpx/{httpx.__version__} "
    f"python/{platform.python_version()}"
)
# Methods whose repeat does what the first did (RFC 9110 section 9.2.2; PATCH here
# sets fields, so it repeats safely too).
_REPEATABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"})
# Raised before a byte of the request left: sending it again is always safe.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class NotGiven:
    """An argument left out, where None is a value of its own (``if_last_event_id``)."""

    def _pager(self, fetch: Callable[[str | None], Call[Page[T]]], page_key: str | None) -> Any:
        """A list's iterator over the pages ``fetch`` reads (sync or async)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return "NOT_GIVEN"

    def __bool__(self) -> bool:
        return False


NOT_GIVEN: Any = NotGiven()


class Pause(NamedTuple):
    seconds: float


class Request(NamedTuple):
    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    headers: Mapping[str, str] | None = None
    #: Whether sending it twice cannot do the work twice.
    repeatable: bool = False


#: A call: a generator yielding requests and pauses, returning the call's result.
Call = Generator[Any, Any, T]


def call(method: Callable[P, Call[T]]) -> Callable[P, T]:
    """Run the generator ``method`` makes with its client's runner (sync or async)."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self._client._run(method(self, *args, **kwargs))

    return run  # type: ignore[return-value]


def segment(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, not {type(value).__name__}")
    return quote(value, safe="")


def body_of(**fields: Any) -> dict[str, Any]:
    """A request body of the fields given (None: left out, as the service reads null)."""
    return {name: value for name, value in fields.items() if value is not None}


def read(response: httpx.Response, parse: Callable[[Any], T]) -> T:
    try:
        return parse(response.json())
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UnexpectedResponse(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code} with a body this client cannot read: {err}",
            response=response,
        ) from None


def _backoff(attempt: int) -> float:
    delay = min(INITIAL_RETRY_DELAY * 2**attempt, MAX_RETRY_DELAY)
    return delay * (1 - 0.25 * random.random())


def _error_code(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None


class BaseClient:
    """What the sync and async clients share: settings, requests and retries."""

    #: The httpx client (sync or async) that the subclass sends requests with.
    _http: Any

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout: float | httpx.Timeout | None = NOT_GIVEN,
        default_headers: Mapping[str, str] | None = None,
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http:// or https:// URL, not {base_url!r}")
        if not isinstance(api_key, str) or not api_key:
            raise ValueError("api_key must be a non-empty string")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError("max_retries must be an integer >= 0")
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self._timeout = timeout
        self._headers = {
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
            **(default_headers or {}),
            "x-api-key": api_key,
        }

    def _pager(self, fetch: Callable[[str | None], Call[Page[T]]], page_key: str | None) -> Any:
        """A list's iterator over the pages ``fetch`` reads (sync or async)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"

    # Requests and retries, written once

    def _build(self, req: Request) -> httpx.Request:
        extra: dict[str, Any] = {}
        if self._timeout is not NOT_GIVEN:
            extra["timeout"] = self._timeout
        params = {k: v for k, v in (req.params or {}).items() if v is not None}
        return self._http.build_request(
            req.method,
            self.base_url + req.path,
            params=params or None,
            json=req.json,
            headers={**self._headers, **(req.headers or {})},
            **extra,
        )

    def _exchange(self, req: Request) -> Call[httpx.Response]:
        """Send ``req``, retrying as the module says; the 2xx answer, or raise."""
        attempt = 0
        while True:
            request = self._build(req)
            try:
                response = yield request
            except httpx.TransportError as err:
                if attempt < self.max_retries and (isinstance(err, _NOT_SENT) or req.repeatable):
                    yield Pause(_backoff(attempt))
                    attempt += 1
                    continue
                timed_out = isinstance(err, httpx.TimeoutException)
                raise (APITimeoutError if timed_out else APIConnectionError)(
                    f"{req.method} {req.path}: no answer after {attempt + 1} attempt(s): "
                    f"{type(err).__name__}: {err}",
                    request=request,
                ) from err
            if response.is_success:
                return response
            delay = self._retry_delay(req, response, attempt)
            if delay is None:
                raise error_from_response(response)
            yield Pause(delay)
            attempt += 1

    def _retry_delay(self, req: Request, response: httpx.Response, attempt: int) -> float | None:
        """How long to wait before sending ``req`` again, None to raise the answer."""
        if attempt >= self.max_retries:
            return None
        status = response.status_code
        refused = status == 429 or (
            status == 409 and _error_code(response) == "idempotency_key_in_use"
        )
        if not (refused or (status >= 500 and req.repeatable)):
            return None
        after = parse_retry_after(response.headers.get("Retry-After"))
        if after is None:
            return _backoff(attempt)
        return after if after <= MAX_RETRY_AFTER else None

    def _fetch(self, req: Request, parse: Callable[[Any], T]) -> Call[T]:
        response = yield from self._exchange(req)
        return read(response, parse)

    def _fetch_record(self, req: Request, record: Any) -> Call[Any]:
        response = yield from self._exchange(req)
        etag = response.headers.get("ETag")
        return read(response, lambda body: record.from_dict(body, etag=etag))

    def _fetch_nothing(self, req: Request) -> Call[None]:
        yield from self._exchange(req)
        return None

    def _lister(
        self, path: str, name: str, parse: Callable[[Any], T], params: Mapping[str, Any]
    ) -> Callable[[str | None], Call[Page[T]]]:
        """The call that reads one page of a list, from a page_key (None: the first)."""

        def page(body: Any) -> Page[T]:
            return Page([parse(item) for item in body[name]], body["metadata"].get("page_key"))

        def fetch(page_key: str | None) -> Call[Page[T]]:
            query = {**params, "page_key": page_key}
            return self._fetch(Request("GET", path, params=query, repeatable=True), page)

        return fetch

    def _raw(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Call[httpx.Response]:
        method = method.upper()
        repeatable = method in _REPEATABLE_METHODS or any(
            name.lower() == IDEMPOTENCY_HEADER.lower() for name in (headers or {})
        )
        req = Request(method, path, params, json, headers, repeatable)
        return (yield from self._exchange(req))


def creating(idempotency_key: str | None) -> dict[str, str]:
    """The headers of a create: its Idempotency-Key, one per logical call."""
    return {IDEMPOTENCY_HEADER: idempotency_key or str(uuid.uuid4())}
