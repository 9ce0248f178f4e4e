"""What the browser console needs of the SQL backends: its sign-ins, and sessions newest first.

A mixin of :class:`~storage_backends.sql.SQLStorage`,
written over :class:`~storage_backends.sql.SQLStorage`'s dialect (``_sql``,
``_reading``, ``_writing``, ``_transaction``, ``_scan``, the encodings). The
table ``console_sessions`` is in the schema's migrations with the others.
"""

from __future__ import annotations

import datetime as dt
import operator
from typing import Any

from ..base import Conflict, ConsoleSession, ConsoleSessionNotFound, Page
from ..codec import filter_rows
from .schema import LIVE, SESSION_SELECT, SESSION_TEXT, SESSIONS

CONSOLE_COLUMNS = ("token_hash", "key_id", "csrf_token", "created_at", "expires_at")
INSERT_CONSOLE_SESSION = (
    f"INSERT INTO console_sessions ({', '.join(CONSOLE_COLUMNS)}) VALUES (?, ?, ?, ?, ?)"
)
GET_CONSOLE_SESSION = (
    f"SELECT {', '.join(CONSOLE_COLUMNS)} FROM console_sessions WHERE token_hash = ?"
)
DELETE_CONSOLE_SESSION = "DELETE FROM console_sessions WHERE token_hash = ?"
PURGE_CONSOLE_SESSIONS = "DELETE FROM console_sessions WHERE expires_at <= ?"

# One agent's live sessions, newest first, read backwards on the (agent_key, id) index.
RECENT_PAGE = f"{SESSION_SELECT} WHERE agent_key = ? AND id < ? AND {LIVE} ORDER BY id DESC"
# Above every row id: the first page of a newest-first list.
NO_BOUND = 2**63 - 1


class ConsoleSQL:
    """:class:`~storage_backends.base.Storage`'s console methods, in SQL."""

    # Supplied by SQLStorage (the dialect and its connections).
    _sql: Any
    _reading: Any
    _writing: Any
    _transaction: Any
    _scan: Any
    _page: Any
    _record: Any
    encode_ts: Any
    decode_ts: Any
    unique_violation: Any
    filter_scan_rows: int
    filter_scan_seconds: float

    def create_console_session(self, *, console_session: ConsoleSession) -> ConsoleSession:
        record = console_session
        params = [record.token_hash, record.key_id, record.csrf_token]
        params += [self.encode_ts(record.created_at), self.encode_ts(record.expires_at)]
        try:
            with self._transaction() as conn:
                conn.execute(self._sql(PURGE_CONSOLE_SESSIONS), [self.encode_ts(record.created_at)])
                conn.execute(self._sql(INSERT_CONSOLE_SESSION), params)
        except self.unique_violation:
            raise Conflict("a console session with this token exists") from None
        return record

    def get_console_session(self, *, token_hash: str, now: dt.datetime) -> ConsoleSession:
        with self._reading() as conn:
            row = conn.execute(self._sql(GET_CONSOLE_SESSION), [token_hash]).fetchone()
        if row is None:
            raise ConsoleSessionNotFound("console session")
        token, key_id, csrf_token, created_at, expires_at = row
        found = ConsoleSession(
            token_hash=token,
            key_id=key_id,
            csrf_token=csrf_token,
            created_at=self.decode_ts(created_at),
            expires_at=self.decode_ts(expires_at),
        )
        if found.expired(now):
            self.delete_console_session(token_hash=token_hash)
            raise ConsoleSessionNotFound("console session")
        return found

    def delete_console_session(self, *, token_hash: str) -> None:
        with self._writing() as conn:
            conn.execute(self._sql(DELETE_CONSOLE_SESSION), [token_hash])

    def list_recent_sessions(
        self,
        *,
        agent_key: str,
        limit: int,
        now: dt.datetime,
        before: int | None = None,
        matches: Any = None,
    ) -> Page:
        params: list[Any] = [agent_key, NO_BOUND if before is None else before]
        params.append(self.encode_ts(now))
        if matches is None:
            with self._reading() as conn:
                rows = conn.execute(
                    self._sql(RECENT_PAGE + " LIMIT ?"), [*params, limit + 1]
                ).fetchall()
            return self._page(SESSIONS, rows, limit)
        with self._scan(self._sql(RECENT_PAGE), params, max(100, 2 * limit)) as scanned:
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
