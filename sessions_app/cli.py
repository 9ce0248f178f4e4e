"""The ``agent-sessions`` operator CLI: a Flask CLI group over the same factory and storage."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import AppGroup, FlaskGroup, with_appcontext
from marshmallow import Schema, ValidationError

from storage_backends import (
    Agent,
    AgentNotFound,
    ApiKeyNotFound,
    Conflict,
    Grant,
    StorageError,
    Unavailable,
)
from storage_backends.codec import utcnow
from storage_backends.memory import MemoryStorage

from .auth import new_api_key
from .errors import flatten_messages
from .naming import KEY_MAX_LENGTH
from .rate_limits import parse_limit
from .schemas import SCOPES, AgentCreateSchema, ApiKeyCreateSchema, is_key
from .text import CONTROLS_NOT_C0, escape_controls

agents = AppGroup("agents", help="Manage agents.")
keys = AppGroup("keys", help="Manage API keys.")
sessions = AppGroup("sessions", help="Maintain sessions.")


def echo(*fields: object, err: bool = False) -> None:
    """Print one line: the fields, tab-separated, each with its control characters escaped.

    Every line the CLI prints goes through here, so a stored value (a name
    holding a newline, a tab or a terminal sequence) can never start a row,
    split a field or reach the terminal as anything but text.
    """
    click.echo("\t".join(escape_controls(str(field)) for field in fields), err=err)


def echo_json(value: Any) -> None:
    """Print ``value`` as JSON, every control character in a string escaped as ``\\uXXXX``."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    # json escapes C0 controls itself (a raw newline is indentation); the rest
    # can only be inside strings.
    click.echo(CONTROLS_NOT_C0.sub(lambda match: f"\\u{ord(match.group()):04x}", text))


def one_line_errors(command: Callable) -> Callable:
    """Storage and input errors end the command with one line and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except StorageError as err:
            raise click.ClickException(escape_controls(describe(err))) from None
        except ValueError as err:
            raise click.ClickException(escape_controls(str(err))) from None

    return wrapper


def describe(err: StorageError) -> str:
    if isinstance(err, Conflict):
        return f"{err} already exists"
    if isinstance(err, AgentNotFound):
        return f"agent {err} not found"
    if isinstance(err, ApiKeyNotFound):
        return f"API key {err} not found"
    if isinstance(err, Unavailable):
        return f"storage unavailable: {err}"
    return f"{type(err).__name__}: {err}"


def storage() -> Any:
    """The configured storage; memory:// is refused, since it lives inside each server process.

    A command on it would act on an empty store of its own, gone when it exits.
    """
    store = current_app.extensions["agent_sessions"].storage
    if isinstance(store, MemoryStorage):
        raise click.ClickException(
            "STORAGE_URL is memory://, which lives inside each server process: "
            "the CLI cannot reach it (use sqlite:// or postgresql://)"
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


def iterate(list_page: Callable[..., Any]) -> Any:
    after = None
    while True:
        page = list_page(limit=100, after=after)
        yield from page.items
        if page.next_cursor is None:
            return
        after = page.next_cursor


@agents.command("create")
@click.argument("agent_key")
@click.option("--name", required=True, help="Human-readable name.")
@click.option("--description", default=None)
@one_line_errors
def create_agent(agent_key: str, name: str, description: str | None) -> None:
    """Create an agent."""
    if not is_key(agent_key):
        raise ValueError(f"AGENT_KEY must be 1 to {KEY_MAX_LENGTH} letters, digits, '_' or '-'")
    fields = checked(
        AgentCreateSchema, {"key": agent_key, "name": name, "description": description}
    )
    now = utcnow()
    agent = Agent(**fields, created_at=now, updated_at=now)
    storage().create_agent(agent=agent)
    echo(f"created agent {agent_key}")


@agents.command("list")
@one_line_errors
def list_agents() -> None:
    """List agents: key, name, state."""
    for agent in iterate(storage().list_agents):
        state = "enabled" if agent.enabled else "disabled"
        echo(agent.key, agent.name, state)


def parse_grant(value: str) -> Grant:
    agent, sep, scopes = value.partition("=")
    scope_list = tuple(s.strip() for s in scopes.split(",") if s.strip())
    if not sep or not scope_list or (agent != "*" and not is_key(agent)):
        raise ValueError(f"--grant {value!r}: expected AGENT=SCOPE[,SCOPE...]")
    unknown = [s for s in scope_list if s not in SCOPES]
    if unknown:
        raise ValueError(
            f"--grant {value!r}: unknown scope {unknown[0]!r}; use {', '.join(SCOPES)}"
        )
    return Grant(agent, scope_list)


def format_grants(key: Any) -> str:
    grants = [f"{g.agent}={','.join(g.scopes)}" for g in key.grants]
    if key.admin:
        grants.insert(0, "admin")
    return " ".join(grants) or "-"


@keys.command("create")
@click.option("--name", required=True)
@click.option("--grant", "grants", multiple=True, metavar="AGENT=SCOPE[,SCOPE...]")
@click.option("--admin", is_flag=True, help="May also manage agents and API keys.")
@click.option("--create-limit", default=None, help="Own session-creation limit, e.g. 30/minute.")
@one_line_errors
def create_key(name: str, grants: tuple[str, ...], admin: bool, create_limit: str | None) -> None:
    """Create an API key; its secret is printed once, alone on the last line."""
    storage()  # refuses memory://, whose keys no server would see
    if create_limit is not None:
        parse_limit(create_limit)  # its message names the limit
    checked(ApiKeyCreateSchema, {"name": name, "create_limit": create_limit})
    key, token = new_api_key(
        name=name,
        grants=[parse_grant(g) for g in grants],
        admin=admin,
        create_limit=create_limit,
    )
    echo(f"created API key {key.id} ({format_grants(key)}); the secret is shown only now:")
    echo(token)


@keys.command("list")
@one_line_errors
def list_keys() -> None:
    """List keys: id, name, grants, state, create limit (never the secret)."""
    now = utcnow()
    for key in iterate(storage().list_api_keys):
        limit = f"create-limit={key.create_limit}" if key.create_limit else "create-limit=default"
        echo(key.id, key.name, format_grants(key), key.state(now), limit)


@keys.command("revoke")
@click.argument("key_id")
@one_line_errors
def revoke_key(key_id: str) -> None:
    """Revoke a key; refused from the next request on, by every worker."""
    storage().revoke_api_key(key_id=key_id, now=utcnow())
    echo(f"revoked API key {key_id}")


@sessions.command("purge-expired")
@one_line_errors
def purge_expired() -> None:
    """Remove sessions idle past their TTI (suitable for cron)."""
    removed = storage().purge_expired_sessions(now=utcnow())
    echo(f"removed {removed} expired sessions")


@click.command("openapi")
@with_appcontext
def openapi_document() -> None:
    """Print the OpenAPI document of the HTTP API as JSON."""
    from .openapi import document

    echo_json(document(current_app))


def register_commands(app: Flask) -> None:
    for command in (agents, keys, sessions, openapi_document):
        app.cli.add_command(command)


def _create_app() -> Flask:
    from . import create_app

    return create_app()


cli = FlaskGroup(
    create_app=_create_app,
    add_version_option=False,
    load_dotenv=False,
    help="Operate the Agent Sessions service (same configuration as the server).",
)


def main() -> None:
    from . import ConfigError

    try:
        cli.main(prog_name="agent-sessions")
    except ConfigError as err:
        echo(f"Error: configuration: {err}", err=True)
        sys.exit(2)
