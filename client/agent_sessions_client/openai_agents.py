"""An OpenAI Agents SDK session over one session of the Agent Sessions service.

``AgentSessionsSession(session_id, base_url=..., api_key=..., agent_key=...)`` is
a :class:`agents.memory.SessionABC` (openai-agents 0.24.0, extra
``openai-agents``): pass it as ``Runner.run(agent, input, session=...)``.

Each SDK item is one event of the history, written as the native event type it
fits (a user message as ``input_message``, an assistant message as
``agent_output``, a function call as ``tool_input``, its output as
``tool_output``, a reasoning summary as ``thinking``, anything else as
``structured_output``), with what the native fields do not hold kept in the
event's ``metadata`` (key :data:`ITEM_KEY`), so that an item reads back equal
to the one added. An item the event bounds refuse natively (NUL characters,
nesting past ``EVENT_MAX_DEPTH``, integers past 64 bits) is kept whole as its
JSON text in a ``structured_output`` event.

Every call is one request, in one transaction on the server: ``add_items`` one
batch that creates the session when it is missing (``create_session``),
``pop_item`` ``POST /events/pop``, ``clear_session`` ``DELETE /events``, and
``get_items(limit)`` reads the newest events first, a page of up to 1,000 at a
time. The calls run the blocking client in a worker thread, so a session works
from any event loop (``Runner.run_sync``, a loop per thread in a thread pool).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import math
import re
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

try:
    from agents.memory import SessionABC, SessionSettings
    from agents.memory.session_settings import coerce_session_settings, resolve_session_limit
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError(
        "agent_sessions_client.openai_agents needs the OpenAI Agents SDK: "
        "pip install 'agent-sessions-client[openai-agents]'"
    ) from err

from .client import AgentSessions
from .errors import SessionNotFound
from .models import Event

__all__ = ["ITEM_KEY", "AgentSessionsSession", "session_key_for"]

T = TypeVar("T")

#: The event ``metadata`` key holding what an item's native event has no field for.
ITEM_KEY = "openai_agents"
#: ``structured_output.schema_name`` of an item kept whole as its JSON text.
TEXT_SCHEMA = "openai_agents.item"
#: The session metadata key naming the SDK's ``session_id`` the session holds.
SESSION_ID_KEY = "openai_agents_session_id"
#: ``tool_configuration_name`` of the SDK's function tools' events.
TOOL_CONFIGURATION = "function"
#: Function call names remembered for their outputs' events.
TOOL_NAMES_KEPT = 1000
#: Events read per request (the service's largest page).
PAGE = 1000
#: The service's default bounds on a native event's JSON values and names.
MAX_DEPTH = 32
NAME_MAX = 255
MESSAGES_MAX = 100
INT64 = 2**63

_KEY = re.compile(r"[0-9A-Za-z_-]{1,64}")
_UNSAFE = re.compile(r"[^0-9A-Za-z_-]+")
#: Every key this module derives from a session_id starts so; no id used as is does.
_MAPPED = "x--"


def session_key_for(session_id: str) -> str:
    """The session key of an SDK ``session_id``: the id itself when it is a key
    (``^[0-9a-zA-Z_-]{1,64}$``), else a readable slug of it and a digest
    (``x--<slug>-<26 letters>``), so that two ids never share a key."""
    if not isinstance(session_id, str):
        raise TypeError(f"session_id must be a string, not {type(session_id).__name__}")
    if _KEY.fullmatch(session_id) and not session_id.startswith(_MAPPED):
        return session_id
    digest = hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()
    tag = base64.b32encode(digest).decode().rstrip("=").lower()[:26]
    slug = _UNSAFE.sub("-", session_id).strip("-")[:32]
    return f"{_MAPPED}{slug}-{tag}" if slug else f"{_MAPPED}{tag}"


# The items' events


def _storable(value: Any, depth: int = 0) -> bool:
    """Whether the service takes ``value`` as a native JSON value: no NUL character or
    lone surrogate, integers within 64 bits, finite numbers, at most MAX_DEPTH deep."""
    if isinstance(value, str):
        if "\x00" in value:
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return -INT64 <= value < INT64
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict | list):
        if depth >= MAX_DEPTH:
            return False
        children = value.items() if isinstance(value, dict) else enumerate(value)
        return all(
            (not isinstance(k, str) or _storable(k)) and _storable(v, depth + 1)
            for k, v in children
        )
    return False


def _label(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= NAME_MAX and bool(value.strip())


def _get(tree: Any, path: Sequence[Any]) -> Any:
    for step in path:
        tree = tree[step]
    return tree


def _put(tree: Any, path: Sequence[Any], value: Any) -> Any:
    if not path:
        return value
    _get(tree, path[:-1])[path[-1]] = value
    return tree


def _dump(value: Any) -> str:
    # ASCII escapes keep NUL characters and lone surrogates out of the stored text.
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


#: How a function call's ``arguments`` text is its ``tool_input`` object again.
_ARGUMENT_TEXTS: dict[str, Callable[[Any], str]] = {
    "json": json.dumps,
    "compact": lambda value: json.dumps(value, separators=(",", ":")),
    "json-utf8": lambda value: json.dumps(value, ensure_ascii=False),
    "compact-utf8": lambda value: json.dumps(value, ensure_ascii=False, separators=(",", ":")),
}


class _Native:
    """A native event for an item: its type and fields, and where each field's value
    sits in the item (``puts``: field path, item path, encoding of the item's text)."""

    def __init__(self, kind: str, fields: dict[str, Any]):
        self.kind = kind
        self.fields = fields
        self.puts: list[list[Any]] = []

    def take(self, field_path: Sequence[Any], item_path: Sequence[Any], how: str = "") -> None:
        put = [list(field_path), list(item_path)]
        self.puts.append([*put, how] if how else put)


def _text_parts(content: Any, part_type: str) -> list[int]:
    if not isinstance(content, list):
        return []
    return [
        index
        for index, part in enumerate(content)
        if isinstance(part, dict)
        and part.get("type") == part_type
        and isinstance(part.get("text"), str)
    ]


class AgentSessionsSession(SessionABC):
    """An Agents SDK session kept in the Agent Sessions service.

    ``session_id``: any string (mapped into the key pattern by :func:`session_key_for`;
    the key is ``self.session_key``). ``agent_key``: the agent whose session it is.
    The API key needs ``sessions:read``, ``sessions:create`` and ``events:append``
    (writes), and ``sessions:delete`` (``pop_item`` and ``clear_session``).
    ``session_settings``: as ``SQLiteSession``'s (``limit``: the items
    ``get_items()`` reads by default). ``client``: an :class:`AgentSessions` of
    ``base_url`` to share among sessions (its connections, key, retries and
    timeout), left open by :meth:`close`. ``session_name``: the name the first
    write gives the session (by default the ``session_id``, cut to 255 characters).

    Subclasses may change how an item becomes an event (:meth:`item_to_event`) and
    back (:meth:`event_to_item`).
    """

    session_settings: SessionSettings | None = None

    def __init__(
        self,
        session_id: str,
        *,
        base_url: str,
        api_key: str,
        agent_key: str,
        session_settings: SessionSettings | Mapping[str, Any] | None = None,
        client: AgentSessions | None = None,
        session_name: str | None = None,
    ):
        self.session_id = session_id
        self.session_key = session_key_for(session_id)
        if not isinstance(agent_key, str) or not _KEY.fullmatch(agent_key):
            raise ValueError(f"agent_key must match ^[0-9a-zA-Z_-]{{1,64}}$, not {agent_key!r}")
        self.agent_key = agent_key
        self.session_settings = (
            coerce_session_settings(
                dict(session_settings)
                if isinstance(session_settings, Mapping)
                else session_settings
            )
            if session_settings is not None
            else SessionSettings()
        )
        if client is not None and client.base_url != base_url.rstrip("/"):
            raise ValueError(f"client is of {client.base_url!r}, not of base_url {base_url!r}")
        self._owns_client = client is None
        self.client = client if client is not None else AgentSessions(base_url, api_key)
        self.session_name = session_name or self._default_name()
        self._closed = False
        self._tool_names: dict[Any, Any] = {}
        self._tool_names_lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.session_id!r}, agent_key={self.agent_key!r}, "
            f"base_url={self.client.base_url!r})"
        )

    # The SDK's interface

    async def get_items(self, limit: int | None = None) -> list[Any]:
        """The history's items in chronological order; with ``limit`` (or the
        settings' limit), the newest ``limit`` of them."""
        self._check_open()
        wanted = resolve_session_limit(limit, self.session_settings)
        return await asyncio.to_thread(self._read_items, wanted)

    async def add_items(self, items: list[Any]) -> None:
        """Append the items, all or nothing, in one request (the session is created
        when it does not exist yet)."""
        self._check_open()
        if not items:
            return
        events = self.items_to_events(list(items))  # TypeError here: nothing sent
        await _finish(asyncio.to_thread(self._append, events))

    async def pop_item(self) -> Any | None:
        """Remove the newest item and return it (None when there is none); of
        concurrent pops, each item goes to exactly one."""
        self._check_open()
        return await _finish(asyncio.to_thread(self._pop))

    async def clear_session(self) -> None:
        """Delete every item; the service's session stays, empty."""
        self._check_open()
        await _finish(asyncio.to_thread(self._clear))

    def close(self) -> None:
        """Close the connections (not those of a ``client`` passed in)."""
        self._closed = True
        if self._owns_client:
            self.client.close()

    # Items and events: what a subclass may change

    def items_to_events(self, items: list[Any]) -> list[dict[str, Any]]:
        """The events of one ``add_items``, in order."""
        # A function's output names its call only: the name comes from the call, in this
        # write or an earlier one of this object (the SDK writes a step's call and output
        # together).
        with self._tool_names_lock:
            for item in items:
                if isinstance(item, dict) and item.get("type") == "function_call":
                    self._tool_names[item.get("call_id")] = item.get("name")
            while len(self._tool_names) > TOOL_NAMES_KEPT:
                del self._tool_names[next(iter(self._tool_names))]
            names = dict(self._tool_names)
        return [self.item_to_event(item, tool_names=names) for item in items]

    def item_to_event(
        self, item: Any, *, tool_names: Mapping[Any, Any] | None = None
    ) -> dict[str, Any]:
        """One item as an event the service takes (a batch's event object)."""
        _dump(item)  # an item that is not JSON raises TypeError or ValueError here
        native = self._native(item, tool_names or {})
        if native is not None and _storable(native.fields):
            template = copy.deepcopy(item)
            for _, item_path, *_ in native.puts:
                template = _put(template, item_path, None)
            meta = {"item": _dump(template), "put": native.puts}
            return {"type": native.kind, **native.fields, "metadata": {ITEM_KEY: meta}}
        return {
            "type": "structured_output",
            "schema_name": TEXT_SCHEMA,
            "content": _dump(item),
            "metadata": {ITEM_KEY: {"text": True}},
        }

    def event_to_item(self, event: Event) -> Any | None:
        """The item an event holds; None for an event that holds none (it is skipped).

        Events this class did not write read as messages where they are one: a user's
        ``input_message`` (from a front end) and an ``agent_output``.
        """
        fields = event.fields
        # An attribute: a field of its type's on this release, of the record on later ones.
        meta = (getattr(event, "metadata", None) or {}).get(ITEM_KEY)
        if isinstance(meta, dict):
            if meta.get("text"):
                return json.loads(fields["content"])
            item = json.loads(meta["item"])
            for field_path, item_path, *how in meta["put"]:
                value = _get(fields, field_path)
                if how:
                    value = _ARGUMENT_TEXTS[how[0]](value)
                item = _put(item, item_path, value)
            return item
        if event.type == "input_message":
            texts = [
                m.get("content") for m in fields.get("messages", ()) if m.get("type") == "text"
            ]
            if len(texts) == 1:
                return {"role": "user", "content": texts[0]}
            if texts:
                return {
                    "role": "user",
                    "content": [{"type": "input_text", "text": text} for text in texts],
                }
            return None
        if event.type == "agent_output":
            return {"role": "assistant", "content": fields.get("content", "")}
        return None

    def _native(self, item: Any, tool_names: Mapping[Any, Any]) -> _Native | None:
        if not isinstance(item, dict):
            return None
        kind = item.get("type", "message")
        role = item.get("role")
        content = item.get("content")
        if kind == "message" and role == "user":
            if isinstance(content, str):
                native = _Native(
                    "input_message", {"messages": [{"type": "text", "content": content}]}
                )
                native.take(["messages", 0, "content"], ["content"])
                return native
            parts = _text_parts(content, "input_text")[:MESSAGES_MAX]
            if not parts:
                return None
            native = _Native("input_message", {"messages": []})
            for n, index in enumerate(parts):
                native.fields["messages"].append(
                    {"type": "text", "content": content[index]["text"]}
                )
                native.take(["messages", n, "content"], ["content", index, "text"])
            return native
        if kind == "message" and role == "assistant":
            if isinstance(content, str):
                native = _Native("agent_output", {"content": content})
                native.take(["content"], ["content"])
                return native
            parts = _text_parts(content, "output_text")
            if not parts:
                return None
            native = _Native("agent_output", {"content": content[parts[0]]["text"]})
            native.take(["content"], ["content", parts[0], "text"])
            return native
        if kind in ("function_call", "function_call_output") and _label(item.get("call_id")):
            if kind == "function_call":
                return self._tool_input(item)
            name = tool_names.get(item["call_id"])
            native = _Native(
                "tool_output",
                {
                    "tool_call_id": item["call_id"],
                    "tool_configuration_name": TOOL_CONFIGURATION,
                    "tool_name": name if _label(name) else TOOL_CONFIGURATION,
                    "tool_output": {"output": item.get("output")},
                },
            )
            native.take(["tool_call_id"], ["call_id"])
            if "output" in item:
                native.take(["tool_output", "output"], ["output"])
            return native
        if kind == "reasoning":
            native = _Native("thinking", {})
            summary = item.get("summary")
            parts = _text_parts(summary, "summary_text")
            if parts:
                native.fields["content"] = summary[parts[0]]["text"]
                native.take(["content"], ["summary", parts[0], "text"])
            return native
        native = _Native(
            "structured_output",
            {"schema_name": kind if _label(kind) else "item", "content": item},
        )
        native.take(["content"], [])
        return native

    @staticmethod
    def _tool_input(item: dict[str, Any]) -> _Native | None:
        if not _label(item.get("name")):
            return None
        arguments = item.get("arguments")
        native = _Native(
            "tool_input",
            {
                "tool_call_id": item["call_id"],
                "tool_configuration_name": TOOL_CONFIGURATION,
                "tool_name": item["name"],
                "tool_input": {},
            },
        )
        native.take(["tool_call_id"], ["call_id"])
        native.take(["tool_name"], ["name"])
        parsed = _json_object(arguments)
        how = next(
            (
                name
                for name, text in _ARGUMENT_TEXTS.items()
                if parsed is not None and text(parsed) == arguments
            ),
            None,
        )
        if parsed is not None:
            # An object's text that dumps would not write again stays in the item too.
            native.fields["tool_input"] = parsed
            if how is not None:
                native.take(["tool_input"], ["arguments"], how)
        elif "arguments" in item:
            native.fields["tool_input"] = {"arguments": arguments}
            native.take(["tool_input", "arguments"], ["arguments"])
        return native

    # Requests (in a worker thread)

    def _read_items(self, limit: int | None) -> list[Any]:
        events = self.client.events
        try:
            if limit is None or limit < 0:  # SQLiteSession: a negative limit is no limit
                pager = events.list(self.agent_key, self.session_key, limit=PAGE)
                return [item for item in map(self.event_to_item, pager) if item is not None]
            if limit == 0:
                return []
            newest: list[Any] = []
            pager = events.list(
                self.agent_key, self.session_key, order="desc", limit=min(limit, PAGE)
            )
            for page in pager.pages():
                newest += (item for item in map(self.event_to_item, page.items) if item is not None)
                if len(newest) >= limit:
                    break
            return newest[:limit][::-1]
        except SessionNotFound:
            return []

    def _append(self, events: list[dict[str, Any]]) -> None:
        self.client.events.append(
            self.agent_key, self.session_key, events, create_session=self._session_fields()
        )

    def _pop(self) -> Any | None:
        while True:
            try:
                event = self.client.events.pop(self.agent_key, self.session_key)
            except SessionNotFound:
                return None
            if event is None:
                return None
            item = self.event_to_item(event)
            if item is not None:  # an event that holds no item is dropped, as
                return item  # SQLiteSession drops a row it cannot read

    def _clear(self) -> None:
        try:
            self.client.events.clear(self.agent_key, self.session_key)
        except SessionNotFound:
            pass

    def _session_fields(self) -> dict[str, Any]:
        """The session a first ``add_items`` creates."""
        fields: dict[str, Any] = {"name": self.session_name}
        if _storable(self.session_id) and len(self.session_id) <= 1024:
            fields["metadata"] = {SESSION_ID_KEY: self.session_id}
        return fields

    def _default_name(self) -> str:
        name = self.session_id[:NAME_MAX] if isinstance(self.session_id, str) else ""
        return name if name.strip() and _storable(name) else "OpenAI Agents session"

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")


def _json_object(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, str):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def _finish(work: Awaitable[T]) -> T:
    """Wait for a write's outcome even when the caller is cancelled meanwhile (as the
    SDK's own sessions do), then raise the cancellation: the write is never left
    half-known, and a cancelled caller does not retry one that was done."""
    task = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as err:
            cancelled = cancelled or err
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning
        raise cancelled
    return task.result()
