"""The storage interface every backend implements, and the exceptions it raises.

Backends know nothing about HTTP: they raise the plain exceptions below and
``sessions_app.corridor.errors`` turns them into responses.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

_Record = TypeVar("_Record")


class StorageError(Exception):
    """Base class of every error a backend raises on purpose."""


class NotFound(StorageError):
    """The addressed record does not exist."""


class AgentNotFound(NotFound):
    pass


class SessionNotFound(NotFound):
    pass


class ApiKeyNotFound(NotFound):
    pass


class EventNotFound(NotFound):
    pass


class ConsoleSessionNotFound(NotFound):
    """No console sign-in has this token, or it expired."""


class Conflict(StorageError):
    """A record with the same key already exists."""


class StaleHistory(Conflict):
    """``if_last_event_id`` no longer names the session's last event: nothing was written."""


class PreconditionFailed(StorageError):
    """The caller's ``precondition`` refused the record as stored: nothing was written."""


class IdempotencyKeyLost(StorageError):
    """The request no longer holds its idempotency key (another took it over after the
    lock ran out): what it wrote in the unit of work must not commit."""


class AgentDisabled(StorageError):
    """The agent exists but its ``enabled`` is false: it takes no new sessions."""


class SessionDisabled(StorageError):
    """The session exists but its ``enabled`` is false: it takes no new events."""


class TooManyEvents(StorageError):
    """A read would return more than its ``limit`` events: nothing was written."""

    def __init__(self, limit: int, max_bytes: int | None = None):
        super().__init__(
            f"more than {limit} events" if max_bytes is None else f"more than {max_bytes} bytes"
        )
        self.limit = limit
        self.max_bytes = max_bytes


class QuotaExceeded(StorageError):
    """A write would pass a storage quota (``AGENT_MAX_BYTES``, ``SESSION_MAX_EVENTS``):
    it was rolled back. ``usage`` is what was stored before it, ``adds`` what it adds."""

    def __init__(self, quota: str, usage: int, adds: int, bound: int):
        super().__init__(f"{quota}: {usage} + {adds} > {bound}")
        self.quota, self.usage, self.adds, self.bound = quota, usage, adds, bound


