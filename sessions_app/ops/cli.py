"""The ``agent-sessions`` operator CLI: Flask CLI groups over the same factory and storage.

Exit statuses (documented in the README): 0 success, 1 the operation failed
(a record not found, storage unavailable, a refused value), 2 a usage error
(click's own), 3 a configuration error (the environment cannot be served).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import AppGroup, ScriptInfo, run_command, with_appcontext
from marshmallow import Schema, ValidationError

from config import ConfigError
from storage_backends import (
    Agent,
    AgentNotFound,
    ApiKeyNotFound,
    Conflict,
    Grant,
    SessionNotFound,
    StorageError,
    Unavailable,
    codec,
)
from storage_backends.codec import utcnow
from storage_backends.memory import MemoryStorage

from ..corridor.auth import new_api_key
from ..corridor.errors import flatten_messages
from ..corridor.rate_limits import parse_limit
from ..naming import KEY_MAX_LENGTH
from ..schemas import (
    SCOPES,
    AgentCreateSchema,
    AgentSchema,
    AgentUpdateSchema,
    ApiKeyCreateSchema,
    ApiKeySchema,
    SessionSchema,
    is_key,
)
from ..text import CONTROLS_NOT_C0, escape_controls
from . import maintenance

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3

agents = AppGroup("agents", help="Manage agents.")
keys = AppGroup("keys", help="Manage API keys.")
sessions = AppGroup("sessions", help="Manage sessions and their history.")
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
    out = click.get_text_stream("stdout")
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
    return f"{type(err).__name__}: {err}"


def storage() -> Any:
    """The configured storage, refused where a command on it could only mislead.

    memory:// lives inside each server process: a command on it would act on
    an empty store of its own, gone when it exits. A SQLite path in a
    directory that does not exist is a configuration mistake (a typo), not a
    place to create a new, empty database; the default file in the instance
    folder is the exception, its folder made on first use as the server does.
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


@agents.command("create")
@click.argument("agent_key")
@click.option("--name", required=True, help="Human-readable name.")
@click.option("--description", default=None)
@one_line_errors
def create_agent(agent_key: str, name: str, description: str | None) -> None:
    """Create an agent."""
    check_key(agent_key, "AGENT_KEY")
    fields = checked(
        AgentCreateSchema, {"key": agent_key, "name": name, "description": description}
    )
    now = utcnow()
    agent = Agent(**fields, created_at=now, updated_at=now)
    storage().create_agent(agent=agent)
    echo(f"created agent {agent_key}")


@agents.command("list")
@json_option
@one_line_errors
def list_agents(as_json: bool) -> None:
    """List agents: key, name, state."""
    found = iterate(storage().list_agents)
    if as_json:
        schema = AgentSchema()
        return echo_json_list("agents", (schema.dump(agent) for agent in found))
    header("KEY", "NAME", "STATE")
    for agent in found:
        echo(agent.key, agent.name, agent_state(agent))


@agents.command("get")
@click.argument("agent_key")
@json_option
@one_line_errors
def get_agent(agent_key: str, as_json: bool) -> None:
    """Show one agent."""
    agent = storage().get_agent(agent_key=check_key(agent_key, "AGENT_KEY"))
    body = AgentSchema().dump(agent)
    if as_json:
        return echo_json(body)
    show(body)


def show(body: dict[str, Any]) -> None:
    """A record as ``field: value`` lines (objects as compact JSON)."""
    for field, value in body.items():
        if isinstance(value, dict | list):
            value = json_text(value, indent=None)
        elif isinstance(value, bool):
            value = str(value).lower()
        echo(f"{field}: {value}")


@agents.command("update")
@click.argument("agent_key")
@click.option("--name", default=None)
@click.option("--description", default=None, help='"" clears it.')
@click.option("--enable/--disable", "enabled", default=None, help="Take new sessions or not.")
@one_line_errors
def update_agent(
    agent_key: str, name: str | None, description: str | None, enabled: bool | None
) -> None:
    """Change an agent's name, description or enabled state."""
    check_key(agent_key, "AGENT_KEY")
    changes = checked(
        AgentUpdateSchema, {"name": name, "description": description, "enabled": enabled}
    )
    if not changes:
        raise click.UsageError(
            "nothing to change: give --name, --description, --enable or --disable"
        )
    agent = storage().update_agent(agent_key=agent_key, changes=changes, now=utcnow())
    echo(f"updated agent {agent.key} ({agent_state(agent)})")


