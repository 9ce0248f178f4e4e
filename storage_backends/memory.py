"""In-process storage: a dict per table behind one lock.

Everything handed in or out is a copy sharing nothing mutable, so callers
can never change stored state by mutating an object. Data lives as long as
the process, and each gunicorn worker has its own: use it for tests, demos
and embedding. A page starts by bisecting a table's sorted sequence numbers,
so its cost does not grow with its depth.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import datetime as dt
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import config

from .base import (
    ANY_LAST_EVENT,
    HIDDEN_BY_COMPACTION,
    Agent,
    AgentDisabled,
    AgentNotFound,
    ApiKey,
    ApiKeyNotFound,
    Conflict,
    ConsoleSession,
    Event,
    EventNotFound,
    Page,
    Precondition,
    PreconditionFailed,
    Session,
    SessionDisabled,
    SessionNotFound,
    StaleHistory,
    Storage,
    TooManyEvents,
)
from .codec import fields_bytes, filter_rows, merge_patch, same_json
from .memory_console import MemoryConsole
from .memory_idempotency import MemoryIdempotency


class _Table(dict):
    """Records by key, as (sequence number, record), with their sequence numbers sorted.

    The sequence number is the page cursor: a page starts where a bisection of
    the sorted numbers puts it. Removal shifts the list (a memmove), which is
    far cheaper than walking a page's depth on every read.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seqs: list[int] = []
        self._keys: list[str] = []

    def add(self, seq: int, key: str, record: Any) -> None:
        # Sequence numbers only grow, so a new record always goes last.
        self[key] = (seq, record)
        self._seqs.append(seq)
        self._keys.append(key)

    def remove(self, key: str) -> None:
        seq, _ = self.pop(key)
        at = bisect.bisect_left(self._seqs, seq)
        del self._seqs[at], self._keys[at]

    def after(self, seq: int | None) -> Iterator[tuple[int, Any]]:
        """(sequence number, record) in order, from the first above ``seq``."""
        at = 0 if seq is None else bisect.bisect_right(self._seqs, seq)
        keys = self._keys
        while at < len(keys):
            yield self[keys[at]]
            at += 1

    def before(self, seq: int | None) -> Iterator[tuple[int, Any]]:
        """(sequence number, record) newest first, from the last below ``seq``."""
        at = len(self._seqs) if seq is None else bisect.bisect_left(self._seqs, seq)
        keys = self._keys
        while at > 0:
            at -= 1
            yield self[keys[at]]


