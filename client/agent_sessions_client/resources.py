"""The resources of the API: one definition of each call, for both clients.

``client.sessions``, ``client.events``, ``client.agents``, ``client.api_keys``:
each method builds its request and returns the generator :mod:`._core` runs.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ._core import NOT_GIVEN, BaseClient, Call, Request, body_of, call, creating, segment
from .models import Agent, ApiKey, Event, EventPage, Page, Session, StateDocument

if TYPE_CHECKING:
    from .client import AsyncPager, SyncPager

T = TypeVar("T")


class _Resource:
    def __init__(self, client: BaseClient):
        self._client = client

    def _pager(self, fetch: Callable[[str | None], Call[Page[T]]], page_key: str | None) -> Any:
        return self._client._pager(fetch, page_key)


def _sessions_path(agent_key: str) -> str:
    return f"/v2/agents/{segment(agent_key, 'agent_key')}/sessions"


def _session_path(agent_key: str, session_key: str) -> str:
    return f"{_sessions_path(agent_key)}/{segment(session_key, 'session_key')}"


def _conditional(if_match: str | None) -> dict[str, str] | None:
    return {"If-Match": if_match} if if_match is not None else None


class Sessions(_Resource):
    """``client.sessions``: an agent's sessions."""

    @call
    def create(
        self,
        agent_key: str,
        *,
        name: str,
        key: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        enabled: bool | None = None,
        tti_minutes: int | None = None,
        idempotency_key: str | None = None,
    ) -> Call[Session]:
        """Create a session (its key is generated from the name when not given)."""
        body = body_of(
            key=key,
            name=name,
            description=description,
            metadata=metadata,
            enabled=enabled,
            tti_minutes=tti_minutes,
        )
        req = Request(
            "POST",
            _sessions_path(agent_key),
            json=body,
            headers=creating(idempotency_key),
            repeatable=True,
        )
        return (yield from self._client._fetch_record(req, Session))

    @call
    def fork(
        self,
        agent_key: str,
        source_session_key: str,
        *,
        name: str,
        source_agent_key: str | None = None,
        include_up_to_event_id: str | None = None,
        compact_up_to_event_id: str | None = None,
        summary_text: str | None = None,
        key: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        enabled: bool | None = None,
        tti_minutes: int | None = None,
        idempotency_key: str | None = None,
    ) -> Call[Session]:
        """Create a session of ``agent_key`` with a copy of another session's visible events.

        ``source_agent_key`` defaults to ``agent_key``. Either copy up to
        ``include_up_to_event_id``, or hide the events up to
        ``compact_up_to_event_id`` behind one compaction event of ``summary_text``.
        """
        source = body_of(
            agent_key=source_agent_key,
            session_key=source_session_key,
            include_up_to_event_id=include_up_to_event_id,
            compact_up_to_event_id=compact_up_to_event_id,
            summary_text=summary_text,
        )
        body = body_of(
            key=key,
            name=name,
            description=description,
            metadata=metadata,
            enabled=enabled,
            tti_minutes=tti_minutes,
            from_session=source,
        )
        req = Request(
            "POST",
            _sessions_path(agent_key),
            json=body,
            headers=creating(idempotency_key),
            repeatable=True,
        )
        return (yield from self._client._fetch_record(req, Session))

    @call
    def get(self, agent_key: str, session_key: str) -> Call[Session]:
        """Read one session (with its ``etag``)."""
        req = Request("GET", _session_path(agent_key, session_key), repeatable=True)
        return (yield from self._client._fetch_record(req, Session))

    def list(
        self,
        agent_key: str,
        *,
        filter: str | None = None,
        metadata: Mapping[str, str | int | float | bool] | None = None,
        limit: int | None = None,
        page_key: str | None = None,
    ) -> SyncPager[Session] | AsyncPager[Session]:
        """Every session of the agent, oldest first, read ``limit`` per request.

        ``filter`` is an RE2 regular expression over name and description.
        ``metadata`` keeps the sessions whose metadata has each of these top-level
        keys with this value (up to 4 keys; an indexed lookup): ``{"user_id": "u-17"}``.
        Iterate for the sessions, or over ``.pages()`` for each page and its
        ``page_key`` (start from one with ``page_key=``).
        """
        params: dict[str, Any] = {"filter": filter, "limit": limit}
        for name, value in (metadata or {}).items():
            if not isinstance(value, (str, int, float, bool)):
                raise TypeError(f"metadata[{name!r}] must be a string, number or boolean")
            params[f"metadata.{name}"] = value if isinstance(value, str) else json.dumps(value)
        fetch = self._client._lister(
            _sessions_path(agent_key), "sessions", Session.from_dict, params
        )
        return self._pager(fetch, page_key)

    @call
    def update(
        self,
        agent_key: str,
        session_key: str,
        *,
        name: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        enabled: bool | None = None,
        tti_minutes: int | None = None,
        if_match: str | None = None,
    ) -> Call[Session]:
        """Change the fields given (None leaves a field as it is; ``description=""``
        clears it). With ``if_match`` (an ``etag``), only while the session is unchanged:
        else :class:`~agent_sessions_client.errors.PreconditionFailed`."""
        body = body_of(
            name=name,
            description=description,
            metadata=metadata,
            enabled=enabled,
            tti_minutes=tti_minutes,
        )
        req = Request(
            "PATCH",
            _session_path(agent_key, session_key),
            json=body,
            headers=_conditional(if_match),
            repeatable=True,
        )
        return (yield from self._client._fetch_record(req, Session))

    @call
    def delete(
        self, agent_key: str, session_key: str, *, if_match: str | None = None
    ) -> Call[None]:
        """Delete a session and its history (with ``if_match``: only while unchanged)."""
        req = Request(
            "DELETE",
            _session_path(agent_key, session_key),
            headers=_conditional(if_match),
            repeatable=True,
        )
        return (yield from self._client._fetch_nothing(req))


