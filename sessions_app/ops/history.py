"""The CLI's ``sessions`` group: list, show, delete, purge, and export and import a history."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup
from marshmallow import ValidationError

from storage_backends import (
    Conflict,
    codec,
)
from storage_backends.codec import utcnow

from ..corridor.errors import flatten_messages
from ..schemas import (
    SessionSchema,
)
from .cli import (
    check_key,
    checked,
    confirm,
    echo,
    echo_json,
    echo_json_list,
    header,
    iterate,
    json_option,
    json_text,
    one_line_errors,
    show,
    storage,
)

sessions = AppGroup("sessions", help="Manage sessions and their history.")


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
    out = sys.stdout  # click.get_text_stream is deprecated (gone in Click 9)
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
