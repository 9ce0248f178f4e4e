"""A Google ADK session service on Agent Sessions (``pip install 'agent-sessions-client[adk]'``).

>>> from agent_sessions_client.adk import AgentSessionsService
>>> service = AgentSessionsService("http://127.0.0.1:8000", "ak_...")
>>> runner = Runner(agent=agent, app_name="support", session_service=service)

How ADK's records land on the service:

- An ADK ``app_name`` is the agent ``agent_prefix + app_name`` (mapped into the key
  pattern when it falls outside it, see :func:`agent_key`). With an admin key the
  agent is created on first use; with any other key it must exist, and the error
  names it (:class:`AgentNotSetUp`).
- An ADK session (``user_id``, ``session_id``) is one session of that agent, its key
  a digest of both (:func:`session_key`), its metadata ``{"user_id", "adk_session_id",
  "adk_update_time", "adk_state"}``: the session's own state, each value as its JSON
  text so that a merge patch replaces it whole, as ADK's ``state.update`` does.
- ``app:`` and ``user:`` state are the agent's state documents ``app`` and
  ``user:USER`` (:func:`user_document`), written by the same batch as the event
  (or the session) they came with, in one transaction.
- Each ADK event is one event of the history, of the native type that fits it:
  user text ``input_message``, model text ``agent_output``, thoughts ``thinking``,
  function calls ``tool_input``, responses ``tool_output``; anything else
  ``structured_output`` (schema ``google.adk.Event``). The event's ``metadata``
  holds its author, its invocation id and, as ``adk_event``, the ADK event's JSON
  less what the native fields already say, so an event read back equals the one
  appended. Its id is a digest of the ADK event's id: an equal event delivered
  again is not written twice.
- A loaded session remembers the id of the history's newest event; an append is
  written only while it still is (``if_last_event_id``), else
  ``StaleSessionError``, as ADK's database services do.

One HTTP request per call, but for ``create_session`` and ``list_sessions`` (which
read the shared state after) and ``get_session`` of a history past one page (1,000
events): each further page is one more request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
import weakref
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from google.adk.errors._stale_session_error import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event as AdkEvent
from google.adk.sessions import _session_util
from google.adk.sessions.base_session_service import (
    BaseSessionService,
    GetSessionConfig,
    ListSessionsResponse,
)
from google.adk.sessions.session import Session as AdkSession
from google.adk.sessions.state import State
from google.genai import types

from ._core import NOT_GIVEN
from .client import AsyncAgentSessions
from .errors import AgentNotFound, Conflict, EventNotFound, Forbidden, SessionNotFound
from .models import Event, Session, parse_timestamp

__all__ = [
    "AgentNotSetUp",
    "AgentSessionsService",
    "agent_key",
    "session_key",
    "user_document",
]

KEY = re.compile(r"[0-9A-Za-z_-]{1,64}\Z")
#: The shape of a key agent_key derives from a name that is not a key: a name that is a key
#: of this shape is mapped too, so that no app is given another app's agent.
MAPPED_AGENT = re.compile(r"(?:.*-[0-9a-f]{16}|app-[0-9a-f]{24})\Z")
DOCUMENT = re.compile(r"[0-9A-Za-z_.:@-]{1,123}\Z")  # "user:" + this fits a document key
#: A page of history as long as the service answers.
PAGE = 1000
#: State documents one read may name (the service's bound).
DOCUMENTS_PER_READ = 16
STALE = (
    "The session has been modified in storage since it was loaded. "
    "Please reload the session before appending more events."
)
ADK_SCHEMA = "google.adk.Event"


class AgentNotSetUp(LookupError):
    """The agent an ADK app maps to does not exist, and this key cannot create it."""

    def __init__(self, agent_key: str, app_name: str):
        super().__init__(
            f"agent {agent_key!r} (ADK app {app_name!r}) does not exist: create it "
            f"(agent-sessions agents create {agent_key} --name NAME), or use an admin key, "
            "which creates it on first use"
        )
        self.agent_key = agent_key
        self.app_name = app_name


def _digest(*parts: str) -> str:
    text = json.dumps(parts, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def agent_key(app_name: str, prefix: str = "") -> str:
    """The agent of an ADK app: ``prefix + app_name`` when that is a key, else a slug of it
    and a digest (``my app`` -> ``my-app-3f2a...``), as is a key of that shape, so that
    two names never share an agent."""
    name = prefix + app_name
    if KEY.match(name) and not MAPPED_AGENT.match(name):
        return name
    slug = re.sub(r"[^0-9A-Za-z_-]+", "-", name).strip("-")[:40]
    return f"{slug}-{_digest(name)[:16]}" if slug else f"app-{_digest(name)[:24]}"


def session_key(user_id: str, session_id: str) -> str:
    """The service's key of an ADK session: a digest of its user and its id."""
    return "adk-" + _digest(user_id, session_id)[:40]


