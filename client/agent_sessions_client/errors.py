"""The client's exceptions: one class per error code of the service, under one base.

Every answer outside 2xx raises an :class:`APIStatusError` subclass chosen by
the body's ``error`` code (``session_not_found`` raises
:class:`SessionNotFound`); a code this release does not know falls back on a
class for its HTTP status, so a newer server never breaks an ``except``.
Each carries ``status``, ``code``, ``message`` (and ``messages``),
``field_errors``, ``request_id`` and the response ``headers``.

A request that got no answer at all raises :class:`APIConnectionError`
(:class:`APITimeoutError` when it timed out).
"""

from __future__ import annotations

import datetime as dt
import email.utils
from typing import Any

import httpx

__all__ = [
    "AgentDisabled",
    "AgentNotFound",
    "AgentSessionsError",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "Conflict",
    "EventNotFound",
    "Forbidden",
    "IdempotencyKeyInUse",
    "IdempotencyKeyMismatch",
    "InternalError",
    "InvalidMetadata",
    "InvalidRequest",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "QuotaExceeded",
    "RateLimitExceeded",
    "SessionDisabled",
    "SessionNotFound",
    "Unauthorized",
    "Unavailable",
    "UnexpectedResponse",
    "UnsupportedMediaType",
]


class AgentSessionsError(Exception):
    """The base of every error this client raises."""


class APIConnectionError(AgentSessionsError):
    """The request got no answer: the connection failed or broke (retries included)."""

    def __init__(self, message: str, *, request: httpx.Request | None = None):
        super().__init__(message)
        self.request = request


class APITimeoutError(APIConnectionError):
    """The request timed out (retries included)."""


class UnexpectedResponse(AgentSessionsError):
    """A 2xx answer whose body is not the shape this client reads."""

    def __init__(self, message: str, *, response: httpx.Response):
        super().__init__(message)
        self.response = response
        self.status = response.status_code
        self.request_id = response.headers.get("X-Request-ID")


class APIStatusError(AgentSessionsError):
    """An answer outside 2xx, in the service's error shape (or not, from a proxy)."""

    #: On the class: the error code it stands for, and the status the service answers
    #: with it. On an instance: the answer's own (a fallback class keeps an unknown code).
    code: str | None = None
    status: int = 0

    def __init__(
        self,
        *,
        status: int,
        code: str | None,
        messages: list[str],
        field_errors: dict[str, str] | None,
        request_id: str | None,
        response: httpx.Response,
    ):
        self.status = status
        self.code = code
        self.messages = messages
        self.message = " ".join(messages)
        self.field_errors = dict(field_errors or {})
        self.request_id = request_id
        self.response = response
        self.headers = response.headers
        super().__init__(str(self))

    def __str__(self) -> str:
        label = f"{self.status} {self.code}" if self.code else str(self.status)
        suffix = f" (request_id={self.request_id})" if self.request_id else ""
        return f"{label}: {self.message}{suffix}"

    @property
    def retry_after(self) -> float | None:
        """The answer's ``Retry-After`` in seconds, None without one (or a malformed one)."""
        return parse_retry_after(self.headers.get("Retry-After"))


class InvalidRequest(APIStatusError):
    """400 ``invalid_request``: a missing or malformed field, query parameter or key."""

    code, status = "invalid_request", 400


class InvalidMetadata(InvalidRequest):
    """400 ``invalid_metadata``: metadata that is not an object, or outside its bounds."""

    code, status = "invalid_metadata", 400


class Unauthorized(APIStatusError):
    """401 ``unauthorized``: a missing, unknown, revoked or expired API key."""

    code, status = "unauthorized", 401


class Forbidden(APIStatusError):
    """403 ``forbidden``: the key lacks the grant for this agent and action."""

    code, status = "forbidden", 403


class NotFound(APIStatusError):
    """404 ``not_found`` (a path that names no route), and the base of every 404."""

    code, status = "not_found", 404


class AgentNotFound(NotFound):
    """404 ``agent_not_found``."""

    code, status = "agent_not_found", 404


class SessionNotFound(NotFound):
    """404 ``session_not_found``."""

    code, status = "session_not_found", 404