@agents.command("delete")
@click.argument("agent_key")
@click.option("--yes", is_flag=True, help="Do not ask (needed without a terminal).")
@one_line_errors
def delete_agent(agent_key: str, yes: bool) -> None:
    """Delete an agent, its sessions and every grant naming it (cannot be undone)."""
    store = storage()
    store.get_agent(agent_key=check_key(agent_key, "AGENT_KEY"))  # not found before asking
    confirm(f"Delete agent {agent_key} with all its sessions and the grants naming it?", yes)
    store.delete_agent(agent_key=agent_key)
    echo(f"deleted agent {agent_key}")


# API keys


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


DURATION = re.compile(r"^(\d{1,6})([mhdw])$")
DURATION_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_expires(value: str, now: dt.datetime) -> str:
    """``--expires``: a duration from now (``90d``, ``12h``) or an RFC 3339 time, in the future.

    Returned as RFC 3339 text for the API's own schema to check.
    """
    match = DURATION.match(value.strip())
    if match:
        when = now + dt.timedelta(**{DURATION_UNITS[match[2]]: int(match[1])})
    else:
        try:
            when = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"--expires {value!r}: expected a duration such as 90d, 12h, 30m, 2w "
                "or a time such as 2030-01-31T00:00:00Z"
            ) from None
        if when.tzinfo is None:
            raise ValueError(f"--expires {value!r}: give a time zone (Z for UTC)")
    if when <= now:
        raise ValueError(f"--expires {value!r}: that time has passed")
    return when.astimezone(dt.UTC).isoformat()


@keys.command("create")
@click.option("--name", required=True)
@click.option("--grant", "grants", multiple=True, metavar="AGENT=SCOPE[,SCOPE...]")
@click.option("--admin", is_flag=True, help="May also manage agents and API keys.")
@click.option("--create-limit", default=None, help="Own session-creation limit, e.g. 30/minute.")
@click.option("--expires", default=None, help="90d, 12h, 30m, 2w, or 2030-01-31T00:00:00Z.")
@one_line_errors
def create_key(
    name: str,
    grants: tuple[str, ...],
    admin: bool,
    create_limit: str | None,
    expires: str | None,
) -> None:
    """Create an API key; its secret is printed once, alone on the last line."""
    store = storage()  # refuses memory://, whose keys no server would see
    if create_limit is not None:
        parse_limit(create_limit)  # its message names the limit
    expires_at = parse_expires(expires, utcnow()) if expires is not None else None
    fields = checked(
        ApiKeyCreateSchema,
        {"name": name, "create_limit": create_limit, "expires_at": expires_at},
    )
    parsed = [parse_grant(g) for g in grants]
    if not parsed and not admin:
        warn("the key has no grant: it authenticates but may do nothing (add --grant)")
    for grant in parsed:
        if grant.agent == "*":
            continue
        try:
            store.get_agent(agent_key=grant.agent)
        except AgentNotFound:
            warn(
                f"--grant {grant.agent}=...: there is no agent {grant.agent} "
                "(the grant applies to one created later with that key)"
            )
    key, token = new_api_key(
        name=name,
        grants=parsed,
        admin=admin,
        create_limit=create_limit,
        expires_at=fields.get("expires_at"),
    )
    until = f", expires {codec.format_ts(key.expires_at)}" if key.expires_at else ""
    echo(f"created API key {key.id} ({format_grants(key)}{until}); the secret is shown only now:")
    echo(token)


@keys.command("list")
@json_option
@one_line_errors
def list_keys(as_json: bool) -> None:
    """List keys: id, name, grants, state, create limit (never the secret)."""
    found = iterate(storage().list_api_keys)
    if as_json:
        schema = ApiKeySchema()
        return echo_json_list("api_keys", (schema.dump(key) for key in found))
    now = utcnow()
    header("ID", "NAME", "GRANTS", "STATE", "CREATE LIMIT")
    for key in found:
        limit = f"create-limit={key.create_limit}" if key.create_limit else "create-limit=default"
        echo(key.id, key.name, format_grants(key), key.state(now), limit)


@keys.command("revoke")
@click.argument("key_id")
@click.option("--yes", is_flag=True, help="Do not ask on a terminal.")
@one_line_errors
def revoke_key(key_id: str, yes: bool) -> None:
    """Revoke a key (cannot be undone); refused from the next request on, by every worker."""
    store = storage()
    key = store.get_api_key(key_id=key_id)
    if key.revoked_at is not None:
        echo(f"API key {key_id} was already revoked at {codec.format_ts(key.revoked_at)}")
        return
    confirm(f"Revoke API key {key_id} ({key.name})? This cannot be undone.", yes, required=False)
    store.revoke_api_key(key_id=key_id, now=utcnow())
    echo(f"revoked API key {key_id}")


