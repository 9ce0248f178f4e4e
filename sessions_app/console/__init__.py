"""The operator console: a browser UI at /console/ over the service's own storage,
grants, limits and schemas (see ``pages`` for what every request walks)."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    """Serve the console at /console/ unless ``CONSOLE_ENABLED`` is false."""
    if not app.config["CONSOLE_ENABLED"]:
        return
    from . import actions  # noqa: F401 - its views join the blueprint
    from .pages import bp

    app.register_blueprint(bp)
