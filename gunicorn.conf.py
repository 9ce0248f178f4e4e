"""gunicorn defaults for ``gunicorn wsgi:app``; each can be overridden on the command line."""

import multiprocessing
import os
import sys

bind = os.environ.get("AGENT_SESSIONS_BIND", "127.0.0.1:8000")
workers = int(
    os.environ.get("WEB_CONCURRENCY")
    or os.environ.get("AGENT_SESSIONS_WORKERS")
    or min(4, multiprocessing.cpu_count() * 2)
)
threads = int(os.environ.get("AGENT_SESSIONS_THREADS", "1"))
timeout = int(os.environ.get("AGENT_SESSIONS_TIMEOUT", "30"))
graceful_timeout = 10
keepalive = 5
# Bound request lines and headers (huge headers get a 4xx from gunicorn itself).
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
accesslog = "-"
errorlog = "-"


def on_starting(server):
    """Refuse to start, with one line, when the configuration cannot be served.

    Checked once in the master before any worker forks, so an operator sees one
    clear message instead of one per worker and gunicorn's own tracebacks.
    Building the app opens no connection, so this is safe before forking.
    """
    from sessions_app import ConfigError, create_app

    try:
        app = create_app()
    except ConfigError as err:
        print(f"agent-sessions: configuration error: {err}", file=sys.stderr, flush=True)
        sys.exit(4)
    warn_if_limits_per_worker(server, app)


def warn_if_limits_per_worker(server, app):
    """Say loudly that memory:// counts rate limits per worker when there are several.

    ``AGENT_SESSIONS_RATELIMIT_REQUIRE_SHARED=true`` turns this into a refusal
    to start (create_app raises ConfigError for memory:// then).
    """
    workers = server.cfg.workers
    if workers > 1 and not app.extensions["agent_sessions"].limits.shared:
        server.log.warning(
            "RATE LIMITS ARE PER WORKER: RATELIMIT_STORAGE_URI is memory:// with %d workers, "
            "so each limit admits up to %d times its count on this host (more with several "
            "hosts). Set AGENT_SESSIONS_RATELIMIT_STORAGE_URI=redis://HOST:6379/0 for exact "
            "limits, or AGENT_SESSIONS_RATELIMIT_REQUIRE_SHARED=true to refuse memory://.",
            workers,
            workers,
        )
