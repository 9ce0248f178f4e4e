"""The events of removed sessions, freed after the removal in chunks of a few milliseconds.

Removing a session is one small statement whatever its history holds: the
row goes, and a trigger notes its id in ``released_sessions`` when it had
events (migration 9). From that statement on the events are unreachable: every
read finds a session's events through its live row, and row ids are never
reused. This module then deletes them, a chunk to a transaction, so that no
chunk holds SQLite's one writer (or a PostgreSQL transaction) for more than
:data:`FREE_TARGET_S` or so: other writers take their turn between chunks.
The chunk's size follows the time the last one took, since rows range from
a few bytes to ``EVENT_MAX_BYTES``.

A crash between the removal and the end of the freeing leaves the note
behind; the next :meth:`ReleasedRows._free_released` without ids (every purge,
every agent deletion) finishes it. Nothing reads those rows meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from .dialect import SQLDialect
from .schema import FORGET_RELEASED, FREE_EVENTS, RELEASED_SESSIONS

# What one chunk aims to hold the writer for; its size doubles below half of
# this and halves above twice it, between the two bounds.
FREE_TARGET_S = 0.01
FREE_CHUNK_FIRST = 100
FREE_CHUNK_MIN = 1
FREE_CHUNK_MAX = 5_000
# Between two chunks: time for a writer waiting for its turn to take it.
FREE_PAUSE_S = 0.002
RELEASED_BATCH = 100  # notes read at a time


class ReleasedRows(SQLDialect):
    """Freeing the events of removed sessions, for :class:`SQLStorage`."""

    def _free_released(self, session_ids: Iterable[int] | None = None) -> int:
        """Delete the events of the removed sessions ``session_ids`` (None: of every removed
        session still noted), a chunk to a transaction; return how many were deleted."""
        if self._unit() is not None:
            # Inside atomic(): a chunk would be its transaction's, held to its end. The
            # notes stay for the next purge or agent deletion.
            return 0
        with self._bulk() as run:
            freed = self._free_all(session_ids)
            run.wrote_much = run.wrote_much or freed > FREE_CHUNK_FIRST
            return freed

    def _free_all(self, session_ids: Iterable[int] | None) -> int:
        freed = 0
        chunk = FREE_CHUNK_FIRST
        if session_ids is not None:
            for session_id in session_ids:
                count, chunk = self._free_session(session_id, chunk)
                freed += count
            return freed
        while True:
            with self._reading() as conn:
                noted = [
                    row[0]
                    for row in conn.execute(
                        self._sql(RELEASED_SESSIONS), [RELEASED_BATCH]
                    ).fetchall()
                ]
            if not noted:
                return freed
            for session_id in noted:
                count, chunk = self._free_session(session_id, chunk)
                freed += count

    def _free_session(self, session_id: int, chunk: int) -> tuple[int, int]:
        """Free one removed session's events; (how many, the chunk size to go on with)."""
        freed = 0
        while True:
            with self._transaction() as conn:
                started = time.monotonic()
                deleted = conn.execute(
                    self._sql(FREE_EVENTS), [session_id, session_id, chunk]
                ).rowcount
                if deleted < chunk:
                    conn.execute(self._sql(FORGET_RELEASED), [session_id])
            took = time.monotonic() - started
            freed += deleted
            if deleted < chunk:
                return freed, chunk
            if took < FREE_TARGET_S / 2:
                chunk = min(chunk * 2, FREE_CHUNK_MAX)
            elif took > FREE_TARGET_S * 2:
                chunk = max(chunk // 2, FREE_CHUNK_MIN)
            time.sleep(FREE_PAUSE_S)
