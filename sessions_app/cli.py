"""The ``agent-sessions`` command: the operator's groups (:mod:`sessions_app.ops`) over an app
built by :func:`sessions_app.create_app`, with Flask's development server.

Exit statuses (documented in the README): 0 success, 1 the operation failed
(a record not found, storage unavailable, a refused value), 2 a usage error
(click's own), 3 a configuration error (the environment cannot be served).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click
from flask import Flask
from flask.cli import ScriptInfo, run_command

from config import ConfigError

from . import create_app, unknown_environment_names
from .ops.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_USAGE, echo, warn
from .ops.commands import COMMANDS


def _create_app(*args: Any) -> Flask:
    for message in unknown_environment_names(os.environ):
        warn(message)
    return create_app()


@click.group(
    help="Operate the Agent Sessions service (same configuration as the server).\n\n"
    "Exit status: 0 success, 1 the operation failed, 2 usage error, 3 configuration error.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="agent-sessions", prog_name="agent-sessions")
def cli() -> None:
    pass


for _command in COMMANDS:
    cli.add_command(_command)
# Flask's development server; its other commands (shell, routes) and plugins
# (flask-limiter's) are for developers and are left out.
cli.add_command(run_command, "run")


def main() -> None:
    info = ScriptInfo(create_app=_create_app, set_debug_flag=False, load_dotenv_defaults=False)
    try:
        cli.main(prog_name="agent-sessions", obj=info)
    except ConfigError as err:
        echo(f"Error: configuration: {err}", err=True)
        sys.exit(EXIT_CONFIG)


__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_USAGE", "cli", "main"]
