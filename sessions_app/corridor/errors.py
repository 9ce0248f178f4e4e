"""One JSON error shape for the whole application, and the handlers that build it."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Flask, g
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from storage_backends import (
    AgentDisabled,
    AgentNotFound,
    ApiKeyNotFound,
    Conflict,
    NotFound,
    PreconditionFailed,
    SessionNotFound,
    Unavailable,
)
from storage_backends.base import (
    EventNotFound,
    QuotaExceeded,
    SessionDisabled,
    StaleHistory,
    TooManyEvents,
)

from ..naming import EVENT_ID_PREFIX
from ..observability import metrics
from .request_id import request_id
from .responses import json_response

log = logging.getLogger("sessions_app.errors")  # the name log filters select it by

# Werkzeug's HTTP errors that reach the handler, by status.
HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    412: "precondition_failed",
    429: "rate_limit_exceeded",
    503: "unavailable",
}

HTTP_MESSAGES = {
    404: "The requested URL was not found.",
    405: "The method is not allowed for the requested URL.",
    413: "The request body is too large.",
}


class ApiError(Exception):
    """An error answered to the client as it is."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        *,
        field_errors: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.error = error
        self.messages = [message] if isinstance(message, str) else list(message)
        self.field_errors = field_errors
        self.headers = headers or {}


