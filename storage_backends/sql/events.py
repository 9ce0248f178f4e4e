"""Events in SQL: append, list, read, hide, delete, compaction, export and import (the fork
is forks.py)."""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from ..base import (
    ANY_LAST_EVENT,
    HIDDEN_BY_COMPACTION,
    AgentNotFound,
    Conflict,
    Event,
    EventNotFound,
    Page,
    Session,
    SessionDisabled,
    SessionNotFound,
    StaleHistory,
    TooManyEvents,
)
from ..codec import fields_bytes, merge_patch, same_json
from .schema import (
    DELETE_EVENT,
    DELETE_EXPIRED_BY_ID,
    DELETE_EXPIRED_SESSION,
    EVENT_BATCH,
    FIND_SESSION,
    GET_EVENT,
    HIDE_EVENT,
    IMPORT_BATCH,
    INSERT_EVENT,
    LAST_EVENT,
    LAST_EVENT_ID,
    LIVE,
    SESSION_EXISTS,
    SESSIONS,
    SHARDS,
    event_page_query,
    event_size_sql,
)
from .usage import UsageRecords, event_bytes


class _CreatedMeanwhile(Exception):
    """A batch's create_session lost the race for its key to another writer's."""


class EventRecords(UsageRecords):
    """The event operations of :class:`SQLStorage`."""

    def _event(self, row: Any, session_key: str) -> Event:
        """An event from a row of :data:`EVENT_COLUMNS`."""
        _, event_id, kind, fields, created_at, hide_reason = row
        return Event(
            id=event_id,
            session_key=session_key,
            type=kind,
            fields=self.decode_json(fields),
            created_at=self.decode_ts(created_at),
            hide_reason=hide_reason,
        )

    def _event_params(self, session_id: int, event: Event) -> list[Any]:
        """The parameters of :data:`INSERT_EVENT` for ``event`` in the session ``session_id``."""
        return [
            session_id,
            event.id,
            event.type,
            self.encode_json(event.fields),
            self.encode_ts(event.created_at),
            event.hide_reason,
        ]

    def _insert_events(
        self, conn: Any, agent_key: str, session_id: int, events: list[Event]
    ) -> None:
        """Charge ``events`` to the session ``session_id`` and its agent, then insert them:
        a refusal of the quota comes before anything is written."""
        if not events:
            return
        rows = [self._event_params(session_id, event) for event in events]
        size = sum(event_bytes(event, row[3]) for event, row in zip(events, rows, strict=True))
        self._charge_events(conn, agent_key, session_id, len(events), size)
        self._execute_many(conn, self._sql(INSERT_EVENT), rows)

    def _session_id(self, agent_key: str, session_key: str, now: dt.datetime) -> int:
        """The row id of a live session: for an export's batches, and to tell why a
        statement on a session's events (which finds the session itself) found none.

        Raises :class:`SessionNotFound`, also for a session expired at ``now``
        (which is then removed, with its events).
        """
        with self._reading() as conn:
            row = conn.execute(self._sql(FIND_SESSION), [agent_key, session_key]).fetchone()
        if row is None:
            raise SessionNotFound(session_key)
        if not self._live(row[1], now):
            with self._writing() as conn:
                conn.execute(self._sql(DELETE_EXPIRED_BY_ID), [row[0], self.encode_ts(now)])
            raise SessionNotFound(session_key)
        return row[0]

    def _touch(
        self, conn: Any, agent_key: str, session_key: str, now: dt.datetime
    ) -> tuple[int, Session] | None:
        """Restart a live session's idle clock in ``conn``'s transaction; (row id, session).

        The UPDATE holds the session's row until the transaction ends, so
        writers of one session's history take turns (SQLite's writers already
        do, in BEGIN IMMEDIATE). None when no live session has the key: an
        expired one is then removed, in this transaction, which the caller
        lets commit before it raises :class:`SessionNotFound`. A disabled
        session is the caller's to refuse (:class:`SessionDisabled`, which
        rolls the restart back), in its own order of refusals.
        """
        touched = self._touch_charging(conn, agent_key, session_key, now, 0, 0)
        return None if touched is None else touched[:2]

    def _touch_charging(
        self, conn: Any, agent_key: str, session_key: str, now: dt.datetime, count: int, size: int
    ) -> tuple[int, Session, int] | None:
        """:meth:`_touch` that also counts ``count`` events of ``size`` bytes to the
        session's own usage in the same statement: (row id, session, its events now).
        The caller charges the agent (:meth:`_charge_agent`) and checks the bound."""
        stamp = self.encode_ts(now)
        row = conn.execute(
            self._sql(
                f"UPDATE sessions SET active_at = ?, expires_at = {self.expires_from_tti}, "
                "event_count = event_count + ?, event_bytes = event_bytes + ? "
                f"WHERE agent_key = ? AND key = ? AND {LIVE} {SESSIONS.returning}, event_count"
            ),
            [stamp, stamp, count, size, agent_key, session_key, stamp],
        ).fetchone()
        if row is None:
            conn.execute(self._sql(DELETE_EXPIRED_SESSION), [agent_key, session_key, stamp])
            return None
        return row[0], self._record(SESSIONS, row), row[-1]

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
        options = (if_last_event_id, metadata_patch, check_metadata, state_patch, check_state)
        try:
            return self._append(
                agent_key, session_key, events, now, *options, create, create_exclusive
            )
        except _CreatedMeanwhile:
            # Another writer created the session first, and committed: it exists now.
            if create_exclusive:
                raise Conflict(f"session {session_key!r} already exists") from None
            return self._append(agent_key, session_key, events, now, *options, None)

    def _append(
        self,
        agent_key: str,
        session_key: str,
        events: list[Event],
        now: dt.datetime,
        if_last_event_id: Any,
        metadata_patch: Mapping[str, Any] | None,
        check_metadata: Callable[[dict[str, Any]], None] | None,
        state_patch: Mapping[str, Mapping[str, Any]] | None,
        check_state: Callable[[str, dict[str, Any]], None] | None,
        create: Session | None,
        create_exclusive: bool = False,
    ) -> Session:
        ids = [event.id for event in events]
        creating = False
        try:
            with self._transaction() as conn:
                rows = [self._event_params(0, event) for event in events]
                size = sum(event_bytes(e, row[3]) for e, row in zip(events, rows, strict=True))
                charged = self._touch_charging(conn, agent_key, session_key, now, len(events), size)
                touched = None if charged is None else charged[:2]
                if touched is not None and create is not None and create_exclusive:
                    raise Conflict(f"session {session_key!r} already exists")
                if touched is None and create is not None:
                    # Created in this transaction: a refusal below rolls it back.
                    creating = True
                    touched = self._insert_session(conn, create), create
                    creating = False
                if touched is not None:
                    # The refusals in the contract's order (Storage.append_events).
                    session_id, session = touched
                    metadata = None
                    if metadata_patch is not None:
                        metadata = merge_patch(session.metadata, dict(metadata_patch))
                        if check_metadata is not None:
                            check_metadata(metadata)
                    if not session.enabled:
                        raise SessionDisabled(session_key)
                    if if_last_event_id is not ANY_LAST_EVENT:
                        last = conn.execute(self._sql(LAST_EVENT_ID), [session_id]).fetchone()
                        if (None if last is None else last[0]) != if_last_event_id:
                            raise StaleHistory(session_key)
                    if len(set(ids)) != len(ids):
                        raise Conflict("an event id appears twice in the batch")
                    if metadata is not None and not same_json(metadata, session.metadata):
                        session = self._write_metadata(conn, session_id, session, metadata, now)
                    if state_patch:
                        self._patch_state(conn, agent_key, state_patch, check_state, now)
                    if charged is None:
                        self._insert_events(conn, agent_key, session_id, events)
                    elif events:
                        # The session counted them in its touch: the agent's turn now.
                        self._check_session_events(charged[2], len(events))
                        self._charge_agent(conn, agent_key, session_id % SHARDS, len(events), size)
                        for row in rows:
                            row[0] = session_id
                        self._execute_many(conn, self._sql(INSERT_EVENT), rows)
        except self.unique_violation:
            if creating:
                raise _CreatedMeanwhile from None
            raise Conflict("an event id of the batch is already in the session") from None
        except self.missing_reference:
            raise AgentNotFound(agent_key) from None
        if touched is None:
            raise SessionNotFound(session_key)
        return session

    def pop_event(
        self,
        *,
        agent_key: str,
        session_key: str,
        now: dt.datetime,
        if_last_event_id: Any = ANY_LAST_EVENT,
    ) -> Event | None:
        found, last = False, None
        with self._transaction() as conn:
            # Held: no append or other pop of this session comes between the read and the delete.
            row = conn.execute(
                self._sql(FIND_SESSION + self.row_lock), [agent_key, session_key]
            ).fetchone()
            if row is not None and not self._live(row[1], now):
                conn.execute(self._sql(DELETE_EXPIRED_BY_ID), [row[0], self.encode_ts(now)])
            elif row is not None:
                found = True
                last = conn.execute(self._sql(LAST_EVENT), [row[0]]).fetchone()
                if (
                    if_last_event_id is not ANY_LAST_EVENT
                    and (None if last is None else last[1]) != if_last_event_id
                ):
                    raise StaleHistory(session_key)
                if last is not None:
                    size = conn.execute(
                        self._sql(
                            "DELETE FROM events WHERE session_id = ? AND seq = ? "
                            f"RETURNING {event_size_sql(self.octets)}"
                        ),
                        [row[0], last[0]],
                    ).fetchone()[0]
                    self._charge_events(conn, agent_key, row[0], -1, -size)
        if not found:
            raise SessionNotFound(session_key)
        return None if last is None else self._event(last, session_key)

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
        ids = [event.id for event in events]
        rows: list[Any] = []
        try:
            with self._transaction() as conn:
                # The restart of the idle clock holds the session's row first: the read
                # below sees every append that came before this one, and no later one.
                touched = self._touch(conn, agent_key, session_key, now)
                if touched is not None:
                    # The refusals in the contract's order (Storage.append_events_since).
                    session_id, session = touched
                    if not session.enabled:
                        raise SessionDisabled(session_key)
                    after = (
                        None
                        if since is None
                        else self._event_seq(conn, session_id, since, visible=False)
                    )
                    if len(set(ids)) != len(ids):
                        raise Conflict("an event id appears twice in the batch")
                    self._insert_events(conn, agent_key, session_id, events)
                    query, _ = event_page_query(
                        False, False, 0, after is not None, by_id=True, rows=limit + 1
                    )
                    cursor = [] if after is None else [after]
                    rows = conn.execute(self._sql(query), [session_id, *cursor]).fetchall()
                    if len(rows) > limit:
                        raise TooManyEvents(limit)  # rolls the append back
                    answer = [self._event(row, session_key) for row in rows]
                    if max_bytes is not None and fields_bytes(answer) > max_bytes:
                        raise TooManyEvents(limit, max_bytes)  # rolls the append back
        except self.unique_violation:
            raise Conflict("an event id of the batch is already in the session") from None
        if touched is None:
            raise SessionNotFound(session_key)
        return answer

    def _write_metadata(
        self,
        conn: Any,
        session_id: int,
        session: Session,
        metadata: dict[str, Any],
        now: dt.datetime,
    ) -> Session:
        """Store the session's new metadata (and its rows of the metadata index), moving
        ``updated_at``; the session as written."""
        before = self._row_bytes(conn, session.agent_key, session.key)
        row = conn.execute(
            self._sql(
                f"UPDATE sessions SET metadata = ?, updated_at = ? WHERE id = ? "
                f"{SESSIONS.returning}"
            ),
            [self.encode_json(metadata), self.encode_ts(now), session_id],
        ).fetchone()
        self._index_metadata(conn, session_id, session.agent_key, metadata, session.metadata)
        self._check_session_bytes(conn, session.agent_key, session_id, before)
        return self._record(SESSIONS, row)

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
        kinds: list[str | None] = [None] if types is None else sorted(types)
        if not kinds:
            self._session_id(agent_key, session_key, now)
            return Page([], None)
        shape = (descending, include_hidden, 0 if types is None else len(kinds), after is not None)
        session = [agent_key, session_key, self.encode_ts(now)]
        cursor = [] if after is None else [after]
        params: list[Any] = []
        for kind in kinds:
            params += [*session, *([] if kind is None else [kind]), *cursor]
        with self._reading() as conn:
            if max_bytes is not None:
                # The sizes first, so that no more events than the bound holds (and the one
                # that passes it) are read: 1,000 events of EVENT_MAX_BYTES are 256 MiB.
                sizes, _ = event_page_query(*shape, rows=limit, columns=f"seq, {self.fields_bytes}")
                total = 0
                for count, (_, size) in enumerate(conn.execute(self._sql(sizes), params), 1):
                    total += size
                    if total > max_bytes:
                        limit = count
                        break
            query, _ = event_page_query(*shape, rows=limit + 1)
            rows = conn.execute(self._sql(query), params).fetchall()
        if not rows:
            self._session_id(agent_key, session_key, now)  # SessionNotFound, or an empty page
        more = len(rows) > limit
        rows = rows[:limit]
        return Page([self._event(row, session_key) for row in rows], rows[-1][0] if more else None)

    def get_event(
        self, *, agent_key: str, session_key: str, event_id: str, now: dt.datetime
    ) -> Event:
        params = [agent_key, session_key, self.encode_ts(now), event_id]
        with self._reading() as conn:
            row = conn.execute(self._sql(GET_EVENT), params).fetchone()
        if row is None:
            self._session_id(agent_key, session_key, now)
            raise EventNotFound(event_id)
        return self._event(row, session_key)

    def set_event_hidden(
        self,
        *,
        agent_key: str,
        session_key: str,
        event_id: str,
        hide_reason: str | None,
        now: dt.datetime,
    ) -> Event:
        params = [hide_reason, agent_key, session_key, self.encode_ts(now), event_id]
        with self._writing() as conn:
            row = conn.execute(self._sql(HIDE_EVENT), params).fetchone()
        if row is None:
            self._session_id(agent_key, session_key, now)
            raise EventNotFound(event_id)
        return self._event(row, session_key)

    def delete_event(
        self, *, agent_key: str, session_key: str, event_id: str, now: dt.datetime
    ) -> None:
        params = [agent_key, session_key, self.encode_ts(now), event_id]
        statement = self._sql(f"{DELETE_EVENT} RETURNING session_id, {event_size_sql(self.octets)}")
        with self._transaction() as conn:
            deleted = conn.execute(statement, params).fetchone()
            if deleted is not None:
                self._charge_events(conn, agent_key, deleted[0], -1, -deleted[1])
        if deleted is None:
            self._session_id(agent_key, session_key, now)
            raise EventNotFound(event_id)

    def clear_events(self, *, agent_key: str, session_key: str, now: dt.datetime) -> int:
        deleted = None
        with self._transaction() as conn:
            # Held: an append that comes meanwhile waits for the history to be empty.
            row = conn.execute(
                self._sql(FIND_SESSION + self.row_lock), [agent_key, session_key]
            ).fetchone()
            if row is not None and not self._live(row[1], now):
                conn.execute(self._sql(DELETE_EXPIRED_BY_ID), [row[0], self.encode_ts(now)])
            elif row is not None:
                count, size = conn.execute(
                    self._sql(
                        f"SELECT count(*), coalesce(sum({event_size_sql(self.octets)}), 0) "
                        "FROM events WHERE session_id = ?"
                    ),
                    [row[0]],
                ).fetchone()
                deleted = conn.execute(
                    self._sql("DELETE FROM events WHERE session_id = ?"), [row[0]]
                ).rowcount
                self._charge_events(conn, agent_key, row[0], -count, -size)
        if deleted is None:
            raise SessionNotFound(session_key)
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
        try:
            with self._transaction() as conn:
                touched = self._touch(conn, agent_key, session_key, now)
                if touched is not None:
                    session_id, session = touched
                    if not session.enabled:
                        raise SessionDisabled(session_key)
                    if up_to_event_id is not None:
                        bound = self._event_seq(conn, session_id, up_to_event_id, visible=True)
                    else:
                        # Everything before the last visible input message, or everything.
                        row = conn.execute(
                            self._sql(
                                "SELECT seq FROM events /*INDEXED BY idx_events_visible_type*/ "
                                "WHERE session_id = ? "
                                "AND type = 'input_message' AND hide_reason IS NULL "
                                "ORDER BY seq DESC LIMIT 1"
                            ),
                            [session_id],
                        ).fetchone()
                        bound = None if row is None else row[0] - 1
                    turns = self._count(
                        conn, session_id, "type = 'input_message' AND hide_reason IS NULL", bound
                    )
                    hidden = conn.execute(
                        self._sql(
                            "UPDATE events /*INDEXED BY idx_events_visible*/ "
                            "SET hide_reason = ? WHERE session_id = ? "
                            "AND hide_reason IS NULL" + ("" if bound is None else " AND seq <= ?")
                        ),
                        [HIDDEN_BY_COMPACTION, session_id, *([] if bound is None else [bound])],
                    ).rowcount
                    stored = self._add_compaction(
                        conn,
                        agent_key,
                        session_id,
                        session_key,
                        compaction,
                        turns,
                        hidden,
                        check_compaction,
                    )
        except self.unique_violation:
            raise Conflict(compaction.id) from None
        if touched is None:
            raise SessionNotFound(session_key)
        return stored

    def _event_seq(self, conn: Any, session_id: int, event_id: str, *, visible: bool) -> int:
        """The sequence number of an event (``visible``: of a visible one), else EventNotFound."""
        query = "SELECT seq FROM events WHERE session_id = ? AND id = ?"
        if visible:
            query += " AND hide_reason IS NULL"
        row = conn.execute(self._sql(query), [session_id, event_id]).fetchone()
        if row is None:
            raise EventNotFound(event_id)
        return row[0]

    def _count(self, conn: Any, session_id: int, condition: str, bound: int | None) -> int:
        """How many of the session's events meet ``condition``, up to ``bound`` (a seq)."""
        query = f"SELECT count(*) FROM events WHERE session_id = ? AND {condition}"
        params: list[Any] = [session_id]
        if bound is not None:
            query += " AND seq <= ?"
            params.append(bound)
        return conn.execute(self._sql(query), params).fetchone()[0]

    def _add_compaction(
        self,
        conn: Any,
        agent_key: str,
        session_id: int,
        session_key: str,
        compaction: Event,
        turns: int,
        hidden: int,
        check: Callable[[Event], None] | None,
    ) -> Event:
        """Append the compaction event, with its counts of what it hid, once ``check``
        (if any) has passed it as stored; what it raises rolls the transaction back."""
        stored = dataclasses.replace(
            compaction,
            session_key=session_key,
            fields={**compaction.fields, "turns_compacted": turns, "events_compacted": hidden},
        )
        if check is not None:
            check(stored)
        self._insert_events(conn, agent_key, session_id, [stored])
        return stored

    def iter_events(self, *, agent_key: str, session_key: str, now: dt.datetime) -> Iterator[Event]:
        session_id = self._session_id(agent_key, session_key, now)
        return self._iter_events(session_id, session_key)

    def count_events(self, *, agent_key: str, session_key: str, now: dt.datetime) -> int:
        session_id = self._session_id(agent_key, session_key, now)
        with self._reading() as conn:
            query = self._sql("SELECT count(*) FROM events WHERE session_id = ?")
            return conn.execute(query, [session_id]).fetchone()[0]

    def _iter_events(self, session_id: int, session_key: str) -> Iterator[Event]:
        """The batches, by the row id (never given to another session); the last one
        short. A session is deleted with its events in one statement, so one deleted
        before that last batch was read leaves it short too, and is then missing."""
        query = self._sql(event_page_query(False, True, 0, True, by_id=True)[0])
        after = 0
        while True:
            with self._reading() as conn:
                rows = conn.execute(query, [session_id, after, EVENT_BATCH]).fetchall()
                if len(rows) < EVENT_BATCH:
                    gone = conn.execute(self._sql(SESSION_EXISTS), [session_id]).fetchone() is None
            for row in rows:
                yield self._event(row, session_key)
            if len(rows) < EVENT_BATCH:
                if gone:
                    raise SessionNotFound(session_key)
                return
            after = rows[-1][0]

    def import_session(self, *, session: Session, events: Iterable[Event]) -> int:
        stored = 0
        try:
            with self._transaction() as conn:
                session_id = self._insert_session(conn, session)
                pending = iter(events)
                while chunk := list(itertools.islice(pending, IMPORT_BATCH)):
                    self._insert_events(conn, session.agent_key, session_id, chunk)
                    stored += len(chunk)
        except self.unique_violation:
            raise Conflict(f"{session.key} or an event id given twice") from None
        except self.missing_reference:
            raise AgentNotFound(session.agent_key) from None
        return stored

    def load_events(
        self,
        *,
        agent_key: str,
        session_key: str,
        events: Iterable[Event],
        batch: int = IMPORT_BATCH,
    ) -> int:
        """Append many events to a session as given, ``batch`` to a transaction; return how many.

        For benchmarks and tests: no check of the session's state or of the
        last event, and the idle clock stays. Raises :class:`SessionNotFound`
        and :class:`Conflict` (an id already in the session; earlier batches stay).
        """
        with self._reading() as conn:
            row = conn.execute(self._sql(FIND_SESSION), [agent_key, session_key]).fetchone()
        if row is None:
            raise SessionNotFound(session_key)
        stored = 0
        pending = iter(events)
        while chunk := list(itertools.islice(pending, batch)):
            try:
                with self._transaction() as conn:
                    self._insert_events(conn, agent_key, row[0], chunk)
            except self.unique_violation:
                raise Conflict("an event id of the batch is already in the session") from None
            stored += len(chunk)
        return stored

    @abc.abstractmethod
    def _execute_many(self, conn: Any, statement: str, rows: list[list[Any]]) -> int:
        """Run ``statement`` once per row; return the rows inserted."""
