"""Everything the console takes from the rest of the service, in one place.

The console adds no rule of its own about what may be stored or who may do
what: it calls the API's permission check (``auth``), its limits
(``rate_limits``), its schemas and validation, its ETags, and the CLI's export
format. The other console modules import them from here only.
"""

from __future__ import annotations

from typing import Any

from flask import current_app

from storage_backends import (
    AgentDisabled,
    AgentNotFound,
    ApiKeyNotFound,
    Conflict,
    ConsoleSession,
    ConsoleSessionNotFound,
    EventNotFound,
    Grant,
    NotFound,
    PreconditionFailed,
    Session,
    SessionDisabled,
    SessionNotFound,
    Storage,
    Unavailable,
)
from storage_backends.base import HIDDEN_MANUAL
from storage_backends.codec import format_ts, utcnow

from ..api.endpoint import compile_filter
from ..api.sessions import create_with_generated_key, fork
from ..corridor import auth, etags, http
from ..corridor.errors import ApiError, flatten_messages, validation_error
from ..observability import metrics
from ..ops.cli import json_text
from ..ops.history import event_line, session_line
from ..schemas import (
    SCOPES,
    ApiKeyCreateSchema,
    ListQuerySchema,
    SessionCreateSchema,
    SessionListQuerySchema,
    SessionSchema,
    SessionUpdateSchema,
    is_key,
)
from ..schemas.events import EVENT_TYPES, EventListQuerySchema

__all__ = [
    "EVENT_TYPES",
    "HIDDEN_MANUAL",
    "SCOPES",
    "AgentDisabled",
    "AgentNotFound",
    "ApiError",
    "ApiKeyCreateSchema",
    "ApiKeyNotFound",
    "Conflict",
    "ConsoleSession",
    "ConsoleSessionNotFound",
    "EventListQuerySchema",
    "EventNotFound",
    "Grant",
    "ListQuerySchema",
    "NotFound",
    "PreconditionFailed",
    "Session",
    "SessionCreateSchema",
    "SessionDisabled",
    "SessionListQuerySchema",
    "SessionNotFound",
    "SessionSchema",
    "SessionUpdateSchema",
    "Storage",
    "Unavailable",
    "auth",
    "compile_filter",
    "create_with_generated_key",
    "etags",
    "event_line",
    "flatten_messages",
    "fork",
    "format_ts",
    "http",
    "is_key",
    "json_text",
    "metrics",
    "session_line",
    "utcnow",
    "validation_error",
]


def extension() -> Any:
    """This app's service state (``app.extensions["agent_sessions"]``)."""
    return current_app._get_current_object().extensions["agent_sessions"]


def storage() -> Storage:
    return extension().storage


def limits() -> Any:
    return extension().limits


def session_etag(session: Session) -> str:
    """The session's ETag, as the API answers it (``GET .../sessions/{key}``)."""
    return etags.tag(etags.representation(SessionSchema().dump(session)))


def if_match(etag: str) -> etags.Conditions:
    """An ``If-Match: etag`` precondition for a session write (400 when malformed)."""
    return etags.Conditions({"HTTP_IF_MATCH": etag}, SessionSchema())
