"""Fixed-window counters in a small SQLite file shared by the processes of one host.

``limits`` storage for ``agent-sessions+file:///path/to/counters.db``: what
``memory://`` counts in when gunicorn runs several workers
(``gunicorn.conf.py`` makes the file's directory, one per server, and removes
it at exit; see :func:`sessions_app.corridor.rate_limits.storage_uri`).

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

The file mends itself: every process moves to the file at the path.

- Each thread compares the path's device and inode (and its ``-writer``
  file's) with those of its connection at most once every ``CHECK_EVERY_S``,
  and at once after an error other than a busy one: a file removed, or
  replaced by another process, is reopened (the directory made again, mode
  0700, when it is gone), and the statement that failed runs once more.
- A file that SQLite finds corrupt (``SQLITE_CORRUPT``, ``SQLITE_NOTADB``:
  overwritten, say), and that a fresh connection finds corrupt as well, is
  replaced, under the writers' turn, by the first process to see it, which
  logs one warning: the database file is unlinked first, then its ``-wal``
  and ``-shm``, so that an old connection closing in another process finds
  its file moved and leaves the new file's WAL alone (SQLite checks that),
  and the counts start again from nothing.

Otherwise a file that cannot be written (disk full, locked or its writers'
turn taken past ``BUSY_TIMEOUT_MS``, a directory that is not this user's
alone) raises :class:`sqlite3.OperationalError` and the like, which
:meth:`HostCounters.unreachable` calls an outage: the service's
``RATELIMIT_FAILURE_POLICY`` then applies, as for a stalled Redis.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from typing import Any

from limits.storage import Storage
from sqlite_utils.utils import sqlite3

from storage_backends.sqlite import WritersTurn

SCHEME = "agent-sessions+file"
BUSY_TIMEOUT_MS = 200
# How often a thread checks that its connection is still to the file at the path.
CHECK_EVERY_S = 1.0
# SQLite's primary result codes: busy or full are outages, corrupt ones are mended.
BUSY_CODES = frozenset((5, 6, 13))  # SQLITE_BUSY, SQLITE_LOCKED, SQLITE_FULL
CORRUPT_CODES = frozenset((11, 26))  # SQLITE_CORRUPT, SQLITE_NOTADB

log = logging.getLogger("sessions_app.host_counters")  # the name log filters select it by

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
            self._open(local)  # a parent's connection is left alone, never closed here
        elif time.monotonic() >= local.check_at:
            local.check_at = time.monotonic() + CHECK_EVERY_S
            if self._identity() != local.identity:
                self._reopen(local)
        return local.connection, local.writer_fd

    def _identity(self) -> tuple[int, ...] | None:
        """The device and inode of the file and of its ``-writer`` file; None when one is gone."""
        try:
            db, writer = os.stat(self.path), os.stat(self.path + "-writer")
        except FileNotFoundError:
            return None
        return db.st_dev, db.st_ino, writer.st_dev, writer.st_ino

    def _open(self, local: threading.local) -> None:
        self._make_directory()
        writer_fd = os.open(self.path + "-writer", os.O_RDWR | os.O_CREAT, 0o600)
        connection = None
        try:
            # Under the turn, so that no replacement (_mend) falls between the
            # connection and the identity it is checked against.
            with self._turn(writer_fd):
                connection = sqlite3.connect(
                    self.path,
                    timeout=self.busy_timeout_ms / 1000,
                    isolation_level=None,
                    check_same_thread=False,
                )
                connection.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
                if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    connection.execute("PRAGMA journal_mode = WAL")
                connection.execute("PRAGMA synchronous = OFF")
                connection.execute(SCHEMA)
                identity = self._identity()
        except BaseException:
            if connection is not None:
                connection.close()
            os.close(writer_fd)
            raise
        local.connection = connection
        local.writer_fd = writer_fd
        local.identity = identity
        local.check_at = time.monotonic() + CHECK_EVERY_S
        local.pid = os.getpid()

    def _reopen(self, local: threading.local) -> None:
        """Close this thread's connection and open one to the file now at the path."""
        with contextlib.suppress(sqlite3.Error):
            local.connection.close()
        with contextlib.suppress(OSError):
            os.close(local.writer_fd)
        local.pid = None
        self._open(local)

    def _make_directory(self) -> None:
        """Make the file's directory again when it is gone; refuse one that others may write."""
        directory = os.path.dirname(self.path)
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        else:
            log.warning("rate-limit counters directory %s was gone: made it again", directory)
        info = os.lstat(directory)
        if (
            not stat.S_ISDIR(info.st_mode)
            or info.st_uid != os.geteuid()
            or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        ):
            raise PermissionError(
                f"rate-limit counters directory {directory} is not a directory of this user's alone"
            )

    def _mend(self, err: Exception) -> bool:
        """After ``err``: reopen a file moved or removed, replace a corrupt one; False if neither.

        True when this thread's connection is, or can now be, to a good file,
        so the statement that failed can run again.
        """
        code = getattr(err, "sqlite_errorcode", None)
        code = code & 0xFF if isinstance(code, int) else None
        if isinstance(err, TimeoutError) or code in BUSY_CODES:
            return False  # busy or full: the file is where it was, an outage
        local = self._local
        opened = getattr(local, "pid", None) == os.getpid()  # else opening it failed
        if opened and self._identity() != local.identity:
            self._reopen(local)
            return True
        if code not in CORRUPT_CODES:
            return False
        writer = self.path + "-writer"
        fd = local.writer_fd if opened else os.open(writer, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with self._turn(fd):
                moved = opened and self._identity() != local.identity  # replaced meanwhile
                replace = not moved and self._corrupt()
                if replace:
                    for suffix in ("", "-wal", "-shm"):  # the database file first (see above)
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.path + suffix)
                    log.warning(
                        "rate-limit counters file %s was corrupt (%s): replaced it with a new "
                        "one; the counts start again",
                        self.path,
                        err,
                    )
        finally:
            if not opened:
                os.close(fd)
        if opened and not (moved or replace):
            return False  # a fresh connection reads it whole: not the file's fault
        if opened:
            self._reopen(local)
        return True  # (a connection not opened yet opens on the next call)

    def _corrupt(self) -> bool:
        """A fresh connection finds the file corrupt (not when it only cannot tell now)."""
        try:
            with contextlib.closing(sqlite3.connect(self.path, timeout=0)) as fresh:
                return fresh.execute("PRAGMA quick_check").fetchone() != ("ok",)
        except sqlite3.Error as err:
            code = getattr(err, "sqlite_errorcode", None)
            return isinstance(code, int) and code & 0xFF in CORRUPT_CODES

    def _turn(self, fd: int) -> WritersTurn:
        """This process's turn to write, waited for ``busy_timeout_ms`` at most."""
        return WritersTurn(fd, self.busy_timeout_ms / 1000)

    def _write(self, sql: str, params: Any = ()) -> list[tuple]:
        try:
            connection, fd = self._connection()
            with self._turn(fd):
                return connection.execute(sql, params).fetchall()
        except (sqlite3.Error, OSError) as err:
            if not self._mend(err):
                raise
        connection, fd = self._connection()
        with self._turn(fd):
            return connection.execute(sql, params).fetchall()

    def _read(self, sql: str, params: Any = ()) -> list[tuple]:
        try:
            return self._connection()[0].execute(sql, params).fetchall()
        except (sqlite3.Error, OSError) as err:
            if not self._mend(err):
                raise
        return self._connection()[0].execute(sql, params).fetchall()

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
        rows = self._read(
            "SELECT count FROM counters WHERE key = ? AND expires_at > ?", (key, time.time())
        )
        return int(rows[0][0]) if rows else 0

    def get_expiry(self, key: str) -> float:
        rows = self._read(
            "SELECT expires_at FROM counters WHERE key = ? AND expires_at > ?", (key, time.time())
        )
        return float(rows[0][0]) if rows else time.time()

    def check(self) -> bool:
        """The file can be written (a read would pass while a writer holds it past the timeout).

        A write that takes the lock and changes nothing (``BEGIN IMMEDIATE``
        alone would leave a transaction open when the ``ROLLBACK`` is skipped).
        """
        self._write("DELETE FROM counters WHERE 0")
        return True

    def reset(self) -> int | None:
        return len(self._write("DELETE FROM counters RETURNING 1"))

    def clear(self, key: str) -> None:
        self._write("DELETE FROM counters WHERE key = ?", (key,))

    def keys(self) -> list[str]:
        """The limit keys of the windows still open."""
        rows = self._read("SELECT key FROM counters WHERE expires_at > ?", (time.time(),))
        return [key for (key,) in rows]

    def unreachable(self, err: Exception) -> bool:
        """The file cannot be used (locked, full, gone, unreadable): the failure policy applies."""
        return isinstance(err, (sqlite3.OperationalError, sqlite3.DatabaseError, OSError))
