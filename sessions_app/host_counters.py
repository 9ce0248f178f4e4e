"""Fixed-window counters in a small SQLite file shared by the processes of one host.

``limits`` storage for ``agent-sessions+file:///path/to/counters.db``: what
``memory://`` counts in when gunicorn runs several workers
(``gunicorn.conf.py`` makes the file's directory, one per server, and removes
it at exit; see :func:`sessions_app.rate_limits.storage_uri`).

One hit is one statement, ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``,
which opens the window (or a new one once it has ended) or adds to it, and
returns the count and the window's end in the same call. The file is in WAL
mode with ``synchronous=OFF``: a process that dies mid-statement leaves its
frames uncommitted and ignored, so every other process reads a consistent
file; only a crash of the machine itself could lose the last counts, and the
counters die with the server anyway. Windows past their end are ignored when
read and swept every ``SWEEP_EVERY`` hits of a process.

Writers take turns on a lock file beside the counters (``<file>-writer``),
as the SQLite storage does (``storage_backends.sqlite.WritersTurn``): a
waiter polls it more often than SQLite's busy handler would (measured: the
turns cost nothing per hit).

A file that cannot be written (disk full, locked or its writers' turn taken
past ``BUSY_TIMEOUT_MS``, removed) raises :class:`sqlite3.OperationalError` and the like, which
:meth:`HostCounters.unreachable` calls an outage: the service's
``RATELIMIT_FAILURE_POLICY`` then applies, as for a stalled Redis.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from limits.storage import Storage
from sqlite_utils.utils import sqlite3

from storage_backends.sqlite import WritersTurn

SCHEME = "agent-sessions+file"
BUSY_TIMEOUT_MS = 200

SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID
"""

# :now, :expiry (seconds), :amount. A row whose window has ended starts again.
HIT = """
INSERT INTO counters (key, count, expires_at) VALUES (:key, :amount, :now + :expiry)
ON CONFLICT (key) DO UPDATE SET
    count = CASE WHEN expires_at <= :now THEN excluded.count ELSE count + excluded.count END,
    expires_at = CASE WHEN expires_at <= :now THEN excluded.expires_at ELSE expires_at END
RETURNING count, expires_at
"""


class HostCounters(Storage):
    """``limits``' fixed-window interface (and ``incr_with_reset``) over one SQLite file."""

    STORAGE_SCHEME = [SCHEME]
    SWEEP_EVERY = 1000

    def __init__(self, uri: str, wrap_exceptions: bool = False, **options: Any):
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        path = uri.removeprefix(SCHEME + "://")
        if not path.startswith("/"):
            raise ValueError(f"{SCHEME}:// needs an absolute path, got {uri!r}")
        self.path = path
        self.busy_timeout_ms = int(options.get("busy_timeout_ms", BUSY_TIMEOUT_MS))
        self._local = threading.local()
        self._hits = 0

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return (sqlite3.Error, OSError)

    # Connections: one per thread and process, opened on first use (safe across fork).

    def _connection(self) -> tuple[Any, int]:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            connection = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            writer_fd = None
            try:
                connection.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
                writer_fd = os.open(self.path + "-writer", os.O_RDWR | os.O_CREAT, 0o600)
                if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    with self._turn(writer_fd):
                        connection.execute("PRAGMA journal_mode = WAL")
                connection.execute("PRAGMA synchronous = OFF")
                connection.execute(SCHEMA)
            except BaseException:
                connection.close()
                if writer_fd is not None:
                    os.close(writer_fd)
                raise
            local.connection = connection
            local.writer_fd = writer_fd
            local.pid = os.getpid()
        return local.connection, local.writer_fd

    def _turn(self, fd: int) -> WritersTurn:
        """This process's turn to write, waited for ``busy_timeout_ms`` at most."""
        return WritersTurn(fd, self.busy_timeout_ms / 1000)

    def _write(self, sql: str, params: Any = ()) -> list[tuple]:
        connection, fd = self._connection()
        with self._turn(fd):
            return connection.execute(sql, params).fetchall()

    def _read(self, sql: str, params: Any = ()) -> tuple | None:
        connection, _ = self._connection()
        return connection.execute(sql, params).fetchone()

    # Counting

    def incr_with_reset(self, key: str, expiry: int, amount: int = 1) -> tuple[int, float]:
        """Count ``amount``; return the window's count and its end (epoch seconds)."""
        now = time.time()
        ((count, expires_at),) = self._write(
            HIT, {"key": key, "amount": amount, "now": now, "expiry": expiry}
        )
        self._hits += 1
        if self._hits % self.SWEEP_EVERY == 0:
            self.sweep(now)
        return count, expires_at

    def sweep(self, now: float | None = None) -> int:
        """Drop the windows that have ended; return how many."""
        rows = self._write(
            "DELETE FROM counters WHERE expires_at <= ? RETURNING 1",
            (time.time() if now is None else now,),
        )
        return len(rows)

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return self.incr_with_reset(key, expiry, amount)[0]

    def get(self, key: str) -> int:
        row = self._read(
            "SELECT count FROM counters WHERE key = ? AND expires_at > ?", (key, time.time())
        )
        return int(row[0]) if row else 0

    def get_expiry(self, key: str) -> float:
        row = self._read(
            "SELECT expires_at FROM counters WHERE key = ? AND expires_at > ?", (key, time.time())
        )
        return float(row[0]) if row else time.time()

    def check(self) -> bool:
        """The file can be written (a read would pass while a writer holds it past the timeout)."""
        connection, fd = self._connection()
        with self._turn(fd):
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("ROLLBACK")
        return True

    def reset(self) -> int | None:
        return len(self._write("DELETE FROM counters RETURNING 1"))

    def clear(self, key: str) -> None:
        self._write("DELETE FROM counters WHERE key = ?", (key,))

    def keys(self) -> list[str]:
        """The limit keys of the windows still open."""
        connection, _ = self._connection()
        rows = connection.execute(
            "SELECT key FROM counters WHERE expires_at > ?", (time.time(),)
        ).fetchall()
        return [key for (key,) in rows]

    def unreachable(self, err: Exception) -> bool:
        """The file cannot be used (locked, full, gone, unreadable): the failure policy applies."""
        return isinstance(err, (sqlite3.OperationalError, sqlite3.DatabaseError, OSError))