# Sessions


@sessions.command("list")
@click.argument("agent_key")
@click.option("--filter", "pattern", default=None, help="RE2 pattern over name and description.")
@json_option
@one_line_errors
def list_sessions(agent_key: str, pattern: str | None, as_json: bool) -> None:
    """List an agent's live sessions: key, name, state, created, expires."""
    store = storage()
    store.get_agent(agent_key=check_key(agent_key, "AGENT_KEY"))
    matches = None
    if pattern is not None:
        try:
            matches = codec.compile_filter(pattern, current_app.config["FILTER_MAX_LENGTH"])
        except ValueError as err:
            raise ValueError(f"--filter: {err}") from None
    found = iterate(store.list_sessions, agent_key=agent_key, now=utcnow(), matches=matches)
    if as_json:
        schema = SessionSchema()
        return echo_json_list("sessions", (schema.dump(s) for s in found))
    header("KEY", "NAME", "STATE", "CREATED", "EXPIRES")
    for session in found:
        expires = codec.format_ts(session.expires_at) if session.expires_at else "-"
        state = "enabled" if session.enabled else "disabled"
        echo(session.key, session.name, state, codec.format_ts(session.created_at), expires)


@sessions.command("get")
@click.argument("agent_key")
@click.argument("session_key")
@json_option
@one_line_errors
def get_session(agent_key: str, session_key: str, as_json: bool) -> None:
    """Show one session."""
    store = storage()
    store.get_agent(agent_key=check_key(agent_key, "AGENT_KEY"))
    session = store.get_session(
        agent_key=agent_key, session_key=check_key(session_key, "SESSION_KEY"), now=utcnow()
    )
    body = SessionSchema().dump(session)
    if as_json:
        return echo_json(body)
    show(body)


@sessions.command("delete")
@click.argument("agent_key")
@click.argument("session_key")
@click.option("--yes", is_flag=True, help="Do not ask (needed without a terminal).")
@one_line_errors
def delete_session(agent_key: str, session_key: str, yes: bool) -> None:
    """Delete a session and its history (cannot be undone)."""
    store = storage()
    store.get_agent(agent_key=check_key(agent_key, "AGENT_KEY"))
    check_key(session_key, "SESSION_KEY")
    store.get_session(agent_key=agent_key, session_key=session_key, now=utcnow())
    confirm(f"Delete session {session_key} of agent {agent_key} with its history?", yes)
    store.delete_session(agent_key=agent_key, session_key=session_key, now=utcnow())
    echo(f"deleted session {session_key} of agent {agent_key}")


@sessions.command("purge-expired")
@one_line_errors
def purge_expired() -> None:
    """Remove sessions idle past their TTI, and Idempotency-Key answers past their TTL
    (suitable for cron)."""
    store, now = storage(), utcnow()
    removed = store.purge_expired_sessions(now=now)
    echo(f"removed {removed} expired sessions")
    # Nothing else removes a key no request sends again: without this the table only grows.
    removed = store.purge_expired_idempotency_keys(now=now)
    echo(f"removed {removed} expired idempotency keys")


# Export and import: a session and its whole history as JSON Lines

EXPORT_FORMAT = "agent-sessions/session"
EXPORT_VERSION = 1
EVENT_ID = re.compile(r"^aev_[0-9A-Za-z]{1,60}$")
EVENT_TYPES = (
    "input_message",
    "agent_output",
    "thinking",
    "tool_input",
    "tool_output",
    "structured_output",
    "step_transition",
    "skill_load",
    "compaction",
)
HIDE_REASONS = ("manual", "compaction")
EVENT_KEYS = ("id", "type", "created_at", "hide_reason")


FORKED_FROM_FIELDS = frozenset({"agent_key", "session_key", "event_id"})


def event_line(event: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": event.id, "type": event.type}
    body["created_at"] = codec.format_ts(event.created_at)
    if event.hide_reason is not None:
        body["hide_reason"] = event.hide_reason
    body.update((k, v) for k, v in event.fields.items() if k not in EVENT_KEYS)
    return {"event": body}


def session_line(session: Any) -> dict[str, Any]:
    body = SessionSchema().dump(session)
    if getattr(session, "forked_from", None):
        body["forked_from"] = dict(session.forked_from)
    if getattr(session, "active_at", None):
        body["active_at"] = codec.format_ts(session.active_at)
    return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "session": body}


