"""The /v2 blueprint: short declarative views, one success code each.

A view says which schemas load its query and body and which shapes its answer
(:func:`endpoint`); the OpenAPI document reads the same declaration. The
corridor of a request: the request id (``http.start_request``), the key
(``auth.authenticate``), the grant (``auth.require``), the limit, the query and
body, one storage call, the answer, the contract headers (``http.contract_headers``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from flask import current_app, request
from marshmallow import Schema, ValidationError
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from storage_backends import Agent, ApiKey, Conflict, Grant, Page, Session, SessionNotFound, codec
from storage_backends.base import ANY_LAST_EVENT, HIDDEN_MANUAL, Event
from storage_backends.codec import dump_json, utcnow

from ..corridor import auth, errors, etags, http, idempotency, rate_limits, responses
from ..corridor.errors import ApiError
from ..naming import key_candidates, new_event_id
from ..observability import metrics
from ..openapi import Operation
from ..openapi.docs import docs
from ..openapi.examples import (
    AGENT,
    API_KEY_REQUEST,
    EVENT,
    EVENT_BATCH_REQUEST,
    EVENT_REQUEST,
    SESSION,
    SESSION_REQUEST,
)
from ..schemas import (
    AgentCreateSchema,
    AgentListSchema,
    AgentSchema,
    AgentUpdateSchema,
    ApiKeyCreatedSchema,
    ApiKeyCreateSchema,
    ApiKeyListSchema,
    ListQuerySchema,
    SessionCreateSchema,
    SessionListQuerySchema,
    SessionListSchema,
    SessionSchema,
    SessionUpdateSchema,
    check_metadata,
)
from ..schemas.events import (
    EventBatchSchema,
    EventCreateSchema,
    EventListQuerySchema,
    EventListSchema,
    EventSchema,
    EventsCreatedSchema,
    check_size,
    dump_event,
)

bp = http.ServiceBlueprint(http.SERVICE_BLUEPRINT, __name__)
bp.before_request(rate_limits.guard_authentication(auth.authenticate))
bp.register_blueprint(docs)
errors.register(bp)  # the API's and the docs page's, wherever the blueprint is mounted

# Statuses of a request whose query or body is refused.
BAD_INPUT = (400, 413, 415)


def service() -> Any:
    """This app's storage and limits (``app.extensions["agent_sessions"]``)."""
    return current_app._get_current_object().extensions["agent_sessions"]


def check_path(agent_key: str | None = None, session_key: str | None = None) -> None:
    """Raise the 404 the path earns, the agent's first: it comes before a 400 for the input."""
    storage = service().storage
    if agent_key is not None:
        storage.get_agent(agent_key=agent_key)
        if session_key is not None:
            storage.get_session(agent_key=agent_key, session_key=session_key, now=utcnow())


def _is_bad_input(err: Exception) -> bool:
    if isinstance(err, ValidationError):
        return True
    if isinstance(err, ApiError):
        return err.status in BAD_INPUT
    return isinstance(err, HTTPException) and err.code in BAD_INPUT