class MemoryStorage(MemoryConsole, MemoryIdempotency, Storage):
    def __init__(
        self,
        *,
        filter_scan_rows: int = config.Config.FILTER_SCAN_ROWS,
        filter_scan_seconds: float = config.Config.FILTER_SCAN_SECONDS,
    ) -> None:
        # Reentrant: a unit of work (atomic) holds it across the calls made inside.
        self._lock = threading.RLock()
        self._seq = itertools.count(1)
        self._agents = _Table()
        self._sessions: dict[str, _Table] = {}
        self._keys = _Table()
        #: each session's history, by the session's sequence number
        self._events: dict[int, _Events] = {}
        self._init_idempotency()
        #: console sign-ins by token hash
        self._console: dict[str, ConsoleSession] = {}
        self.filter_scan_rows = int(filter_scan_rows)
        self.filter_scan_seconds = float(filter_scan_seconds)

    @classmethod
    def from_url(cls, url: str, *, options: Mapping[str, Any]) -> MemoryStorage:
        if url.rstrip("/") != "memory:":
            raise ValueError("the memory backend takes no path or options: use memory://")
        return cls(
            filter_scan_rows=options.get("FILTER_SCAN_ROWS", config.Config.FILTER_SCAN_ROWS),
            filter_scan_seconds=options.get(
                "FILTER_SCAN_SECONDS", config.Config.FILTER_SCAN_SECONDS
            ),
        )

    def check(self) -> None:
        return None

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """The lock, held for the block: no other thread sees it half done. There is no
        rollback (what the block stored before it raised stays stored)."""
        with self._lock:
            yield

    # Agents

    def create_agent(self, *, agent: Agent) -> Agent:
        with self._lock:
            if agent.key in self._agents:
                raise Conflict(agent.key)
            self._agents.add(next(self._seq), agent.key, _copy(agent))
            self._sessions[agent.key] = _Table()
            return _copy(agent)

    def get_agent(self, *, agent_key: str) -> Agent:
        with self._lock:
            return _copy(self._agent(agent_key))

    def list_agents(self, *, limit: int, after: int | None = None) -> Page:
        with self._lock:
            return _page(self._agents.after(after), limit)

    def update_agent(
        self,
        *,
        agent_key: str,
        changes: Mapping[str, Any],
        now: dt.datetime,
        precondition: Precondition[Agent] | None = None,
    ) -> Agent:
        with self._lock:
            seq, _ = self._agents.get(agent_key, (None, None))
            agent = self._agent(agent_key)
            _check(precondition, agent)
            agent = dataclasses.replace(agent, **_copy_tree(dict(changes)), updated_at=now)
            self._agents[agent_key] = (seq, agent)
            return _copy(agent)

    def delete_agent(
        self, *, agent_key: str, precondition: Precondition[Agent] | None = None
    ) -> None:
        with self._lock:
            _check(precondition, self._agent(agent_key))
            self._agents.remove(agent_key)
            for seq, _ in self._sessions.pop(agent_key).values():
                self._events.pop(seq, None)
            # A new agent with this key inherits no grants.
            for key_id, (seq, key) in list(self._keys.items()):
                kept = [grant for grant in key.grants if grant.agent != agent_key]
                if len(kept) != len(key.grants):
                    self._keys[key_id] = (seq, dataclasses.replace(key, grants=kept))

    def _agent(self, agent_key: str) -> Agent:
        try:
            return self._agents[agent_key][1]
        except KeyError:
            raise AgentNotFound(agent_key) from None

    # Sessions

    def create_session(self, *, session: Session) -> Session:
        with self._lock:
            self._create_session(session)
            return _copy(session)

    def _create_session(self, session: Session, log: _Events | None = None) -> None:
        """Store a copy of ``session`` with ``log`` as its history (empty by default).

        Called with the lock held; raises what :meth:`create_session` raises.
        """
        sessions = self._sessions.get(session.agent_key)
        if sessions is None:
            raise AgentNotFound(session.agent_key)
        if not self._agent(session.agent_key).enabled:
            raise AgentDisabled(session.agent_key)
        held = sessions.get(session.key)
        if held is not None:
            if not held[1].expired(session.created_at):
                raise Conflict(session.key)
            # Idle past its TTI, the session is gone for clients: its key is free.
            self._remove_session(sessions, session.key)
        seq = next(self._seq)
        sessions.add(seq, session.key, _copy(session))
        self._events[seq] = _Events() if log is None else log

    def get_session(self, *, agent_key: str, session_key: str, now: dt.datetime) -> Session:
        with self._lock:
            return _copy(self._live_session(agent_key, session_key, now)[1])

    def list_sessions(
        self,
        *,
        agent_key: str,
        limit: int,
        now: dt.datetime,
        after: int | None = None,
        matches: Any = None,
    ) -> Page:
        with self._lock:
            sessions = self._sessions.get(agent_key)
            if sessions is None:
                return Page([], None)
            live = ((seq, s) for seq, s in sessions.after(after) if not s.expired(now))
            if matches is None:
                return _page(live, limit)
            rows, stopped = filter_rows(
                live,
                limit=limit,
                matches=matches,
                text=lambda row: (row[1].name, row[1].description),
                position=lambda row: row[0],
                max_rows=self.filter_scan_rows,
                max_seconds=self.filter_scan_seconds,
            )
            if stopped is None:
                return _page(iter(rows), limit)
            return Page([_copy(r) for _, r in rows], stopped)

    def list_recent_sessions(
        self,
        *,
        agent_key: str,
        limit: int,
        now: dt.datetime,
        before: int | None = None,
        matches: Any = None,
    ) -> Page:
        with self._lock:
            sessions = self._sessions.get(agent_key)
            if sessions is None:
                return Page([], None)
            live = ((seq, s) for seq, s in sessions.before(before) if not s.expired(now))
            if matches is None:
                return _page(live, limit)
            rows, stopped = filter_rows(
                live,
                limit=limit,
                matches=matches,
                text=lambda row: (row[1].name, row[1].description),
                position=lambda row: row[0],
                max_rows=self.filter_scan_rows,
                max_seconds=self.filter_scan_seconds,
            )
            if stopped is None:
                return _page(iter(rows), limit)
            return Page([_copy(r) for _, r in rows], stopped)

    def update_session(
        self,
        *,
        agent_key: str,
        session_key: str,
        changes: Mapping[str, Any],
        now: dt.datetime,
        precondition: Precondition[Session] | None = None,
    ) -> Session:
        with self._lock:
            seq, session = self._live_session(agent_key, session_key, now)
            _check(precondition, session)
            session = dataclasses.replace(
                session, **_copy_tree(dict(changes)), updated_at=now, active_at=now
            )
            self._sessions[agent_key][session_key] = (seq, session)
            return _copy(session)

    def delete_session(
        self,
        *,
        agent_key: str,
        session_key: str,
        now: dt.datetime,
        precondition: Precondition[Session] | None = None,
    ) -> None:
        with self._lock:
            _check(precondition, self._live_session(agent_key, session_key, now)[1])
            self._remove_session(self._sessions[agent_key], session_key)

    def purge_expired_sessions(self, *, now: dt.datetime) -> int:
        with self._lock:
            removed = 0
            for sessions in self._sessions.values():
                for key in [k for k, (_, s) in sessions.items() if s.expired(now)]:
                    self._remove_session(sessions, key)
                    removed += 1
            return removed

    def _live_session(
        self, agent_key: str, session_key: str, now: dt.datetime
    ) -> tuple[int, Session]:
        sessions = self._sessions.get(agent_key)
        held = None if sessions is None else sessions.get(session_key)
        if held is None:
            raise SessionNotFound(session_key)
        seq, session = held
        if session.expired(now):
            self._remove_session(sessions, session_key)
            raise SessionNotFound(session_key)
        return seq, session

    def _remove_session(self, sessions: _Table, session_key: str) -> None:
        """Remove a session and its events."""
        seq, _ = sessions[session_key]
        sessions.remove(session_key)
        self._events.pop(seq, None)

    # Events

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
    ) -> Session:
        with self._lock:
            # The refusals in the contract's order (Storage.append_events).
            seq, session = self._live_session(agent_key, session_key, now)
            changes: dict[str, Any] = {"active_at": now}
            if metadata_patch is not None:
                metadata = _copy_tree(merge_patch(session.metadata, dict(metadata_patch)))
                if check_metadata is not None:
                    check_metadata(_copy_tree(metadata))
                if not same_json(metadata, session.metadata):
                    changes.update(metadata=metadata, updated_at=now)
            if not session.enabled:
                raise SessionDisabled(session_key)
            log = self._events[seq]
            if if_last_event_id is not ANY_LAST_EVENT and log.last_id() != if_last_event_id:
                raise StaleHistory(session_key)
            log.check_new([event.id for event in events])
            for event in events:
                log.add(next(self._seq), _stored(event, session_key))
            session = dataclasses.replace(session, **changes)
            self._sessions[agent_key][session_key] = (seq, session)
            return _copy(session)

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
        with self._lock:  # held across the checks, the append and the read
            # The refusals in the contract's order (Storage.append_events_since).
            seq, session = self._live_session(agent_key, session_key, now)
            if not session.enabled:
                raise SessionDisabled(session_key)
            log = self._events[seq]
            after = None if since is None else log.seq_of(since)
            log.check_new([event.id for event in events])
            # There is no rollback: the bound is checked before anything is written.
            room = limit - sum(event.hide_reason is None for event in events)
            rows = log.rows(after=after, include_hidden=False)
            if room < 0 or next(itertools.islice(rows, room, None), None) is not None:
                raise TooManyEvents(limit)
            if max_bytes is not None:
                stored = [event for _, event in log.rows(after=after, include_hidden=False)]
                if fields_bytes([*stored, *events]) > max_bytes:
                    raise TooManyEvents(limit, max_bytes)
            self.append_events(agent_key=agent_key, session_key=session_key, events=events, now=now)
            return _page(log.rows(after=after, include_hidden=False), limit).items

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
    ) -> Page:
        with self._lock:
            seq, _ = self._live_session(agent_key, session_key, now)
            rows = self._events[seq].rows(
                after=after, descending=descending, include_hidden=include_hidden
            )
            if types is not None:
                rows = ((s, e) for s, e in rows if e.type in types)
            return _page(rows, limit)

    def get_event(
        self, *, agent_key: str, session_key: str, event_id: str, now: dt.datetime
    ) -> Event:
        with self._lock:
            seq, _ = self._live_session(agent_key, session_key, now)
            return _copy(self._events[seq].get(event_id))

    def set_event_hidden(
        self,
        *,
        agent_key: str,
        session_key: str,
        event_id: str,
        hide_reason: str | None,
        now: dt.datetime,
    ) -> Event:
        with self._lock:
            seq, _ = self._live_session(agent_key, session_key, now)
            return _copy(self._events[seq].set_hidden(event_id, hide_reason))

    def delete_event(
        self, *, agent_key: str, session_key: str, event_id: str, now: dt.datetime
    ) -> None:
        with self._lock:
            seq, _ = self._live_session(agent_key, session_key, now)
            self._events[seq].remove(event_id)

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
        with self._lock:
            seq, session = self._live_session(agent_key, session_key, now)
            if not session.enabled:
                raise SessionDisabled(session_key)
            log = self._events[seq]
            visible = [event for _, event in log.rows(include_hidden=False)]
            if up_to_event_id is None:
                inputs = [i for i, e in enumerate(visible) if e.type == "input_message"]
                hidden = visible[: inputs[-1]] if inputs else visible
            else:
                ids = [event.id for event in visible]
                if up_to_event_id not in ids:  # the anchor is a visible event, as a fork's
                    raise EventNotFound(up_to_event_id)
                hidden = visible[: ids.index(up_to_event_id) + 1]
            log.check_new([compaction.id])
            stored = _compaction(compaction, session_key, hidden)
            if check_compaction is not None:
                check_compaction(_copy(stored))
            for event in hidden:
                log.set_hidden(event.id, HIDDEN_BY_COMPACTION)
            log.add(next(self._seq), stored)
            self._sessions[agent_key][session_key] = (
                seq,
                dataclasses.replace(session, active_at=now),
            )
            return _copy(stored)

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
        with self._lock:
            now = session.created_at
            source_seq, _ = self._live_session(source_agent_key, source_session_key, now)
            source = self._events[source_seq]
            copies = [_stored(e, session.key) for _, e in source.rows(include_hidden=False)]
            ids = [event.id for event in copies]
            if include_up_to_event_id is not None:
                if include_up_to_event_id not in ids:
                    raise EventNotFound(include_up_to_event_id)
                copies = copies[: ids.index(include_up_to_event_id) + 1]
                ids = ids[: len(copies)]
            hidden: list[Event] = []
            if compact_up_to_event_id is not None:
                if compact_up_to_event_id not in ids:
                    raise EventNotFound(compact_up_to_event_id)
                hidden = copies[: ids.index(compact_up_to_event_id) + 1]
            extra = []
            if compaction is not None and compact_up_to_event_id is not None:
                extra.append(_compaction(compaction, session.key, hidden))
                if check_compaction is not None:
                    check_compaction(_copy(extra[-1]))
            forked_from = {"agent_key": source_agent_key, "session_key": source_session_key}
            if copies:
                forked_from["event_id"] = copies[-1].id
            session = dataclasses.replace(_copy(session), forked_from=forked_from)
            for event in hidden:
                event.hide_reason = HIDDEN_BY_COMPACTION
            log = self._new_log(copies + extra)
            self._create_session(session, log)
            return _copy(session)

    def iter_events(self, *, agent_key: str, session_key: str, now: dt.datetime) -> Iterator[Event]:
        with self._lock:
            seq, _ = self._live_session(agent_key, session_key, now)
            log = self._events[seq]
        return self._iter_events(seq, log, session_key)

    def count_events(self, *, agent_key: str, session_key: str, now: dt.datetime) -> int:
        with self._lock:
            seq, _ = self._live_session(agent_key, session_key, now)
            return self._events[seq].count()

    def _iter_events(
        self, seq: int, log: _Events, session_key: str, batch: int = 1000
    ) -> Iterator[Event]:
        """As the SQL backends read: a session deleted before the last batch ends it."""
        after = None
        while True:
            with self._lock:
                rows = list(itertools.islice(log.rows(after=after, include_hidden=True), batch))
                events = [_copy(event) for _, event in rows]
                gone = self._events.get(seq) is not log
            if gone:
                raise SessionNotFound(session_key)
            yield from events
            if len(rows) < batch:
                return
            after = rows[-1][0]

    def import_session(self, *, session: Session, events: Iterable[Event]) -> int:
        stored = [_stored(event, session.key) for event in events]
        with self._lock:
            self._create_session(_copy(session), self._new_log(stored))
            return len(stored)

    def _new_log(self, events: list[Event]) -> _Events:
        """A history holding ``events`` (stored copies); :class:`Conflict` for a repeated id."""
        log = _Events()
        log.check_new([event.id for event in events])
        for event in events:
            log.add(next(self._seq), event)
        return log

    # API keys

    def create_api_key(self, *, api_key: ApiKey) -> ApiKey:
        with self._lock:
            if api_key.id in self._keys:
                raise Conflict(api_key.id)
            self._keys.add(next(self._seq), api_key.id, _copy(api_key))
            return _copy(api_key)

    def get_api_key(self, *, key_id: str) -> ApiKey:
        with self._lock:
            try:
                return _copy(self._keys[key_id][1])
            except KeyError:
                raise ApiKeyNotFound(key_id) from None

    def list_api_keys(self, *, limit: int, after: int | None = None) -> Page:
        with self._lock:
            return _page(self._keys.after(after), limit)

    def revoke_api_key(self, *, key_id: str, now: dt.datetime) -> ApiKey:
        with self._lock:
            try:
                seq, key = self._keys[key_id]
            except KeyError:
                raise ApiKeyNotFound(key_id) from None
            if key.revoked_at is None:
                key = dataclasses.replace(key, revoked_at=now)
                self._keys[key_id] = (seq, key)
            return _copy(key)


