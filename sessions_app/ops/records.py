"""The CLI's ``agents`` and ``keys`` groups: the records an operator manages."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import click
from flask.cli import AppGroup

from storage_backends import (
    Agent,
    AgentNotFound,
    Grant,
    codec,
)
from storage_backends.codec import utcnow

from ..corridor.auth import new_api_key
from ..corridor.rate_limits import parse_limit
from ..schemas import (
    SCOPES,
    AgentCreateSchema,
    AgentSchema,
    AgentUpdateSchema,
    ApiKeyCreateSchema,
    ApiKeySchema,
    is_key,
)
from .cli import (
    agent_state,
    check_key,
    checked,
    confirm,
    echo,
    echo_json,
    echo_json_list,
    header,
    iterate,
    json_option,
    one_line_errors,
    show,
    storage,
    warn,
)

agents = AppGroup("agents", help="Manage agents.")
keys = AppGroup("keys", help="Manage API keys.")


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
    storage(missing_ok=True).create_agent(agent=agent)
    echo(f"created agent {agent_key}")


@agents.command("list")
@json_option
@one_line_errors
def list_agents(as_json: bool) -> None:
    """List agents: key, name, state, and what each stores (sessions, events, bytes)."""
    store = storage()
    found = ((agent, store.get_usage(agent_key=agent.key)) for agent in iterate(store.list_agents))
    if as_json:
        schema = AgentSchema()
        return echo_json_list(
            "agents", (schema.dump(agent) | {"usage": usage} for agent, usage in found)
        )
    header("KEY", "NAME", "STATE", "SESSIONS", "EVENTS", "BYTES")
    for agent, usage in found:
        echo(agent.key, agent.name, agent_state(agent), *usage.values())


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
    store = storage(missing_ok=True)  # refuses memory://, whose keys no server would see
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
