"""What the browser console needs of the memory backend beyond its tables: its sign-ins.

A mixin of :class:`~storage_backends.memory.MemoryStorage`, as
``sql/console.py`` is of the SQL backends: the sign-ins sit in their own dict,
behind the backend's lock, copied in and out like every record.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading

from .base import Conflict, ConsoleSession, ConsoleSessionNotFound


class MemoryConsole:
    """:class:`~storage_backends.base.Storage`'s console sign-ins, in memory."""

    # Supplied by MemoryStorage.
    _lock: threading.RLock
    #: console sign-ins by token hash
    _console: dict[str, ConsoleSession]

    def create_console_session(self, *, console_session: ConsoleSession) -> ConsoleSession:
        with self._lock:
            now = console_session.created_at
            for token_hash in [h for h, c in self._console.items() if c.expired(now)]:
                del self._console[token_hash]
            if console_session.token_hash in self._console:
                raise Conflict("a console session with this token exists")
            # Its fields are text and times: a shallow copy shares nothing mutable.
            self._console[console_session.token_hash] = dataclasses.replace(console_session)
            return dataclasses.replace(console_session)

    def get_console_session(self, *, token_hash: str, now: dt.datetime) -> ConsoleSession:
        with self._lock:
            found = self._console.get(token_hash)
            if found is None:
                raise ConsoleSessionNotFound("console session")
            if found.expired(now):
                del self._console[token_hash]
                raise ConsoleSessionNotFound("console session")
            return dataclasses.replace(found)

    def delete_console_session(self, *, token_hash: str) -> None:
        with self._lock:
            self._console.pop(token_hash, None)
