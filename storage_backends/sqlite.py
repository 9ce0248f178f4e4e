"""SQLite storage through sqlite-utils: one file, WAL, a connection per thread.

Concurrency rules this module keeps:

- Nothing connects before the first call, so a process may fork after
  creating the object (``gunicorn --preload``); a connection is never used
  by a process other than the one that opened it.
- Single-statement writes run in autocommit mode. Transactions that read
  before they write start with ``BEGIN IMMEDIATE``: a deferred transaction
  that upgrades from read to write fails with "database is locked" at once,
  whatever the busy timeout.
- The unique index on (agent_key, key) decides races between creates.
- Writers take turns on a lock file beside the database (``<db>-writer``)
  before they touch SQLite's own lock (:class:`WritersTurn`). SQLite's busy
  handler polls by sleeping for a millisecond and more; the turn is polled
  every 50-500 µs. It is a matter of speed, not of safety: SQLite's own lock
  keeps writers apart either way. The turn is waited for up to the busy
  timeout, then the write is a 503.
- Requests never checkpoint the WAL: each process's checkpointer thread
  does, every CHECKPOINT_INTERVAL_S, beside readers and writers (a PASSIVE
  checkpoint waits for neither). A request's connection checkpoints only
  past REQUEST_AUTOCHECKPOINT_PAGES, which bounds the WAL should the thread
  fall behind. Running a checkpoint beside other writers is safe from SQLite
  3.51.3 on (the WAL-reset bug, https://sqlite.org/wal.html#walresetbug);
  the default install bundles a newer SQLite (``pysqlite3``). With an older
  one (warned about at start) there is no checkpointer thread: SQLite's own
  autocheckpoint runs inside the writers' turn.
- Every connection comes from sqlite-utils' choice of library
  (``sqlite_utils.utils.sqlite3``: pysqlite3 when installed): two SQLite
  libraries in one process on one file would drop each other's POSIX locks.
- A thread's connection and its descriptor of the lock file are closed
  together, when the thread ends or by :meth:`SQLiteStorage.close`, which
  also stops the checkpointer.

The operations themselves are :class:`~storage_backends.sql.SQLStorage`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import sqlite_utils
from sqlite_utils.utils import sqlite3

import config

from .base import Unavailable
from .codec import dump_json, format_ts, load_json, parse_ts
from .sql import SCHEMA_VERSION, SQLStorage
from .sql.dialect import BulkRun

__all__ = ["SCHEMA_VERSION", "SQLiteStorage", "WritersTurn"]

log = logging.getLogger(__name__)

# The driver asks every parameter of a type it has no adapter for whether it adapts
# itself (two failed attribute lookups, about 10k instructions for each None bound);
# an adapter that gives None back binds NULL as before, without them.
sqlite3.register_adapter(type(None), lambda value: value)

# SQLite before this release can corrupt a WAL database written by several
# connections at once (https://sqlite.org/wal.html#walresetbug).
WAL_RESET_FIXED = (3, 51, 3)
# With such a SQLite, checkpoints run only inside a writer's turn, as SQLite's
# own autocheckpoint does, never from a thread beside the writers.
WAL_RESET_BUG = sqlite3.sqlite_version_info < WAL_RESET_FIXED
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
# How often each process's checkpointer moves the WAL into the database.
CHECKPOINT_INTERVAL_S = 1.0
# A request's connection checkpoints only past this many WAL pages (SQLite's
# default is 1,000): a bound for when the checkpointer falls behind.
REQUEST_AUTOCHECKPOINT_PAGES = 10_000
# After a checkpoint has reset it, the WAL file is truncated to this size.
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024


class SQLiteStorage(SQLStorage):
    dialect_name = "sqlite"
    placeholder = "?"
    unique_violation = sqlite3.IntegrityError
    # Timestamps are fixed-width text (codec.format_ts), which strftime writes alike.
    expires_from_tti = (
        "CASE WHEN tti_minutes > 0 "
        "THEN strftime('%Y-%m-%dT%H:%M:%fZ', ?, '+' || tti_minutes || ' minutes') END"
    )
    json_contains = "instr({}, ?) > 0"
    # One writer for the whole file: a large fork's copy must not hold it (sql/forks.py).
    fork_in_chunks = True

    encode_json = staticmethod(dump_json)
    decode_json = staticmethod(load_json)
    encode_ts = staticmethod(format_ts)
    decode_ts = staticmethod(parse_ts)
    encode_flag = staticmethod(int)

    def __init__(
        self,
        path: str,
        *,
        busy_timeout_ms: int = config.Config.SQLITE_BUSY_TIMEOUT_MS,
        synchronous: str = config.Config.SQLITE_SYNCHRONOUS,
    ):
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"SQLITE_SYNCHRONOUS must be one of {', '.join(SYNCHRONOUS_MODES)}")
        self.path = path
        self.busy_timeout_ms = int(busy_timeout_ms)
        self.synchronous = synchronous
        self._local = threading.local()
        # Every thread's connection, for close(); a thread's own goes when it ends.
        self._connections: weakref.WeakSet[_ThreadConnection] = weakref.WeakSet()
        self._schema_ready_pid: int | None = None
        self._schema_lock = threading.Lock()
        self._checkpointer: _Checkpointer | None = None

    @classmethod
    def from_url(cls, url: str, *, options: Mapping[str, Any]) -> SQLiteStorage:
        # sqlite:////abs/path (absolute) or sqlite:///rel/path (relative), as in SQLAlchemy.
        prefix = "sqlite:///"
        if not url.startswith(prefix) or len(url) == len(prefix):
            raise ValueError("expected sqlite:////absolute/path.db or sqlite:///relative/path.db")
        storage = cls(
            url[len(prefix) :],
            busy_timeout_ms=options.get(
                "SQLITE_BUSY_TIMEOUT_MS", config.Config.SQLITE_BUSY_TIMEOUT_MS
            ),
            synchronous=str(options.get("SQLITE_SYNCHRONOUS", config.Config.SQLITE_SYNCHRONOUS)),
        )
        storage._read_filter_options(options)
        storage._read_quota_options(options)
        return storage

    # Connections

    def _reading(self) -> _Reading:
        return _Reading(self)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite_utils.Database]:
        """This thread's connection, holding this process's turn to write (see the module doc).

        The turn is waited for up to the busy timeout, like SQLite's own lock:
        a holder that stalls (a stopped or traced process) makes this a 503,
        never a worker hung until gunicorn kills it.
        """
        unit = self._unit()
        if unit is not None:  # inside atomic(): its transaction, its turn
            with _translated():
                yield unit
            return
        with _translated():
            connection = self._thread_connection()
            with WritersTurn(connection.writer_fd, self.busy_timeout_ms / 1000):
                yield connection.db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite_utils.Database]:
        """A ``BEGIN IMMEDIATE`` transaction in the writers' turn; inside atomic(), a
        savepoint of its transaction."""
        unit = self._unit()
        if unit is not None:
            with _translated(), _savepoint(unit):
                yield unit
            return
        with self._writing() as db, _immediate(db):
            yield db

    # The UPDATE and the removal of an expired session commit together.
    _update_transaction = _transaction

    @contextlib.contextmanager
    def _bulk(self) -> Iterator[BulkRun]:
        """The chunks of a long copy or freeing checkpoint nothing inside their turns; the
        WAL they wrote is checkpointed at the end, outside any turn.

        A commit that finds the WAL past REQUEST_AUTOCHECKPOINT_PAGES runs a checkpoint
        of it inside its writers' turn: after one chunk of such a run, or after the
        whole run for the next writer, that was hundreds of milliseconds of a held
        writer. A PASSIVE checkpoint blocks no writer, and leaves a WAL the next
        writer starts again from its beginning.
        """
        outer = getattr(self._local, "bulk", None)
        if outer is not None:
            yield outer
            return
        run = BulkRun()
        if WAL_RESET_BUG or self._unit() is not None:
            yield run
            return
        db = self.db
        with _translated():
            db.execute("PRAGMA wal_autocheckpoint = 0")
        self._local.bulk = run
        try:
            yield run
        finally:
            self._local.bulk = None
            with contextlib.suppress(sqlite3.Error):
                if run.wrote_much:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                db.execute(f"PRAGMA wal_autocheckpoint = {REQUEST_AUTOCHECKPOINT_PAGES}")

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[Any]:
        """A second connection in a read transaction, which WAL keeps at one state of the
        file while this thread's connection writes (a fork's source, sql/forks.py)."""
        self._thread_connection()  # the schema, ensured
        with _translated():
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        try:
            with _translated():
                conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
                conn.execute("BEGIN")
            yield _Snapshot(conn)
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    @contextlib.contextmanager
    def _scan(self, query: str, params: list[Any], batch: int) -> Iterator[Any]:
        with _translated():
            cursor = self.db.execute(query, params)
            try:
                yield cursor
            finally:
                cursor.close()

    def _execute_many(self, conn: sqlite_utils.Database, statement: str, rows: list) -> int:
        return conn.conn.executemany(statement, rows).rowcount

    @property
    def db(self) -> sqlite_utils.Database:
        """This thread's connection, opened (and the schema ensured) on first use."""
        return self._thread_connection().db

    def _thread_connection(self) -> _ThreadConnection:
        local = self._local
        connection = getattr(local, "connection", None)
        if connection is None or connection.pid != os.getpid():
            connection = self._connect()
            local.connection = connection
            self._connections.add(connection)
            if not WAL_RESET_BUG:
                self._start_checkpointer()
        return connection

    def _start_checkpointer(self) -> None:
        """This process's checkpointer, started with its first connection (see _Checkpointer)."""
        with self._schema_lock:
            current = self._checkpointer
            if current is None or current.pid != os.getpid():
                self._checkpointer = _Checkpointer(self)

    def _connect(self) -> _ThreadConnection:
        with _translated():
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_ms / 1000,
                isolation_level=None,  # autocommit; transactions are explicit
                # Used by one thread only; close() may end it from another.
                check_same_thread=False,
            )
            try:
                db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
                db.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
                if db.journal_mode != "wal":
                    db.enable_wal()
                db.execute(f"PRAGMA synchronous = {self.synchronous}")
                if not WAL_RESET_BUG:
                    # Else SQLite's default (1,000 pages), inside the writers' turn.
                    db.execute(f"PRAGMA wal_autocheckpoint = {REQUEST_AUTOCHECKPOINT_PAGES}")
                db.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
                self._ensure_schema(db)
                # Each thread opens its own descriptor: flock turns are per open file.
                writer_fd = os.open(self.path + "-writer", os.O_RDWR | os.O_CREAT, 0o600)
            except BaseException:
                conn.close()
                raise
            return _ThreadConnection(db, writer_fd)

    def _ensure_schema(self, db: sqlite_utils.Database) -> None:
        pid = os.getpid()
        with self._schema_lock:
            if self._schema_ready_pid == pid:
                return
            with _immediate(db):
                version = db.execute("PRAGMA user_version").fetchone()[0]
                empty = version == 0 and not db.execute("SELECT 1 FROM sqlite_master").fetchone()
                applied = self._migrate_from(db, version)
                if empty:
                    # Once per database: the next connection, in any process, finds a version.
                    # A new file where one was expected is a mistyped path, or a lost volume.
                    log.warning(
                        "storage: created a new, empty database at %s (schema version %s)",
                        os.path.abspath(self.path),
                        applied[-1],
                    )
                else:
                    for done in applied:
                        log.info("sqlite schema migrated to version %s", done)
            self._schema_ready_pid = pid

    def _record_version(self, conn: sqlite_utils.Database, version: int) -> None:
        conn.execute(f"PRAGMA user_version = {int(version)}")

    def close(self) -> None:
        """Close every thread's connection opened by this process (at shutdown)."""
        connections, self._connections = list(self._connections), weakref.WeakSet()
        self._local = threading.local()
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None and checkpointer.pid == os.getpid():
            checkpointer.stop()
        for connection in connections:
            connection.close()

    def check(self) -> None:
        with self._reading() as db:
            db.execute("SELECT 1").fetchone()

    def announce(self, log: logging.Logger) -> None:
        version = sqlite3.sqlite_version
        log.info("storage: SQLite %s at %s (synchronous=%s)", version, self.path, self.synchronous)
        if tuple(int(part) for part in version.split(".")[:3]) < WAL_RESET_FIXED:
            log.warning(
                "SQLite %s is older than %s and has the WAL-reset bug, which can corrupt the "
                "database when several processes write to it (sqlite.org/wal.html#walresetbug); "
                "install a newer SQLite",
                version,
                ".".join(map(str, WAL_RESET_FIXED)),
            )