def endpoint(
    tag: str,
    status: int,
    response: type[Schema] | None = None,
    *,
    body: type[Schema] | None = None,
    query: type[Schema] | None = None,
    body_limit: str | None = None,
    authorize: Callable[[dict[str, str], dict[str, Any]], None] | None = None,
    etag: type[Schema] | None = None,
    idempotent: bool = False,
    **described: Any,
) -> Callable:
    """Declare a view: its query and body schemas (loaded into ``query=`` and ``body=``),
    the schema dumping what it returns (an object, or an object and headers; a
    Response goes out as it is) and its status.

    ``body_limit`` names the configuration key bounding the body's bytes
    (default: ``MAX_CONTENT_LENGTH``). ``authorize`` sees the path and the
    parsed body before the schema does: a permission that depends on the body
    is a 403 before any 404 or 400.

    ``etag`` is the schema of the record the path names (:mod:`.etags`): its
    answers carry the record's ``ETag``; a GET checks ``If-Match`` and
    ``If-None-Match`` against it (412, 304), and a PATCH or DELETE hands them
    to the view as ``precondition=``, for the storage to check in the write's
    own transaction. A create (POST) only answers the tag.

    ``idempotent``: a POST that creates something, which takes an
    ``Idempotency-Key`` (:mod:`.idempotency`): once its body is read and its
    permissions checked, the rest runs once per key, and retries get its answer.

    The order of refusals is the contract's: a bad query or body is a 400 only
    once the records the path names are known to exist (404 before 400), and a
    missing session of a missing agent is ``agent_not_found``.
    """
    query_schema = query() if query is not None else None
    body_schema = body() if body is not None else None
    response_schema = response() if response is not None else None
    etag_schema = etag() if etag is not None else None
    declared = Operation(
        tag,
        status,
        response,
        body=body,
        query=query,
        etag=etag is not None,
        idempotent=idempotent,
        **described,
    )

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapper(**path: str) -> Response:
            inputs: dict[str, Any] = {}
            conditions = method = raw = None
            req = request._get_current_object()  # one look through the proxy (see http.py)
            environ = req.environ
            try:
                if etag_schema is not None:
                    method = environ["REQUEST_METHOD"]
                    if method != "POST":
                        conditions = etags.Conditions.of_request(environ, etag_schema)
                    if method in ("PATCH", "DELETE"):
                        inputs["precondition"] = conditions
                if query_schema is not None:
                    inputs["query"] = query_schema.load(req.args.to_dict())
                elif environ.get("QUERY_STRING") and req.args:
                    raise ValidationError(dict.fromkeys(req.args, ["Unknown field."]))
                if body_schema is not None:
                    key = idempotency.requested(environ) if idempotent else None
                    limit = None
                    if body_limit:
                        limit = current_app._get_current_object().config[body_limit]
                    raw = http.json_object(limit, req)
                    if authorize is not None:
                        authorize(path, raw)
                    if key is not None:
                        return idempotency.remembered(
                            key, raw, functools.partial(respond, path, inputs, raw, conditions)
                        )
            except (ValidationError, ApiError, HTTPException) as err:
                if _is_bad_input(err):
                    check_path(path.get("agent_key"), path.get("session_key"))
                raise
            return respond(path, inputs, raw, conditions if method in ("GET", "HEAD") else None)

        def respond(
            path: dict[str, str],
            inputs: dict[str, Any],
            raw: Any,
            conditions: etags.Conditions | None,
        ) -> Response:
            """The view's answer, once the request is read (and, with an Idempotency-Key,
            claimed): the body loaded, the view run, its result dumped."""
            try:
                if raw is not None:
                    inputs["body"] = body_schema.load(raw)
                result = view(**path, **inputs)
            except (ValidationError, ApiError, HTTPException) as err:
                if _is_bad_input(err):
                    check_path(path.get("agent_key"), path.get("session_key"))
                raise
            except SessionNotFound:
                check_path(path.get("agent_key"))
                raise
            if response_schema is None:
                return responses.no_content()
            if isinstance(result, Response):
                return result
            obj, headers = result if isinstance(result, tuple) else (result, None)
            if etag_schema is None:
                return responses.json_response(response_schema.dump(obj), status, headers)
            data = etags.representation(response_schema.dump(obj))
            etag = etags.tag(data)
            if conditions is not None:  # a read's (a write's are the storage's to check)
                if not conditions.matches(etag):
                    return errors.precondition_failed()
                if not conditions.none_match(etag):
                    return responses.not_modified([*(headers or ()), ("ETag", etag)])
            response = responses.json_data_response(data, status, headers)
            # Added last: each header the response sets meanwhile scans those before it.
            response.headers.add("ETag", etag)
            return response

        wrapper.operation = declared  # type: ignore[attr-defined]
        return wrapper

    return decorator


def page_body(page: Page, name: str) -> dict[str, Any]:
    return {name: page.items, "metadata": {"page_key": http.encode_cursor(page.next_cursor)}}


def created(key: str) -> list[tuple[str, str]]:
    """The Location of a record just created by a POST to its collection (this request's path).

    Cheaper than ``url_for``, and it keeps whatever prefix the blueprint is mounted at.
    """
    return [("Location", f"{request._get_current_object().path}/{key}")]


def compile_filter(pattern: str) -> Any:
    """The list filter, compiled by the storage codec; a bad one is a 400."""
    try:
        return codec.compile_filter(pattern, current_app.config["FILTER_MAX_LENGTH"])
    except ValueError as err:
        raise ApiError(400, "invalid_request", f"filter: {err}") from None


# Sessions


def authorize_fork(path: dict[str, str], body: dict[str, Any]) -> None:
    """A fork reads its source: the key needs sessions:read on the source's agent."""
    source = body.get("from_session")
    if isinstance(source, dict):
        agent_key = source.get("agent_key")
        if agent_key is None:
            agent_key = path["agent_key"]
        if isinstance(agent_key, str):
            auth.check(agent_key, "sessions:read", "the source session's agent")