def _events_path(agent_key: str, session_key: str) -> str:
    return _session_path(agent_key, session_key) + "/events"


def _event_path(agent_key: str, session_key: str, event_id: str) -> str:
    return f"{_events_path(agent_key, session_key)}/{segment(event_id, 'event_id')}"


def _messages(messages: str | Sequence[str | Mapping[str, Any]]) -> list[Any]:
    """An input's messages: a string is one text message, as is each string in a list."""
    if isinstance(messages, str):
        messages = [messages]
    return [
        {"type": "text", "content": item} if isinstance(item, str) else dict(item)
        for item in messages
    ]


def _history_query(
    order: str | None,
    types: str | Iterable[str] | None,
    include_hidden: bool | None,
    limit: int | None,
) -> dict[str, Any]:
    """The query of a read of the history (None: left out)."""
    if types is not None and not isinstance(types, str):
        types = ",".join(types)
    hidden = None if include_hidden is None else ("true" if include_hidden else "false")
    return {"order": order, "type": types, "include_hidden": hidden, "limit": limit}


def _events(body: Any) -> list[Event]:
    return [Event.from_dict(item) for item in body["events"]]


def _last_event(body: Any) -> Event:
    return _events(body)[-1]


def _popped(body: Any) -> Event | None:
    events = _events(body)
    return events[0] if events else None