class _Events:
    """One session's history: events by sequence number, with the sorted numbers of
    all of them and of the visible ones, so that a page starts with a bisection.
    """

    def __init__(self) -> None:
        self._by_seq: dict[int, Event] = {}
        self._seq_of: dict[str, int] = {}
        self._all: list[int] = []
        self._visible: list[int] = []

    def count(self) -> int:
        return len(self._all)

    def check_new(self, ids: list[str]) -> None:
        """Raise :class:`Conflict` when an id is in the history or twice in ``ids``."""
        if len(set(ids)) != len(ids):
            raise Conflict("an event id appears twice in the batch")
        for event_id in ids:
            if event_id in self._seq_of:
                raise Conflict(event_id)

    def add(self, seq: int, event: Event) -> None:
        # Sequence numbers only grow, so a new event always goes last.
        self._by_seq[seq] = event
        self._seq_of[event.id] = seq
        self._all.append(seq)
        if event.hide_reason is None:
            self._visible.append(seq)

    def seq_of(self, event_id: str) -> int:
        try:
            return self._seq_of[event_id]
        except KeyError:
            raise EventNotFound(event_id) from None

    def get(self, event_id: str) -> Event:
        return self._by_seq[self.seq_of(event_id)]

    def last_id(self) -> str | None:
        return self._by_seq[self._all[-1]].id if self._all else None

    def set_hidden(self, event_id: str, hide_reason: str | None) -> Event:
        seq = self.seq_of(event_id)
        event = self._by_seq[seq]
        if (event.hide_reason is None) != (hide_reason is None):
            if hide_reason is None:
                bisect.insort(self._visible, seq)
            else:
                del self._visible[bisect.bisect_left(self._visible, seq)]
        event.hide_reason = hide_reason
        return event

    def remove(self, event_id: str) -> None:
        seq = self.seq_of(event_id)
        event = self._by_seq.pop(seq)
        del self._seq_of[event_id]
        del self._all[bisect.bisect_left(self._all, seq)]
        if event.hide_reason is None:
            del self._visible[bisect.bisect_left(self._visible, seq)]

    def rows(
        self, *, after: int | None = None, descending: bool = False, include_hidden: bool
    ) -> Iterator[tuple[int, Event]]:
        """(sequence number, event) in order (``descending``: newest first), past ``after``."""
        seqs = self._all if include_hidden else self._visible
        by_seq = self._by_seq
        if descending:
            at = len(seqs) if after is None else bisect.bisect_left(seqs, after)
            while at > 0:
                at -= 1
                yield seqs[at], by_seq[seqs[at]]
        else:
            at = 0 if after is None else bisect.bisect_right(seqs, after)
            while at < len(seqs):
                yield seqs[at], by_seq[seqs[at]]
                at += 1


