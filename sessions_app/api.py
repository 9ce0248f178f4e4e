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
from storage_backends.codec import utcnow

from . import auth, errors, http, metrics, rate_limits
from .errors import ApiError
from .naming import key_candidates
from .openapi import Operation
from .openapi.docs import docs
from .openapi.examples import AGENT, API_KEY_REQUEST, SESSION, SESSION_REQUEST
from .schemas import (
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
)

bp = http.ServiceBlueprint(http.SERVICE_BLUEPRINT, __name__)
bp.before_request(rate_limits.guard_authentication(auth.authenticate))
bp.register_blueprint(docs)
errors.register(bp)  # the API's and the docs page's, wherever the blueprint is mounted

# Statuses of a request whose query or body is refused.
BAD_INPUT = (400, 413, 415)


def service() -> Any:
    """This app's storage and limits (``app.extensions["agent_sessions"]``)."""
    return current_app.extensions["agent_sessions"]


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
    **described: Any,
) -> Callable:
    """Declare a view: its query and body schemas (loaded into ``query=`` and ``body=``),
    the schema dumping what it returns (an object, or an object and headers) and its status.

    The order of refusals is the contract's: a bad query or body is a 400 only
    once the records the path names are known to exist (404 before 400), and a
    missing session of a missing agent is ``agent_not_found``.
    """
    query_schema = query() if query is not None else None
    body_schema = body() if body is not None else None
    response_schema = response() if response is not None else None
    declared = Operation(tag, status, response, body=body, query=query, **described)

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapper(**path: str) -> Response:
            inputs: dict[str, Any] = {}
            try:
                if query_schema is not None:
                    inputs["query"] = query_schema.load(request.args.to_dict())
                elif request.args:
                    raise ValidationError(dict.fromkeys(request.args, ["Unknown field."]))
                if body_schema is not None:
                    inputs["body"] = body_schema.load(http.json_object())
                result = view(**path, **inputs)
            except (ValidationError, ApiError, HTTPException) as err:
                if _is_bad_input(err):
                    check_path(path.get("agent_key"), path.get("session_key"))
                raise
            except SessionNotFound:
                check_path(path.get("agent_key"))
                raise
            if response_schema is None:
                return http.no_content()
            obj, headers = result if isinstance(result, tuple) else (result, None)
            return http.json_response(response_schema.dump(obj), status, headers)

        wrapper.operation = declared  # type: ignore[attr-defined]
        return wrapper

    return decorator


def page_body(page: Page, name: str) -> dict[str, Any]:
    return {name: page.items, "metadata": {"page_key": http.encode_cursor(page.next_cursor)}}


def created(key: str) -> list[tuple[str, str]]:
    """The Location of a record just created by a POST to its collection (this request's path).

    Cheaper than ``url_for``, and it keeps whatever prefix the blueprint is mounted at.
    """
    return [("Location", f"{request.path}/{key}")]


def compile_filter(pattern: str) -> Any:
    """The list filter, compiled by the storage codec; a bad one is a 400."""
    try:
        return codec.compile_filter(pattern, current_app.config["FILTER_MAX_LENGTH"])
    except ValueError as err:
        raise ApiError(400, "invalid_request", f"filter: {err}") from None


# Sessions


@bp.post("/agents/<record_key:agent_key>/sessions")
@rate_limits.creates
@auth.require("sessions:create")
@endpoint(
    "Sessions",
    201,
    SessionSchema,
    body=SessionCreateSchema,
    statuses=(409,),
    headers=("Location",),
    examples={"request": SESSION_REQUEST, "response": SESSION},
)
def create_session(agent_key: str, body: dict[str, Any]) -> Any:
    """Create a session."""
    now = utcnow()
    key = body.pop("key", None)
    session = Session(agent_key=agent_key, key=key or "", created_at=now, updated_at=now, **body)
    if key is not None:
        session = service().storage.create_session(session=session)
    else:
        session = create_with_generated_key(session)
    metrics.session_created()
    return session, created(session.key)


def create_with_generated_key(session: Session) -> Session:
    storage = service().storage
    for candidate in key_candidates(session.name):
        session.key = candidate
        try:
            return storage.create_session(session=session)
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
@endpoint("Sessions", 200, SessionSchema, examples={"response": SESSION})
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
    examples={"request": {"enabled": False}, "response": SESSION | {"enabled": False}},
)
def update_session(agent_key: str, session_key: str, body: dict[str, Any]) -> Any:
    """Change some fields of a session."""
    return service().storage.update_session(
        agent_key=agent_key, session_key=session_key, changes=body, now=utcnow()
    )


@bp.delete("/agents/<record_key:agent_key>/sessions/<record_key:session_key>")
@rate_limits.per_key
@auth.require("sessions:delete")
@endpoint("Sessions", 204)
def delete_session(agent_key: str, session_key: str) -> None:
    """Delete a session."""
    service().storage.delete_session(agent_key=agent_key, session_key=session_key, now=utcnow())


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
    headers=("Location",),
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
@endpoint("Agents", 200, AgentSchema, examples={"response": AGENT})
def get_agent(agent_key: str) -> Any:
    """Read one agent."""
    return service().storage.get_agent(agent_key=agent_key)


@bp.patch("/agents/<record_key:agent_key>")
@rate_limits.per_admin_key
@auth.require_admin
@endpoint("Agents", 200, AgentSchema, body=AgentUpdateSchema)
def update_agent(agent_key: str, body: dict[str, Any]) -> Any:
    """Change some fields of an agent."""
    return service().storage.update_agent(agent_key=agent_key, changes=body, now=utcnow())


@bp.delete("/agents/<record_key:agent_key>")
@rate_limits.per_admin_key
@auth.require_admin
@endpoint("Agents", 204)
def delete_agent(agent_key: str) -> None:
    """Delete an agent and all its sessions."""
    service().storage.delete_agent(agent_key=agent_key)


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