class Events(_Resource):
    """``client.events``: a session's history."""

    def list(
        self,
        agent_key: str,
        session_key: str,
        *,
        order: str | None = None,
        types: str | Iterable[str] | None = None,
        include_hidden: bool | None = None,
        limit: int | None = None,
        page_key: str | None = None,
    ) -> SyncPager[Event] | AsyncPager[Event]:
        """Every event of the session in history order (``order="desc"``: newest first),
        read ``limit`` per request; ``types`` keeps only those types, ``include_hidden``
        adds hidden events. Iterate, or use ``.pages()``."""
        fetch = self._client._lister(
            _events_path(agent_key, session_key),
            "events",
            Event.from_dict,
            _history_query(order, types, include_hidden, limit),
        )
        return self._pager(fetch, page_key)

    @call
    def page(
        self,
        agent_key: str,
        session_key: str,
        *,
        order: str | None = None,
        types: str | Iterable[str] | None = None,
        include_hidden: bool | None = None,
        limit: int | None = None,
        page_key: str | None = None,
        include_session: bool = False,
        include_state: Iterable[str] | None = None,
    ) -> Call[EventPage]:
        """One page of the history (as :meth:`list` reads them), with, when asked, the
        session (``include_session``) and some of the agent's state documents
        (``include_state``: their keys), read after the events in the same request."""
        params = {
            **_history_query(order, types, include_hidden, limit),
            "page_key": page_key,
            "include_session": "true" if include_session else None,
            "include_state": None if include_state is None else ",".join(include_state),
        }
        req = Request("GET", _events_path(agent_key, session_key), params=params, repeatable=True)

        def parse(body: Any) -> EventPage:
            session = body.get("session")
            state = body.get("state")
            return EventPage(
                _events(body),
                body["metadata"].get("page_key"),
                session=None if session is None else Session.from_dict(session),
                state=None if state is None else [StateDocument.from_dict(d) for d in state],
            )

        return (yield from self._client._fetch(req, parse))

    @call
    def get(self, agent_key: str, session_key: str, event_id: str) -> Call[Event]:
        """Read one event, hidden or not."""
        req = Request("GET", _event_path(agent_key, session_key, event_id), repeatable=True)
        return (yield from self._client._fetch(req, Event.from_dict))

    @call
    def create(
        self,
        agent_key: str,
        session_key: str,
        messages: str | Sequence[str | Mapping[str, Any]],
        *,
        idempotency_key: str | None = None,
    ) -> Call[Event]:
        """Add a user's input (an ``input_message`` event; needs ``events:create``).

        ``messages``: a string, or a list of strings (text) and message objects
        (``{"type": "skill", "skill_name": ...}``).
        """
        body = {"type": "input_message", "messages": _messages(messages)}
        req = Request(
            "POST",
            _events_path(agent_key, session_key),
            json=body,
            headers=creating(idempotency_key),
            repeatable=True,
        )
        return (yield from self._client._fetch(req, _last_event))

    @call
    def append(
        self,
        agent_key: str,
        session_key: str,
        events: Sequence[Mapping[str, Any]],
        *,
        if_last_event_id: str | None = NOT_GIVEN,
        metadata_patch: Mapping[str, Any] | None = None,
        state_patch: Mapping[str, Mapping[str, Any]] | None = None,
        create_session: Mapping[str, Any] | None = None,
        idempotency_key: str | Literal[False] | None = None,
    ) -> Call[list[Event]]:
        """Append what the agent did, all or nothing (needs ``events:append``).

        ``events`` are event objects as the API takes them
        (``{"type": "agent_output", "content": "...", "metadata"?: {...}}``). With
        ``if_last_event_id`` the batch is written only while the session's last
        event has that id (None: while it has none), else
        :class:`~agent_sessions_client.errors.Conflict`. In the same transaction:
        ``metadata_patch`` merges into the session's metadata (RFC 7386),
        ``state_patch`` (``{"app": {...}, "user:u-17": {...}}``) into the agent's
        state documents, and ``create_session`` (``{"name": ..., "metadata"?: ...,
        "exclusive"?: True}``; needs ``sessions:create`` too) creates the session
        when it does not exist (with ``exclusive``, only then: else ``Conflict``).
        ``events`` may be empty when one of those three is given.

        ``idempotency_key=False`` sends none, for a caller whose events carry their
        own ids (``"id": "aev_..."``): a retry then cannot write them twice, and one
        whose first attempt was written answers ``Conflict``. It saves the server
        the key's record, two writes of its own.
        """
        body: dict[str, Any] = {"events": [dict(event) for event in events]}
        if if_last_event_id is not NOT_GIVEN:
            body["if_last_event_id"] = if_last_event_id
        if metadata_patch is not None:
            body["metadata_patch"] = metadata_patch
        if state_patch is not None:
            body["state_patch"] = state_patch
        if create_session is not None:
            body["create_session"] = dict(create_session)
        req = Request(
            "POST",
            _events_path(agent_key, session_key) + "/batch",
            json=body,
            headers=None if idempotency_key is False else creating(idempotency_key),
            repeatable=idempotency_key is not False or all("id" in e for e in body["events"]),
        )
        return (yield from self._client._fetch(req, _events))

    @call
    def pop(
        self,
        agent_key: str,
        session_key: str,
        *,
        if_last_event_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Call[Event | None]:
        """Delete the session's newest event (hidden or not) and answer it; None when the
        history is empty. One transaction: of concurrent pops, each event goes to one.

        With ``if_last_event_id``, only while the newest event has that id, else
        :class:`~agent_sessions_client.errors.Conflict` and nothing is deleted. Sent
        with an Idempotency-Key, so a retry never pops a second event (needs
        ``sessions:delete``).
        """
        body = body_of(if_last_event_id=if_last_event_id)
        req = Request(
            "POST",
            _events_path(agent_key, session_key) + "/pop",
            json=body,
            headers=creating(idempotency_key),
            repeatable=True,
        )
        return (yield from self._client._fetch(req, _popped))

    @call
    def clear(self, agent_key: str, session_key: str) -> Call[None]:
        """Delete every event of the session, hidden ones too, and keep the session
        (needs ``sessions:delete``)."""
        req = Request("DELETE", _events_path(agent_key, session_key), repeatable=True)
        return (yield from self._client._fetch_nothing(req))

    @call
    def compact(
        self,
        agent_key: str,
        session_key: str,
        *,
        summary_text: str,
        up_to_event_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Call[Event]:
        """Hide the visible events up to ``up_to_event_id`` (by default all before the
        last input) behind one compaction event of ``summary_text``; answers that event."""
        body = body_of(type="compact", summary_text=summary_text)
        if up_to_event_id is not None:
            body["compact_up_to_event_id"] = up_to_event_id
        req = Request(
            "POST",
            _events_path(agent_key, session_key),
            json=body,
            headers=creating(idempotency_key),
            repeatable=True,
        )
        return (yield from self._client._fetch(req, _last_event))

    @call
    def hide(self, agent_key: str, session_key: str, event_id: str) -> Call[Event]:
        """Hide an event from lists (``hide_reason == "manual"``)."""
        path = _event_path(agent_key, session_key, event_id) + "/hide"
        req = Request("POST", path, repeatable=True)
        return (yield from self._client._fetch(req, Event.from_dict))

    @call
    def unhide(self, agent_key: str, session_key: str, event_id: str) -> Call[Event]:
        """Show a hidden event in lists again."""
        path = _event_path(agent_key, session_key, event_id) + "/unhide"
        req = Request("POST", path, repeatable=True)
        return (yield from self._client._fetch(req, Event.from_dict))

    @call
    def delete(self, agent_key: str, session_key: str, event_id: str) -> Call[None]:
        """Delete one event."""
        req = Request("DELETE", _event_path(agent_key, session_key, event_id), repeatable=True)
        return (yield from self._client._fetch_nothing(req))


def _agent_path(key: str) -> str:
    return f"/v2/agents/{segment(key, 'key')}"


class Agents(_Resource):
    """``client.agents``: agents (admin keys only)."""

    @call
    def create(
        self,
        key: str,
        *,
        name: str,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        enabled: bool | None = None,
        idempotency_key: str | None = None,
    ) -> Call[Agent]:
        """Create an agent."""
        body = body_of(
            key=key, name=name, description=description, metadata=metadata, enabled=enabled
        )
        req = Request(
            "POST", "/v2/agents", json=body, headers=creating(idempotency_key), repeatable=True
        )
        return (yield from self._client._fetch_record(req, Agent))

    @call
    def get(self, key: str) -> Call[Agent]:
        """Read one agent (with its ``etag``)."""
        req = Request("GET", _agent_path(key), repeatable=True)
        return (yield from self._client._fetch_record(req, Agent))

    @call
    def state(self, key: str, keys: Iterable[str]) -> Call[list[StateDocument]]:
        """Some of the agent's state documents (1 to 16 keys: ``["app", "user:u-17"]``),
        in that order; one never written is ``{}`` (needs ``sessions:read``)."""
        if isinstance(keys, str):
            keys = [keys]
        params = {"keys": ",".join(keys)}
        req = Request("GET", _agent_path(key) + "/state", params=params, repeatable=True)
        return (
            yield from self._client._fetch(
                req, lambda body: [StateDocument.from_dict(d) for d in body["state"]]
            )
        )

    def list(
        self, *, limit: int | None = None, page_key: str | None = None
    ) -> SyncPager[Agent] | AsyncPager[Agent]:
        """Every agent; iterate, or use ``.pages()``."""
        fetch = self._client._lister("/v2/agents", "agents", Agent.from_dict, {"limit": limit})
        return self._pager(fetch, page_key)

    @call
    def update(
        self,
        key: str,
        *,
        name: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        enabled: bool | None = None,
        if_match: str | None = None,
    ) -> Call[Agent]:
        """Change the fields given; with ``if_match``, only while the agent is unchanged."""
        body = body_of(name=name, description=description, metadata=metadata, enabled=enabled)
        req = Request(
            "PATCH", _agent_path(key), json=body, headers=_conditional(if_match), repeatable=True
        )
        return (yield from self._client._fetch_record(req, Agent))

    @call
    def delete(self, key: str, *, if_match: str | None = None) -> Call[None]:
        """Delete an agent with all its sessions and the grants naming it."""
        req = Request("DELETE", _agent_path(key), headers=_conditional(if_match), repeatable=True)
        return (yield from self._client._fetch_nothing(req))


def _grants(grants: Mapping[str, Iterable[str]] | Iterable[Any] | None) -> list[dict[str, Any]]:
    """Grants as ``{"agent": [scopes]}``, or a list of Grant records or grant objects."""
    if grants is None:
        return []
    if isinstance(grants, Mapping):
        return [{"agent": agent, "scopes": list(scopes)} for agent, scopes in grants.items()]
    out = []
    for grant in grants:
        if isinstance(grant, Mapping):
            out.append({"agent": grant["agent"], "scopes": list(grant["scopes"])})
        else:
            out.append({"agent": grant.agent, "scopes": list(grant.scopes)})
    return out


class ApiKeys(_Resource):
    """``client.api_keys``: API keys (admin keys only)."""

    @call
    def create(
        self,
        *,
        name: str,
        grants: Mapping[str, Iterable[str]] | Iterable[Any] | None = None,
        admin: bool | None = None,
        create_limit: str | None = None,
        expires_at: dt.datetime | str | None = None,
    ) -> Call[ApiKey]:
        """Create an API key; its ``secret`` is in this answer only.

        ``grants``: ``{"support-bot": ["sessions:read"], "*": [...]}``. Sent
        without an Idempotency-Key (the service takes none here), so a request
        that may have reached the server is not sent again: on a broken
        connection, look the key up by name in :meth:`list`.
        """
        if isinstance(expires_at, dt.datetime):
            if expires_at.tzinfo is None:
                raise ValueError("expires_at must be an aware datetime")
            expires_at = expires_at.isoformat()
        body = body_of(
            name=name,
            grants=_grants(grants),
            admin=admin,
            create_limit=create_limit,
            expires_at=expires_at,
        )
        req = Request("POST", "/v2/api_keys", json=body)
        return (yield from self._client._fetch(req, ApiKey.from_dict))

    def list(
        self, *, limit: int | None = None, page_key: str | None = None
    ) -> SyncPager[ApiKey] | AsyncPager[ApiKey]:
        """Every API key (never a secret); iterate, or use ``.pages()``."""
        fetch = self._client._lister("/v2/api_keys", "api_keys", ApiKey.from_dict, {"limit": limit})
        return self._pager(fetch, page_key)

    @call
    def revoke(self, key_id: str) -> Call[None]:
        """Revoke an API key (effective everywhere within a second)."""
        req = Request("DELETE", f"/v2/api_keys/{segment(key_id, 'key_id')}", repeatable=True)
        return (yield from self._client._fetch_nothing(req))
