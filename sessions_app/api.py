"""The /v2 blueprint: short views, one success code each."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from flask import Blueprint, current_app, g, request
from werkzeug.wrappers import Response

from storage_backends import (
    Agent,
    Conflict,
    Grant,
    Page,
    Session,
    SessionNotFound,
    codec,
)
from storage_backends.codec import utcnow

from . import auth, body, errors, limits
from .errors import ApiError
from .naming import key_candidates
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

bp = Blueprint("agent_sessions", __name__)
bp.before_request(auth.authenticate)
errors.register(bp)

session_schema = SessionSchema()
session_create_schema = SessionCreateSchema()
session_update_schema = SessionUpdateSchema()
session_list_schema = SessionListSchema()
session_list_query_schema = SessionListQuerySchema()
agent_schema = AgentSchema()
agent_create_schema = AgentCreateSchema()
agent_update_schema = AgentUpdateSchema()
agent_list_schema = AgentListSchema()
list_query_schema = ListQuerySchema()
api_key_created_schema = ApiKeyCreatedSchema()
api_key_create_schema = ApiKeyCreateSchema()
api_key_list_schema = ApiKeyListSchema()


@bp.after_request
def finish(response: Response) -> Response:
    """Headers every API response carries (none of them is set anywhere else)."""
    response.headers.extend(
        [
            ("X-Request-ID", errors.request_id()),
            ("X-Content-Type-Options", "nosniff"),
            ("Cache-Control", "no-store"),
            *limits.headers(),
        ]
    )
    return response


def state() -> Any:
    return current_app.extensions["agent_sessions"]


def respond(schema: Any, obj: Any, status: int = 200, headers: Any = None) -> Response:
    return errors.json_response(schema.dump(obj), status, headers)


def no_content() -> Response:
    return current_app.response_class(status=204)


def encode_cursor(position: int | None) -> str | None:
    if position is None:
        return None
    return base64.urlsafe_b64encode(f"v1:{position}".encode()).decode().rstrip("=")


# Positions are 64-bit signed integers in every backend: larger ones never exist.
MAX_POSITION = 2**63 - 1


def decode_cursor(page_key: str | None) -> int | None:
    if page_key is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(page_key + "=" * (-len(page_key) % 4)).decode()
        version, _, position = raw.partition(":")
        if version != "v1" or not position.isdigit() or int(position) > MAX_POSITION:
            raise ValueError(raw)
        return int(position)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "invalid_request", "page_key: Not a valid page key.") from None


def list_query(schema: Any) -> dict[str, Any]:
    query = schema.load(request.args.to_dict())
    query["after"] = decode_cursor(query.pop("page_key", None))
    return query


def page_body(page: Page, name: str) -> dict[str, Any]:
    return {name: page.items, "metadata": {"page_key": encode_cursor(page.next_cursor)}}


def member_url(key: str) -> str:
    """The URL of a resource just created by a POST to its collection (this request's path).

    Cheaper than ``url_for``, and it keeps whatever prefix the blueprint is mounted at.
    """
    return f"{request.path}/{key}"


def ensure_agent(agent_key: str) -> None:
    """Raise AgentNotFound; used on error paths to tell a missing agent from a bad body."""
    state().storage.get_agent(agent_key=agent_key)


# Sessions


@bp.post("/agents/<agent_key>/sessions")
@auth.require("sessions:create")
def create_session(agent_key: str) -> Response:
    """Create a session."""
    ext = state()
    ext.limits.hit(
        g.api_key.create_limit or current_app.config["SESSION_CREATE_LIMIT"],
        "create",
        g.api_key.id,
        agent_key,
    )
    try:
        data = session_create_schema.load(body.json_object())
    except Exception:
        # 404 for a missing agent comes before 400 for a bad body.
        ensure_agent(agent_key)
        raise
    now = utcnow()
    key = data.pop("key", None)
    session = Session(agent_key=agent_key, key=key or "", created_at=now, updated_at=now, **data)
    if key is not None:
        created = ext.storage.create_session(session=session)
    else:
        created = create_with_generated_key(session)
    location = member_url(created.key)
    return respond(session_schema, created, 201, [("Location", location)])


def create_with_generated_key(session: Session) -> Session:
    storage = state().storage
    for candidate in key_candidates(session.name):
        session.key = candidate
        try:
            return storage.create_session(session=session)
        except Conflict:
            continue
    raise ApiError(409, "conflict", "Could not generate a free key; supply one.")


@bp.get("/agents/<agent_key>/sessions")
@auth.require("sessions:read")
def list_sessions(agent_key: str) -> Response:
    """List the agent's sessions, a page at a time."""
    query = list_query(session_list_query_schema)
    pattern = query.pop("filter", None)
    if pattern is not None:
        query["matches"] = compile_filter(pattern)
    page = state().storage.list_sessions(agent_key=agent_key, now=utcnow(), **query)
    if not page.items:
        ensure_agent(agent_key)
    return respond(session_list_schema, page_body(page, "sessions"))


def compile_filter(pattern: str) -> Any:
    """The list filter, compiled by the storage codec; a bad one is a 400."""
    try:
        return codec.compile_filter(pattern, current_app.config["FILTER_MAX_LENGTH"])
    except ValueError as err:
        raise ApiError(400, "invalid_request", f"filter: {err}") from None


@bp.get("/agents/<agent_key>/sessions/<session_key>")
@auth.require("sessions:read")
def get_session(agent_key: str, session_key: str) -> Response:
    """Read one session."""
    try:
        session = state().storage.get_session(
            agent_key=agent_key, session_key=session_key, now=utcnow()
        )
    except SessionNotFound:
        ensure_agent(agent_key)
        raise
    return respond(session_schema, session)


@bp.patch("/agents/<agent_key>/sessions/<session_key>")
@auth.require("sessions:update")
def update_session(agent_key: str, session_key: str) -> Response:
    """Change some fields of a session."""
    try:
        changes = session_update_schema.load(body.json_object())
    except Exception:
        ensure_agent(agent_key)
        raise
    try:
        session = state().storage.update_session(
            agent_key=agent_key, session_key=session_key, changes=changes, now=utcnow()
        )
    except SessionNotFound:
        ensure_agent(agent_key)
        raise
    return respond(session_schema, session)


@bp.delete("/agents/<agent_key>/sessions/<session_key>")
@auth.require("sessions:delete")
def delete_session(agent_key: str, session_key: str) -> Response:
    """Delete a session."""
    try:
        state().storage.delete_session(agent_key=agent_key, session_key=session_key, now=utcnow())
    except SessionNotFound:
        ensure_agent(agent_key)
        raise
    return no_content()


# Agents (admin)


@bp.post("/agents")
@auth.require_admin
def create_agent() -> Response:
    """Create an agent."""
    data = agent_create_schema.load(body.json_object())
    now = utcnow()
    agent = state().storage.create_agent(agent=Agent(created_at=now, updated_at=now, **data))
    location = member_url(agent.key)
    return respond(agent_schema, agent, 201, [("Location", location)])


@bp.get("/agents")
@auth.require_admin
def list_agents() -> Response:
    """List agents."""
    page = state().storage.list_agents(**list_query(list_query_schema))
    return respond(agent_list_schema, page_body(page, "agents"))


@bp.get("/agents/<agent_key>")
@auth.require_admin
def get_agent(agent_key: str) -> Response:
    """Read one agent."""
    return respond(agent_schema, state().storage.get_agent(agent_key=agent_key))


@bp.patch("/agents/<agent_key>")
@auth.require_admin
def update_agent(agent_key: str) -> Response:
    """Change some fields of an agent."""
    try:
        changes = agent_update_schema.load(body.json_object())
    except Exception:
        ensure_agent(agent_key)
        raise
    agent = state().storage.update_agent(agent_key=agent_key, changes=changes, now=utcnow())
    return respond(agent_schema, agent)


@bp.delete("/agents/<agent_key>")
@auth.require_admin
def delete_agent(agent_key: str) -> Response:
    """Delete an agent and all its sessions."""
    state().storage.delete_agent(agent_key=agent_key)
    return no_content()


# API keys (admin)


@bp.post("/api_keys")
@auth.require_admin
def create_api_key() -> Response:
    """Create an API key; its secret appears in this response only."""
    data = api_key_create_schema.load(body.json_object())
    data["grants"] = [Grant(g["agent"], tuple(g["scopes"])) for g in data["grants"]]
    key, token = auth.new_api_key(**data)
    return errors.json_response(api_key_created_schema.dump(key) | {"secret": token}, 201)


@bp.get("/api_keys")
@auth.require_admin
def list_api_keys() -> Response:
    """List API keys (never their secrets)."""
    page = state().storage.list_api_keys(**list_query(list_query_schema))
    return respond(api_key_list_schema, page_body(page, "api_keys"))


@bp.delete("/api_keys/<key_id>")
@auth.require_admin
def revoke_api_key(key_id: str) -> Response:
    """Revoke an API key."""
    state().storage.revoke_api_key(key_id=key_id, now=utcnow())
    return no_content()
