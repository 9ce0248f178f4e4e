"""The agent views (admin): create, list, get, update, delete."""

from __future__ import annotations

import dataclasses
from typing import Any

from storage_backends import Agent
from storage_backends.codec import utcnow

from ..corridor import auth, rate_limits
from ..openapi.examples import (
    AGENT,
)
from ..schemas import (
    AgentCreateSchema,
    AgentListSchema,
    AgentSchema,
    AgentUpdateSchema,
    AgentUsageSchema,
    ListQuerySchema,
)
from .endpoint import bp, created, endpoint, page_body, service


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
@endpoint(
    "Agents",
    200,
    AgentUsageSchema,
    etag=AgentSchema,
    examples={"response": AGENT | {"usage": {"sessions": 3, "events": 120, "bytes": 48_213}}},
)
def get_agent(agent_key: str) -> Any:
    """Read one agent, with what it stores (its quotas count this usage)."""
    storage = service().storage
    agent = storage.get_agent(agent_key=agent_key)
    return dataclasses.asdict(agent) | {"usage": storage.get_usage(agent_key=agent_key)}


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