def _stored(event: Event, session_key: str) -> Event:
    """A copy of ``event`` as stored in the session ``session_key``."""
    return dataclasses.replace(_copy(event), session_key=session_key)


def _compaction(compaction: Event, session_key: str, hidden: list[Event]) -> Event:
    """The compaction event to store, with its counts of what it ``hidden``."""
    stored = _stored(compaction, session_key)
    stored.fields.update(
        turns_compacted=sum(event.type == "input_message" for event in hidden),
        events_compacted=len(hidden),
    )
    return stored


def _check(precondition: Precondition[Any] | None, record: Any) -> None:
    """Raise :class:`PreconditionFailed` unless ``precondition`` (if any) holds for a copy
    of ``record`` (called with the lock held, so the write that follows sees the same)."""
    if precondition is not None and not precondition(_copy(record)):
        raise PreconditionFailed(getattr(record, "key", ""))


def _page(rows: Iterator[tuple[int, Any]], limit: int) -> Page:
    """Take ``limit`` records from (seq, record) pairs; the cursor says whether more follow."""
    picked = []
    for seq, record in rows:
        if len(picked) == limit:
            return Page([_copy(r) for _, r in picked], picked[-1][0])
        picked.append((seq, record))
    return Page([_copy(r) for _, r in picked], None)


def _copy(record: Any) -> Any:
    """A copy of a stored dataclass that shares nothing mutable with it.

    Records hold immutable values (text, numbers, datetimes, tuples) besides
    JSON metadata and a key's grants, so a shallow copy with those two copied
    anew is enough, at a sixth of ``copy.deepcopy``'s cost (2 µs a session).
    """
    clone = copy.copy(record)
    for name, value in vars(record).items():
        if isinstance(value, dict | list):
            setattr(clone, name, _copy_tree(value))
    return clone


def _copy_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy_tree(child) for key, child in value.items()}
    if isinstance(value, list):
        return [_copy_tree(child) for child in value]
    if dataclasses.is_dataclass(value):
        return _copy(value)
    return value
