"""The event views: list, get, create, append a batch, hide, unhide, delete; a stream on request."""

from __future__ import annotations

import functools
from typing import Any

from flask import current_app
from marshmallow import ValidationError
from werkzeug.wrappers import Response

from storage_backends.base import ANY_LAST_EVENT, HIDDEN_MANUAL, Event, Session
from storage_backends.codec import dump_json, utcnow

from ..corridor import auth, http, rate_limits, responses
from ..corridor.errors import ApiError
from ..naming import new_event_id
from ..observability import metrics
from ..openapi.examples import (
    EVENT,
    EVENT_BATCH_REQUEST,
    EVENT_REQUEST,
)
from ..schemas import (
    check_metadata,
)
from ..schemas.events import (
    SINCE_MAX_EVENTS,
    SINCE_START,
    EventBatchSchema,
    EventCreateSchema,
    EventPopSchema,
    EventSchema,
    EventsCreatedSchema,
    EventsPoppedSchema,
    check_size,
    dump_event,
    events_bytes,
    events_within,
)
from ..schemas.state import EventPageQuerySchema, EventPageSchema
from .endpoint import bp, check_compaction, compaction_event, endpoint, service
from .state import check_state

EVENTS_PATH = "/agents/<record_key:agent_key>/sessions/<record_key:session_key>/events"
EVENT_PATH = EVENTS_PATH + "/<event_id:event_id>"

WRITE_CONFLICTS = {
    409: "`session_disabled`: the session's `enabled` is false; it takes no new events. "
    "`quota_exceeded`: the write would pass a storage quota; nothing is written.",
}
BATCH_CONFLICTS = {
    403: "`forbidden`: the key lacks `events:append` on this agent, or (with "
    "`create_session`) `sessions:create`.",
    404: "`agent_not_found`; `session_not_found` unless `create_session` is given.",
    409: "`conflict`: an event id the session already has (or twice in the batch), or an "
    "`if_last_event_id` that no longer names the session's last event; nothing is written. "
    "`session_disabled`: the session's `enabled` is false; it takes no new events. With "
    "`create_session`, `agent_disabled`: the agent takes no new sessions; with its "
    "`exclusive`, `conflict`: the session exists. "
    "`quota_exceeded`: the write would pass a storage quota.",
    413: "`payload_too_large`: the body is over {events_max_body} bytes, or an event "
    "serializes to more than {event_max_bytes}.",
}
EVENT_NOT_FOUND = {
    404: "`agent_not_found`, `session_not_found`, or `event_not_found`: the session has no "
    "event with this id; `not_found`: the path does not name a route.",
}


def event_stream(events: list[Event]) -> Response:
    """The events as server-sent events, each on one ``data:`` line, then ``{"type": "end"}``."""
    lines = [f"data: {dump_json(dump_event(event))}\n\n" for event in events]
    lines.append('data: {"type":"end"}\n\n')
    return current_app.response_class("".join(lines), 201, mimetype="text/event-stream")


def authorize_batch(path: dict[str, str], body: dict[str, Any]) -> None:
    """A batch that may create its session needs sessions:create too."""
    if body.get("create_session") is not None:
        auth.check(path["agent_key"], "sessions:create")


def authorize_event_write(path: dict[str, str], body: dict[str, Any]) -> None:
    """A user's input or interruption needs events:create; a compaction, what the agent
    runtime writes, events:append."""
    kind = body.get("type")
    if kind in ("input_message", "interrupt"):
        auth.check(path["agent_key"], "events:create")
    elif kind == "compact":
        auth.check(path["agent_key"], "events:append")


#: How many times EVENTS_PAGE_MAX_BYTES a page of events may read before it is cut.
READ_AHEAD = 8


