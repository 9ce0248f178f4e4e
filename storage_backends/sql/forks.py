"""Forks in SQL: a new session with a copy of its source's visible history.

Two ways, by the dialect's ``fork_in_chunks``:

- In one transaction (PostgreSQL, and any fork inside :meth:`atomic`): the source's
  row is shared-locked, the copy is one ``INSERT ... SELECT``, and the new session
  commits with its events. PostgreSQL's writers of other sessions never wait for it.
- In chunks (SQLite, whose one writer a large copy would hold for seconds): the
  source is read from a snapshot of its own (a read transaction on a second
  connection), which fixes one state of it. The new session is written first under
  a placeholder key (``~`` and a random hex: no client can name it) with an expiry
  in the past, so that no read, list or index sees it; its events follow, a chunk
  of a few milliseconds to a transaction. One small transaction then gives it its
  key, its expiry, its rows of the metadata index and the compaction event: the
  session and its events appear together. A failure drops the placeholder (its
  events are then freed as a deleted session's); a crash leaves it to
  ``purge-expired``, which removes placeholders older than FORK_PLACEHOLDER_GRACE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import secrets
import time
from collections.abc import Callable
from typing import Any

from ..base import (
    HIDDEN_BY_COMPACTION,
    AgentDisabled,
    AgentNotFound,
    Conflict,
    Event,
    EventNotFound,
    Session,
    SessionNotFound,
)
from ..codec import dump_json
from .dialect import identity
from .schema import (
    DELETE_EXPIRED_SESSION,
    EVENT_ROW_BYTES,
    FIND_SESSION,
    INSERT_EVENT,
    SESSION_EXISTS,
    SESSION_INSERT_COLUMNS,
    SESSIONS,
    event_size_sql,
)
from .usage import UsageRecords

# A placeholder's key starts with this, which no session key of the API can.
PLACEHOLDER_PREFIX = "~"
# A placeholder's expiry: long past, whatever a caller's clock says.
PLACEHOLDER_EXPIRY = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# A placeholder this old was left by a crash (no copy runs that long): purge removes it.
FORK_PLACEHOLDER_GRACE = dt.timedelta(hours=1)
# What one chunk of the copy aims to hold the writer for, and its bounds in rows.
FORK_TARGET_S = 0.01
FORK_CHUNK_FIRST = 200
FORK_CHUNK_MIN = 1
FORK_CHUNK_MAX = 5_000
# Between two chunks: time for a writer waiting for its turn to take it.
FORK_PAUSE_S = 0.001

# The source's events to copy, from a cursor (parameters: source id, after, last, limit).
FORK_ROWS = (
    "SELECT seq, id, type, fields, created_at FROM events /*INDEXED BY idx_events_visible*/ "
    "WHERE session_id = ? AND hide_reason IS NULL AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
)
# The copy in one statement (parameters: new id, compaction bound, its reason, source id, last).
FORK_COPY = (
    "INSERT INTO events (session_id, id, type, fields, created_at, hide_reason) "
    "SELECT ?, id, type, fields, created_at, CASE WHEN seq <= ? THEN ? END "
    "FROM events /*INDEXED BY idx_events_visible*/ "
    "WHERE session_id = ? AND hide_reason IS NULL AND seq <= ? ORDER BY seq"
)
# A placeholder takes its key and expiry, while its agent takes sessions.
PUBLISH_FORK = (
    "UPDATE sessions SET key = ?, expires_at = ? WHERE id = ? "
    "AND EXISTS (SELECT 1 FROM agents WHERE key = ? AND enabled)"
)


def _pause() -> None:
    """Between two chunks of a copy: a waiting writer's turn."""
    time.sleep(FORK_PAUSE_S)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a fork copies, read from one state of the source."""

    source_id: int
    last_seq: int | None  # the last event copied; None: nothing to copy
    compact_bound: int | None  # copies up to this seq are hidden by compaction
    hidden: int  # how many copies are hidden by compaction
    turns: int  # how many of those are input messages
    forked_from: dict[str, str]


class ForkRecords(UsageRecords):
    """The fork of :class:`SQLStorage`."""

    #: whether a fork copies in chunks, from a snapshot, behind a placeholder (see the
    #: module doc); else in one transaction
    fork_in_chunks = False

    def _snapshot(self) -> contextlib.AbstractContextManager[Any]:
        """A connection of its own in a read transaction: one state of the database for
        every statement run on it, beside the writes of this thread's connection."""
        raise NotImplementedError

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
        source = (source_agent_key, source_session_key)
        anchors = (include_up_to_event_id, compact_up_to_event_id)
        if self.fork_in_chunks and self._unit() is None:
            return self._fork_in_chunks(session, source, anchors, compaction, check_compaction)
        try:
            with self._transaction() as conn:
                # The source's row held until the copy commits: every writer of its
                # history (append, compaction) takes that row first, so the statements
                # below read one state of it, not a compaction's half.
                plan = self._fork_plan(conn, session, source, anchors, self.share_lock)
                session = dataclasses.replace(session, forked_from=plan.forked_from)
                session_id = self._insert_session(conn, session)
                if plan.last_seq is not None:
                    # A copy stores its events again: charged, or refused past a quota,
                    # before it is written.
                    count, size = self._fork_size(conn, plan)
                    self._charge_events(conn, session.agent_key, session_id, count, size)
                    conn.execute(
                        self._sql(FORK_COPY),
                        [
                            session_id,
                            plan.compact_bound or 0,
                            HIDDEN_BY_COMPACTION,
                            plan.source_id,
                            plan.last_seq,
                        ],
                    )
                if plan.compact_bound is not None and compaction is not None:
                    self._add_compaction(
                        conn,
                        session.agent_key,
                        session_id,
                        session.key,
                        compaction,
                        plan.turns,
                        plan.hidden,
                        check_compaction,
                    )
        except self.unique_violation:
            raise Conflict(session.key) from None
        except self.missing_reference:
            raise AgentNotFound(session.agent_key) from None
        return session

    def _fork_plan(
        self,
        conn: Any,
        session: Session,
        source: tuple[str, str],
        anchors: tuple[str | None, str | None],
        lock: str,
    ) -> _Plan:
        """The source and its anchors checked, and what to copy, read on ``conn``.

        Raises :class:`SessionNotFound` for the source, :class:`EventNotFound` for an
        anchor not among its visible events (or a compaction anchor past the other).
        """
        source_agent_key, source_session_key = source
        include_up_to, compact_up_to = anchors
        row = conn.execute(self._sql(FIND_SESSION + lock), list(source)).fetchone()
        if row is None or not self._live(row[1], session.created_at):
            raise SessionNotFound(source_session_key)
        source_id = row[0]
        bound = None
        if include_up_to is not None:
            bound = self._event_seq(conn, source_id, include_up_to, visible=True)
        compact_bound = None
        if compact_up_to is not None:
            compact_bound = self._event_seq(conn, source_id, compact_up_to, visible=True)
            if bound is not None and compact_bound > bound:
                raise EventNotFound(compact_up_to)
        # The last event to copy, which bounds the copy against later appends.
        last = conn.execute(
            self._sql(
                "SELECT seq, id FROM events /*INDEXED BY idx_events_visible*/ "
                "WHERE session_id = ? AND hide_reason IS NULL"
                + ("" if bound is None else " AND seq <= ?")
                + " ORDER BY seq DESC LIMIT 1"
            ),
            [source_id, *([] if bound is None else [bound])],
        ).fetchone()
        forked_from = {"agent_key": source_agent_key, "session_key": source_session_key}
        if last is not None:
            forked_from["event_id"] = last[1]
        hidden = turns = 0
        if compact_bound is not None:
            hidden = self._count(conn, source_id, "hide_reason IS NULL", compact_bound)
            turns = self._count(
                conn, source_id, "type = 'input_message' AND hide_reason IS NULL", compact_bound
            )
        return _Plan(
            source_id,
            None if last is None else last[0],
            compact_bound,
            hidden,
            turns,
            forked_from,
        )

    def _fork_in_chunks(
        self,
        session: Session,
        source: tuple[str, str],
        anchors: tuple[str | None, str | None],
        compaction: Event | None,
        check: Callable[[Event], None] | None,
    ) -> Session:
        with self._bulk() as run:
            with self._snapshot() as snapshot:
                plan = self._fork_plan(snapshot, session, source, anchors, "")
                self._check_fork_target(session)
                if plan.last_seq is not None:
                    # Refused before any copy when it cannot fit; each chunk is charged
                    # (and checked) as it is written.
                    self._check_room(session.agent_key, *self._fork_size(snapshot, plan))
                session = dataclasses.replace(session, forked_from=plan.forked_from)
                placeholder = self._insert_placeholder(session)
                try:
                    chunks = self._copy_in_chunks(snapshot, plan, placeholder, session.agent_key)
                    run.wrote_much = chunks > 1
                except BaseException:
                    self._drop_placeholder(placeholder)
                    raise
            try:
                self._publish_fork(placeholder, session, plan, compaction, check)
            except BaseException:
                self._drop_placeholder(placeholder)
                raise
        return session

    def _fork_size(self, conn: Any, plan: _Plan) -> tuple[int, int]:
        """How many events the fork copies, and their bytes as its usage counts them."""
        row = conn.execute(
            self._sql(
                f"SELECT count(*), coalesce(sum({event_size_sql(self.octets)}), 0) "
                "FROM events /*INDEXED BY idx_events_visible*/ "
                "WHERE session_id = ? AND hide_reason IS NULL AND seq <= ?"
            ),
            [plan.source_id, plan.last_seq],
        ).fetchone()
        return int(row[0]), int(row[1])

    def _check_fork_target(self, session: Session) -> None:
        """Refuse, before any copy, a fork that could not appear: its key held by a live
        session, its agent missing or disabled (the publication decides for good)."""
        with self._reading() as conn:
            row = conn.execute(self._sql(FIND_SESSION), [session.agent_key, session.key]).fetchone()
            agent = conn.execute(
                self._sql("SELECT enabled FROM agents WHERE key = ?"), [session.agent_key]
            ).fetchone()
        if agent is None:
            raise AgentNotFound(session.agent_key)
        if not agent[0]:
            raise AgentDisabled(session.agent_key)
        if row is not None and self._live(row[1], session.created_at):
            raise Conflict(session.key)

    def _insert_placeholder(self, session: Session) -> int:
        """The new session's row under a placeholder key, expired; its row id."""
        hidden = dataclasses.replace(session, key=PLACEHOLDER_PREFIX + secrets.token_hex(16))
        params = self._encode(SESSIONS, hidden, SESSION_INSERT_COLUMNS)
        params[-1] = self.encode_ts(PLACEHOLDER_EXPIRY)
        columns = ", ".join(SESSION_INSERT_COLUMNS)
        marks = ", ".join("?" * len(SESSION_INSERT_COLUMNS))
        try:
            with self._transaction() as conn:
                row = conn.execute(
                    self._sql(f"INSERT INTO sessions ({columns}) VALUES ({marks}) RETURNING id"),
                    params,
                ).fetchone()
        except self.missing_reference:
            raise AgentNotFound(session.agent_key) from None
        return row[0]

    def _copy_in_chunks(self, snapshot: Any, plan: _Plan, placeholder: int, agent: str) -> int:
        """The source's events, read from ``snapshot``, written to the placeholder a chunk
        to a transaction, each chunk sized to hold the writer about FORK_TARGET_S; return
        how many chunks."""
        chunks = 0
        if plan.last_seq is None:
            return chunks
        copy_json = self.encode_json if self.decode_json is identity else identity
        read = self._sql(FORK_ROWS)
        insert = self._sql(INSERT_EVENT)
        exists = self._sql(SESSION_EXISTS + self.row_lock)
        bound = plan.compact_bound or 0
        after, chunk = 0, FORK_CHUNK_FIRST
        while True:
            rows = snapshot.execute(read, [plan.source_id, after, plan.last_seq, chunk]).fetchall()
            if not rows:
                return chunks
            params = [
                [
                    placeholder,
                    event_id,
                    kind,
                    copy_json(fields),
                    created_at,
                    HIDDEN_BY_COMPACTION if seq <= bound else None,
                ]
                for seq, event_id, kind, fields, created_at in rows
            ]
            size = sum(
                EVENT_ROW_BYTES
                + len(row[1].encode())
                + len(row[2].encode())
                + len((row[3] if isinstance(row[3], str) else dump_json(row[3])).encode())
                for row in rows
            )
            with self._transaction() as conn:
                started = time.monotonic()
                # Removed meanwhile (its agent deleted): no row may outlive it.
                if conn.execute(exists, [placeholder]).fetchone() is None:
                    raise AgentNotFound(agent)
                self._charge_events(conn, agent, placeholder, len(rows), size)
                self._execute_many(conn, insert, params)
            took = time.monotonic() - started
            chunks += 1
            if len(rows) < chunk:
                return chunks
            after = rows[-1][0]
            if took < FORK_TARGET_S / 2:
                chunk = min(chunk * 2, FORK_CHUNK_MAX)
            elif took > FORK_TARGET_S * 2:
                chunk = max(chunk // 2, FORK_CHUNK_MIN)
            _pause()

    def _publish_fork(
        self,
        placeholder: int,
        session: Session,
        plan: _Plan,
        compaction: Event | None,
        check: Callable[[Event], None] | None,
    ) -> None:
        """One small transaction: the placeholder becomes the session, with its rows of the
        metadata index and its compaction event. Raises what create_session raises."""
        stamp = self.encode_ts(session.created_at)
        try:
            with self._transaction() as conn:
                # An expired session holding the key gives way, as on create.
                conn.execute(
                    self._sql(DELETE_EXPIRED_SESSION), [session.agent_key, session.key, stamp]
                )
                published = conn.execute(
                    self._sql(PUBLISH_FORK),
                    [
                        session.key,
                        self.encode_ts(session.expires_at),
                        placeholder,
                        session.agent_key,
                    ],
                ).rowcount
                if published == 0:
                    agent = conn.execute(
                        self._sql("SELECT 1 FROM agents WHERE key = ?"), [session.agent_key]
                    ).fetchone()
                    raise (AgentNotFound if agent is None else AgentDisabled)(session.agent_key)
                self._index_metadata(
                    conn, placeholder, session.agent_key, session.metadata, new=True
                )
                if plan.compact_bound is not None and compaction is not None:
                    self._add_compaction(
                        conn,
                        session.agent_key,
                        placeholder,
                        session.key,
                        compaction,
                        plan.turns,
                        plan.hidden,
                        check,
                    )
        except self.unique_violation:
            raise Conflict(session.key) from None

    def _drop_placeholder(self, placeholder: int) -> None:
        """Remove a fork that will not appear, and free what it copied; a failure here
        leaves it to purge-expired."""
        try:
            with self._writing() as conn:
                conn.execute(self._sql("DELETE FROM sessions WHERE id = ?"), [placeholder])
            self._free_released([placeholder])
        except Exception:  # noqa: BLE001 - the fork's own failure is the one to raise
            pass
