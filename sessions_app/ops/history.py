"""The CLI's ``sessions`` group: list, show, delete, purge, and export and import a history."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import pickle
import re
import stat
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup
from marshmallow import Schema, ValidationError

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
EVENT_KEYS = ("id", "type", "created_at", "hide_reason")


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


def progress(items: Iterable[Any], label: str, total: int | None, file: Any = None) -> Any:
    """``items`` with a progress bar on ``file`` (standard error) when a person watches it.

    The bar shows the count of ``total`` (when known, with the percentage and,
    after a second, the time left) and the rate. It is redrawn every 0.1% of
    the total (every 100 items when it is not known), so that drawing costs
    nothing next to the work. Elsewhere (a pipe, a file) nothing is written.
    """
    file = sys.stderr if file is None else file
    if not file.isatty():
        return contextlib.nullcontext(items)
    bar = click.progressbar(
        items,
        length=total,
        label=label,
        file=file,
        show_pos=True,
        show_percent=total is not None,
        show_eta=True,
        update_min_steps=max(1, total // 1000) if total is not None else 100,
    )

    def rate(_: Any) -> str | None:
        elapsed = time.time() - bar.start  # click's own clock for the time left
        return f"{bar.pos / elapsed:,.0f} events/s" if bar.pos and elapsed > 0 else None

    bar.item_show_func = rate
    return bar


def announced_count(source: Any) -> int | None:
    """The count the end line of an export announces, read from the end of a regular file
    without moving its position; None for a pipe or a file that does not end with one.

    For the progress bar only: the import checks the count when it reaches that line.
    """
    try:
        fd = source.fileno()
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        tail = os.pread(fd, 4096, max(0, info.st_size - 4096))
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    try:
        count = json.loads(tail.rstrip().rpartition(b"\n")[2])["end"]["events"]
    except (ValueError, KeyError, TypeError):
        return None
    return count if type(count) is int and count >= 0 else None


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
    # Counted first for the progress bar only, which only a terminal shows.
    total = (
        store.count_events(agent_key=agent_key, session_key=session_key, now=now)
        if sys.stderr.isatty()
        else None
    )
    events = store.iter_events(agent_key=agent_key, session_key=session_key, now=now)
    out = sys.stdout  # click.get_text_stream is deprecated (gone in Click 9)
    out.write(json_text(session_line(session), indent=None) + "\n")
    count = 0
    with progress(events, f"exporting {session_key}", total) as shown:
        for event in shown:
            out.write(json_text(event_line(event), indent=None) + "\n")
            count += 1
    out.write(json_text({"end": {"events": count}}, indent=None) + "\n")
    out.flush()
    if sys.stderr.isatty():
        echo(f"exported session {session_key} with {count} events", err=True)


class BadExport(ValueError):
    """A line of an export that cannot be imported; the message names the line."""


#: The earliest time an import takes: the API never wrote one before it.
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: How far past the import's own time a time may be: the exporting host's clock
#: may run ahead of this one's, never by more.
CLOCK_SKEW = dt.timedelta(days=1)


def time_refused(number: int, field: str, message: str, body: dict[str, Any]) -> BadExport:
    """The refusal of ``body``'s time ``field``, showing it as the line gives it."""
    value = given_at(body, field)
    shown = f" (given: {value!r})" if value is not None else ""
    return BadExport(f"line {number}: {field}: {message}{shown}")


def check_time(
    value: dt.datetime, field: str, number: int, now: dt.datetime, body: dict[str, Any]
) -> None:
    """``value`` is a time the API could have written: from 1970 to ``now`` plus
    :data:`CLOCK_SKEW`."""
    if value < EPOCH:
        raise time_refused(number, field, "Must not be before 1970-01-01T00:00:00Z.", body)
    if value > now + CLOCK_SKEW:
        limit = codec.format_ts(now + CLOCK_SKEW)
        message = f"Must not be more than a day past the import's time (up to {limit})."
        raise time_refused(number, field, message, body)


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