def user_document(user_id: str) -> str:
    """The state document of an ADK user's ``user:`` state."""
    if DOCUMENT.match(user_id):
        return "user:" + user_id
    return "user@" + _digest(user_id)[:48]


def _event_id(adk_id: str) -> str:
    return "aev_" + _digest(adk_id)[:40]


# State: each value as its JSON text, so that a merge patch sets it whole.


def _encode_state(delta: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in delta.items():
        if len(key) <= 120 and not key.startswith("#"):
            out[key] = json.dumps(value, separators=(",", ":"))
        else:  # a key past the service's key bound: named by its digest
            out["#" + _digest(key)] = json.dumps([key, value], separators=(",", ":"))
    return out


def _decode_state(stored: Any) -> dict[str, Any]:
    """A state as stored; a value another client wrote as plain JSON is read as it is."""
    out: dict[str, Any] = {}
    for key, value in (stored or {}).items():
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass  # a plain string, not one of ours
            if key.startswith("#") and isinstance(value, list) and len(value) == 2:
                key, value = value
        out[key] = value
    return out


def _merged(app: dict[str, Any], user: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    state = dict(own)
    state.update({State.APP_PREFIX + k: v for k, v in app.items()})
    state.update({State.USER_PREFIX + k: v for k, v in user.items()})
    return state


# Events: the native type that fits, and the rest in metadata.


def _texts(content: types.Content) -> list[str] | None:
    """The parts' texts, when every part is a plain text and nothing else."""
    texts = []
    for part in content.parts or []:
        if part.model_dump(exclude_none=True).keys() != {"text"} or not part.text:
            return None
        texts.append(part.text)
    return texts or None


def _tool(
    kind: str, call_id: str | None, name: str | None, value: Any, event: AdkEvent, author: str
) -> dict[str, Any]:
    """A function call (``tool_input``) or its response (``tool_output``) as the native type."""
    return {
        "type": kind,
        "tool_call_id": (call_id or event.id or "call")[:255],
        "tool_configuration_name": author[:255],
        "tool_name": (name or "function")[:255],
        kind: value or {},
    }


def _native(event: AdkEvent) -> tuple[dict[str, Any], types.Content | None]:
    """The event's native type and fields, and the content they rebuild (None: none)."""
    content = event.content
    parts = (content.parts if content else None) or []
    author = event.author or "agent"
    calls = [p.function_call for p in parts if p.function_call]
    responses = [p.function_response for p in parts if p.function_response]
    if calls:
        call = calls[0]
        return _tool("tool_input", call.id, call.name, call.args, event, author), None
    if responses:
        response = responses[0]
        fields = _tool("tool_output", response.id, response.name, response.response, event, author)
        return fields, None
    if content is not None and parts:
        if (
            all(
                p.thought
                and p.text
                and p.model_dump(exclude_none=True).keys() == {"text", "thought"}
                for p in parts
            )
            and len(parts) == 1
        ):
            rebuilt = types.Content(
                role=content.role, parts=[types.Part(text=parts[0].text, thought=True)]
            )
            return {"type": "thinking", "content": parts[0].text}, rebuilt
        texts = _texts(content)
        if texts and content.role == "user" and len(texts) <= 100:
            rebuilt = types.Content(role="user", parts=[types.Part(text=t) for t in texts])
            messages = [{"type": "text", "content": t} for t in texts]
            return {"type": "input_message", "messages": messages}, rebuilt
        if texts and len(texts) == 1 and content.role == "model":
            rebuilt = types.Content(role="model", parts=[types.Part(text=texts[0])])
            return {"type": "agent_output", "content": texts[0]}, rebuilt
    return {"type": "structured_output", "schema_name": ADK_SCHEMA, "content": None}, None


def _rebuilt(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """The content a native event's fields say, as ADK's JSON."""
    kind = event["type"]
    if kind == "input_message":
        texts = [m.get("content") for m in event.get("messages", [])]
        parts = [{"text": t} for t in texts if isinstance(t, str)]
        return {"role": "user", "parts": parts} if parts else None
    if kind == "agent_output":
        return {"role": "model", "parts": [{"text": event.get("content", "")}]}
    if kind == "thinking":
        return {"role": "model", "parts": [{"text": event.get("content", ""), "thought": True}]}
    return None


def to_service_event(event: AdkEvent) -> dict[str, Any]:
    """The service's event (for a batch) of an ADK event."""
    body, rebuilt = _native(event)
    stored = json.loads(event.model_dump_json(exclude_none=True))
    if rebuilt is not None and rebuilt == event.content:
        stored.pop("content", None)  # the native fields say it
    body["id"] = _event_id(event.id)
    body["metadata"] = {
        "author": event.author,
        "invocation_id": event.invocation_id,
        "adk_event": json.dumps(stored, ensure_ascii=False, separators=(",", ":")),
    }
    return body


def from_service_event(event: Event | Mapping[str, Any]) -> AdkEvent | None:
    """The ADK event a stored event holds (a record, or the event's JSON as answered).

    One written by another client reads as its native text, the user's or the
    model's; None for what ADK has no event for.
    """
    if isinstance(event, Event):
        event = {
            **event.fields,
            "id": event.id,
            "type": event.type,
            "metadata": event.metadata,
            "created_at": event.created_at.isoformat() if event.created_at else None,
        }
    text = (event.get("metadata") or {}).get("adk_event")
    if isinstance(text, str) and text.endswith("}"):
        if '"content":' not in text or "content" not in json.loads(text):
            content = _rebuilt(event)
            if content is not None:
                # Spliced into the text: ADK's own JSON parser reads it in one pass.
                joint = "," if len(text) > 2 else ""
                text = f'{text[:-1]}{joint}"content":{json.dumps(content)}}}'
        return AdkEvent.model_validate_json(text)
    content = _rebuilt(event)
    if content is None or event["type"] == "thinking":
        return None
    stamp = parse_timestamp(event.get("created_at"))
    return AdkEvent.model_validate(
        {
            "id": event["id"],
            "invocation_id": "",
            "author": "user" if event["type"] == "input_message" else "agent",
            "content": content,
            "timestamp": stamp.timestamp() if stamp else time.time(),
        }
    )


class AgentSessionsService(BaseSessionService):
    """An ADK ``BaseSessionService`` whose sessions live on an Agent Sessions server.

    ``base_url``: the service's root (no ``/v2``). ``api_key``: a key with
    ``sessions:create``, ``sessions:read``, ``sessions:delete`` and ``events:append`` on
    the agents (``agent_prefix + app_name``), or an admin key, which also creates a
    missing agent. Other keyword arguments go to the client
    (:class:`~agent_sessions_client.AsyncAgentSessions`: ``max_retries``, ``timeout``).
    Usable from any event loop: each loop gets its own connections.
    """

    def __init__(self, base_url: str, api_key: str, *, agent_prefix: str = "", **options: Any):
        if not isinstance(agent_prefix, str):
            raise TypeError("agent_prefix must be a string")
        AsyncAgentSessions(base_url, api_key, **options)  # checks the arguments now
        self._base_url = base_url
        self._api_key = api_key
        self._options = options
        self.agent_prefix = agent_prefix
        self._clients: weakref.WeakKeyDictionary[Any, AsyncAgentSessions] = (
            weakref.WeakKeyDictionary()
        )
        self._agents: set[str] = set()  # known to exist

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._base_url!r}, agent_prefix={self.agent_prefix!r})"

    @property
    def _client(self) -> AsyncAgentSessions:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = AsyncAgentSessions(self._base_url, self._api_key, **self._options)
            self._clients[loop] = client
        return client

    async def close(self) -> None:
        """Close this event loop's connections."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    async def __aenter__(self) -> AgentSessionsService:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _agent(self, app_name: str) -> str:
        return agent_key(app_name, self.agent_prefix)

    async def _create_agent(self, agent: str, app_name: str) -> None:
        try:
            await self._client.agents.create(agent, name=app_name[:255] or agent)
        except Forbidden:
            raise AgentNotSetUp(agent, app_name) from None
        except Conflict:
            pass  # created meanwhile
        self._agents.add(agent)

    # BaseSessionService

    async def create_session(
        self,
        *,
        app_name: str,
        user_id: str,
        state: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> AdkSession:
        session_id = (session_id or "").strip() or str(uuid.uuid4())
        agent = self._agent(app_name)
        deltas = _session_util.extract_json_safe_state_delta(state or {})
        now = time.time()
        metadata = {
            "user_id": user_id,
            "adk_session_id": session_id,
            "adk_update_time": now,
            "adk_state": _encode_state(deltas["session"]),
        }
        shared = self._state_patch(user_id, deltas)
        key = session_key(user_id, session_id)
        create = {"name": session_id[:255], "metadata": metadata, "exclusive": True}
        for attempt in range(2):
            try:
                await self._client.events.append(
                    agent, key, [], create_session=create, state_patch=shared or None
                )
                break
            except Conflict:
                raise AlreadyExistsError(f"Session with id {session_id} already exists.") from None
            except AgentNotFound:
                if attempt:
                    raise
                await self._create_agent(agent, app_name)
        self._agents.add(agent)
        app, user = await self._documents(agent, ["app", user_document(user_id)])
        session = AdkSession(
            id=session_id,
            app_name=app_name,
            user_id=user_id,
            state=_merged(app, user, deltas["session"]),
            events=[],
            last_update_time=now,
        )
        session._storage_update_marker = ""  # no event yet
        return session

    async def get_session(
        self,
        *,
        app_name: str,
        user_id: str,
        session_id: str,
        config: GetSessionConfig | None = None,
    ) -> AdkSession | None:
        session_id = (session_id or "").strip()
        if not session_id:
            return None
        agent = self._agent(app_name)
        key = session_key(user_id, session_id)
        wanted = config.num_recent_events if config else None
        after = config.after_timestamp if config else None
        document = user_document(user_id)
        path = f"/v2/agents/{quote(agent, safe='')}/sessions/{key}/events"
        query: dict[str, Any] = {
            "order": "desc",
            "include_hidden": "true",
            "limit": PAGE if wanted is None else max(1, min(wanted, PAGE)),
            "include_session": "true",
            "include_state": f"app,{document}",
        }
        try:
            # The events as answered, not as records: a long history is read at ADK's pace.
            page = (await self._client.request("GET", path, params=query)).json()
        except (SessionNotFound, AgentNotFound):
            return None
        record = Session.from_dict(page["session"])
        if record.metadata.get("user_id") != user_id:
            return None
        marker = page["events"][0]["id"] if page["events"] else ""
        state = {d["key"]: _decode_state(d["value"]) for d in page["state"]}
        events: list[AdkEvent] = []
        done = wanted == 0
        whole = wanted is None and after is None  # every page will be read
        while not done:
            page_key = page["metadata"].get("page_key")
            following = None
            if whole and page_key is not None:
                # Asked for now: the server reads the next page while this one is converted.
                following = asyncio.ensure_future(self._events_page(path, page_key))
                await asyncio.sleep(0)
            for stored in page["events"]:
                if "hide_reason" in stored:
                    continue
                event = from_service_event(stored)
                if event is None:
                    continue
                if after is not None and event.timestamp < after:
                    done = True  # the history is in time order: nothing older is wanted
                    break
                events.append(event)
                if wanted is not None and len(events) >= wanted:
                    done = True
                    break
            if done or page_key is None:
                break
            page = await (following or self._events_page(path, page_key))
        events.reverse()
        session = self._session(record, app_name, state.get("app", {}), state.get(document, {}))
        session.events = events
        session._storage_update_marker = marker
        return session

    async def list_sessions(
        self, *, app_name: str, user_id: str | None = None
    ) -> ListSessionsResponse:
        agent = self._agent(app_name)
        query = None if user_id is None else {"user_id": user_id}
        records: list[Session] = []
        try:
            async for record in self._client.sessions.list(agent, metadata=query, limit=100):
                owner = record.metadata.get("user_id")
                if "adk_session_id" in record.metadata and isinstance(owner, str):
                    if user_id is None or owner == user_id:
                        records.append(record)
        except AgentNotFound:
            return ListSessionsResponse()
        users = sorted({r.metadata["user_id"] for r in records})
        keys = ["app", *(user_document(u) for u in users)]
        documents = dict(zip(keys, await self._documents(agent, keys), strict=True))
        sessions = [
            self._session(
                r, app_name, documents["app"], documents[user_document(r.metadata["user_id"])]
            )
            for r in records
        ]
        sessions.sort(key=lambda s: (s.last_update_time, s.user_id, s.id))
        return ListSessionsResponse(sessions=sessions)

    async def delete_session(self, *, app_name: str, user_id: str, session_id: str) -> None:
        key = session_key(user_id, (session_id or "").strip())
        try:
            await self._client.sessions.delete(self._agent(app_name), key)
        except (SessionNotFound, AgentNotFound):
            pass

    async def get_user_state(self, *, app_name: str, user_id: str) -> dict[str, Any]:
        (user,) = await self._documents(self._agent(app_name), [user_document(user_id)])
        return user

    async def append_event(self, session: AdkSession, event: AdkEvent) -> AdkEvent:
        if event.partial:
            return event
        self._apply_temp_state(session, event)
        event = self._trim_temp_delta_state(event)
        deltas = _session_util.extract_json_safe_state_delta(event.actions.state_delta or {})
        agent = self._agent(session.app_name)
        key = session_key(session.user_id, session.id)
        metadata_patch: dict[str, Any] = {"adk_update_time": event.timestamp}
        if deltas["session"]:
            metadata_patch["adk_state"] = _encode_state(deltas["session"])
        marker = session._storage_update_marker
        body = to_service_event(event)
        try:
            await self._client.events.append(
                agent,
                key,
                [body],
                if_last_event_id=NOT_GIVEN if marker is None else (marker or None),
                metadata_patch=metadata_patch,
                state_patch=self._state_patch(session.user_id, deltas) or None,
                # The event's id is its own: a retry is never written twice.
                idempotency_key=False,
            )
        except (SessionNotFound, AgentNotFound):
            raise SessionNotFoundError(f"Session {session.id} not found.") from None
        except Conflict:
            if not await self._delivered(agent, key, body["id"], event):
                raise StaleSessionError(STALE) from None
            newest = await self._client.events.page(agent, key, order="desc", limit=1)
            session._storage_update_marker = newest.items[0].id if newest.items else ""
            session.last_update_time = event.timestamp
            if any(e.id == event.id for e in session.events):
                return event
            return self._commit_event_to_session(session, event)
        session._storage_update_marker = body["id"]
        session.last_update_time = event.timestamp
        return self._commit_event_to_session(session, event)

    # Helpers

    async def _events_page(self, path: str, page_key: str) -> dict[str, Any]:
        query = {"order": "desc", "include_hidden": "true", "limit": PAGE, "page_key": page_key}
        return (await self._client.request("GET", path, params=query)).json()

    async def _delivered(self, agent: str, key: str, event_id: str, event: AdkEvent) -> bool:
        """Whether this event is stored already (a delivery again); AlreadyExistsError
        when its id is stored with another event."""
        try:
            stored = await self._client.events.get(agent, key, event_id)
        except EventNotFound:
            return False
        if from_service_event(stored) != event:
            raise AlreadyExistsError(f"Event {event.id} already exists.")
        return True

    def _state_patch(self, user_id: str, deltas: dict[str, dict[str, Any]]) -> dict[str, Any]:
        patch = {}
        if deltas["app"]:
            patch["app"] = _encode_state(deltas["app"])
        if deltas["user"]:
            patch[user_document(user_id)] = _encode_state(deltas["user"])
        return patch

    async def _documents(self, agent: str, keys: list[str]) -> list[dict[str, Any]]:
        """The decoded state documents of ``keys`` (``{}`` for an agent that does not exist)."""
        found: list[dict[str, Any]] = []
        for start in range(0, len(keys), DOCUMENTS_PER_READ):
            chunk = keys[start : start + DOCUMENTS_PER_READ]
            try:
                documents = await self._client.agents.state(agent, chunk)
            except AgentNotFound:
                return [{} for _ in keys]
            found += [_decode_state(d.value) for d in documents]
        return found

    @staticmethod
    def _session(
        record: Session, app_name: str, app: dict[str, Any], user: dict[str, Any]
    ) -> AdkSession:
        own = _decode_state(record.metadata.get("adk_state"))
        stamp = record.metadata.get("adk_update_time")
        if not isinstance(stamp, (int, float)):
            stamp = record.updated_at.timestamp() if record.updated_at else 0.0
        return AdkSession(
            id=record.metadata.get("adk_session_id", record.key),
            app_name=app_name,
            user_id=record.metadata.get("user_id", ""),
            state=_merged(app, user, own),
            events=[],
            last_update_time=float(stamp),
        )