class WritersTurn:
    """An exclusive flock on ``fd`` (a ``-writer`` file), waited for ``timeout`` seconds at most.

    A free turn is taken at once. A taken one is polled for, with pauses
    from 50 µs up to half a millisecond (below SQLite's busy handler, which
    sleeps a millisecond and more), and past the timeout raises TimeoutError,
    an OSError: both storages answer that as unavailable. A class rather than
    a generator, as it wraps every write.
    """

    __slots__ = ("fd", "timeout")

    def __init__(self, fd: int, timeout: float):
        self.fd = fd
        self.timeout = timeout

    def __enter__(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        deadline = time.monotonic() + self.timeout
        pause = 0.00005
        while True:
            time.sleep(pause)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"database is locked: the writers' turn was not free within "
                        f"{self.timeout:g} s"
                    ) from None
            pause = min(pause * 2, 0.0005)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


class _ThreadConnection:
    """One thread's connection and its descriptor of the writers' lock file.

    Both close together, by :meth:`close` or when the thread ends (its
    thread-local slot, the only other reference, goes with it).
    """

    def __init__(self, db: sqlite_utils.Database, writer_fd: int):
        self.db = db
        self.writer_fd = writer_fd
        self.pid = os.getpid()
        self._finalizer = weakref.finalize(self, _close_connection, self.pid, db, writer_fd)

    def close(self) -> None:
        self._finalizer()