def progress(items: Iterable[Any], label: str) -> Any:
    """``items`` with a progress counter on standard error when a person watches it."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext(items)
    return click.progressbar(items, label=label, file=sys.stderr, show_pos=True)


@sessions.command("export")
@click.argument("agent_key")
@click.argument("session_key")
@one_line_errors
def export_session(agent_key: str, session_key: str) -> None:
    """Write a session and its whole history (hidden events marked) as JSON Lines.

    The first line is the session, then one line per event, oldest first, then
    an end line with the count; read a batch at a time, in constant memory.
    """
    store = storage()
    store.get_agent(agent_key=check_key(agent_key, "AGENT_KEY"))
    check_key(session_key, "SESSION_KEY")
    now = utcnow()
    session = store.get_session(agent_key=agent_key, session_key=session_key, now=now)
    events = store.iter_events(agent_key=agent_key, session_key=session_key, now=now)
    out = click.get_text_stream("stdout")
    out.write(json_text(session_line(session), indent=None) + "\n")
    count = 0
    with progress(events, f"exporting {session_key}") as shown:
        for event in shown:
            out.write(json_text(event_line(event), indent=None) + "\n")
            count += 1
    out.write(json_text({"end": {"events": count}}, indent=None) + "\n")
    out.flush()
    if sys.stderr.isatty():
        echo(f"exported session {session_key} with {count} events", err=True)


class BadExport(ValueError):
    """A line of an export that cannot be imported; the message names the line."""


def parse_line(text: str, number: int) -> dict[str, Any]:
    """One line, parsed as strictly as a request body (no NUL, no unpaired surrogate)."""
    from ..corridor.http import parse

    try:
        value = parse(text.encode("utf-8", "surrogatepass"))
    except ValueError as err:
        raise BadExport(f"line {number}: not JSON ({err})") from None
    if not isinstance(value, dict):
        raise BadExport(f"line {number}: expected a JSON object")
    return value


def timestamp(value: Any, where: str) -> dt.datetime:
    try:
        return codec.parse_ts(value)
    except (TypeError, ValueError):
        raise BadExport(f"{where}: not a timestamp: {value!r}") from None


def read_session(first: dict[str, Any], agent_key: str | None, session_key: str | None) -> Any:
    from storage_backends import Session

    if first.get("format") != EXPORT_FORMAT or first.get("version") != EXPORT_VERSION:
        raise BadExport(
            f"line 1: not an export of this service (format {EXPORT_FORMAT}, "
            f"version {EXPORT_VERSION})"
        )
    body = first.get("session")
    if not isinstance(body, dict):
        raise BadExport("line 1: no session")
    from ..schemas import SessionCreateSchema

    key = session_key or body.get("key")
    if key is None:
        raise BadExport("line 1: the session has no key; give one with --key")
    try:
        fields = checked(
            SessionCreateSchema,
            {k: body.get(k) for k in ("name", "description", "metadata", "enabled", "tti_minutes")}
            | {"key": key},
        )
    except ValueError as err:
        raise BadExport(f"line 1: {str(err).removeprefix('--')}") from None
    forked_from = body.get("forked_from")
    if forked_from is not None and not (
        isinstance(forked_from, dict)
        and {"agent_key", "session_key"} <= forked_from.keys() <= FORKED_FROM_FIELDS
        and all(isinstance(v, str) and v for v in forked_from.values())
    ):
        raise BadExport(
            "line 1: forked_from must be an object of agent_key, session_key and "
            "optionally event_id, each a string"
        )
    created = timestamp(body.get("created_at"), "line 1: created_at")
    updated = timestamp(body.get("updated_at"), "line 1: updated_at")
    active = body.get("active_at")
    return Session(
        agent_key=agent_key or body.get("agent_key") or "",
        created_at=created,
        updated_at=updated,
        forked_from=forked_from,
        active_at=timestamp(active, "line 1: active_at") if active is not None else None,
        **fields,
    )


def event_fields(body: dict[str, Any], number: int) -> dict[str, Any]:
    """The fields of an event line, checked by its type's schema as a batch is."""
    from ..schemas.events import STORED_EVENT_VARIANTS

    given = {k: v for k, v in body.items() if k not in EVENT_KEYS}
    try:
        loaded = STORED_EVENT_VARIANTS[body["type"]]().load({"type": body["type"], **given})
    except ValidationError as err:
        path, message = next(iter(flatten_messages(err.messages).items()))
        raise BadExport(f"line {number}: {path}: {message}") from None
    loaded.pop("type", None)
    loaded.pop("id", None)
    # The line's own order first, then what the schema added (defaults).
    return {k: loaded[k] for k in given if k in loaded} | loaded


