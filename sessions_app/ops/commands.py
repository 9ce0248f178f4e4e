"""The operator's command groups, for a host application's ``flask`` and ``agent-sessions``."""

from __future__ import annotations

from flask import Flask

from .cli import backup, db, openapi_document, restore
from .history import sessions
from .records import agents, keys

COMMANDS = (agents, keys, sessions, db, backup, restore, openapi_document)


def register_commands(app: Flask) -> None:
    """The operator's groups on ``app.cli`` (so a host application's ``flask`` has them)."""
    for command in COMMANDS:
        app.cli.add_command(command)
