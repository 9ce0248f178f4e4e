"""Sessions in SQL: create, read, list, update, delete, purge, and bulk loading."""

from __future__ import annotations

import datetime as dt
import functools
import operator
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ..base import (
    AgentDisabled,
    AgentNotFound,
    Conflict,
    Page,
    Precondition,
    PreconditionFailed,
    QuotaExceeded,
    Session,
    SessionNotFound,
)
from ..codec import (
    filter_rows,
    metadata_conditions,
    metadata_index_entries,
    text_matches,
)
from .forks import FORK_PLACEHOLDER_GRACE, PLACEHOLDER_PREFIX
from .released import ReleasedRows
from .schema import (
    DELETE_EXPIRED_BY_ID,
    DELETE_EXPIRED_SESSION,
    DELETE_METADATA,
    DELETE_METADATA_KEY,
    DELETE_SESSION,
    GET_SESSION,
    INDEX_BATCH,
    INDEX_ROWS,
    INSERT_METADATA,
    INSERT_SESSION,
    INSERT_SESSION_ID,
    INSERT_SESSION_USAGE,
    LIVE,
    METADATA_PAGE,
    PURGE_CHUNK,
    PURGE_EXPIRED,
    SESSION_INSERT_COLUMNS,
    SESSION_PAGE,
    SESSION_SELECT,
    SESSION_TEXT,
    SESSIONS,
    insert_metadata_rows,
    limit_clause,
    metadata_scan_query,
    session_size_sql,
)
from .usage import UsageRecords, session_bytes

# The session fields whose bytes its usage counts (migration 10's triggers).
CHARGED_FIELDS = frozenset({"name", "description", "metadata"})