@bp.get(EVENTS_PATH)
@rate_limits.per_key
@auth.require("sessions:read")
@endpoint(
    "Events",
    200,
    EventPageSchema,
    query=EventPageQuerySchema,
    examples={"response": {"events": [EVENT], "metadata": {}}},
)
def list_events(agent_key: str, session_key: str, query: dict[str, Any]) -> Any:
    """List the session's events, a page at a time."""
    with_session = query.pop("include_session")
    state_keys = query.pop("include_state", None)
    descending = query.pop("order") == "desc"
    scope = f"{agent_key}/{session_key}"
    page_key = query.pop("page_key", None)
    if page_key is not None:
        try:
            query["after"] = http.decode_scoped_cursor(page_key, scope=scope, descending=descending)
        except ValueError:
            raise ApiError(
                400,
                "invalid_request",
                "page_key: Not a page key of this list in this order.",
                field_errors={"page_key": "Not a page key of this list in this order."},
            ) from None
    limit = query.pop("limit")
    read = functools.partial(
        service().storage.list_events,
        agent_key=agent_key,
        session_key=session_key,
        now=utcnow(),
        descending=descending,
        **query,
    )
    budget = current_app.config["EVENTS_PAGE_MAX_BYTES"]
    # A page that could read far more than the bound (1,000 events of EVENT_MAX_BYTES are
    # 256 MiB) has the storage read its sizes first, then no more events than the bound
    # holds and the one past it; a short page (the default 10) is read at once.
    could_read = limit * current_app.config["EVENT_MAX_BYTES"]
    page = read(limit=limit, max_bytes=budget if could_read > READ_AHEAD * budget else None)
    # The page is encoded once, and its events measured in its text: most pages fit.
    answer, text = _answer(page, scope, descending)
    if events_bytes(text, answer) > budget:
        fit = events_within(answer["events"], budget)
        if fit < len(page.items):  # (a page of one event over the bound is answered whole)
            page = read(limit=fit)  # the shorter page again: its events and its cursor in one read
            answer, text = _answer(page, scope, descending)
    if not with_session and state_keys is None:
        return responses.json_text_response(text)
    # Read after the events: a write between the reads shows in the session (its metadata,
    # the newer), so a runtime that takes the page's newest event as the history's last
    # and writes with if_last_event_id is refused rather than acting on an older state.
    if with_session:
        answer["session"] = service().storage.get_session(
            agent_key=agent_key, session_key=session_key, now=utcnow()
        )
    if state_keys is not None:
        answer["state"] = service().storage.get_state(agent_key=agent_key, keys=state_keys)
    return answer  # its events already dumped, which the schema answers as they are


def _answer(page: Any, scope: str, descending: bool) -> tuple[dict[str, Any], str]:
    """A page of events dumped as :class:`EventPageSchema` answers it, and its JSON."""
    cursor = http.encode_scoped_cursor(page.next_cursor, scope=scope, descending=descending)
    answer = _EVENT_PAGE.dump({"events": page.items, "metadata": {"page_key": cursor}})
    return answer, dump_json(answer)


_EVENT_PAGE = EventPageSchema()


@bp.get(EVENT_PATH)
@rate_limits.per_key
@auth.require("sessions:read")
@endpoint("Events", 200, EventSchema, examples={"response": EVENT}, errors=EVENT_NOT_FOUND)
def get_event(agent_key: str, session_key: str, event_id: str) -> Any:
    """Read one event, hidden or not."""
    return service().storage.get_event(
        agent_key=agent_key, session_key=session_key, event_id=event_id, now=utcnow()
    )