def error_response(
    status: int,
    error: str,
    messages: list[str],
    field_errors: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {"error": error, "messages": messages}
    if field_errors is not None:
        body["field_errors"] = field_errors
    body["request_id"] = request_id()
    return json_response(body, status, list((headers or {}).items()))


def flatten_messages(messages: Any, prefix: str = "") -> dict[str, str]:
    """Marshmallow's nested error dict as {"dotted.path": "first message"}."""
    flat: dict[str, str] = {}
    if isinstance(messages, dict):
        for key, value in messages.items():
            # A nested object's own error (not an object at all) is the object's.
            path = (
                prefix if key == "_schema" and prefix else f"{prefix}.{key}" if prefix else str(key)
            )
            flat.update(flatten_messages(value, path))
    elif isinstance(messages, list) and messages and all(isinstance(m, str) for m in messages):
        flat[prefix or "_schema"] = " ".join(messages)
    elif isinstance(messages, list):
        for index, value in enumerate(messages):
            flat.update(flatten_messages(value, f"{prefix}.{index}" if prefix else str(index)))
    else:
        flat[prefix or "_schema"] = str(messages)
    return flat


UNKNOWN_FIELD = "Unknown field."


def _is_metadata(path: str) -> bool:
    """A body's ``metadata``, an event's of a batch (``events.3.metadata``) or the
    session's a batch creates (``create_session.metadata``)."""
    parts = path.split(".")
    return (
        parts[0] == "metadata"
        or (len(parts) == 3 and parts[0] == "events" and parts[2] == "metadata")
        or parts[:2] == ["create_session", "metadata"]
    )


def validation_error(err: ValidationError) -> ApiError:
    field_errors = flatten_messages(err.messages)
    # An unknown field named "metadata" (in a body that has none) is not metadata.
    only_metadata = all(
        _is_metadata(path) and message != UNKNOWN_FIELD for path, message in field_errors.items()
    )
    code = "invalid_metadata" if only_metadata else "invalid_request"
    messages = [
        message if path == "_schema" else f"{path}: {message}"
        for path, message in field_errors.items()
    ]
    return ApiError(400, code, messages, field_errors=field_errors)


def handle_api_error(err: ApiError) -> Response:
    return error_response(err.status, err.error, err.messages, err.field_errors, err.headers)


def handle_validation_error(err: ValidationError) -> Response:
    return handle_api_error(validation_error(err))


def handle_not_found(err: NotFound) -> Response:
    if isinstance(err, AgentNotFound):
        return error_response(404, "agent_not_found", [f"Agent {err} not found."])
    if isinstance(err, SessionNotFound):
        return error_response(404, "session_not_found", [f"Session {err} not found."])
    if isinstance(err, EventNotFound):
        return error_response(404, "event_not_found", [f"Event {err} not found."])
    if isinstance(err, ApiKeyNotFound):
        return error_response(404, "not_found", [f"API key {err} not found."])
    return error_response(404, "not_found", ["Not found."])


def handle_conflict(err: Conflict) -> Response:
    subject = str(err)
    if " " in subject:  # a sentence of the backend's own, not a key
        return error_response(409, "conflict", [subject[:1].upper() + subject[1:] + "."])
    what = "Event" if subject.startswith(EVENT_ID_PREFIX) else "Key"
    return error_response(409, "conflict", [f"{what} {subject} already exists."])


def handle_stale_history(err: StaleHistory) -> Response:
    return error_response(
        409,
        "conflict",
        ["if_last_event_id no longer names the session's last event; nothing was written."],
    )


def handle_precondition_failed(err: PreconditionFailed) -> Response:
    return precondition_failed()


def precondition_failed() -> Response:
    return error_response(
        412,
        "precondition_failed",
        [
            "If-Match or If-None-Match does not hold for the record's current ETag; "
            "nothing was changed. Read it again for its current ETag."
        ],
    )


def handle_session_disabled(err: SessionDisabled) -> Response:
    return error_response(
        409, "session_disabled", [f"Session {err} is disabled: it takes no new events."]
    )


def quota_message(err: QuotaExceeded) -> str:
    """A quota's refusal as the API and the CLI say it (README "Storage quotas")."""
    what = "events in this session" if err.quota == "SESSION_MAX_EVENTS" else "bytes of this agent"
    return (
        f"Quota {err.quota} exceeded: {err.usage} {what} stored, this write adds "
        f"{err.adds}, the bound is {err.bound}; nothing was written."
    )


def handle_quota_exceeded(err: QuotaExceeded) -> Response:
    return error_response(409, "quota_exceeded", [quota_message(err)])


def handle_too_many_events(err: TooManyEvents) -> Response:
    # Only an input's ``since`` asks for a bounded read in the same transaction as a write.
    what = (
        f"More than {err.limit} visible events"
        if err.max_bytes is None
        else f"Visible events of more than {err.max_bytes} bytes"
    )
    message = (
        f"{what} would follow it, more than one answer holds; nothing was written. "
        "Page through them with GET .../events instead."
    )
    return error_response(400, "invalid_request", [f"since: {message}"], {"since": message})


def handle_agent_disabled(err: AgentDisabled) -> Response:
    return error_response(
        409, "agent_disabled", [f"Agent {err} is disabled: it takes no new sessions."]
    )


def handle_unavailable(err: Unavailable) -> Response:
    log.warning("answering 503: %s", err)
    # The rate-limit storage's outage names itself; any other is the storage's.
    metrics.storage_error(503, getattr(err, "source", None))
    return error_response(
        503,
        "unavailable",
        ["The service is temporarily unavailable; retry later."],
        headers={"Retry-After": str(err.retry_after)},
    )


def handle_http_exception(err: HTTPException) -> Response:
    status = err.code or 500
    if status >= 500:
        return handle_unexpected(err)
    code = HTTP_CODES.get(status, "invalid_request")
    message = HTTP_MESSAGES.get(status) or err.description or err.name
    headers = {}
    if status == 405 and getattr(err, "valid_methods", None):
        headers["Allow"] = ", ".join(sorted(err.valid_methods))
    # A 401's challenge (RFC 9110 11.6.1), as the exception states it.
    headers.update((n, v) for n, v in err.get_headers() if n.lower() == "www-authenticate")
    return error_response(status, code, [message], headers=headers)


def raised_in_storage(err: BaseException) -> bool:
    """Whether the exception came out of the storage layer (its traceback passes through it)."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").startswith("storage_backends"):
            return True
        tb = tb.tb_next
    return False


def handle_unexpected(err: Exception) -> Response:
    if raised_in_storage(err):
        metrics.storage_error(500)
    response = error_response(500, "internal_error", ["An internal error occurred."])
    log.exception("unhandled error (request_id=%s)", g.request_id)
    return response


HANDLERS = (
    (ApiError, handle_api_error),
    (ValidationError, handle_validation_error),
    (NotFound, handle_not_found),
    (StaleHistory, handle_stale_history),
    (Conflict, handle_conflict),
    (PreconditionFailed, handle_precondition_failed),
    (SessionDisabled, handle_session_disabled),
    (TooManyEvents, handle_too_many_events),
    (QuotaExceeded, handle_quota_exceeded),
    (AgentDisabled, handle_agent_disabled),
    (Unavailable, handle_unavailable),
    (HTTPException, handle_http_exception),
    (Exception, handle_unexpected),
)


def client_error_response(err: Exception) -> Response | None:
    """The answer a handler gives ``err`` when it is the client's (a 4xx), else None."""
    if isinstance(err, Unavailable) or (isinstance(err, ApiError) and err.status >= 500):
        return None
    if isinstance(err, HTTPException) and (err.code or 500) >= 500:
        return None
    for exc, handler in HANDLERS[:-1]:  # not the catch-all's 500
        if isinstance(err, exc):
            return handler(err)
    return None


def register(target: Flask | Blueprint) -> None:
    """Install the handlers on an app (everything) or a blueprint (its own views)."""
    for exc, handler in HANDLERS:
        target.register_error_handler(exc, handler)