def load(schema: Schema, body: Any, number: int) -> dict[str, Any]:
    """``body`` loaded by one of the API's schemas; a refusal names the line, the field
    and, when it is a short text or number, the value refused."""
    try:
        return schema.load(body)
    except ValidationError as err:
        path, message = next(iter(flatten_messages(err.messages).items()))
        value = given_at(body, path)
        shown = f" (given: {value!r})" if value is not None else ""
        raise BadExport(f"line {number}: {path}: {message}{shown}") from None


def given_at(body: Any, path: str) -> Any:
    """The value at a dotted ``path`` of ``body``, if it is short enough to show."""
    for part in path.split("."):
        if isinstance(body, dict) and part in body:
            body = body[part]
        elif isinstance(body, list) and part.isdigit() and int(part) < len(body):
            body = body[int(part)]
        else:
            return None
    if isinstance(body, bool) or not isinstance(body, str | int | float):
        return None
    if isinstance(body, str) and not body.isprintable():
        return None  # shown escaped, it would read as something else
    return body if len(repr(body)) <= 80 else None


def read_session(
    first: dict[str, Any], agent_key: str | None, session_key: str | None, now: dt.datetime
) -> Any:
    """The session of an export's first line, checked by the API's own schema.

    Its idle clock restarts at ``now``: an import is the session's latest
    activity, so a session exported long ago is not expired as it arrives.
    """
    from storage_backends import Session

    from ..schemas import ExportedSessionSchema

    if first.get("format") != EXPORT_FORMAT or first.get("version") != EXPORT_VERSION:
        raise BadExport(
            f"line 1: not an export of this service (format {EXPORT_FORMAT}, "
            f"version {EXPORT_VERSION})"
        )
    body = first.get("session")
    if not isinstance(body, dict):
        raise BadExport("line 1: no session")
    if session_key is not None:
        body = body | {"key": check_key(session_key, "--key")}
    if agent_key is not None:
        body = body | {"agent_key": check_key(agent_key, "--agent")}
    if body.get("key") is None:
        raise BadExport("line 1: the session has no key; give one with --key")
    fields = load(ExportedSessionSchema(), body, 1)
    for name in ("created_at", "updated_at", "active_at"):
        if fields.get(name) is not None:
            check_time(fields[name], name, 1, now, body)
    if fields["created_at"] > fields["updated_at"]:
        message = f"Must not be after updated_at ({codec.format_ts(fields['updated_at'])})."
        raise time_refused(1, "created_at", message, body)
    return Session(**fields | {"active_at": now})


def read_events(
    lines: Iterator[tuple[int, str]], session_key: str, tally: list[int], now: dt.datetime
) -> Any:
    """The events of an export, checked one by one; a missing or wrong end line is an error.

    Times run forward, as the API writes a history: an event older than the one
    before it is refused, as is one outside :func:`check_time`'s bounds.

    Raising from here aborts the import's transaction: nothing is stored.
    """
    from storage_backends import Event

    from ..corridor.errors import ApiError
    from ..schemas.events import ExportedEventSchema, check_size

    schema = ExportedEventSchema()
    previous: dt.datetime | None = None
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
        loaded = load(schema, body, number)
        tally[0] += 1
        keys = {key: loaded.pop(key, None) for key in EVENT_KEYS}
        check_time(keys["created_at"], "created_at", number, now, body)
        if previous is not None and keys["created_at"] < previous:
            message = f"Must not be before the previous event's ({codec.format_ts(previous)})."
            raise time_refused(number, "created_at", message, body)
        previous = keys["created_at"]
        event = Event(
            id=keys["id"],
            session_key=session_key,
            type=keys["type"],
            # The line's own order first, then what the schema added (defaults).
            fields={k: loaded[k] for k in body if k in loaded} | loaded,
            created_at=keys["created_at"],
            hide_reason=keys["hide_reason"],
        )
        try:
            check_size(None, event)
        except ApiError as err:
            raise BadExport(f"line {number}: {err}") from None
        yield event
    raise BadExport("the file ends before its end line: it is not a whole export")


#: What a line may hold beyond the record it carries: the session line's other fields
#: beside its metadata, an event line's ``{"event": ...}`` around the event.
SESSION_LINE_EXTRA = 16 * 1024
EVENT_LINE_EXTRA = 1024