@bp.post("/agents/<record_key:agent_key>/sessions")
@rate_limits.creates
@auth.require("sessions:create")
@endpoint(
    "Sessions",
    201,
    SessionSchema,
    body=SessionCreateSchema,
    authorize=authorize_fork,
    statuses=(409,),
    headers=("Location",),
    etag=SessionSchema,
    idempotent=True,
    examples={"request": SESSION_REQUEST, "response": SESSION},
    errors={
        403: "`forbidden`: the key lacks sessions:create on this agent, or (with "
        "`from_session`) sessions:read on the source session's agent.",
        404: "`agent_not_found`: no agent has this key. With `from_session`: "
        "`session_not_found` (no such source session) or `event_not_found` (an anchor "
        "that is not among the source's visible events).",
    },
)
def create_session(agent_key: str, body: dict[str, Any]) -> Any:
    """Create a session, or fork one (``from_session``)."""
    now = utcnow()
    key = body.pop("key", None)
    source = body.pop("from_session", None)
    session = Session(agent_key=agent_key, key=key or "", created_at=now, updated_at=now, **body)
    extension = service()
    if source is not None:
        create = functools.partial(fork, source=source, now=now)
    else:
        create = extension.storage.create_session
    if key is not None:
        session = create(session=session)
    else:
        session = create_with_generated_key(session, create)
    metrics.session_created(extension.metrics)
    return session, created(session.key)


def fork(*, session: Session, source: dict[str, Any], now: Any) -> Session:
    """Create ``session`` with a copy of the source's visible history."""
    compaction = None
    if "compact_up_to_event_id" in source:
        compaction = compaction_event(session.key, source["summary_text"], now)
    return service().storage.fork_session(
        session=session,
        source_agent_key=source.get("agent_key", session.agent_key),
        source_session_key=source["session_key"],
        include_up_to_event_id=source.get("include_up_to_event_id"),
        compact_up_to_event_id=source.get("compact_up_to_event_id"),
        compaction=compaction,
    )


def create_with_generated_key(session: Session, create: Callable[..., Session]) -> Session:
    for candidate in key_candidates(session.name):
        session.key = candidate
        try:
            return create(session=session)
        except Conflict:
            continue
    raise ApiError(409, "conflict", "Could not generate a free key; supply one.")


@bp.get("/agents/<record_key:agent_key>/sessions")
@rate_limits.per_key
@auth.require("sessions:read")
@endpoint(
    "Sessions",
    200,
    SessionListSchema,
    query=SessionListQuerySchema,
    examples={"response": {"sessions": [SESSION], "metadata": {}}},
)
def list_sessions(agent_key: str, query: dict[str, Any]) -> Any:
    """List the agent's sessions, a page at a time."""
    pattern = query.pop("filter", None)
    if pattern is not None:
        query["matches"] = compile_filter(pattern)
    page = service().storage.list_sessions(agent_key=agent_key, now=utcnow(), **query)
    if not page.items:
        check_path(agent_key)  # an empty page, or no such agent
    return page_body(page, "sessions")


@bp.get("/agents/<record_key:agent_key>/sessions/<record_key:session_key>")
@rate_limits.per_key
@auth.require("sessions:read")
@endpoint("Sessions", 200, SessionSchema, etag=SessionSchema, examples={"response": SESSION})
def get_session(agent_key: str, session_key: str) -> Any:
    """Read one session."""
    return service().storage.get_session(agent_key=agent_key, session_key=session_key, now=utcnow())


@bp.patch("/agents/<record_key:agent_key>/sessions/<record_key:session_key>")
@rate_limits.per_key
@auth.require("sessions:update")
@endpoint(
    "Sessions",
    200,
    SessionSchema,
    body=SessionUpdateSchema,
    etag=SessionSchema,
    examples={"request": {"enabled": False}, "response": SESSION | {"enabled": False}},
)
def update_session(
    agent_key: str, session_key: str, body: dict[str, Any], precondition: Any
) -> Any:
    """Change some fields of a session."""
    return service().storage.update_session(
        agent_key=agent_key,
        session_key=session_key,
        changes=body,
        now=utcnow(),
        precondition=precondition,
    )


@bp.delete("/agents/<record_key:agent_key>/sessions/<record_key:session_key>")
@rate_limits.per_key
@auth.require("sessions:delete")
@endpoint("Sessions", 204, etag=SessionSchema)
def delete_session(agent_key: str, session_key: str, precondition: Any) -> None:
    """Delete a session."""
    service().storage.delete_session(
        agent_key=agent_key, session_key=session_key, now=utcnow(), precondition=precondition
    )


