"""What each agent stores, and its quotas: the one place every SQL write path charges.

An agent's usage is kept in ``agent_usage`` rows, :data:`SHARDS` of them per
agent (a session's row id picks its shard), so that appends to different
sessions of one agent on PostgreSQL take different rows and do not wait on
each other; the usage is the sum of the agent's rows. A session's own row
(name, description, metadata, counted twice for the metadata index) is charged
by the triggers of migration 10 on its insert, update and delete, the last with
the events the session held (``sessions.event_count`` and ``event_bytes``).
Events and state documents are charged here, by the write that adds or
removes them, in its transaction; a write that grows the usage past a bound
raises :class:`QuotaExceeded`, which rolls it back.

On SQLite every write holds the database (BEGIN IMMEDIATE): the quotas are
exact. On PostgreSQL (READ COMMITTED) a write sees the others' committed
usage: the events of one session are exact (its row is held by the append),
an agent's bytes may pass the bound by what the writes in flight on its other
shards add, at most ``SHARDS - 1`` of them.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import config

from ..base import Event, QuotaExceeded, Session
from ..codec import dump_json
from .dialect import SQLDialect
from .schema import EVENT_ROW_BYTES, SESSION_ROW_BYTES, SHARDS, session_size_sql


def event_bytes(event: Event, fields: Any = None) -> int:
    """The bytes an event is charged: ``fields`` is its stored JSON text, when at hand."""
    text = fields if isinstance(fields, str) else dump_json(event.fields)
    return EVENT_ROW_BYTES + len(event.id.encode()) + len(event.type.encode()) + len(text.encode())


def session_bytes(session: Session) -> int:
    """The bytes a session's own row is charged (migration 10's triggers, in Python)."""
    texts = (session.name, session.description or "", dump_json(session.metadata))
    name, description, metadata = (len(text.encode()) for text in texts)
    return SESSION_ROW_BYTES + name + description + 2 * metadata


ADD_USAGE = (
    "INSERT INTO agent_usage (agent_key, shard, sessions, events, bytes) VALUES (?, ?, 0, ?, ?) "
    "ON CONFLICT (agent_key, shard) DO UPDATE SET events = agent_usage.events + excluded.events, "
    "bytes = agent_usage.bytes + excluded.bytes"
)
ADD_EXISTING_USAGE = (
    "INSERT INTO agent_usage (agent_key, shard, sessions, events, bytes) SELECT ?, ?, 0, 0, ? "
    "WHERE EXISTS (SELECT 1 FROM agents WHERE key = ?) "
    "ON CONFLICT (agent_key, shard) DO UPDATE SET bytes = agent_usage.bytes + excluded.bytes"
)
#: :data:`ADD_USAGE` answering the agent's bytes after it: the other shards' and this one's
ADD_USAGE_TOTAL = (
    ADD_USAGE + " RETURNING (SELECT coalesce(sum(other.bytes), 0) FROM agent_usage AS other "
    "WHERE other.agent_key = agent_usage.agent_key AND other.shard <> agent_usage.shard) "
    "+ agent_usage.bytes"
)
GET_USAGE = (
    "SELECT coalesce(sum(sessions), 0), coalesce(sum(events), 0), coalesce(sum(bytes), 0) "
    "FROM agent_usage WHERE agent_key = ?"
)
AGENT_BYTES = "SELECT coalesce(sum(bytes), 0) FROM agent_usage WHERE agent_key = ?"
CHARGE_SESSION = (
    "UPDATE sessions SET event_count = event_count + ?, event_bytes = event_bytes + ? "
    "WHERE id = ? RETURNING event_count"
)


class UsageRecords(SQLDialect):
    """Usage and quotas of :class:`SQLStorage`."""

    #: the dialect's byte length of a text column, a format with one ``{}``
    octets = "length(CAST({} AS BLOB))"
    agent_max_bytes = config.Config.AGENT_MAX_BYTES
    session_max_events = config.Config.SESSION_MAX_EVENTS

    def _read_quota_options(self, options: Mapping[str, Any]) -> None:
        """The quotas, from the settings (config.Config has the defaults; 0: no bound)."""
        self.agent_max_bytes = int(options.get("AGENT_MAX_BYTES", config.Config.AGENT_MAX_BYTES))
        self.session_max_events = int(
            options.get("SESSION_MAX_EVENTS", config.Config.SESSION_MAX_EVENTS)
        )
        if self.agent_max_bytes < 0 or self.session_max_events < 0:
            raise ValueError("AGENT_MAX_BYTES and SESSION_MAX_EVENTS must be 0 or more")

    def get_usage(self, *, agent_key: str) -> dict[str, int]:
        with self._reading() as conn:
            sessions, events, size = conn.execute(self._sql(GET_USAGE), [agent_key]).fetchone()
        return {"sessions": int(sessions), "events": int(events), "bytes": int(size)}

    def _charge_events(
        self, conn: Any, agent_key: str, session_id: int, count: int, size: int
    ) -> None:
        """Count ``count`` events of ``size`` bytes (negative: removed) to the session and its
        agent, in ``conn``'s transaction; :class:`QuotaExceeded` past a bound."""
        if count == 0 and size == 0:
            return
        held = conn.execute(self._sql(CHARGE_SESSION), [count, size, session_id]).fetchone()[0]
        self._check_session_events(held, count)
        self._charge_agent(conn, agent_key, session_id % SHARDS, count, size)

    def _check_session_events(self, held: int, added: int) -> None:
        """:class:`QuotaExceeded` when a session holding ``held`` events, ``added`` of them
        just counted, passes SESSION_MAX_EVENTS."""
        if added > 0 and self.session_max_events and held > self.session_max_events:
            raise QuotaExceeded("SESSION_MAX_EVENTS", held - added, added, self.session_max_events)

    def _charge_agent(
        self, conn: Any, agent_key: str, shard: int, count: int, size: int, *, checked: bool = True
    ) -> None:
        """Add to the agent's usage in one of its shards, checking its bytes when they grew
        (in the same statement): :class:`QuotaExceeded` past AGENT_MAX_BYTES."""
        params = [agent_key, shard, count, size]
        if not (checked and size > 0 and self.agent_max_bytes):
            conn.execute(self._sql(ADD_USAGE), params)
            return
        total = conn.execute(self._sql(ADD_USAGE_TOTAL), params).fetchone()[0]
        if total > self.agent_max_bytes:
            raise QuotaExceeded("AGENT_MAX_BYTES", int(total) - size, size, self.agent_max_bytes)

    def _charge_existing_agent(self, conn: Any, agent_key: str, shard: int, size: int) -> bool:
        """Add ``size`` bytes to the agent's usage, unchecked, when the agent exists."""
        return (
            conn.execute(
                self._sql(ADD_EXISTING_USAGE), [agent_key, shard, size, agent_key]
            ).rowcount
            > 0
        )

    def _check_agent_bytes(self, conn: Any, agent_key: str, added: int) -> None:
        """:class:`QuotaExceeded` when the agent's bytes, with ``added`` just written, pass
        AGENT_MAX_BYTES (a write that grew them calls it in its transaction)."""
        if not self.agent_max_bytes or added <= 0:
            return
        total = conn.execute(self._sql(AGENT_BYTES), [agent_key]).fetchone()[0]
        if total > self.agent_max_bytes:
            raise QuotaExceeded("AGENT_MAX_BYTES", int(total) - added, added, self.agent_max_bytes)

    def _check_room(self, agent_key: str, count: int, size: int) -> None:
        """:class:`QuotaExceeded`, read outside any write, when ``size`` more bytes cannot
        fit the agent's bound, or ``count`` events a new session's (a chunked copy's first
        check; its chunks are charged and checked as they are written)."""
        if self.session_max_events and count > self.session_max_events:
            raise QuotaExceeded("SESSION_MAX_EVENTS", 0, count, self.session_max_events)
        if self.agent_max_bytes and size > 0:
            with self._reading() as conn:
                total = int(conn.execute(self._sql(AGENT_BYTES), [agent_key]).fetchone()[0])
            if total + size > self.agent_max_bytes:
                raise QuotaExceeded("AGENT_MAX_BYTES", total, size, self.agent_max_bytes)

    def _row_bytes(self, conn: Any, agent_key: str, session_key: str) -> int:
        """The bytes of a session's own row, as its triggers charge them (0: no such row)."""
        size = session_size_sql(self.octets, "s")
        row = conn.execute(
            self._sql(f"SELECT {size} FROM sessions AS s WHERE agent_key = ? AND key = ?"),
            [agent_key, session_key],
        ).fetchone()
        return 0 if row is None else int(row[0])

    def _check_session_bytes(
        self, conn: Any, agent_key: str, session_id: int, before: int = 0
    ) -> None:
        """After a session's row was written (``before``: its bytes until then), check
        its agent's bytes when the row grew; :class:`QuotaExceeded` rolls the write back."""
        if not self.agent_max_bytes:
            return
        size = session_size_sql(self.octets, "s")
        after = conn.execute(
            self._sql(f"SELECT {size} FROM sessions AS s WHERE id = ?"), [session_id]
        ).fetchone()[0]
        self._check_agent_bytes(conn, agent_key, int(after) - before)

    @staticmethod
    def _state_shard(key: str) -> int:
        return zlib.crc32(key.encode()) % SHARDS
