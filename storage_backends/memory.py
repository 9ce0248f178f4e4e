"""In-process storage: a dict per table behind one lock.

Everything handed in or out is a copy sharing nothing mutable, so callers
can never change stored state by mutating an object. Data lives as long as
the process, and each gunicorn worker has its own: use it for tests, demos
and embedding. A page starts by bisecting a table's sorted sequence numbers,
so its cost does not grow with its depth.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import threading
import time
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
    Session,
    SessionDisabled,
    SessionNotFound,
    StaleHistory,
    StateDocument,
    Storage,
    TooManyEvents,
)
from .codec import (
    dump_json,
    fields_bytes,
    filter_rows,
    merge_patch,
    metadata_matches,
    same_json,
    text_matches,
)
from .memory_console import MemoryConsole
from .memory_idempotency import MemoryIdempotency
from .memory_tables import (
    History,
    MetadataIndex,
    Table,
    check_precondition,
    compaction_of,
    copy_record,
    copy_tree,
    page_of,
    stored_copy,
)
from .sql.schema import STATE_ROW_BYTES
from .sql.usage import event_bytes, session_bytes


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
        self._agents = Table()
        self._sessions: dict[str, Table] = {}
        #: the sessions' metadata values, for the list's metadata.KEY=VALUE
        self._by_metadata = MetadataIndex()
        self._keys = Table()
        #: each session's history, by the session's sequence number
        self._events: dict[int, History] = {}
        self._init_idempotency()
        #: each agent's state documents, by key
        self._state: dict[str, dict[str, StateDocument]] = {}
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

    def get_usage(self, *, agent_key: str) -> dict[str, int]:
        """Counted on demand, as the SQL backends count it; memory:// enforces no quota."""
        with self._lock:
            sessions = events = size = 0
            table = self._sessions.get(agent_key)
            for seq, session in table.after(None) if table is not None else ():
                sessions += 1
                size += session_bytes(session)
                for event in self._events[seq].events():
                    events += 1
                    size += event_bytes(event)
            for document in self._state.get(agent_key, {}).values():
                size += STATE_ROW_BYTES + len(dump_json(document.value).encode())
            return {"sessions": sessions, "events": events, "bytes": size}

    def create_agent(self, *, agent: Agent) -> Agent:
        with self._lock:
            if agent.key in self._agents:
                raise Conflict(agent.key)
            self._agents.add(next(self._seq), agent.key, copy_record(agent))
            self._sessions[agent.key] = Table()
            return copy_record(agent)

    def get_agent(self, *, agent_key: str) -> Agent:
        with self._lock:
            return copy_record(self._agent(agent_key))

    def list_agents(self, *, limit: int, after: int | None = None) -> Page:
        with self._lock:
            return page_of(self._agents.after(after), limit)

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
            check_precondition(precondition, agent)
            agent = dataclasses.replace(agent, **copy_tree(dict(changes)), updated_at=now)
            self._agents[agent_key] = (seq, agent)
            return copy_record(agent)

    def delete_agent(
        self, *, agent_key: str, precondition: Precondition[Agent] | None = None
    ) -> None:
        with self._lock:
            check_precondition(precondition, self._agent(agent_key))
            self._agents.remove(agent_key)
            for seq, session in self._sessions.pop(agent_key).values():
                self._events.pop(seq, None)
                self._by_metadata.remove(agent_key, seq, session.metadata)
            self._state.pop(agent_key, None)
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
            return copy_record(session)

    def _create_session(self, session: Session, log: History | None = None) -> None:
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
        sessions.add(seq, session.key, copy_record(session))
        self._by_metadata.add(session.agent_key, seq, session.metadata)
        self._events[seq] = History() if log is None else log

    def get_session(self, *, agent_key: str, session_key: str, now: dt.datetime) -> Session:
        with self._lock:
            return copy_record(self._live_session(agent_key, session_key, now)[1])

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
        with self._lock:
            sessions = self._sessions.get(agent_key)
            if sessions is None:
                return Page([], None)
            if metadata:
                return self._list_by_metadata(
                    agent_key, sessions, limit, now, after, matches, metadata
                )
            live = ((seq, s) for seq, s in sessions.after(after) if not s.expired(now))
            if matches is None:
                return page_of(live, limit)
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
                return page_of(iter(rows), limit)
            return Page([copy_record(r) for _, r in rows], stopped)

    def _list_by_metadata(
        self,
        agent_key: str,
        sessions: Table,
        limit: int,
        now: dt.datetime,
        after: int | None,
        matches: Any,
        metadata: Mapping[str, str],
    ) -> Page:
        """The metadata index's page, read as the SQL backends read theirs (see there)."""
        (key, value), *_ = metadata.items()
        picked: list[tuple[int, Session]] = []
        deadline = time.monotonic() + self.filter_scan_seconds
        read = 0
        for seq in self._by_metadata.after(agent_key, key, value, after):
            _, session = sessions.at(seq)
            if (
                not session.expired(now)
                and metadata_matches(session.metadata, metadata)
                and (matches is None or text_matches(matches, session.name, session.description))
            ):
                picked.append((seq, session))
                if len(picked) > limit:
                    return page_of(iter(picked), limit)
            read += 1
            if read >= self.filter_scan_rows or time.monotonic() > deadline:
                return Page([copy_record(s) for _, s in picked], seq)
        return page_of(iter(picked), limit)

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
                return page_of(live, limit)
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
                return page_of(iter(rows), limit)
            return Page([copy_record(r) for _, r in rows], stopped)

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
            check_precondition(precondition, session)
            updated = dataclasses.replace(
                session, **copy_tree(dict(changes)), updated_at=now, active_at=now
            )
            self._sessions[agent_key][session_key] = (seq, updated)
            self._reindex(agent_key, seq, session, updated)
            session = updated
            return copy_record(session)

    def delete_session(
        self,
        *,
        agent_key: str,
        session_key: str,
        now: dt.datetime,
        precondition: Precondition[Session] | None = None,
    ) -> None:
        with self._lock:
            check_precondition(precondition, self._live_session(agent_key, session_key, now)[1])
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

    def _remove_session(self, sessions: Table, session_key: str) -> None:
        """Remove a session and its events."""
        seq, session = sessions[session_key]
        sessions.remove(session_key)
        self._events.pop(seq, None)
        self._by_metadata.remove(session.agent_key, seq, session.metadata)

    def _reindex(self, agent_key: str, seq: int, before: Session, after: Session) -> None:
        if after.metadata is not before.metadata:
            self._by_metadata.remove(agent_key, seq, before.metadata)
            self._by_metadata.add(agent_key, seq, after.metadata)

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
        create: Session | None = None,
        create_exclusive: bool = False,
        state_patch: Mapping[str, Mapping[str, Any]] | None = None,
        check_state: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> Session:
        with self._lock:
            # The refusals in the contract's order (Storage.append_events).
            try:
                seq, session = self._live_session(agent_key, session_key, now)
                log = self._events[seq]
                if create is not None and create_exclusive:
                    raise Conflict(f"session {session_key!r} already exists")
            except SessionNotFound:
                if create is None:
                    raise
                # Created last, once every check passed: there is no rollback here.
                seq, session, log = None, copy_record(create), History()
            changes: dict[str, Any] = {"active_at": now}
            if metadata_patch is not None:
                metadata = copy_tree(merge_patch(session.metadata, dict(metadata_patch)))
                if check_metadata is not None:
                    check_metadata(copy_tree(metadata))
                if not same_json(metadata, session.metadata):
                    changes.update(metadata=metadata, updated_at=now)
            if not session.enabled:
                raise SessionDisabled(session_key)
            if if_last_event_id is not ANY_LAST_EVENT and log.last_id() != if_last_event_id:
                raise StaleHistory(session_key)
            log.check_new([event.id for event in events])
            documents = self._state.get(agent_key, {})
            patched = {}
            for key in sorted(state_patch or ()):
                held = documents.get(key)
                value = copy_tree(merge_patch(held.value if held else {}, dict(state_patch[key])))
                if check_state is not None:
                    check_state(key, copy_tree(value))
                patched[key] = StateDocument(key, value, now)
            if seq is None:
                new = dataclasses.replace(session, **changes)
                for event in events:
                    log.add(next(self._seq), stored_copy(event, session_key))
                self._create_session(new, log)
                result = new
            else:
                for event in events:
                    log.add(next(self._seq), stored_copy(event, session_key))
                result = dataclasses.replace(session, **changes)
                self._sessions[agent_key][session_key] = (seq, result)
                self._reindex(agent_key, seq, session, result)
            if patched:
                self._state.setdefault(agent_key, {}).update(patched)
            return copy_record(result)

    def pop_event(
        self,
        *,
        agent_key: str,
        session_key: str,
        now: dt.datetime,
        if_last_event_id: Any = ANY_LAST_EVENT,
    ) -> Event | None:
        with self._lock:
            seq, _ = self._live_session(agent_key, session_key, now)
            log = self._events[seq]
            last = log.last_id()
            if if_last_event_id is not ANY_LAST_EVENT and last != if_last_event_id:
                raise StaleHistory(session_key)
            if last is None:
                return None
            event = copy_record(log.get(last))
            log.remove(last)
            return event

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
            return page_of(log.rows(after=after, include_hidden=False), limit).items

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
        with self._lock:
            seq, _ = self._live_session(agent_key, session_key, now)

            def rows() -> Iterator[tuple[int, Event]]:
                found = self._events[seq].rows(
                    after=after, descending=descending, include_hidden=include_hidden
                )
                return found if types is None else ((s, e) for s, e in found if e.type in types)

            if max_bytes is not None:
                # As on SQL: the page ends at the event that takes it past max_bytes.
                total = 0
                for count, (_, event) in enumerate(itertools.islice(rows(), limit), 1):
                    total += fields_bytes([event])
                    if total > max_bytes:
                        limit = count
                        break
            return page_of(rows(), limit)

    def get_event(
        self, *, agent_key: str, session_key: str, event_id: str, now: dt.datetime
    ) -> Event:
        with self._lock:
            seq, _ = self._live_session(agent_key, session_key, now)
            return copy_record(self._events[seq].get(event_id))

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
            return copy_record(self._events[seq].set_hidden(event_id, hide_reason))

    def delete_event(
        self, *, agent_key: str, session_key: str, event_id: str, now: dt.datetime
    ) -> None:
        with self._lock:
            seq, _ = self._live_session(agent_key, session_key, now)
            self._events[seq].remove(event_id)

    def clear_events(self, *, agent_key: str, session_key: str, now: dt.datetime) -> int:
        with self._lock:
            seq, _ = self._live_session(agent_key, session_key, now)
            deleted = self._events[seq].count()
            self._events[seq] = History()
            return deleted

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
            stored = compaction_of(compaction, session_key, hidden)
            if check_compaction is not None:
                check_compaction(copy_record(stored))
            for event in hidden:
                log.set_hidden(event.id, HIDDEN_BY_COMPACTION)
            log.add(next(self._seq), stored)
            self._sessions[agent_key][session_key] = (
                seq,
                dataclasses.replace(session, active_at=now),
            )
            return copy_record(stored)

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
            copies = [stored_copy(e, session.key) for _, e in source.rows(include_hidden=False)]
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
                extra.append(compaction_of(compaction, session.key, hidden))
                if check_compaction is not None:
                    check_compaction(copy_record(extra[-1]))
            forked_from = {"agent_key": source_agent_key, "session_key": source_session_key}
            if copies:
                forked_from["event_id"] = copies[-1].id
            session = dataclasses.replace(copy_record(session), forked_from=forked_from)
            for event in hidden:
                event.hide_reason = HIDDEN_BY_COMPACTION
            log = self._new_log(copies + extra)
            self._create_session(session, log)
            return copy_record(session)

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
        self, seq: int, log: History, session_key: str, batch: int = 1000
    ) -> Iterator[Event]:
        """As the SQL backends read: a session deleted before the last batch ends it."""
        after = None
        while True:
            with self._lock:
                rows = list(itertools.islice(log.rows(after=after, include_hidden=True), batch))
                events = [copy_record(event) for _, event in rows]
                gone = self._events.get(seq) is not log
            if gone:
                raise SessionNotFound(session_key)
            yield from events
            if len(rows) < batch:
                return
            after = rows[-1][0]

    def import_session(self, *, session: Session, events: Iterable[Event]) -> int:
        stored = [stored_copy(event, session.key) for event in events]
        with self._lock:
            self._create_session(copy_record(session), self._new_log(stored))
            return len(stored)

    def _new_log(self, events: list[Event]) -> History:
        """A history holding ``events`` (stored copies); :class:`Conflict` for a repeated id."""
        log = History()
        log.check_new([event.id for event in events])
        for event in events:
            log.add(next(self._seq), event)
        return log

    # State documents

    def get_state(self, *, agent_key: str, keys: list[str]) -> list[StateDocument]:
        with self._lock:
            self._agent(agent_key)
            documents = self._state.get(agent_key, {})
            return [copy_record(documents.get(key) or StateDocument(key)) for key in keys]

    # API keys

    def create_api_key(self, *, api_key: ApiKey) -> ApiKey:
        with self._lock:
            if api_key.id in self._keys:
                raise Conflict(api_key.id)
            self._keys.add(next(self._seq), api_key.id, copy_record(api_key))
            return copy_record(api_key)

    def get_api_key(self, *, key_id: str) -> ApiKey:
        with self._lock:
            try:
                return copy_record(self._keys[key_id][1])
            except KeyError:
                raise ApiKeyNotFound(key_id) from None

    def list_api_keys(self, *, limit: int, after: int | None = None) -> Page:
        with self._lock:
            return page_of(self._keys.after(after), limit)

    def revoke_api_key(self, *, key_id: str, now: dt.datetime) -> ApiKey:
        with self._lock:
            try:
                seq, key = self._keys[key_id]
            except KeyError:
                raise ApiKeyNotFound(key_id) from None
            if key.revoked_at is None:
                key = dataclasses.replace(key, revoked_at=now)
                self._keys[key_id] = (seq, key)
            return copy_record(key)