def read_events(lines: Iterator[tuple[int, str]], session_key: str, tally: list[int]) -> Any:
    """The events of an export, checked one by one; a missing or wrong end line is an error.

    Raising from here aborts the import's transaction: nothing is stored.
    """
    from storage_backends import Event
    from storage_backends.codec import dump_json

    from ..schemas.events import dump_event

    for number, text in lines:
        line = parse_line(text, number)
        if "end" in line:
            expected = line["end"].get("events") if isinstance(line["end"], dict) else None
            if expected != tally[0]:
                raise BadExport(
                    f"line {number}: the end line counts {expected!r} events, "
                    f"the file holds {tally[0]}"
                )
            for extra, rest in lines:
                if rest.strip():
                    raise BadExport(f"line {extra}: text after the end line")
            tally[1] = 1
            return
        body = line.get("event")
        if not isinstance(body, dict):
            raise BadExport(f"line {number}: expected an event or the end line")
        event_id, kind = body.get("id"), body.get("type")
        if not isinstance(event_id, str) or not EVENT_ID.match(event_id):
            raise BadExport(f"line {number}: bad event id {event_id!r}")
        if kind not in EVENT_TYPES:
            raise BadExport(f"line {number}: unknown event type {kind!r}")
        hidden = body.get("hide_reason")
        if hidden is not None and hidden not in HIDE_REASONS:
            raise BadExport(f"line {number}: bad hide_reason {hidden!r}")
        tally[0] += 1
        event = Event(
            id=event_id,
            session_key=session_key,
            type=kind,
            fields=event_fields(body, number),
            created_at=timestamp(body.get("created_at"), f"line {number}: created_at"),
            hide_reason=hidden,
        )
        size = len(dump_json(dump_event(event)).encode())
        if size > current_app.config["EVENT_MAX_BYTES"]:
            raise BadExport(
                f"line {number}: the event serializes to {size} bytes; at most "
                f"{current_app.config['EVENT_MAX_BYTES']} are allowed"
            )
        yield event
    raise BadExport("the file ends before its end line: it is not a whole export")


@sessions.command("import")
@click.argument("source", type=click.File("r", encoding="utf-8"), default="-")
@click.option("--agent", "agent_key", default=None, help="Import under this agent instead.")
@click.option("--key", "session_key", default=None, help="Import under this session key instead.")
@one_line_errors
def import_session(source: Any, agent_key: str | None, session_key: str | None) -> None:
    """Read an export (a file, or - for standard input) into a new session, ids kept.

    All or nothing: a bad line, a missing end line or a session key that is
    taken stores nothing.
    """
    store = storage()
    lines = ((number, text) for number, text in enumerate(source, 1) if text.strip())
    first = next(lines, None)
    if first is None:
        raise BadExport("the input is empty")
    session = read_session(parse_line(first[1], first[0]), agent_key, session_key)
    check_key(session.agent_key, "the agent key")
    store.get_agent(agent_key=session.agent_key)
    tally = [0, 0]  # events read, end line seen
    events = read_events(lines, session.key, tally)
    try:
        with progress(events, f"importing {session.key}") as shown:
            count = store.import_session(session=session, events=shown)
    except Conflict:
        raise BadExport(
            f"session {session.key} of agent {session.agent_key} exists, or the file repeats "
            "an event id: nothing imported (--key imports under another key)"
        ) from None
    if not tally[1]:  # a backend that stopped reading early
        raise BadExport("the import did not reach the end line")
    echo(f"imported session {session.key} of agent {session.agent_key} with {count} events")


# The schema


@db.command("status")
@one_line_errors
def db_status() -> None:
    """Show the schema version of the database and of this release (changes nothing)."""
    store = storage()
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
    store = storage()
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
    store = storage()
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


def register_commands(app: Flask) -> None:
    """The operator's groups on ``app.cli`` (so a host application's ``flask`` has them)."""
    for command in (agents, keys, sessions, db, backup, restore, openapi_document):
        app.cli.add_command(command)


def _create_app(*args: Any) -> Flask:
    from .. import create_app, unknown_environment_names

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


for _command in (agents, keys, sessions, db, backup, restore, openapi_document):
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
