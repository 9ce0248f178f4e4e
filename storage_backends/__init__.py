"""Storage backends, chosen by the scheme of a URL."""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Mapping
from typing import Any

from .base import (
    ANY_LAST_EVENT,
    HIDDEN_BY_COMPACTION,
    HIDDEN_MANUAL,
    Agent,
    AgentDisabled,
    AgentNotFound,
    Answer,
    ApiKey,
    ApiKeyNotFound,
    Conflict,
    ConsoleSession,
    ConsoleSessionNotFound,
    Event,
    EventNotFound,
    Grant,
    IdempotencyKeyLost,
    IdempotencyRecord,
    NotFound,
    Page,
    Precondition,
    PreconditionFailed,
    SchemaTooNew,
    Session,
    SessionDisabled,
    SessionNotFound,
    StaleHistory,
    StateDocument,
    Storage,
    StorageError,
    TooManyEvents,
    Unavailable,
)

# Silent unless the host configures logging (gunicorn.conf.py sends these to the
# error log). Without a handler, Python's last-resort one would print warnings to
# stderr, for instance a second line after the CLI's one-line error.
logging.getLogger(__name__).addHandler(logging.NullHandler())

# scheme -> "module:class"; modules import lazily so optional drivers stay optional.
BACKENDS: dict[str, str] = {
    "memory": "storage_backends.memory:MemoryStorage",
    "sqlite": "storage_backends.sqlite:SQLiteStorage",
    "postgresql": "storage_backends.postgres:PostgresStorage",
    "postgres": "storage_backends.postgres:PostgresStorage",
}


class StorageConfigError(ValueError):
    """The storage URL cannot be served: unknown scheme, bad form, missing driver."""


def storage_from_url(url: str, options: Mapping[str, Any] | None = None) -> Storage:
    """Build the backend for ``url`` without connecting to it."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    target = BACKENDS.get(scheme)
    if target is None:
        known = ", ".join(sorted(BACKENDS))
        raise StorageConfigError(
            f"unknown storage URL scheme {scheme or url!r} (STORAGE_URL); use one of: {known}"
        )
    module_name, class_name = target.split(":")
    try:
        backend = getattr(importlib.import_module(module_name), class_name)
    except ImportError as err:
        raise StorageConfigError(
            f"the {scheme} backend needs a driver that is not installed ({err.name}); "
            f"install agent-sessions[{scheme.replace('postgresql', 'postgres')}]"
        ) from None
    try:
        return backend.from_url(url, options=options or {})
    except ValueError as err:
        # The URL may carry a password (postgresql://user:secret@host/db): never echo it.
        shown = re.sub(r"(//[^/:@]*:)[^/@]*@", r"\1***@", url)
        raise StorageConfigError(f"bad storage URL {shown!r}: {err}") from None


__all__ = [
    "ANY_LAST_EVENT",
    "BACKENDS",
    "HIDDEN_BY_COMPACTION",
    "HIDDEN_MANUAL",
    "Agent",
    "Answer",
    "AgentDisabled",
    "AgentNotFound",
    "ApiKey",
    "ApiKeyNotFound",
    "Conflict",
    "ConsoleSession",
    "ConsoleSessionNotFound",
    "Event",
    "EventNotFound",
    "Grant",
    "IdempotencyKeyLost",
    "IdempotencyRecord",
    "NotFound",
    "Page",
    "Precondition",
    "PreconditionFailed",
    "SchemaTooNew",
    "Session",
    "SessionDisabled",
    "SessionNotFound",
    "StaleHistory",
    "StateDocument",
    "Storage",
    "StorageConfigError",
    "StorageError",
    "TooManyEvents",
    "Unavailable",
    "storage_from_url",
]