@bp.post(EVENTS_PATH)
@rate_limits.per_key
@auth.require("events:create", "events:append")
@endpoint(
    "Events",
    201,
    EventsCreatedSchema,
    body=EventCreateSchema,
    body_limit="EVENT_MAX_BYTES",
    authorize=authorize_event_write,
    idempotent=True,
    stream=True,
    examples={
        "request": EVENT_REQUEST,
        "response": {"events": [EVENT], "session_key": EVENT["session_key"]},
    },
    errors={
        400: "`invalid_request`: a missing or malformed field, a body that is not a JSON "
        "object, bad JSON, an unknown field or `type`; or a `since` that more than "
        f"{SINCE_MAX_EVENTS} visible events would follow (nothing is written).",
        403: "`forbidden`: the key lacks `events:create` (for `input_message` and "
        "`interrupt`) or `events:append` (for `compact`) on this agent.",
        404: "`agent_not_found`, `session_not_found`; `event_not_found`: the "
        "`compact_up_to_event_id` of a compact, or the `since` of an input, is not among "
        "the session's events.",
        **WRITE_CONFLICTS,
        413: "`payload_too_large`: the body, or the event, is over {event_max_bytes} bytes.",
    },
)
def create_event(agent_key: str, session_key: str, body: dict[str, Any]) -> Any:
    """Add a user's input or interruption to the session, or compact its history."""
    now = utcnow()
    storage = service().storage
    answer = None
    if body["type"] == "compact":
        written = storage.compact_events(
            agent_key=agent_key,
            session_key=session_key,
            up_to_event_id=body.get("compact_up_to_event_id"),
            compaction=compaction_event(session_key, body["summary_text"], now),
            now=now,
            check_compaction=check_compaction("summary_text"),
        )
    else:
        if body["type"] == "interrupt":
            kind, fields = "session_interrupted", event_fields(body)
        else:
            kind = "input_message"
            names = [name for name in ("messages", "behavior") if name in body]
            fields = event_fields(body, *names)
        written = Event(
            id=new_event_id(), session_key=session_key, type=kind, fields=fields, created_at=now
        )
        check_size(None, written)
        since = body.get("since")
        if since is None:
            storage.append_events(
                agent_key=agent_key, session_key=session_key, events=[written], now=now
            )
        else:
            answer = storage.append_events_since(
                agent_key=agent_key,
                session_key=session_key,
                events=[written],
                now=now,
                since=None if since == SINCE_START else since,
                limit=SINCE_MAX_EVENTS,
                max_bytes=current_app.config["EVENTS_PAGE_MAX_BYTES"],
            )
    metrics.events_written(1)
    events = [written] if answer is None else answer
    if body["stream_response"]:
        return event_stream(events)
    return {"events": events, "session_key": session_key}


@bp.post(EVENTS_PATH + "/batch")
@rate_limits.per_key
@auth.require("events:append")
@endpoint(
    "Events",
    201,
    EventsCreatedSchema,
    body=EventBatchSchema,
    body_limit="EVENTS_MAX_CONTENT_LENGTH",
    authorize=authorize_batch,
    idempotent=True,
    creates_session=lambda body: body.get("create_session") is not None,
    examples={
        "request": EVENT_BATCH_REQUEST,
        "response": {"events": [EVENT], "session_key": EVENT["session_key"]},
    },
    errors=BATCH_CONFLICTS,
)
def append_events(agent_key: str, session_key: str, body: dict[str, Any]) -> Any:
    """Append what the agent did to the session's history, all or nothing."""
    now = utcnow()
    events = []
    for index, item in enumerate(body["events"]):
        kind = item.pop("type")
        event = Event(
            id=item.pop("id", None) or new_event_id(),
            session_key=session_key,
            type=kind,
            fields=event_fields(item, *(name for name in item if name != "metadata")),
            created_at=now,
        )
        check_size(index, event)
        events.append(event)
    create, exclusive = None, False
    if "create_session" in body:
        exclusive = body["create_session"].pop("exclusive", False)
        create = Session(
            key=session_key,
            agent_key=agent_key,
            created_at=now,
            updated_at=now,
            **body["create_session"],
        )
    service().storage.append_events(
        agent_key=agent_key,
        session_key=session_key,
        events=events,
        now=now,
        if_last_event_id=body.get("if_last_event_id", ANY_LAST_EVENT),
        metadata_patch=body.get("metadata_patch"),
        check_metadata=check_patched_metadata if "metadata_patch" in body else None,
        create=create,
        create_exclusive=exclusive,
        state_patch=body.get("state_patch"),
        check_state=check_state,
    )
    metrics.events_written(len(events))
    return {"events": events, "session_key": session_key}