# Session events

EVENTS_PATH = "/agents/<record_key:agent_key>/sessions/<record_key:session_key>/events"
EVENT_PATH = EVENTS_PATH + "/<event_id:event_id>"

WRITE_CONFLICTS = {
    409: "`session_disabled`: the session's `enabled` is false; it takes no new events.",
}
BATCH_CONFLICTS = {
    409: "`conflict`: an event id the session already has (or twice in the batch), or an "
    "`if_last_event_id` that no longer names the session's last event; nothing is written. "
    "`session_disabled`: the session's `enabled` is false; it takes no new events.",
    413: "`payload_too_large`: the body is over {events_max_body} bytes, or an event "
    "serializes to more than {event_max_bytes}.",
}
EVENT_NOT_FOUND = {
    404: "`agent_not_found`, `session_not_found`, or `event_not_found`: the session has no "
    "event with this id; `not_found`: the path does not name a route.",
}


def compaction_event(session_key: str, summary_text: str, now: Any) -> Event:
    """A compaction event to write (the backend counts what it hid). Its summary is the
    event itself, so its ``summary_key`` is its id."""
    event_id = new_event_id()
    return Event(
        id=event_id,
        session_key=session_key,
        type="compaction",
        fields={"summary_text": summary_text, "summary_key": event_id},
        created_at=now,
    )


def event_stream(events: list[Event]) -> Response:
    """The events as server-sent events, each on one ``data:`` line, then ``{"type": "end"}``."""
    lines = [f"data: {dump_json(dump_event(event))}\n\n" for event in events]
    lines.append('data: {"type":"end"}\n\n')
    return current_app.response_class("".join(lines), 201, mimetype="text/event-stream")


def authorize_event_write(path: dict[str, str], body: dict[str, Any]) -> None:
    """A user's input needs events:create; a compaction, what the agent runtime writes,
    events:append."""
    kind = body.get("type")
    if kind == "input_message":
        auth.check(path["agent_key"], "events:create")
    elif kind == "compact":
        auth.check(path["agent_key"], "events:append")


@bp.get(EVENTS_PATH)
@rate_limits.per_key
@auth.require("sessions:read")
@endpoint(
    "Events",
    200,
    EventListSchema,
    query=EventListQuerySchema,
    examples={"response": {"events": [EVENT], "metadata": {}}},
)
def list_events(agent_key: str, session_key: str, query: dict[str, Any]) -> Any:
    """List the session's events, a page at a time."""
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
    page = service().storage.list_events(
        agent_key=agent_key,
        session_key=session_key,
        now=utcnow(),
        descending=descending,
        **query,
    )
    cursor = http.encode_scoped_cursor(page.next_cursor, scope=scope, descending=descending)
    return {"events": page.items, "metadata": {"page_key": cursor}}


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
        403: "`forbidden`: the key lacks `events:create` (for `input_message`) or "
        "`events:append` (for `compact`) on this agent.",
        404: "`agent_not_found`, `session_not_found`; on compact, `event_not_found`: "
        "`compact_up_to_event_id` is not among the session's events.",
        **WRITE_CONFLICTS,
        413: "`payload_too_large`: the body, or the event, is over {event_max_bytes} bytes.",
    },
)
def create_event(agent_key: str, session_key: str, body: dict[str, Any]) -> Any:
    """Add a user's input to the session, or compact its history."""
    now = utcnow()
    storage = service().storage
    if body["type"] == "compact":
        compaction = compaction_event(session_key, body["summary_text"], now)
        check_size(None, compaction)
        written = storage.compact_events(
            agent_key=agent_key,
            session_key=session_key,
            up_to_event_id=body.get("compact_up_to_event_id"),
            compaction=compaction,
            now=now,
        )
    else:
        written = Event(
            id=new_event_id(),
            session_key=session_key,
            type="input_message",
            fields={"messages": body["messages"]},
            created_at=now,
        )
        check_size(None, written)
        storage.append_events(
            agent_key=agent_key, session_key=session_key, events=[written], now=now
        )
    metrics.events_written(1)
    if body["stream_response"]:
        return event_stream([written])
    return {"events": [written], "session_key": session_key}