class SessionRecords(ReleasedRows, UsageRecords):
    """The session operations of :class:`SQLStorage`."""

    def create_session(self, *, session: Session) -> Session:
        params = [*self._encode(SESSIONS, session, SESSION_INSERT_COLUMNS), session.agent_key]
        entries = metadata_index_entries(session.metadata)
        try:
            # The session, its rows of the metadata index and its usage commit together.
            with self._transaction() as conn:
                inserted = self._insert_indexed(conn, session, params, entries)
        except self.unique_violation:
            inserted = self._replace_expired_session(session, params, entries)
        except self.missing_reference:
            raise AgentNotFound(session.agent_key) from None
        if inserted == 0:
            self.get_agent(agent_key=session.agent_key)  # AgentNotFound
            raise AgentDisabled(session.agent_key)
        return session

    @functools.cached_property
    def _insert_session_usage(self) -> str:
        size = session_size_sql(self.octets, "sessions")
        return self._sql(INSERT_SESSION_USAGE.format(size=size))

    def _insert_indexed(
        self, conn: Any, session: Session, params: list[Any], entries: dict[str, str]
    ) -> int:
        """INSERT_SESSION and the new session's rows of the metadata index; rows inserted."""
        if not self.agent_max_bytes:
            row = conn.execute(self._sql(INSERT_SESSION_ID), params).fetchone()
        else:
            row = conn.execute(self._insert_session_usage, [*params, session.agent_key]).fetchone()
        if row is None:
            return 0
        if self.agent_max_bytes:
            added = int(row[2])
            if row[1] + added > self.agent_max_bytes:
                raise QuotaExceeded("AGENT_MAX_BYTES", int(row[1]), added, self.agent_max_bytes)
        self._add_index_rows(conn, row[0], session.agent_key, entries)
        return 1

    def _add_index_rows(
        self, conn: Any, session_id: int, agent_key: str, entries: Mapping[str, str]
    ) -> None:
        """A session's new rows of the metadata index, a statement per INDEX_ROWS of them."""
        rows = list(entries.items())
        for start in range(0, len(rows), INDEX_ROWS):
            chunk = rows[start : start + INDEX_ROWS]
            conn.execute(
                self._sql(insert_metadata_rows(len(chunk))),
                [part for key, value in chunk for part in (session_id, key, agent_key, value)],
            )

    def _replace_expired_session(
        self, session: Session, params: list[Any], entries: dict[str, str]
    ) -> int:
        """The key is taken: by a live session (:class:`Conflict`) or by one idle past its TTI.

        An expired session is gone for clients, so it gives way: it is removed
        in the same transaction as the insert that takes its key.
        """
        now = self.encode_ts(session.created_at)
        try:
            with self._transaction() as conn:
                removed = conn.execute(
                    self._sql(DELETE_EXPIRED_SESSION), [session.agent_key, session.key, now]
                ).rowcount
                if removed == 0:
                    raise Conflict(session.key)
                return self._insert_indexed(conn, session, params, entries)
        except self.unique_violation:
            raise Conflict(session.key) from None

    def get_session(self, *, agent_key: str, session_key: str, now: dt.datetime) -> Session:
        with self._reading() as conn:
            row = conn.execute(
                self._sql(GET_SESSION),
                [agent_key, session_key],
            ).fetchone()
        if row is None:
            raise SessionNotFound(session_key)
        if not self._live(row[-1], now):
            with self._writing() as conn:
                conn.execute(
                    self._sql(DELETE_EXPIRED_BY_ID),
                    [row[0], self.encode_ts(now)],
                )
            raise SessionNotFound(session_key)
        return self._record(SESSIONS, row)

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
        if metadata:
            return self._list_by_metadata(agent_key, limit, now, after, matches, metadata)
        params: list[Any] = [agent_key, after or 0, self.encode_ts(now)]
        if matches is None:
            with self._reading() as conn:
                rows = conn.execute(
                    self._sql(SESSION_PAGE + limit_clause(limit + 1)), params
                ).fetchall()
            return self._page(SESSIONS, rows, limit)
        # The pattern runs in Python over rows read as it goes, so only as many
        # are read as it takes to fill the page, or to spend the scan's budget.
        with self._scan(self._sql(SESSION_PAGE), params, max(100, 2 * limit)) as scanned:
            rows, stopped = filter_rows(
                scanned,
                limit=limit,
                matches=matches,
                text=SESSION_TEXT,
                position=operator.itemgetter(0),
                max_rows=self.filter_scan_rows,
                max_seconds=self.filter_scan_seconds,
            )
        if stopped is None:
            return self._page(SESSIONS, rows, limit)
        return Page([self._record(SESSIONS, r) for r in rows], stopped)

    def _list_by_metadata(
        self,
        agent_key: str,
        limit: int,
        now: dt.datetime,
        after: int | None,
        matches: Any,
        metadata: Mapping[str, str],
    ) -> Page:
        """A page of the sessions whose metadata meets every condition, through the index.

        One condition without a filter is one statement: ``limit + 1`` entries of
        the index from the cursor, each with its session's row, whatever the
        agent's size or the page's depth. Otherwise the first condition's entries
        are read in session order from the cursor, within the filtered list's
        budget (rows and seconds), and the page ends early, with a cursor, when
        the other conditions or the filter let too few through.
        """
        (key, value), *others = metadata_conditions(metadata)
        if not others and matches is None:
            with self._reading() as conn:
                rows = conn.execute(
                    self._sql(METADATA_PAGE),
                    [agent_key, key, value, after or 0, self.encode_ts(now), limit + 1],
                ).fetchall()
            return self._page(SESSIONS, rows, limit)
        params = [*(text for pair in others for text in pair), agent_key, key, value, after or 0]
        picked: list[int] = []
        stopped = None
        deadline = time.monotonic() + self.filter_scan_seconds
        read = 0
        query = self._sql(metadata_scan_query(1 + len(others)))
        with self._scan(query, params, max(100, 2 * limit)) as scanned:
            for session_id, name, description, expires_at, meets in scanned:
                if (
                    meets
                    and self._live(expires_at, now)
                    and (matches is None or text_matches(matches, name, description))
                ):
                    picked.append(session_id)
                    if len(picked) > limit:
                        break
                read += 1
                if read >= self.filter_scan_rows or time.monotonic() > deadline:
                    stopped = session_id
                    break
        more = len(picked) > limit
        picked = picked[:limit]
        rows = []
        if picked:
            marks = ", ".join("?" * len(picked))
            with self._reading() as conn:
                rows = conn.execute(
                    self._sql(f"{SESSION_SELECT} WHERE id IN ({marks}) ORDER BY id"), picked
                ).fetchall()
        cursor = picked[-1] if more else stopped
        return Page([self._record(SESSIONS, row) for row in rows], cursor)

    def _index_metadata(
        self,
        conn: Any,
        session_id: int,
        agent_key: str,
        metadata: Mapping[str, Any],
        previous: Mapping[str, Any] | None = None,
        *,
        new: bool = False,
    ) -> None:
        """Make the session's rows of the metadata index those of ``metadata``, in ``conn``'s
        transaction: ``new``, a session that has none yet; ``previous``, the metadata its
        rows hold now (only the keys that changed are written); neither, rewrite them all."""
        entries = metadata_index_entries(metadata)
        if new or previous is None:
            if not new:
                conn.execute(self._sql(DELETE_METADATA), [session_id])
            gone, added = {}, entries
        else:
            held = metadata_index_entries(previous)
            gone = {k: v for k, v in held.items() if entries.get(k) != v}
            added = {k: v for k, v in entries.items() if held.get(k) != v}
        if gone:
            self._execute_many(
                conn, self._sql(DELETE_METADATA_KEY), [[session_id, key] for key in gone]
            )
        if added:
            self._add_index_rows(conn, session_id, agent_key, added)

    def _index_sessions_after(self, conn: Any, after: int) -> None:
        """Index the metadata of every session whose row id is above ``after`` (which has
        none yet): the migration's backfill, and a bulk load's."""
        while True:
            rows = conn.execute(
                self._sql(
                    "SELECT id, agent_key, metadata FROM sessions WHERE id > ? ORDER BY id LIMIT ?"
                ),
                [after, INDEX_BATCH],
            ).fetchall()
            if not rows:
                return
            params = [
                [session_id, key, agent_key, value]
                for session_id, agent_key, metadata in rows
                for key, value in metadata_index_entries(self.decode_json(metadata)).items()
            ]
            if params:
                self._execute_many(conn, self._sql(INSERT_METADATA), params)
            after = rows[-1][0]

    def update_session(
        self,
        *,
        agent_key: str,
        session_key: str,
        changes: Mapping[str, Any],
        now: dt.datetime,
        precondition: Precondition[Session] | None = None,
    ) -> Session:
        assignments, params = self._assignments(SESSIONS, changes, now)
        # expires_at moves with updated_at, by the new tti_minutes or the stored one.
        if "tti_minutes" in changes:
            tti = changes["tti_minutes"]
            expires = "?"
            params.append(self.encode_ts(now + dt.timedelta(minutes=tti)) if tti else None)
        else:
            expires = self.expires_from_tti
            params.append(self.encode_ts(now))
        # An update restarts the idle clock.
        query = (
            f"UPDATE sessions SET {assignments}, expires_at = {expires}, active_at = ? "
            f"WHERE agent_key = ? AND key = ? AND {LIVE} {SESSIONS.returning}"
        )
        stamp = self.encode_ts(now)
        # A change of the texts the usage counts is checked against the agent's bytes.
        grows = bool(self.agent_max_bytes and CHARGED_FIELDS & changes.keys())
        if precondition is not None:
            with self._transaction() as conn:
                row = None
                if self._check_session(conn, agent_key, session_key, now, precondition):
                    before = self._row_bytes(conn, agent_key, session_key) if grows else 0
                    row = conn.execute(
                        self._sql(query), [*params, stamp, agent_key, session_key, stamp]
                    ).fetchone()
                    if row is not None and "metadata" in changes:
                        self._index_metadata(conn, row[0], agent_key, changes["metadata"])
                    if row is not None and grows:
                        self._check_session_bytes(conn, agent_key, row[0], before)
            if row is None:
                raise SessionNotFound(session_key)
            return self._record(SESSIONS, row)
        with self._transaction() if grows else self._update_transaction() as conn:
            before = self._row_bytes(conn, agent_key, session_key) if grows else 0
            row = conn.execute(
                self._sql(query), [*params, stamp, agent_key, session_key, stamp]
            ).fetchone()
            if row is None:
                # Gone means gone: an expired session is removed by the call that noticed.
                conn.execute(self._sql(DELETE_EXPIRED_SESSION), [agent_key, session_key, stamp])
            else:
                if "metadata" in changes:
                    self._index_metadata(conn, row[0], agent_key, changes["metadata"])
                if grows:
                    self._check_session_bytes(conn, agent_key, row[0], before)
        if row is None:
            raise SessionNotFound(session_key)
        return self._record(SESSIONS, row)

    def _check_session(
        self,
        conn: Any,
        agent_key: str,
        session_key: str,
        now: dt.datetime,
        precondition: Precondition[Session],
    ) -> int | None:
        """Hold the session's row in ``conn``'s transaction and check ``precondition`` on it;
        its row id, or None when no live session has the key (an expired one is then
        removed in this transaction, which the caller lets commit)."""
        row = self._held(conn, GET_SESSION, [agent_key, session_key])
        if row is None:
            return None
        if not self._live(row[-1], now):
            conn.execute(self._sql(DELETE_EXPIRED_BY_ID), [row[0], self.encode_ts(now)])
            return None
        if not precondition(self._record(SESSIONS, row)):
            raise PreconditionFailed(session_key)
        return row[0]

    def delete_session(
        self,
        *,
        agent_key: str,
        session_key: str,
        now: dt.datetime,
        precondition: Precondition[Session] | None = None,
    ) -> None:
        if precondition is not None:
            with self._transaction() as conn:
                session_id = self._check_session(conn, agent_key, session_key, now, precondition)
                if session_id is not None:
                    conn.execute(self._sql("DELETE FROM sessions WHERE id = ?"), [session_id])
            if session_id is None:
                raise SessionNotFound(session_key)
            self._free_released([session_id])
            return
        with self._writing() as conn:
            row = conn.execute(
                self._sql(DELETE_SESSION),
                [agent_key, session_key],
            ).fetchone()
        if row is not None:
            # Gone for every reader already; its events are freed in short chunks.
            self._free_released([row[0]])
        # An expired session is removed all the same, but it was already gone for clients.
        if row is None or not self._live(row[1], now):
            raise SessionNotFound(session_key)

    def purge_expired_sessions(self, *, now: dt.datetime) -> int:
        # A chunk of sessions to a transaction, then the events of every session
        # removed, this purge's and any a crash or an expiry left noted. A fork's
        # placeholder a crash left goes too, uncounted: it was never a session.
        purged = 0
        while True:
            with self._writing() as conn:
                removed = conn.execute(
                    self._sql(PURGE_EXPIRED),
                    [
                        self.encode_ts(now),
                        self.encode_ts(now - FORK_PLACEHOLDER_GRACE),
                        PURGE_CHUNK,
                    ],
                ).fetchall()
            purged += sum(not key.startswith(PLACEHOLDER_PREFIX) for (key,) in removed)
            if len(removed) < PURGE_CHUNK:
                break
        self._free_released()
        return purged

    def _insert_session(self, conn: Any, session: Session) -> int:
        """create_session inside ``conn``'s transaction; return the new row's id.

        An expired session holding the key is removed first (with its events).
        """
        conn.execute(
            self._sql(DELETE_EXPIRED_SESSION),
            [session.agent_key, session.key, self.encode_ts(session.created_at)],
        )
        params = [*self._encode(SESSIONS, session, SESSION_INSERT_COLUMNS), session.agent_key]
        row = conn.execute(self._sql(INSERT_SESSION + " RETURNING id"), params).fetchone()
        if row is None:
            agent = conn.execute(
                self._sql("SELECT 1 FROM agents WHERE key = ?"), [session.agent_key]
            ).fetchone()
            raise (AgentNotFound if agent is None else AgentDisabled)(session.agent_key)
        self._index_metadata(conn, row[0], session.agent_key, session.metadata, new=True)
        self._check_agent_bytes(conn, session.agent_key, session_bytes(session))
        return row[0]

    def load_sessions(self, sessions: Iterable[Session], *, batch: int = 10_000) -> int:
        """Insert many sessions, ``batch`` to a transaction; return how many were stored.

        The statement is create_session's (sessions of a missing agent are
        skipped); a key that exists already raises :class:`Conflict`.
        """
        stored = 0
        statement = self._sql(INSERT_SESSION)
        rows = ([*self._encode(SESSIONS, s, SESSION_INSERT_COLUMNS), s.agent_key] for s in sessions)
        while True:
            chunk = [row for _, row in zip(range(batch), rows, strict=False)]
            if not chunk:
                return stored
            try:
                with self._transaction() as conn:
                    last = conn.execute(self._sql("SELECT max(id) FROM sessions")).fetchone()[0]
                    stored += self._execute_many(conn, statement, chunk)
                    self._index_sessions_after(conn, last or 0)
            except self.unique_violation:
                raise Conflict("a session key of the batch exists") from None