@bp.post(EVENTS_PATH + "/pop")
@rate_limits.per_key
@auth.require("sessions:delete")
@endpoint(
    "Events",
    200,
    EventsPoppedSchema,
    body=EventPopSchema,
    idempotent=True,
    examples={
        "request": {"if_last_event_id": EVENT["id"]},
        "response": {"events": [EVENT], "session_key": EVENT["session_key"]},
    },
    errors={
        409: "`conflict`: `if_last_event_id` no longer names the session's newest event (or "
        "the history is empty); nothing is deleted.",
    },
)
def pop_event(agent_key: str, session_key: str, body: dict[str, Any]) -> Any:
    """Delete the session's newest event and answer it, in one step (beyond Vectara)."""
    popped = service().storage.pop_event(
        agent_key=agent_key,
        session_key=session_key,
        now=utcnow(),
        if_last_event_id=body.get("if_last_event_id", ANY_LAST_EVENT),
    )
    return {"events": [] if popped is None else [popped], "session_key": session_key}


def event_fields(body: dict[str, Any], *names: str) -> dict[str, Any]:
    """The stored fields of an event: its type's ``names`` from ``body``, then its
    ``metadata`` when one was sent (answered last, after the type's own)."""
    fields = {name: body[name] for name in names}
    if "metadata" in body:
        fields["metadata"] = body["metadata"]
    return fields


def check_patched_metadata(metadata: dict[str, Any]) -> None:
    """The session's metadata once patched must keep the metadata bounds (else nothing is
    written)."""
    try:
        check_metadata(metadata)
    except ValidationError as err:
        message = " ".join(err.messages) if isinstance(err.messages, list) else str(err.messages)
        raise ApiError(
            400,
            "invalid_metadata",
            f"metadata_patch: the patched metadata is out of bounds: {message}",
            field_errors={"metadata_patch": message},
        ) from None


@bp.delete(EVENTS_PATH)
@rate_limits.per_key
@auth.require("sessions:delete")
@endpoint("Events", 204)
def clear_events(agent_key: str, session_key: str) -> None:
    """Empty the session's history and keep the session (beyond Vectara)."""
    service().storage.clear_events(agent_key=agent_key, session_key=session_key, now=utcnow())


@bp.post(EVENT_PATH + "/hide")
@rate_limits.per_key
@auth.require("sessions:update")
@endpoint("Events", 200, EventSchema, errors=EVENT_NOT_FOUND)
def hide_event(agent_key: str, session_key: str, event_id: str) -> Any:
    """Hide an event from lists (``hide_reason: manual``)."""
    return service().storage.set_event_hidden(
        agent_key=agent_key,
        session_key=session_key,
        event_id=event_id,
        hide_reason=HIDDEN_MANUAL,
        now=utcnow(),
    )


@bp.post(EVENT_PATH + "/unhide")
@rate_limits.per_key
@auth.require("sessions:update")
@endpoint("Events", 200, EventSchema, errors=EVENT_NOT_FOUND)
def unhide_event(agent_key: str, session_key: str, event_id: str) -> Any:
    """Show a hidden event in lists again."""
    return service().storage.set_event_hidden(
        agent_key=agent_key,
        session_key=session_key,
        event_id=event_id,
        hide_reason=None,
        now=utcnow(),
    )


@bp.delete(EVENT_PATH)
@rate_limits.per_key
@auth.require("sessions:delete")
@endpoint("Events", 204, errors=EVENT_NOT_FOUND)
def delete_event(agent_key: str, session_key: str, event_id: str) -> None:
    """Delete an event from the session's history."""
    service().storage.delete_event(
        agent_key=agent_key, session_key=session_key, event_id=event_id, now=utcnow()
    )
