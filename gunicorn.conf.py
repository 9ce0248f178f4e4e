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
        create_app()
    except ConfigError as err:
        print(f"agent-sessions: configuration error: {err}", file=sys.stderr, flush=True)
        sys.exit(4)
