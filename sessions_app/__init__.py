"""Agent Sessions: conversational sessions between users and AI agents, over HTTP."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

import config as default_config
from config import ConfigError
from storage_backends import Storage, StorageConfigError, storage_from_url

from . import console
from .corridor import errors, http
from .corridor.keycache import KeyCache
from .corridor.rate_limits import RateLimits
from .observability import logs, metrics, tracing

log = logging.getLogger("agent_sessions")
# Silent unless the host configures logging (gunicorn.conf.py sends it to the error
# log): the CLI must not print the start-up warnings below on every command.
log.addHandler(logging.NullHandler())

ENV_PREFIX = "AGENT_SESSIONS"


@dataclasses.dataclass
class AgentSessions:
    """Per-app state, kept in ``app.extensions["agent_sessions"]``."""

    storage: Storage
    limits: RateLimits
    url_prefix: str
    max_body: int  # bytes of a request body, whatever the host's MAX_CONTENT_LENGTH
    owns_app: bool = False  # the standalone app: every answer is the service's
    metrics: Any = None  # observability.metrics.Metrics when METRICS_ENABLED
    # Keys found in storage, each at most a second old (API.md allows that long).
    key_cache: KeyCache = dataclasses.field(default_factory=KeyCache)


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
    if app.config.get("METRICS_ENABLED") is None:
        app.config["METRICS_ENABLED"] = True  # the standalone service counts by default
    app.json.sort_keys = False  # keep the schemas' field order
    app.json.ensure_ascii = False
    app.url_map.merge_slashes = False  # "//" is a 404, never a redirect to another path
    init_app(app)
    # The whole app is the service: its other routes (health checks, a host's
    # additions) answer errors in the same shape as the blueprint does.
    errors.register(app)
    app.extensions["agent_sessions"].owns_app = True
    # "/" belongs to the standalone service only: a host application keeps its own.
    from .api.health import index

    # No slash-redirect for an empty path: the service never redirects (the view 404s it).
    app.add_url_rule("/", "index", index, methods=["GET"], strict_slashes=False)
    if app.config["PROXY_COUNT"]:
        # Client addresses (the per-address auth-failure limit) from X-Forwarded-For,
        # and the scheme (HTTPS ended at the proxy: the console's cookie is Secure)
        # from X-Forwarded-Proto, trusting only as many hops as there are proxies of our own.
        hops = int(app.config["PROXY_COUNT"])
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)
    return app


def create_app_or_exit() -> Flask:
    """:func:`create_app` for the server's entry points (``wsgi.py``, ``gunicorn.conf.py``).

    A configuration that cannot be served is one line on standard error and
    exit status 4, instead of a traceback per worker.
    """
    try:
        return create_app()
    except ConfigError as err:
        print(f"agent-sessions: configuration error: {err}", file=sys.stderr, flush=True)
        sys.exit(4)


def init_app(app: Flask, *, url_prefix: str = "/v2") -> None:
    """Add the service to ``app``: storage, limits, the /v2 blueprint, health routes, CLI.

    A host application calls this with its own configuration; missing keys
    take the defaults of ``config.Config``. The host's own routes, hooks and
    error pages are left as they are.
    """
    from .api import bp
    from .api.health import ops
    from .ops.commands import register_commands

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
    app.extensions["agent_sessions"] = AgentSessions(
        storage=storage,
        limits=limits,
        url_prefix=url_prefix,
        # Flask's own defaults hold MAX_CONTENT_LENGTH = None, which setdefault keeps.
        max_body=app.config["MAX_CONTENT_LENGTH"] or default_config.Config.MAX_CONTENT_LENGTH,
    )
    storage.announce(log)
    app.url_map.converters.update(http.CONVERTERS)
    # The request id before anything else can answer.
    app.before_request_funcs.setdefault(None, []).insert(0, http.start_request)
    app.after_request(http.contract_headers)
    # Each off unless configured; a host's init_app gets none by default.
    metrics.init_app(app, app.extensions["agent_sessions"])
    logs.init_app(app)
    tracing.init_app(app)
    app.register_blueprint(bp, url_prefix=url_prefix)
    app.register_blueprint(ops)
    console.init_app(app)
    register_commands(app)


def unknown_environment_names(environ: Mapping[str, str]) -> list[str]:
    """A warning line for each ``AGENT_SESSIONS_*`` name that sets nothing, naming the closest.

    Flask's ``from_prefixed_env`` takes any such name as a setting, so a typo
    (``AGENT_SESSIONS_STORAGE_URLL``) would otherwise be ignored without a word.
    """
    known = default_config.known_settings()
    prefix = ENV_PREFIX + "_"
    messages = []
    for name in sorted(environ):
        if not name.startswith(prefix) or name[len(prefix) :] in known:
            continue
        close = difflib.get_close_matches(name[len(prefix) :], known, n=1, cutoff=0.6)
        hint = f"; did you mean {prefix}{close[0]}?" if close else ""
        messages.append(f"unknown setting {name} is ignored{hint}")
    return messages


def default_storage_url(app: Flask) -> str:
    return "sqlite:///" + os.path.join(app.instance_path, "sessions.db")
