"""The WSGI entry point: ``gunicorn wsgi:app``."""

import sys

from sessions_app import ConfigError, create_app

try:
    app = create_app()
except ConfigError as err:
    # One clear line for the operator instead of a traceback per worker.
    print(f"agent-sessions: configuration error: {err}", file=sys.stderr, flush=True)
    sys.exit(4)
