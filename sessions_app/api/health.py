"""Liveness and readiness, outside the /v2 prefix and without a key."""

from __future__ import annotations

from importlib import metadata

from flask import current_app, request
from werkzeug.exceptions import NotFound
from werkzeug.wrappers import Response

from storage_backends import Unavailable

from ..corridor.http import ServiceBlueprint
from ..corridor.responses import json_response
from ..openapi import operation
from ..schemas import HealthSchema, ReadinessSchema

ops = ServiceBlueprint("agent_sessions_ops", __name__)


@ops.get("/healthz")
@operation("Service", 200, HealthSchema)
def healthz() -> Response:
    """The process answers."""
    return json_response({"status": "ok"})


@ops.get("/readyz")
@operation("Service", 200, ReadinessSchema, statuses=(503,))
def readyz() -> Response:
    """Storage and rate-limit storage answer."""
    service = current_app.extensions["agent_sessions"]
    try:
        service.storage.check()
        storage = "ok"
    except Unavailable:
        storage = "unavailable"
    limiter = "ok" if service.limits.check() else "degraded"
    ready = storage == "ok" and (limiter == "ok" or not service.limits.fail_closed)
    body = {"status": "ok" if ready else "unavailable", "storage": storage, "rate_limit": limiter}
    # A probe must see the state now, never a cached answer.
    return json_response(body, 200 if ready else 503, [("Cache-Control", "no-store")])


def index() -> Response:
    """Where to start: the API documentation and the OpenAPI document."""
    if request.environ.get("PATH_INFO") != "/":
        raise NotFound()
    prefix = current_app.extensions["agent_sessions"].url_prefix
    body = {
        "name": "Agent Sessions",
        "version": VERSION,
        "links": {
            "docs": f"{prefix}/docs",
            "openapi": f"{prefix}/openapi.json",
            "health": "/healthz",
            "ready": "/readyz",
        },
    }
    return json_response(body)


# A signpost for people, not part of the API the document describes.
index.openapi_hidden = True  # type: ignore[attr-defined]

try:
    VERSION = metadata.version("agent-sessions")
except metadata.PackageNotFoundError:  # run from a source tree that is not installed
    VERSION = "unknown"