class _Checkpointer:
    """A daemon thread that checkpoints the WAL every CHECKPOINT_INTERVAL_S, one per process.

    Requests then write without ever running a checkpoint themselves (its two
    fsyncs were what set create's p99): their connections checkpoint only past
    REQUEST_AUTOCHECKPOINT_PAGES, a bound on the WAL should this thread fall
    behind. A PASSIVE checkpoint waits for no reader or writer; with SQLite
    3.51.3 or newer it may run beside them (the WAL-reset bug is fixed).
    The thread holds no reference to the storage: it stops with
    :meth:`stop`, or when the storage is garbage-collected.
    """

    def __init__(self, storage: SQLiteStorage):
        self.pid = os.getpid()
        self._stop = threading.Event()
        weakref.finalize(storage, self._stop.set)
        self._thread = threading.Thread(
            target=self._run,
            args=(storage.path, storage.busy_timeout_ms, storage.synchronous, self._stop),
            name="sqlite-checkpointer",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _run(path: str, busy_timeout_ms: int, synchronous: str, stop: threading.Event) -> None:
        conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
            while not stop.wait(CHECKPOINT_INTERVAL_S):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as err:
                    log.warning("sqlite checkpoint failed: %s", err)
        finally:
            conn.close()


# Connections inherited over a fork: a child must not close its parent's
# (SQLite may checkpoint and remove the WAL on the last close), so they are kept.
_inherited: list[sqlite_utils.Database] = []


def _close_connection(pid: int, db: sqlite_utils.Database, writer_fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(writer_fd)
    if os.getpid() != pid:
        _inherited.append(db)
        return
    with contextlib.suppress(sqlite3.Error):
        db.close()


@contextlib.contextmanager
def _immediate(db: sqlite_utils.Database) -> Iterator[None]:
    """A write transaction that takes the write lock up front (see the module docstring).

    It ends in a COMMIT, or a ROLLBACK when the block or the COMMIT itself
    fails, so a connection never stays inside a stale transaction.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def _savepoint(db: sqlite_utils.Database) -> Iterator[None]:
    """A nested transaction inside an open one: undone alone when the block fails."""
    db.execute("SAVEPOINT nested")
    try:
        yield
    except BaseException:
        if db.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK TO nested")
                db.execute("RELEASE nested")
        raise
    db.execute("RELEASE nested")


# Errors that mean "try again later" rather than "this request is wrong".
_UNAVAILABLE_MARKERS = (
    "locked",
    "busy",
    "disk i/o",
    "full",
    "unable to open",
    "readonly",
    "read-only",
    "not a database",
    "malformed",
)


class _Translated:
    """Turns SQLite's operational failures into :class:`Unavailable` (a context manager).

    A class rather than a generator: it wraps every call, and costs a third as much.
    """

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: Any, traceback: Any) -> bool:
        if err is None or isinstance(err, sqlite3.IntegrityError):
            return False
        if isinstance(err, sqlite3.DatabaseError):  # OperationalError is one
            message = str(err).lower()
            if any(marker in message for marker in _UNAVAILABLE_MARKERS):
                log.warning("sqlite unavailable: %s", err)
                raise Unavailable(f"sqlite: {err}") from err
        elif isinstance(err, OSError):
            # The database's directory cannot be made or reached (a file in its
            # path, no permission, a read-only or full file system).
            log.warning("sqlite unavailable: %s", err)
            raise Unavailable(f"sqlite: {err}") from err
        return False


_translated = _Translated


class _Snapshot:
    """A snapshot's connection whose statements' failures are translated (see _Translated)."""

    __slots__ = ("conn",)

    def __init__(self, conn: Any):
        self.conn = conn

    def execute(self, statement: str, params: Any = ()) -> Any:
        with _translated():
            return self.conn.execute(statement, params)


class _Reading(_Translated):
    """This thread's connection for reads, failures translated (see _Translated)."""

    def __init__(self, storage: SQLiteStorage):
        self.storage = storage

    def __enter__(self) -> sqlite_utils.Database:  # type: ignore[override]
        with _translated():
            return self.storage.db