class Unavailable(StorageError):
    """The backend cannot answer now (unreachable, busy past its timeout, disk full);
    ``retry_after`` is a hint in seconds for clients."""

    def __init__(self, message: str = "storage unavailable", retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class SchemaTooNew(Unavailable):
    """The database was migrated by a newer release than this one: it is not served.

    Unavailable, not a bug: the service stays down (503) until the newer release
    runs again, rather than writing rows an older schema does not describe.
    """

    def __init__(self, found: int, known: int):
        super().__init__(
            f"database schema version {found} is newer than this release understands ({known})",
            retry_after=60,
        )


@dataclasses.dataclass
class Agent:
    key: str
    name: str
    description: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    enabled: bool = True
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None


@dataclasses.dataclass
class Session:
    key: str
    agent_key: str
    name: str
    description: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    enabled: bool = True
    tti_minutes: int = 0
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    #: ``{"agent_key", "session_key", "event_id"?}`` of a forked session's source
    forked_from: dict[str, str] | None = None
    #: when the idle clock last restarted (an update or an event written); None: ``updated_at``
    active_at: dt.datetime | None = None

    @property
    def expires_at(self) -> dt.datetime | None:
        """When the session idles out: ``tti_minutes`` after its last update."""
        since = self.active_at or self.updated_at
        if not self.tti_minutes or since is None:
            return None
        return since + dt.timedelta(minutes=self.tti_minutes)

    def expired(self, now: dt.datetime) -> bool:
        expires_at = self.expires_at
        return expires_at is not None and expires_at <= now


@dataclasses.dataclass
class Grant:
    agent: str  # an agent key, or "*" for every agent
    scopes: tuple[str, ...]


@dataclasses.dataclass
class ApiKey:
    """An API key as stored: its public id and the SHA-256 of its secret, never the secret."""

    id: str
    name: str
    secret_hash: str
    grants: list[Grant] = dataclasses.field(default_factory=list)
    admin: bool = False
    create_limit: str | None = None
    created_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None

    def state(self, now: dt.datetime) -> str:
        """``"revoked"``, ``"expired"`` (at ``now``) or ``"active"``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def active(self, now: dt.datetime) -> bool:
        return self.state(now) == "active"

    def allows(self, agent_key: str, scope: str) -> bool:
        if self.admin:
            return True
        return any(g.agent in ("*", agent_key) and scope in g.scopes for g in self.grants)


#: Where an event's ``hide_reason`` comes from.
HIDDEN_MANUAL = "manual"
HIDDEN_BY_COMPACTION = "compaction"


@dataclasses.dataclass
class Event:
    """One entry of a session's history.

    ``fields`` holds the fields of its ``type`` (validated by the web layer
    before they reach a backend), e.g. ``{"content": "..."}`` for
    ``agent_output``. ``session_key`` is the session it is stored in (a fork
    stores copies of the source's events, under the same ids).
    """

    id: str
    session_key: str
    type: str
    fields: dict[str, Any]
    created_at: dt.datetime
    hide_reason: str | None = None


@dataclasses.dataclass
class StateDocument:
    """A JSON object an agent's runtime keeps across its sessions, by a key of its choosing
    (ADK's ``app:`` state under one key, each user's ``user:`` state under another)."""

    key: str
    value: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: None for a key never written
    updated_at: dt.datetime | None = None


@dataclasses.dataclass
class ConsoleSession:
    """A sign-in to the browser console: the SHA-256 of its random token (the cookie's
    value, never stored), the API key it acts as, its CSRF token and its expiry."""

    token_hash: str
    key_id: str
    csrf_token: str
    created_at: dt.datetime
    expires_at: dt.datetime

    def expired(self, now: dt.datetime) -> bool:
        return self.expires_at <= now


#: A write's condition on the record as stored (an ``If-Match``): True lets it through.
Precondition = Callable[[_Record], bool]

#: ``if_last_event_id`` left out: append whatever the last event is.
ANY_LAST_EVENT: Any = object()


@dataclasses.dataclass(frozen=True)
class Answer:
    """An HTTP answer as remembered for an idempotency key: replayed byte for byte."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclasses.dataclass(frozen=True)
class IdempotencyRecord:
    """What an idempotency key holds: the fingerprint of the request that claimed it, the
    claim's token, and its answer once remembered (None while that request is in flight)."""

    fingerprint: str
    token: str
    answer: Answer | None = None


@dataclasses.dataclass
class Page:
    """One page of a listing. ``next_cursor`` is the position after the last item, or None."""

    items: list[Any]
    next_cursor: int | None


class Storage(abc.ABC):
    """Agents, sessions with their events, and API keys.

    Every method is keyword-only. Objects passed in and returned are copies:
    mutating them never changes what is stored. Listings are ordered by an
    internal, strictly increasing sequence number; ``after`` is the
    ``next_cursor`` of the previous page. Any backend may raise
    :class:`Unavailable` from any method (:class:`SchemaTooNew` for a
    database a newer release has migrated).
    """

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str, *, options: Mapping[str, Any]) -> Storage:
        """Build a backend from its URL; raise ValueError for a malformed one.

        Must not connect: connections open lazily, so the object is safe to
        create before a fork.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections held by this process."""

    @abc.abstractmethod
    def check(self) -> None:
        """Return if the backend answers; raise :class:`Unavailable` otherwise."""

    def announce(self, log: logging.Logger) -> None:
        """Log, once at start, what serves and anything an operator must know.

        Must not connect: it runs in the factory, before any fork.
        """
        log.info("storage: %s", type(self).__name__)

    def atomic(self) -> contextlib.AbstractContextManager[None]:
        """A unit of work: the calls made inside it on this thread commit together, or
        not at all when the block raises (a call that raises inside it undoes only its own
        part, so the block may go on). Units nest.

        The SQL backends run it as one transaction (nested calls as savepoints);
        the memory backend holds its lock for the block, and has no rollback.
        """
        return contextlib.nullcontext()

    # Agents

    @abc.abstractmethod
    def create_agent(self, *, agent: Agent) -> Agent:
        """Store a new agent. Raises :class:`Conflict` when its key exists."""

    @abc.abstractmethod
    def get_agent(self, *, agent_key: str) -> Agent:
        """Raises :class:`AgentNotFound`."""

    @abc.abstractmethod
    def list_agents(self, *, limit: int, after: int | None = None) -> Page:
        """A page of agents in creation order."""

    @abc.abstractmethod
    def get_usage(self, *, agent_key: str) -> dict[str, int]:
        """What the agent stores: ``{"sessions", "events", "bytes"}`` (its quotas count these)."""

    @abc.abstractmethod
    def update_agent(
        self,
        *,
        agent_key: str,
        changes: Mapping[str, Any],
        now: dt.datetime,
        precondition: Precondition[Agent] | None = None,
    ) -> Agent:
        """Apply ``changes`` (field to new value) and move ``updated_at``.

        ``precondition``, when given, is called with the agent as stored, in
        the transaction of the write and with the record held against other
        writers: when it returns False nothing is written and
        :class:`PreconditionFailed` is raised (so of two writers whose
        precondition held for one version, the second sees the first's
        result). Raises :class:`AgentNotFound` (before any precondition).
        """

    @abc.abstractmethod
    def delete_agent(
        self, *, agent_key: str, precondition: Precondition[Agent] | None = None
    ) -> None:
        """Delete the agent, all its sessions and every grant naming it, in one transaction.

        An API key keeps its other grants (``*`` ones included), so a new agent
        with the same key gives no old key access. ``precondition`` as for
        :meth:`update_agent`. Raises :class:`AgentNotFound`,
        :class:`PreconditionFailed`.
        """

    # Sessions

    @abc.abstractmethod
    def create_session(self, *, session: Session) -> Session:
        """Store a new session.

        Raises :class:`AgentNotFound` when the agent does not exist,
        :class:`AgentDisabled` when its ``enabled`` is false, and
        :class:`Conflict` when the agent already has a live session with this
        key. A session idle past its TTI at ``session.created_at`` holds no
        key: it is removed in the transaction that stores the new one. The
        uniqueness is decided by the store itself, so concurrent creates of
        one key give exactly one winner.
        """

    @abc.abstractmethod
    def get_session(self, *, agent_key: str, session_key: str, now: dt.datetime) -> Session:
        """Raises :class:`SessionNotFound`, also for a session idle past its TTI at ``now``
        (which is then removed).
        """

    @abc.abstractmethod
    def list_sessions(
        self,
        *,
        agent_key: str,
        limit: int,
        now: dt.datetime,
        after: int | None = None,
        matches: Any = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Page:
        """A page of the agent's live sessions in creation order.

        ``matches``, when given, is a compiled pattern with a ``search``
        method; only sessions whose name or description it matches are listed.
        ``metadata``, when given (1 to 4 keys), lists only the sessions whose
        metadata has each top-level key with a value whose text is the one given:
        a string equal to it, or a number or boolean whose JSON text is it
        (:func:`codec.metadata_value_text`). It is read through an index kept in
        the transaction of every write of a session's metadata, so a page costs
        the same at any size and depth; with several keys (or ``matches``) it
        reads the first key's matches within the same budget as a filter.
        Such a page reads a bounded number of sessions for a bounded time
        (``FILTER_SCAN_ROWS``, ``FILTER_SCAN_SECONDS``): when the budget runs
        out first, it ends early, with fewer than ``limit`` items (maybe none)
        and ``next_cursor`` at the last session read.
        An unknown agent lists as empty: callers check the agent first.
        """

    @abc.abstractmethod
    def update_session(
        self,
        *,
        agent_key: str,
        session_key: str,
        changes: Mapping[str, Any],
        now: dt.datetime,
        precondition: Precondition[Session] | None = None,
    ) -> Session:
        """Apply ``changes`` (field to new value) and move ``updated_at`` to ``now``.

        An update restarts the idle clock: ``active_at`` moves to ``now`` too.
        Raises :class:`SessionNotFound`, also when expired at ``now`` (the
        session is then removed, as by :meth:`get_session`), and
        :class:`PreconditionFailed` when ``precondition`` (see
        :meth:`update_agent`) returns False for the live session as stored.
        """

    @abc.abstractmethod
    def delete_session(
        self,
        *,
        agent_key: str,
        session_key: str,
        now: dt.datetime,
        precondition: Precondition[Session] | None = None,
    ) -> None:
        """Raises :class:`SessionNotFound` (also when expired at ``now``) and
        :class:`PreconditionFailed` (see :meth:`update_agent`)."""

    @abc.abstractmethod
    def purge_expired_sessions(self, *, now: dt.datetime) -> int:
        """Remove every session idle past its TTI at ``now``; return how many (what a
        crashed fork left, a placeholder and never a session, goes too, uncounted)."""

    # Events: the history of one live session, in the order written

    @abc.abstractmethod
    def append_events(
        self,
        *,
        agent_key: str,
        session_key: str,
        events: list[Event],
        now: dt.datetime,
        if_last_event_id: Any = ANY_LAST_EVENT,
        metadata_patch: Mapping[str, Any] | None = None,
        check_metadata: Callable[[dict[str, Any]], None] | None = None,
        create: Session | None = None,
        create_exclusive: bool = False,
        state_patch: Mapping[str, Mapping[str, Any]] | None = None,
        check_state: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> Session:
        """Append ``events`` (ids chosen by the caller) in one transaction, all or nothing.

        ``state_patch`` maps state document keys of the agent to JSON merge patches,
        applied in the same transaction (a document never written starts as ``{}``);
        ``check_state`` is called with each key and result before anything is
        written, and whatever it raises aborts the batch. Writers of one document
        take turns, so no patch is lost.

        ``create``, when given, is the session to create (its key ``session_key``)
        if no live one has the key: created in the same transaction, so that the
        batch's first write needs no other call; raises then what
        :meth:`create_session` raises (:class:`AgentNotFound`, :class:`AgentDisabled`)
        and :class:`SessionDisabled` for one created disabled, and nothing is
        created. Of two batches creating one key at once, one creates it and the
        other appends to it; with ``create_exclusive`` a live session with the key
        (the other batch's too) is :class:`Conflict` instead, and nothing is written.

        The same transaction restarts the session's idle clock (``active_at``
        and the stored expiry move to ``now``) and, with ``metadata_patch``,
        applies it to the session's metadata as a JSON merge patch (RFC 7386),
        moving ``updated_at``; ``check_metadata`` is called with the result
        before anything is written and whatever it raises aborts the batch.
        ``if_last_event_id``: the batch is written only while the session's
        last event (hidden or not) has this id (``None``: it has no event),
        else :class:`StaleHistory`. Returns the session as written.

        Raises :class:`SessionNotFound` (also when expired at ``now``),
        :class:`SessionDisabled`, :class:`Conflict` when an id is already in
        the session (or twice in the batch). A batch wrong in several ways is
        refused for the first of them in this order: the session not found;
        whatever ``check_metadata`` raises (the request's own fault); then the
        session's state: disabled, :class:`StaleHistory`, a duplicate id.
        """

    @abc.abstractmethod
    def append_events_since(
        self,
        *,
        agent_key: str,
        session_key: str,
        events: list[Event],
        now: dt.datetime,
        since: str | None,
        limit: int,
        max_bytes: int | None = None,
    ) -> list[Event]:
        """Append ``events`` as :meth:`append_events` does and, in the same transaction,
        read back the visible events written after the event ``since``, oldest first.

        ``since`` may name a hidden event; None reads from the session's first
        event. ``events`` are the last of what is returned: the read sees
        exactly the history the append extended, whatever else writes to the
        session at the same time. Nothing is written when it raises, for the
        first of these: :class:`SessionNotFound` (also when expired at
        ``now``), :class:`SessionDisabled`, :class:`EventNotFound` when the
        session has no event ``since``, :class:`Conflict` for an id of
        ``events`` already in the session (or twice in ``events``), and
        :class:`TooManyEvents` when more than ``limit`` events would be
        returned, or when their fields serialize (as stored, JSON) to more than
        ``max_bytes`` bytes in all.
        """

    @abc.abstractmethod
    def list_events(
        self,
        *,
        agent_key: str,
        session_key: str,
        limit: int,
        now: dt.datetime,
        after: int | None = None,
        descending: bool = False,
        include_hidden: bool = False,
        types: frozenset[str] | None = None,
        max_bytes: int | None = None,
    ) -> Page:
        """A page of the session's events, oldest first (``descending``: newest first).

        ``after`` is the ``next_cursor`` of the previous page in the same
        direction. The cost of a page does not depend on its depth (keyset).
        ``max_bytes``: the page ends (with a cursor) at the first event whose stored
        fields take it past that many bytes, read no further. Raises :class:`SessionNotFound`.
        """

    @abc.abstractmethod
    def get_event(
        self, *, agent_key: str, session_key: str, event_id: str, now: dt.datetime
    ) -> Event:
        """An event, hidden or not. Raises :class:`SessionNotFound`, :class:`EventNotFound`."""

    @abc.abstractmethod
    def set_event_hidden(
        self,
        *,
        agent_key: str,
        session_key: str,
        event_id: str,
        hide_reason: str | None,
        now: dt.datetime,
    ) -> Event:
        """Set (``"manual"``) or clear (None) an event's ``hide_reason``; return the event.

        Raises :class:`SessionNotFound`, :class:`EventNotFound`.
        """

    @abc.abstractmethod
    def delete_event(
        self, *, agent_key: str, session_key: str, event_id: str, now: dt.datetime
    ) -> None:
        """Raises :class:`SessionNotFound`, :class:`EventNotFound`."""

    @abc.abstractmethod
    def pop_event(
        self,
        *,
        agent_key: str,
        session_key: str,
        now: dt.datetime,
        if_last_event_id: Any = ANY_LAST_EVENT,
    ) -> Event | None:
        """Delete the session's newest event (hidden or not) and return it, in one
        transaction; None when the history is empty.

        ``if_last_event_id``: only while the newest event has this id, else
        :class:`StaleHistory` and nothing is deleted. Appends and pops of one
        session take turns, so an event is popped at most once. Raises
        :class:`SessionNotFound`; a disabled session's events can be popped.
        """

    @abc.abstractmethod
    def clear_events(self, *, agent_key: str, session_key: str, now: dt.datetime) -> int:
        """Delete every event of the session, hidden ones too, in one transaction; the session
        stays (its fields and idle clock unchanged). Return how many were deleted.

        A disabled session is cleared too. Raises :class:`SessionNotFound` (also when
        expired at ``now``: it is then removed).
        """

    @abc.abstractmethod
    def compact_events(
        self,
        *,
        agent_key: str,
        session_key: str,
        up_to_event_id: str | None,
        compaction: Event,
        now: dt.datetime,
        check_compaction: Callable[[Event], None] | None = None,
    ) -> Event:
        """Hide by compaction every visible event up to and including ``up_to_event_id``
        and append ``compaction``, in one transaction; return the compaction event.

        ``up_to_event_id`` None: every visible event before the last visible
        ``input_message`` (all of them when there is none). The caller fills
        ``compaction.fields`` except ``turns_compacted`` (input messages
        hidden) and ``events_compacted`` (events hidden), which the backend
        sets. ``check_compaction`` is called with the event as it is about to
        be stored (counts set); whatever it raises aborts the call and nothing
        is written. Restarts the idle clock like :meth:`append_events`. Raises
        :class:`SessionNotFound`, :class:`SessionDisabled`,
        :class:`EventNotFound` (an anchor that is not a visible event of the
        session: a hidden one is refused, as :meth:`fork_session` refuses it).
        """

    @abc.abstractmethod
    def fork_session(
        self,
        *,
        session: Session,
        source_agent_key: str,
        source_session_key: str,
        include_up_to_event_id: str | None = None,
        compact_up_to_event_id: str | None = None,
        compaction: Event | None = None,
        check_compaction: Callable[[Event], None] | None = None,
    ) -> Session:
        """Create ``session`` with a copy of the source's visible events, in one transaction.

        Copies keep their ids, fields and ``created_at``, in order: every
        visible event, or those up to and including ``include_up_to_event_id``.
        With ``compact_up_to_event_id`` (and ``compaction``, whose
        ``*_compacted`` counts the backend sets), the copies up to that anchor
        are hidden by compaction and ``compaction`` is appended after the last
        copy; ``check_compaction`` is called with it as :meth:`compact_events`
        calls it. The copy is of one state of the source: a batch or a
        compaction of the source committing meanwhile is in it whole or not
        at all.
        The stored session's ``forked_from`` names the source and the
        last event copied. Raises what :meth:`create_session` raises for the
        new session, :class:`SessionNotFound` for the source and
        :class:`EventNotFound` for an anchor not among its visible events.
        """

    @abc.abstractmethod
    def iter_events(self, *, agent_key: str, session_key: str, now: dt.datetime) -> Iterator[Event]:
        """Every event of the session, hidden ones included, oldest first.

        Read lazily in batches (constant memory for any history). The session
        is checked by the call itself, which raises :class:`SessionNotFound`
        before it returns the iterator (so a streamed answer can still be a 404).
        Each batch is read on its own: events written or removed meanwhile may
        or may not appear, but none appears twice or out of order, and none
        of another session: a session deleted before its last batch is read
        ends the iteration with :class:`SessionNotFound`, so that what was
        read is never taken for the whole history.
        """

    def count_events(self, *, agent_key: str, session_key: str, now: dt.datetime) -> int:
        """How many events the session holds, hidden ones included (what :meth:`iter_events`
        would yield now). Raises :class:`SessionNotFound`. Backends count without reading."""
        events = self.iter_events(agent_key=agent_key, session_key=session_key, now=now)
        return sum(1 for _ in events)

    @abc.abstractmethod
    def import_session(self, *, session: Session, events: Iterable[Event]) -> int:
        """Create ``session`` and append ``events`` as given (ids, times and hide
        reasons kept); return how many. All or nothing; raises what
        :meth:`create_session` raises, and :class:`Conflict` for an id given
        twice. A disabled session may be imported (a restore is not new input).
        ``session.forked_from`` and ``active_at`` are stored as given.
        """

    # State documents: what an agent's runtime keeps across its sessions

    @abc.abstractmethod
    def get_state(self, *, agent_key: str, keys: list[str]) -> list[StateDocument]:
        """The agent's state documents with these keys, in that order; a key never written
        is an empty document without ``updated_at``. Raises :class:`AgentNotFound`.

        They are written by :meth:`append_events` (``state_patch``) and deleted with
        their agent.
        """

    # API keys

    @abc.abstractmethod
    def create_api_key(self, *, api_key: ApiKey) -> ApiKey:
        """Raises :class:`Conflict` when the id exists."""

    @abc.abstractmethod
    def get_api_key(self, *, key_id: str) -> ApiKey:
        """Look a key up by its id, revoked or not. Raises :class:`ApiKeyNotFound`."""

    @abc.abstractmethod
    def list_api_keys(self, *, limit: int, after: int | None = None) -> Page:
        """A page of keys in creation order."""

    @abc.abstractmethod
    def revoke_api_key(self, *, key_id: str, now: dt.datetime) -> ApiKey:
        """Mark the key revoked (idempotent). Raises :class:`ApiKeyNotFound`."""

    # Idempotency keys: a request's answer, remembered for its retries

    @abc.abstractmethod
    def claim_idempotency_key(
        self,
        *,
        scope: str,
        key: str,
        fingerprint: str,
        token: str,
        now: dt.datetime,
        locked_until: dt.datetime,
        expires_at: dt.datetime,
    ) -> IdempotencyRecord:
        """Claim ``key`` (within ``scope``) for the request ``fingerprint``, with ``token``.

        The claim is taken, and committed at once, when the key holds nothing, a
        record expired at ``now``, or a claim of the same fingerprint whose lock
        ended (its request died unanswered). Returns the record as stored: the
        caller holds the key when its ``token`` is the caller's and ``answer`` is
        None. Claims of one key are decided one at a time, across processes.
        """

    @abc.abstractmethod
    def finish_idempotency_key(
        self, *, scope: str, key: str, token: str, answer: Answer, agent_key: str | None = None
    ) -> None:
        """Remember ``answer`` for the claim ``token``; inside :meth:`atomic`, in the same
        transaction as the write it answers, its bytes counted in ``agent_key``'s usage.
        Raises :class:`IdempotencyKeyLost` when the claim is no longer ``token``'s."""

    @abc.abstractmethod
    def release_idempotency_key(self, *, scope: str, key: str, token: str) -> None:
        """Give up the claim ``token`` unanswered (a retry is processed anew); a claim that
        is no longer ``token``'s is left alone."""

    @abc.abstractmethod
    def purge_expired_idempotency_keys(self, *, now: dt.datetime) -> int:
        """Remove every idempotency record expired at ``now``; return how many."""

    # The browser console: its sign-ins, and the newest sessions first

    @abc.abstractmethod
    def create_console_session(self, *, console_session: ConsoleSession) -> ConsoleSession:
        """Store a console sign-in, and remove every one expired at its ``created_at``
        (so the table holds only live sign-ins without a sweep of its own).

        Raises :class:`Conflict` when its ``token_hash`` exists.
        """

    @abc.abstractmethod
    def get_console_session(self, *, token_hash: str, now: dt.datetime) -> ConsoleSession:
        """The live sign-in with this token hash. Raises :class:`ConsoleSessionNotFound`,
        also for one expired at ``now`` (which is then removed)."""

    @abc.abstractmethod
    def delete_console_session(self, *, token_hash: str) -> None:
        """End a sign-in; one that does not exist is no error (signing out twice)."""

    @abc.abstractmethod
    def list_recent_sessions(
        self,
        *,
        agent_key: str,
        limit: int,
        now: dt.datetime,
        before: int | None = None,
        matches: Any = None,
    ) -> Page:
        """A page of the agent's live sessions, newest first.

        ``before`` is the ``next_cursor`` of the previous page: the page starts
        with the newest session created before it (keyset, so a page costs the
        same at any depth). ``matches`` and its bounded scan are as for
        :meth:`list_sessions`, whose cursors mean nothing here.
        An unknown agent lists as empty: callers check the agent first.
        """
