"""The operator CLI's ground: output, one-line errors, the storage it acts on; and the
``db``, ``backup``, ``restore`` and ``openapi`` commands.

The ``agents`` and ``keys`` groups are in :mod:`.records`, ``sessions`` in
:mod:`.history`; :mod:`sessions_app.cli` is the ``agent-sessions`` command.
Exit statuses: see :mod:`sessions_app.cli`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup, with_appcontext
from marshmallow import Schema, ValidationError

from config import ConfigError
from storage_backends import (
    AgentNotFound,
    ApiKeyNotFound,
    Conflict,
    SessionNotFound,
    StorageError,
    Unavailable,
)
from storage_backends.base import QuotaExceeded
from storage_backends.memory import MemoryStorage

from ..corridor.errors import flatten_messages, quota_message
from ..naming import KEY_MAX_LENGTH
from ..schemas import (
    is_key,
)
from ..text import CONTROLS_NOT_C0, escape_controls
from . import maintenance

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3

db = AppGroup("db", help="The database schema: its version and upgrades.")

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document (stable field names)."
)


def echo(*fields: object, err: bool = False) -> None:
    """Print one line: the fields, tab-separated, each with its control characters escaped.

    Every line the CLI prints goes through here, so a stored value (a name
    holding a newline, a tab or a terminal sequence) can never start a row,
    split a field or reach the terminal as anything but text.
    """
    click.echo("\t".join(escape_controls(str(field)) for field in fields), err=err)


def warn(message: str) -> None:
    echo(f"Warning: {message}", err=True)


def json_text(value: Any, indent: int | None = 2) -> str:
    """``value`` as JSON, every control character in a string escaped as ``\\uXXXX``."""
    text = json.dumps(value, indent=indent, ensure_ascii=False)
    # json escapes C0 controls itself (a raw newline is indentation); the rest
    # can only be inside strings.
    return CONTROLS_NOT_C0.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def echo_json(value: Any) -> None:
    click.echo(json_text(value))


def echo_json_list(name: str, items: Iterable[Any]) -> None:
    """``{"<name>": [...]}`` written item by item: one document, in constant memory."""
    out = sys.stdout  # click.get_text_stream is deprecated (gone in Click 9)
    out.write(f'{{"{name}": [')
    count = 0
    for item in items:
        out.write(("," if count else "") + "\n  " + json_text(item, indent=None))
        count += 1
    out.write("\n]}\n" if count else "]}\n")


def header(*columns: str) -> None:
    """Column names, only when a person reads the output (standard output is a terminal)."""
    if sys.stdout.isatty():
        echo(*columns)


def one_line_errors(command: Callable) -> Callable:
    """Storage and input errors end the command with one line and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ConfigError:
            raise
        except StorageError as err:
            raise click.ClickException(escape_controls(describe(err))) from None
        except (ValueError, maintenance.MaintenanceError) as err:
            raise click.ClickException(escape_controls(str(err))) from None

    return wrapper


def describe(err: StorageError) -> str:
    if isinstance(err, Conflict):
        return f"{err} already exists"
    if isinstance(err, AgentNotFound):
        return f"agent {err} not found"
    if isinstance(err, SessionNotFound):
        return f"session {err} not found"
    if isinstance(err, ApiKeyNotFound):
        return f"API key {err} not found"
    if isinstance(err, Unavailable):
        return f"storage unavailable: {err}"
    if isinstance(err, QuotaExceeded):
        return quota_message(err)
    return f"{type(err).__name__}: {err}"


def storage(*, missing_ok: bool = False) -> Any:
    """The configured storage, refused where a command on it could only mislead.

    memory:// lives inside each server process: a command on it would act on
    an empty store of its own, gone when it exits. A SQLite path in a
    directory that does not exist is a configuration mistake (a typo), not a
    place to create a new, empty database; the default file in the instance
    folder is the exception, its folder made on first use as the server does.
    A SQLite file that does not exist is refused too, before anything opens
    it, unless ``missing_ok`` (the commands that make records or the schema):
    reading or changing records there would make a new, empty database, and
    answer from it.
    """
    app = current_app
    store = app.extensions["agent_sessions"].storage
    if isinstance(store, MemoryStorage):
        raise click.ClickException(
            "STORAGE_URL is memory://, which lives inside each server process: "
            "the CLI cannot reach it (use sqlite:// or postgresql://)"
        )
    if maintenance.backend_name(store) == "sqlite" and app.config["STORAGE_URL"]:
        directory = os.path.dirname(os.path.abspath(store.path))
        if not os.path.isdir(directory):
            raise ConfigError(
                f"STORAGE_URL {app.config['STORAGE_URL']}: directory {directory} does not exist"
            )
    if maintenance.backend_name(store) == "sqlite" and not missing_ok:
        if not os.path.exists(store.path):
            raise click.ClickException(
                f"the database {os.path.abspath(store.path)} does not exist: check STORAGE_URL "
                "(agents create, keys create, db upgrade and restore make a new one)"
            )
    return store


