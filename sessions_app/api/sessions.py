"""The session views: create (new, with a generated key, or forked), list, get, update, delete."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import request

from storage_backends import Conflict, Session
from storage_backends.codec import utcnow

from ..corridor import auth, rate_limits
from ..corridor.errors import ApiError
from ..naming import key_candidates
from ..observability import metrics
from ..openapi.examples import (
    SESSION,
    SESSION_REQUEST,
)
from ..schemas import (
    SessionCreateSchema,
    SessionListQuerySchema,
    SessionListSchema,
    SessionSchema,
    SessionUpdateSchema,
)
from .endpoint import (
    bp,
    check_compaction,
    check_path,
    compaction_event,
    compile_filter,
    created,
    endpoint,
    page_body,
    service,
)


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
        check_compaction=check_compaction("from_session.summary_text"),
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
    args = request.args
    twice = [
        name for name in query.get("metadata", ()) if len(args.getlist(f"metadata.{name}")) > 1
    ]
    if twice:
        name = f"metadata.{twice[0]}"[:200]
        message = "Given twice; give each metadata key once."
        raise ApiError(400, "invalid_request", f"{name}: {message}", field_errors={name: message})
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
    statuses=(409,),
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