@bp.post(EVENTS_PATH + "/batch")
@rate_limits.per_key
@auth.require("events:append")
@endpoint(
    "Events",
    201,
    EventsCreatedSchema,
    body=EventBatchSchema,
    body_limit="EVENTS_MAX_CONTENT_LENGTH",
    idempotent=True,
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
            fields=item,
            created_at=now,
        )
        check_size(index, event)
        events.append(event)
    service().storage.append_events(
        agent_key=agent_key,
        session_key=session_key,
        events=events,
        now=now,
        if_last_event_id=body.get("if_last_event_id", ANY_LAST_EVENT),
        metadata_patch=body.get("metadata_patch"),
        check_metadata=check_patched_metadata if "metadata_patch" in body else None,
    )
    metrics.events_written(len(events))
    return {"events": events, "session_key": session_key}


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


# Agents (admin)


@bp.post("/agents")
@rate_limits.per_admin_key
@auth.require_admin
@endpoint(
    "Agents",
    201,
    AgentSchema,
    body=AgentCreateSchema,
    statuses=(409,),
    idempotent=True,
    headers=("Location",),
    etag=AgentSchema,
    examples={
        "request": {k: AGENT[k] for k in ("key", "name", "description")},
        "response": AGENT,
    },
)
def create_agent(body: dict[str, Any]) -> Any:
    """Create an agent."""
    now = utcnow()
    agent = service().storage.create_agent(agent=Agent(created_at=now, updated_at=now, **body))
    return agent, created(agent.key)


@bp.get("/agents")
@rate_limits.per_admin_key
@auth.require_admin
@endpoint("Agents", 200, AgentListSchema, query=ListQuerySchema)
def list_agents(query: dict[str, Any]) -> Any:
    """List agents."""
    return page_body(service().storage.list_agents(**query), "agents")


@bp.get("/agents/<record_key:agent_key>")
@rate_limits.per_admin_key
@auth.require_admin
@endpoint("Agents", 200, AgentSchema, etag=AgentSchema, examples={"response": AGENT})
def get_agent(agent_key: str) -> Any:
    """Read one agent."""
    return service().storage.get_agent(agent_key=agent_key)


@bp.patch("/agents/<record_key:agent_key>")
@rate_limits.per_admin_key
@auth.require_admin
@endpoint("Agents", 200, AgentSchema, body=AgentUpdateSchema, etag=AgentSchema)
def update_agent(agent_key: str, body: dict[str, Any], precondition: Any) -> Any:
    """Change some fields of an agent."""
    return service().storage.update_agent(
        agent_key=agent_key, changes=body, now=utcnow(), precondition=precondition
    )


@bp.delete("/agents/<record_key:agent_key>")
@rate_limits.per_admin_key
@auth.require_admin
@endpoint("Agents", 204, etag=AgentSchema)
def delete_agent(agent_key: str, precondition: Any) -> None:
    """Delete an agent and all its sessions."""
    service().storage.delete_agent(agent_key=agent_key, precondition=precondition)
    service().key_cache.clear()  # its grants ended: this worker sees that at once


# API keys (admin)


@bp.post("/api_keys")
@rate_limits.per_admin_key
@auth.require_admin
@endpoint(
    "API keys",
    201,
    ApiKeyCreatedSchema,
    body=ApiKeyCreateSchema,
    examples={"request": API_KEY_REQUEST},
)
def create_api_key(body: dict[str, Any]) -> Any:
    """Create an API key; its secret appears in this response only."""
    if idempotency.ENVIRON_KEY in request.environ:
        # A replay would show the secret twice; a retry that must not make a second
        # key looks for the first by name (GET /api_keys) instead.
        raise ApiError(
            400,
            "invalid_request",
            f"{idempotency.HEADER}: not taken here: a key's secret is shown once only.",
        )
    body["grants"] = [Grant(grant["agent"], tuple(grant["scopes"])) for grant in body["grants"]]
    key, token = auth.new_api_key(**body)
    return NewApiKey(**vars(key), secret=token)


@dataclasses.dataclass
class NewApiKey(ApiKey):
    """A key just made, with its token: the one answer that shows it."""

    secret: str = ""


@bp.get("/api_keys")
@rate_limits.per_admin_key
@auth.require_admin
@endpoint("API keys", 200, ApiKeyListSchema, query=ListQuerySchema)
def list_api_keys(query: dict[str, Any]) -> Any:
    """List API keys (never their secrets)."""
    return page_body(service().storage.list_api_keys(**query), "api_keys")


@bp.delete("/api_keys/<api_key_id:key_id>")
@rate_limits.per_admin_key
@auth.require_admin
@endpoint("API keys", 204)
def revoke_api_key(key_id: str) -> None:
    """Revoke an API key."""
    service().storage.revoke_api_key(key_id=key_id, now=utcnow())
    service().key_cache.forget(key_id)  # this worker sees the revocation at once
