"""Agent Sessions: conversational sessions between users and AI agents, over HTTP."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask, request
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

import config as default_config
from storage_backends import Storage, StorageConfigError, storage_from_url

from . import errors
from .limits import RateLimits

log = logging.getLogger("agent_sessions")
# Silent unless the host configures logging (gunicorn.conf.py sends it to the error
# log): the CLI must not print the start-up warnings below on every command.
log.addHandler(logging.NullHandler())

ENV_PREFIX = "AGENT_SESSIONS"


class ConfigError(ValueError):
    """The configuration cannot be served; the message is one line for the operator."""


@dataclasses.dataclass
class AgentSessions:
    """Per-app state, kept in ``app.extensions["agent_sessions"]``."""

    storage: Storage
    limits: RateLimits


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the standalone service.

    Configuration comes from ``config.Config``, then the environment
    (``AGENT_SESSIONS_*``), then ``config``. Nothing connects to storage here:
    connections open lazily in each worker, so the app is safe to fork.
    Raises :class:`ConfigError` for a configuration that cannot work.
    """
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_object(default_config.Config)
    app.config.from_prefixed_env(ENV_PREFIX)
    if config:
        app.config.update(config)
    app.json.sort_keys = False  # keep the schemas' field order
    app.json.ensure_ascii = False
    errors.register(app)
    app.after_request(_common_headers)
    init_app(app)
    if app.config["PROXY_COUNT"]:
        # Client addresses (the per-address auth-failure limit) from X-Forwarded-For,
        # trusting only as many hops as there are proxies of our own.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=int(app.config["PROXY_COUNT"]))
    return app


def init_app(app: Flask, *, url_prefix: str = "/v2") -> None:
    """Add the service to ``app``: storage, limits, the /v2 blueprint, health routes, CLI.

    A host application calls this with its own configuration; missing keys
    take the defaults of ``config.Config``.
    """
    from .api import bp
    from .cli import register_commands
    from .openapi import docs
    from .ops import ops

    for key in dir(default_config.Config):
        if key.isupper():
            app.config.setdefault(key, getattr(default_config.Config, key))
    try:
        default_config.check(app.config)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    url = app.config["STORAGE_URL"] or default_storage_url(app)
    try:
        storage = storage_from_url(url, app.config)
        limits = RateLimits(app)
    except (StorageConfigError, ValueError) as err:
        raise ConfigError(str(err)) from None
    app.extensions["agent_sessions"] = AgentSessions(storage=storage, limits=limits)
    storage.announce(log)
    app.register_blueprint(bp, url_prefix=url_prefix)
    app.before_request(_routing_errors_as_json(url_prefix))
    app.register_blueprint(ops)
    app.register_blueprint(docs, url_prefix=url_prefix)
    register_commands(app)


def _routing_errors_as_json(url_prefix: str) -> Callable[[], Any]:
    """A hook answering 404 and 405 under ``url_prefix`` in the JSON error shape.

    Routing errors never reach a blueprint's own handlers (no view matched), so
    a host application would answer the API's unknown URLs and wrong methods
    with its own pages. Paths outside the prefix stay the host's business.
    """
    prefix = url_prefix.rstrip("/") + "/"

    def hook() -> Any:
        err = request.routing_exception
        if (
            isinstance(err, HTTPException)
            and err.code in (404, 405)
            and (request.path + "/").startswith(prefix)
        ):
            from .api import finish

            return finish(errors.handle_http_exception(err))
        return None

    return hook


def default_storage_url(app: Flask) -> str:
    return "sqlite:///" + os.path.join(app.instance_path, "sessions.db")


def _common_headers(response: Any) -> Any:
    """The API's headers on the standalone app's other answers (health checks, unknown paths)."""
    if "X-Request-ID" in response.headers:
        return response  # set, with nosniff, by the API and docs blueprints
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers["X-Request-ID"] = errors.request_id()
    return response