def checked(schema: type[Schema], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` loaded by the API's own schema, so the CLI stores nothing the API would refuse.

    A refusal is a ValueError naming the first bad field, in one line.
    """
    try:
        return schema().load({k: v for k, v in data.items() if v is not None})
    except ValidationError as err:
        path, message = next(iter(flatten_messages(err.messages).items()))
        raise ValueError(f"--{path.replace('_', '-')}: {message}") from None


def iterate(list_page: Callable[..., Any], **kwargs: Any) -> Iterator[Any]:
    after = None
    while True:
        page = list_page(limit=100, after=after, **kwargs)
        yield from page.items
        if page.next_cursor is None:
            return
        after = page.next_cursor


def confirm(question: str, yes: bool, *, required: bool = True) -> None:
    """Ask on a terminal; elsewhere ``--yes`` is needed (unless not ``required``)."""
    if yes:
        return
    if sys.stdin.isatty():
        click.confirm(escape_controls(question), abort=True, err=True)
    elif required:
        raise click.UsageError(f"{escape_controls(question)} Pass --yes to confirm (no terminal).")


def check_key(value: str, what: str) -> str:
    if not is_key(value):
        raise ValueError(f"{what} must be 1 to {KEY_MAX_LENGTH} letters, digits, '_' or '-'")
    return value


# Agents


def agent_state(agent: Any) -> str:
    return "enabled" if agent.enabled else "disabled"


def show(body: dict[str, Any]) -> None:
    """A record as ``field: value`` lines (objects as compact JSON)."""
    for field, value in body.items():
        if isinstance(value, dict | list):
            value = json_text(value, indent=None)
        elif isinstance(value, bool):
            value = str(value).lower()
        echo(f"{field}: {value}")


@db.command("status")
@one_line_errors
def db_status() -> None:
    """Show the schema version of the database and of this release (changes nothing)."""
    store = storage(missing_ok=True)
    found = maintenance.schema_version(store)
    known = maintenance.known_version()
    echo(f"backend: {maintenance.backend_name(store)}")
    echo(f"database schema version: {found if found is not None else 'none (no database yet)'}")
    echo(f"this release's schema version: {known}")
    for version, summary in maintenance.migrations():
        state = "applied" if found is not None and version <= found else "pending"
        echo(f"  {version}", state, summary)
    if found is not None and found > known:
        raise click.ClickException(
            f"the database is newer ({found}) than this release ({known}): run the newer release"
        )
    if found is None or found < known:
        echo("upgrade with: agent-sessions db upgrade (or let the server do it on first use)")
    else:
        echo("up to date")


@db.command("upgrade")
@one_line_errors
def db_upgrade() -> None:
    """Create the schema or bring it to this release's version (what first use does)."""
    store = storage(missing_ok=True)
    before = maintenance.schema_version(store)
    store.check()  # opens the database, which creates or migrates the schema
    after = maintenance.schema_version(store)
    if before == after:
        echo(f"schema version {after}: up to date")
    else:
        echo(f"schema upgraded from {before or 'none'} to {after}")


# Backup and restore


@click.command("backup")
@click.argument("path", type=click.Path(dir_okay=False))
@with_appcontext
@one_line_errors
def backup(path: str) -> None:
    """Write a consistent copy of the SQLite database to PATH, safe while serving."""
    store = storage()
    if maintenance.backend_name(store) != "sqlite":
        raise click.ClickException(
            "backup copies SQLite databases; for PostgreSQL use pg_dump "
            "(pg_dump --format=custom --file=sessions.dump DATABASE_URL)"
        )
    pages = maintenance.sqlite_backup(store.path, path)
    echo(f"backed up {store.path} to {path} ({pages} pages, integrity ok)")


@click.command("restore")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--yes", is_flag=True, help="Do not ask (needed without a terminal).")
@with_appcontext
@one_line_errors
def restore(path: str, yes: bool) -> None:
    """Replace the SQLite database with the backup at PATH (stop the server first)."""
    store = storage(missing_ok=True)
    if maintenance.backend_name(store) != "sqlite":
        raise click.ClickException(
            "restore writes SQLite databases; for PostgreSQL use pg_restore "
            "(pg_restore --clean --dbname=DATABASE_URL sessions.dump)"
        )
    version = maintenance.check_backup(path)
    if maintenance.in_use(store.path):
        raise click.ClickException(
            f"{store.path} is in use by another process (a running server?): "
            "stop the server, then restore"
        )
    confirm(f"Replace {store.path} with the backup {path} (schema {version})?", yes)
    store.close()  # this process's own connections: none may see the file change
    pages = maintenance.sqlite_restore(path, store.path)
    echo(f"restored {path} into {store.path} ({pages} pages)")


@click.command("openapi")
@with_appcontext
def openapi_document() -> None:
    """Print the OpenAPI document of the HTTP API as JSON."""
    from ..openapi import document

    echo_json(document(current_app))
