"""Typed records of the service's answers.

Each record reads the fields this release knows and keeps any other in
``extra``, so a newer server's additions never break an older client. Absent
optional fields are None. Timestamps are aware ``datetime`` objects in UTC.
Records read from an answer that carried an ``ETag`` keep it in ``etag``, for
``if_match`` on a later update or delete.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, TypeVar

__all__ = [
    "Agent",
    "ApiKey",
    "Event",
    "ForkedFrom",
    "Grant",
    "Page",
    "EventPage",
    "Record",
    "Session",
    "StateDocument",
]

T = TypeVar("T")
R = TypeVar("R", bound="Record")


def parse_timestamp(value: Any) -> dt.datetime | None:
    """An RFC 3339 timestamp (``2026-11-28T17:49:52.123Z``) as an aware datetime."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"not a timestamp: {value!r}")
    return dt.datetime.fromisoformat(value)


@dataclasses.dataclass(kw_only=True)
class Record:
    """What every record has: the fields this client does not know, and the answer's ETag."""

    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    etag: str | None = dataclasses.field(default=None, repr=False, compare=False)

    #: Fields read as timestamps, and fields holding nested records.
    TIMESTAMPS: ClassVar[frozenset[str]] = frozenset()
    NESTED: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any], *, etag: str | None = None) -> R:
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__}: not a JSON object")
        known = {f.name for f in dataclasses.fields(cls) if f.init} - {"extra", "etag"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for name, value in data.items():
            if name not in known:
                extra[name] = value
            elif name in cls.TIMESTAMPS:
                values[name] = parse_timestamp(value)
            elif name in cls.NESTED and value is not None:
                values[name] = cls.NESTED[name](value)
            else:
                values[name] = value
        return cls(**values, extra=extra, etag=etag)


@dataclasses.dataclass(kw_only=True)
class ForkedFrom(Record):
    """Where a forked session came from; ``event_id`` is the last event copied."""

    agent_key: str
    session_key: str
    event_id: str | None = None


@dataclasses.dataclass(kw_only=True)
class Session(Record):
    key: str
    agent_key: str
    name: str
    description: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    enabled: bool = True
    tti_minutes: int = 0
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    forked_from: ForkedFrom | None = None

    TIMESTAMPS = frozenset({"created_at", "updated_at"})
    NESTED = {"forked_from": ForkedFrom.from_dict}


@dataclasses.dataclass(kw_only=True)
class Agent(Record):
    key: str
    name: str
    description: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    enabled: bool = True
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None

    TIMESTAMPS = frozenset({"created_at", "updated_at"})


@dataclasses.dataclass(kw_only=True)
class Grant(Record):
    """Scopes on one agent (``*``: every agent)."""

    agent: str
    scopes: list[str]


def _grants(value: Any) -> list[Grant]:
    return [Grant.from_dict(item) for item in value]


@dataclasses.dataclass(kw_only=True)
class ApiKey(Record):
    """An API key; ``secret`` is set only on the answer of its creation."""

    id: str
    name: str
    grants: list[Grant] = dataclasses.field(default_factory=list)
    admin: bool = False
    state: str | None = None
    create_limit: str | None = None
    created_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None
    secret: str | None = dataclasses.field(default=None, repr=False)

    TIMESTAMPS = frozenset({"created_at", "expires_at", "revoked_at"})
    NESTED = {"grants": _grants}


COMMON_EVENT_FIELDS = frozenset({"id", "session_key", "type", "created_at", "hide_reason"})


@dataclasses.dataclass(kw_only=True)
class Event(Record):
    """One event of a session's history.

    The fields of its type (``content``, ``messages``, ``tool_name``...) are in
    ``fields`` and read as attributes too (``event.content``), so event types a
    newer server adds read as well as the known ones.
    """

    id: str
    session_key: str
    type: str
    created_at: dt.datetime | None = None
    hide_reason: str | None = None
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: What the event carries beyond its type's fields (None when it has none).
    metadata: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, etag: str | None = None) -> Event:
        if not isinstance(data, Mapping):
            raise ValueError("Event: not a JSON object")
        fields = {k: v for k, v in data.items() if k not in COMMON_EVENT_FIELDS}
        metadata = fields.pop("metadata", None)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ValueError("Event: metadata is not a JSON object")
        return cls(
            id=data["id"],
            session_key=data["session_key"],
            type=data["type"],
            created_at=parse_timestamp(data.get("created_at")),
            hide_reason=data.get("hide_reason"),
            fields=fields,
            metadata=metadata,
            etag=etag,
        )

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails; "fields" itself may not be set yet (copy).
        if name.startswith("__") or name == "fields":
            raise AttributeError(name)
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(f"{self.type} event has no field {name!r}") from None

    @property
    def hidden(self) -> bool:
        return self.hide_reason is not None


@dataclasses.dataclass(kw_only=True)
class StateDocument(Record):
    """One of an agent's state documents (``app``, ``user:u-17``...): ``{}`` until written."""

    key: str
    value: dict[str, Any] = dataclasses.field(default_factory=dict)
    updated_at: dt.datetime | None = None

    TIMESTAMPS = frozenset({"updated_at"})


@dataclasses.dataclass
class Page(Generic[T]):
    """One page of a list; ``page_key`` goes on to the next (None on the last page)."""

    items: list[T]
    page_key: str | None = None


@dataclasses.dataclass
class EventPage(Page[Event]):
    """A page of a history, with what was asked along with it: the session
    (``include_session``) and the agent's state documents (``include_state``)."""

    session: Session | None = None
    state: list[StateDocument] | None = None