class EventNotFound(NotFound):
    """404 ``event_not_found``."""

    code, status = "event_not_found", 404


class MethodNotAllowed(APIStatusError):
    """405 ``method_not_allowed``."""

    code, status = "method_not_allowed", 405


class Conflict(APIStatusError):
    """409 ``conflict``: a key or event id that exists, or an ``if_last_event_id`` that
    no longer holds."""

    code, status = "conflict", 409


class SessionDisabled(APIStatusError):
    """409 ``session_disabled``: the session's ``enabled`` is false; it takes no events."""

    code, status = "session_disabled", 409


class AgentDisabled(APIStatusError):
    """409 ``agent_disabled``: the agent's ``enabled`` is false; it takes no sessions."""

    code, status = "agent_disabled", 409


class IdempotencyKeyInUse(APIStatusError):
    """409 ``idempotency_key_in_use``: a request with this key is still in flight."""

    code, status = "idempotency_key_in_use", 409


class QuotaExceeded(APIStatusError):
    """409 ``quota_exceeded``: the write would pass a storage quota; nothing was written."""

    code, status = "quota_exceeded", 409


class PreconditionFailed(APIStatusError):
    """412 ``precondition_failed``: ``If-Match`` does not hold; nothing changed."""

    code, status = "precondition_failed", 412


class PayloadTooLarge(APIStatusError):
    """413 ``payload_too_large``."""

    code, status = "payload_too_large", 413


class UnsupportedMediaType(APIStatusError):
    """415 ``unsupported_media_type``."""

    code, status = "unsupported_media_type", 415


class IdempotencyKeyMismatch(APIStatusError):
    """422 ``idempotency_key_mismatch``: the key was used for another method, path or body."""

    code, status = "idempotency_key_mismatch", 422


class RateLimitExceeded(APIStatusError):
    """429 ``rate_limit_exceeded``; ``retry_after`` says when to try again."""

    code, status = "rate_limit_exceeded", 429


class InternalError(APIStatusError):
    """500 ``internal_error``, and the base of any other 5xx but 503."""

    code, status = "internal_error", 500


class Unavailable(APIStatusError):
    """503 ``unavailable``: storage or rate-limit backend unreachable; retry later."""

    code, status = "unavailable", 503


BY_CODE: dict[str, type[APIStatusError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        InvalidMetadata,
        Unauthorized,
        Forbidden,
        NotFound,
        AgentNotFound,
        SessionNotFound,
        EventNotFound,
        MethodNotAllowed,
        Conflict,
        SessionDisabled,
        AgentDisabled,
        IdempotencyKeyInUse,
        QuotaExceeded,
        PreconditionFailed,
        PayloadTooLarge,
        UnsupportedMediaType,
        IdempotencyKeyMismatch,
        RateLimitExceeded,
        InternalError,
        Unavailable,
    )
    if cls.code is not None
}

# A code this release does not know: the class of its status.
BY_STATUS: dict[int, type[APIStatusError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    412: PreconditionFailed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    429: RateLimitExceeded,
    503: Unavailable,
}


def error_from_response(response: httpx.Response) -> APIStatusError:
    """The exception for an answer outside 2xx."""
    status = response.status_code
    body: Any = None
    try:
        body = response.json()
    except ValueError:
        pass
    if not isinstance(body, dict):
        body = {}
    code = body.get("error") if isinstance(body.get("error"), str) else None
    messages = body.get("messages")
    if not (isinstance(messages, list) and all(isinstance(m, str) for m in messages)):
        text = response.text.strip()[:200] if not body else ""
        messages = [text or response.reason_phrase or f"HTTP {status}"]
    field_errors = body.get("field_errors")
    request_id = body.get("request_id")
    if not isinstance(request_id, str):
        request_id = response.headers.get("X-Request-ID")
    cls = BY_CODE.get(code or "") or BY_STATUS.get(status)
    if cls is None:
        cls = InternalError if status >= 500 else APIStatusError
    return cls(
        status=status,
        code=code,
        messages=messages,
        field_errors=field_errors if isinstance(field_errors, dict) else None,
        request_id=request_id,
        response=response,
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` value: delta-seconds or an HTTP date (RFC 9110)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())