#: A byte the source's decoder could not read (its ``surrogateescape``): no UTF-8 text
#: decodes to a surrogate, so one here is a byte of the input that is not UTF-8.
_UNDECODED = re.compile("[\udc80-\udcff]").search


def bounded_lines(
    source: Any, first: tuple[int, str], rest: tuple[int, str]
) -> Iterator[tuple[int, str]]:
    """The non-blank lines of ``source`` with their numbers, each read up to its bound in
    bytes (``first`` for line 1, ``rest`` after, each with the setting it comes from): a
    longer line is refused as it is read, before it is parsed, and nothing past it is read."""
    number = 0
    while True:
        bound, setting = first if number == 0 else rest
        # Characters: a line of more than ``bound`` of them has more than ``bound`` bytes.
        text = source.readline(bound + 1)
        if not text:
            return
        number += 1
        body = text[:-1] if text.endswith("\n") else text
        if len(body) > bound or len(body.encode("utf-8", "surrogatepass")) > bound:
            raise BadExport(f"line {number}: longer than {bound} bytes ({setting}): refused unread")
        if _UNDECODED(body):
            raise BadExport(f"line {number}: not UTF-8 text")
        if body.strip():
            yield number, body


class Spool:
    """Checked events kept in a temporary file (memory holds one at a time), so that the
    input is read whole before the import takes the writer."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()
        self.count = 0

    def add(self, events: Iterable[Any]) -> None:
        for event in events:
            pickle.dump(event, self.file, protocol=pickle.HIGHEST_PROTOCOL)
            self.count += 1

    def __iter__(self) -> Iterator[Any]:
        self.file.seek(0)
        for _ in range(self.count):
            yield pickle.load(self.file)  # noqa: S301 - our own file, written just now

    def close(self) -> None:
        self.file.close()


@sessions.command("import")
@click.argument(
    "source", type=click.File("r", encoding="utf-8", errors="surrogateescape"), default="-"
)
@click.option("--agent", "agent_key", default=None, help="Import under this agent instead.")
@click.option("--key", "session_key", default=None, help="Import under this session key instead.")
@one_line_errors
def import_session(source: Any, agent_key: str | None, session_key: str | None) -> None:
    """Read an export (a file, or - for standard input) into a new session, ids kept.

    All or nothing: a bad line, a missing end line or a session key that is
    taken stores nothing. The session's idle clock restarts with the import.
    The input is read and checked whole before anything is written (a slow
    pipe never holds the writer), and a line longer than its bound is refused
    unread.
    """
    store = storage()
    config = current_app.config
    metadata, event = config["METADATA_MAX_BYTES"], config["EVENT_MAX_BYTES"]
    lines = bounded_lines(
        source,
        (metadata + SESSION_LINE_EXTRA, f"METADATA_MAX_BYTES {metadata} and the session"),
        (event + EVENT_LINE_EXTRA, f"EVENT_MAX_BYTES {event} and the line around it"),
    )
    first = next(lines, None)
    if first is None:
        raise BadExport("the input is empty")
    now = utcnow()
    session = read_session(parse_line(first[1], first[0]), agent_key, session_key, now)
    store.get_agent(agent_key=session.agent_key)
    tally = [0, 0]  # events read, end line seen
    events = read_events(lines, session.key, tally, now)
    spool = Spool()
    try:
        total = announced_count(source) if sys.stderr.isatty() else None
        with progress(events, f"importing {session.key}", total) as shown:
            spool.add(shown)
        count = store.import_session(session=session, events=iter(spool))
    except Conflict:
        raise BadExport(
            f"session {session.key} of agent {session.agent_key} exists, or the file repeats "
            "an event id: nothing imported (--key imports under another key)"
        ) from None
    finally:
        spool.close()
    if not tally[1]:  # a backend that stopped reading early
        raise BadExport("the import did not reach the end line")
    done = f"imported session {session.key} of agent {session.agent_key} with {count} events"
    if session.expires_at is not None:
        expires = codec.format_ts(session.expires_at)
        done += f"; its idle clock starts now: unless used, it expires at {expires}"
    echo(done)


# The schema
