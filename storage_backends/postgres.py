"""PostgreSQL storage through psycopg 3: one connection pool per process.

Rules this module keeps:

- Nothing connects before the first call, and a pool belongs to the process
  that opened it: after a fork (``gunicorn --preload``) the child opens its
  own, so no connection is ever shared between processes.
- The schema (``sql.MIGRATIONS``) is created, or migrated, on first use in a
  transaction holding ``pg_advisory_xact_lock``: ``CREATE TABLE IF NOT EXISTS``
  alone is not safe when several processes or hosts start together. Applied
  versions are recorded in ``schema_migrations``.
- Single statements run in autocommit (one round trip); explicit transactions
  only where statements must commit together.
- The unique constraint on (agent_key, key) decides create races. A foreign
  key with ``ON DELETE CASCADE`` makes sure a create racing the deletion of
  its agent can never leave a session behind.
- Every way of not reaching the server (refused, restarting, shut down, pool
  timeout) becomes :class:`Unavailable`, and so does a set-up that cannot
  serve (a search_path naming no schema, a missing database or role, no
  privilege to create the tables, a read-only database), naming the cause in
  one line without the URL's password. Connections are tested on checkout,
  and a failed test replaces every idle connection, since after a server
  restart all of them are dead.

The tables live in the first schema of the connection's ``search_path``; pick
another than ``public`` with libpq's ``options`` in the URL, for example
``postgresql://app@db/sessions?options=-csearch_path%3Dagent_sessions``.

Settings (config keys, with their defaults in ``config.Config``):
``POSTGRES_POOL_MIN`` and ``POSTGRES_POOL_MAX`` connections per process;
``POSTGRES_TIMEOUT`` seconds to connect, to get a connection from the pool and
to wait for a lock; ``POSTGRES_STATEMENT_TIMEOUT_MS`` per statement.

The operations themselves are :class:`~storage_backends.sql.SQLStorage`'s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import select
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
from psycopg import errors
from psycopg.adapt import Buffer, Loader
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Json
from psycopg_pool import ConnectionPool, PoolTimeout

import config

from . import sql
from .base import Unavailable
from .codec import dump_json, load_json
from .sql import SQLStorage, identity

log = logging.getLogger(__name__)
# The pool logs every failed reconnection. Keep that out of stderr (the CLI answers
# in one line) unless the host configures logging, as gunicorn.conf.py does.
logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())

# Any constant works, as long as every release uses the same one.
MIGRATION_LOCK_ID = 0x6167_656E_7473  # "agents"
SCHEMA_VERSION = sql.SCHEMA_VERSION
# One agent's live sessions in keyset order, in the driver's placeholder style.
SESSION_PAGE = sql.to_pyformat(sql.SESSION_PAGE)

# Failures that mean "try again later", not "this request is wrong". The pool's
# own errors (PoolTimeout, PoolClosed, TooManyRequests) are OperationalErrors,
# and so are AdminShutdown, CannotConnectNow, QueryCanceled and lock timeouts.
UNAVAILABLE_ERRORS = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    errors.ReadOnlySqlTransaction,
)
# Failures of the database's set-up rather than of the request, by SQLSTATE (its
# class, the first two characters, or the whole code): the server cannot serve
# this service as configured until someone changes it (the URL, a grant, the
# database), so they are Unavailable too, not bugs. 08 connection, 28 login,
# 3D database, 3F schema (a search_path naming no schema), 53 resources (disk
# full, too many connections), 57 operator intervention, 58 system; 25006 a
# read-only database, 42501 a missing privilege, 42P01 tables gone from under a
# running service (the schema dropped, a search_path elsewhere).
SETUP_SQLSTATES = frozenset({"08", "28", "3D", "3F", "53", "57", "58", "25006", "42501", "42P01"})


def _json(value: Any) -> Json:
    """A json parameter, written as the text the SQLite backend stores (codec.dump_json)."""
    return Json(value, dumps=dump_json)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    # The connections' TimeZone is UTC, so psycopg's datetimes come in UTC already.
    if value is None or value.tzinfo is dt.UTC:
        return value
    return value.astimezone(dt.UTC)


class JsonColumnLoader(Loader):
    """json and jsonb read with codec.load_json, as the SQLite backend reads its columns.

    What ``set_json_loads(load_json)`` gives, with one call a column instead of two:
    ``load_json`` reads the driver's buffer as it comes (a memoryview), with no copy.
    """

    def load(self, data: Buffer) -> Any:
        return load_json(data)


class PostgresStorage(SQLStorage):
    dialect_name = "postgres"
    placeholder = "%s"
    unique_violation = errors.UniqueViolation
    # The foreign key settles a create racing the deletion of its agent.
    missing_reference = errors.ForeignKeyViolation
    # ON DELETE CASCADE removes an agent's sessions in the agent's DELETE.
    sessions_cascade = True
    # READ COMMITTED: a second writer waits for the row, then reads the first's version.
    row_lock = " FOR UPDATE"
    # A fork shares its source's row: appends, compactions, updates and the
    # deletion take the row, so none of them commits between its statements.
    share_lock = " FOR SHARE"
    fields_bytes = "octet_length(fields::text)"
    expires_from_tti = "CASE WHEN tti_minutes > 0 THEN ? + make_interval(mins => tti_minutes) END"
    json_contains = "strpos({}::text, ?) > 0"
    octets = "octet_length({}::text)"

    encode_json = staticmethod(_json)
    # psycopg reads json columns with codec.load_json (JsonColumnLoader, registered on
    # each connection), as the SQLite backend does.
    decode_json = staticmethod(identity)
    encode_ts = staticmethod(identity)
    decode_ts = staticmethod(_utc)

    def __init__(
        self,
        conninfo: str,
        *,
        min_size: int = config.Config.POSTGRES_POOL_MIN,
        max_size: int = config.Config.POSTGRES_POOL_MAX,
        timeout: float = config.Config.POSTGRES_TIMEOUT,
        statement_timeout_ms: int = config.Config.POSTGRES_STATEMENT_TIMEOUT_MS,
    ):
        self.conninfo = conninfo
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.timeout = float(timeout)
        self.statement_timeout_ms = int(statement_timeout_ms)
        if not 0 <= self.min_size <= self.max_size or self.max_size < 1:
            raise ValueError("need 0 <= POSTGRES_POOL_MIN <= POSTGRES_POOL_MAX and a max >= 1")
        if self.timeout <= 0:
            raise ValueError("POSTGRES_TIMEOUT must be a positive number of seconds")
        self._params = conninfo_to_dict(conninfo)
        self._lock = threading.Lock()
        # This thread's open unit of work (atomic), if any.
        self._local = threading.local()
        self._pool: ConnectionPool | None = None
        self._pool_pid: int | None = None
        self._schema_ready = False
        # Why the pool's last connection attempt failed (None once one succeeds).
        self._connect_error: psycopg.Error | None = None

    @classmethod
    def from_url(cls, url: str, *, options: Mapping[str, Any]) -> PostgresStorage:
        """Raise ValueError for a URL libpq cannot parse; never connect."""
        try:
            conninfo_to_dict(url)
        except psycopg.ProgrammingError as err:
            raise ValueError(str(err).splitlines()[0]) from None
        defaults = config.Config
        storage = cls(
            url,
            min_size=options.get("POSTGRES_POOL_MIN", defaults.POSTGRES_POOL_MIN),
            max_size=options.get("POSTGRES_POOL_MAX", defaults.POSTGRES_POOL_MAX),
            timeout=options.get("POSTGRES_TIMEOUT", defaults.POSTGRES_TIMEOUT),
            statement_timeout_ms=options.get(
                "POSTGRES_STATEMENT_TIMEOUT_MS", defaults.POSTGRES_STATEMENT_TIMEOUT_MS
            ),
        )
        storage._read_filter_options(options)
        storage._read_quota_options(options)
        return storage

    # Connections

    def _get_pool(self) -> ConnectionPool:
        """This process's pool, opened (and the schema ensured) on first use."""
        pid = os.getpid()
        if self._pool is None or self._pool_pid != pid:
            with self._lock:
                if self._pool is None or self._pool_pid != pid:
                    # A pool inherited over a fork is dropped, not closed: its
                    # connections belong to the parent (psycopg never closes a
                    # connection from a process other than its opener).
                    self._pool = self._new_pool()
                    self._pool_pid = pid
                    self._schema_ready = False
        pool = self._pool
        if not self._schema_ready:
            with self._lock:
                if not self._schema_ready:
                    self._migrate(pool)
                    self._schema_ready = True
        return pool

    def _new_pool(self) -> ConnectionPool:
        # Autocommit: a single statement is its own transaction, one round trip
        # instead of three (BEGIN, the statement, COMMIT); _transaction() opens
        # an explicit one where several statements must commit together.
        kwargs: dict[str, Any] = {
            "connect_timeout": max(2, math.ceil(self.timeout)),
            "autocommit": True,
        }
        if "application_name" not in self._params:
            kwargs["application_name"] = "agent-sessions"
        storage = self

        class Connection(psycopg.Connection):
            """Remembers why the last attempt failed: the pool says only that it timed out."""

            @classmethod
            def connect(cls, *args: Any, **kwargs: Any) -> Any:
                try:
                    conn = super().connect(*args, **kwargs)
                except psycopg.Error as err:
                    storage._connect_error = err
                    raise
                storage._connect_error = None
                return conn

        pool = ConnectionPool(
            self.conninfo,
            connection_class=Connection,
            min_size=self.min_size,
            max_size=self.max_size,
            kwargs=kwargs,
            open=False,
            timeout=self.timeout,
            configure=self._configure,
            check=self._check_connection,
            # Give up a reconnection loop early: the next request then starts a
            # fresh attempt at once instead of waiting out a long back-off.
            reconnect_timeout=max(10.0, 2 * self.timeout),
            name="agent-sessions",
        )
        pool.open(wait=False)
        return pool

    def _configure(self, conn: psycopg.Connection) -> None:
        # UTC so timestamps come back in UTC; bounded waits so a lock or a slow
        # statement gives a 503 instead of a hung worker. No bitmap scans: with
        # no statistics yet (a table autovacuum has not analyzed), the planner
        # fetched every session of an agent and sorted them for a page of ten
        # (6 ms at 30,000 sessions, growing with the agent) instead of reading
        # the (agent_key, id) index in order (0.07 ms). No query here gains
        # from a bitmap scan.
        for name in ("json", "jsonb"):
            conn.adapters.register_loader(name, JsonColumnLoader)
        conn.execute(
            "SELECT set_config('TimeZone', 'UTC', false), "
            "set_config('lock_timeout', %s, false), set_config('statement_timeout', %s, false), "
            "set_config('enable_bitmapscan', 'off', false)",
            [f"{int(self.timeout * 1000)}ms", f"{self.statement_timeout_ms}ms"],
        )
        conn.commit()

    def _check_connection(self, conn: psycopg.Connection) -> None:
        if not _has_news(conn):
            return
        try:
            ConnectionPool.check_connection(conn)
        except Exception:
            # One dead connection usually means the server restarted, and then
            # every idle one is dead too: replace them all rather than testing
            # each in turn (the pool waits a back-off between failed checks).
            pool = self._pool
            if pool is not None and self._pool_pid == os.getpid():
                log.warning("postgresql connection lost; replacing idle connections")
                pool.drain()
            raise

    def _migrate(self, pool: ConnectionPool) -> None:
        # Any failure here (no schema to create in, no privilege, a read-only
        # database) leaves the service unable to serve: Unavailable, and the
        # next call tries again, so a grant or a fixed URL takes effect at once.
        with self._translated(psycopg.Error), pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK_ID])
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
            for version in self._migrate_from(conn, row.fetchone()[0]):
                log.info("postgresql schema migrated to version %s", version)

    def _record_version(self, conn: psycopg.Connection, version: int) -> None:
        conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", [version])

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in autocommit mode: each statement commits on its own.

        Raises :class:`Unavailable` when the server cannot be reached.
        """
        unit = self._unit()
        if unit is not None:
            # Inside atomic(): its connection, in a savepoint, so that a statement that
            # fails (a duplicate key the caller handles) undoes only itself.
            with self._translated(), unit.transaction():
                yield unit
            return
        with self._translated(), self._get_pool().connection() as conn:
            yield conn

    @contextlib.contextmanager
    def _translated(self, *also: type[Exception]) -> Iterator[None]:
        """Turn every failure to reach the server, or of its set-up, into :class:`Unavailable`.

        The message names the cause (for a pool timeout, why the last
        connection attempt failed) in one line, without the URL's password.
        """
        try:
            yield
        except psycopg.Error as err:
            if not isinstance(err, (*UNAVAILABLE_ERRORS, *also)) and not _is_setup_error(err):
                raise
            cause = err
            if isinstance(err, PoolTimeout) and self._connect_error is not None:
                cause = self._connect_error
            reason = f"{type(cause).__name__}: {_first_line(cause)}"
            if cause is not err:
                reason = f"{reason} ({_first_line(err)})"
            password = self._params.get("password")
            if password:
                reason = reason.replace(password, "***")
            log.warning("postgresql unavailable: %s", reason)
            raise Unavailable(f"postgresql: {reason}") from err

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in one transaction: committed on success, else rolled back.

        Raises :class:`Unavailable` when the server cannot be reached.
        """
        with self._connection() as conn, conn.transaction():
            yield conn

    # Reads and single writes commit on their own: one round trip each. The
    # removal after an update that found the session expired re-checks the
    # expiry itself, so it needs no transaction with the UPDATE.
    _reading = _connection
    _writing = _connection
    _update_transaction = _connection

    @contextlib.contextmanager
    def _scan(self, query: str, params: list[Any], batch: int) -> Iterator[Any]:
        # A server-side cursor, fetched in batches (it lives in a transaction).
        with self._transaction() as conn, conn.cursor(name="list_sessions") as cursor:
            cursor.itersize = batch
            cursor.execute(query, params)
            yield cursor

    def _execute_many(self, conn: psycopg.Connection, statement: str, rows: list) -> int:
        with conn.cursor() as cursor:
            cursor.executemany(statement, rows)
            return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            pool, pid = self._pool, self._pool_pid
            self._pool, self._pool_pid, self._schema_ready = None, None, False
        if pool is not None and pid == os.getpid():
            pool.close()

    def check(self) -> None:
        with self._connection() as conn:
            conn.execute("SELECT 1").fetchone()

    def announce(self, log: logging.Logger) -> None:
        params = self._params
        log.info(
            "storage: PostgreSQL database %s at %s (pool %s-%s per process)",
            params.get("dbname"),
            params.get("host") or params.get("hostaddr") or "localhost",
            self.min_size,
            self.max_size,
        )


def _is_setup_error(err: psycopg.Error) -> bool:
    state = err.sqlstate or ""
    return state in SETUP_SQLSTATES or state[:2] in SETUP_SQLSTATES


def _first_line(err: BaseException) -> str:
    # libpq's messages run over several lines ("LINE 1: ...", a caret, hints).
    return " ".join((str(err).splitlines() or [""])[0].split())


def _has_news(conn: psycopg.Connection) -> bool:
    """Whether a pooled connection may be dead, without a round trip to the server.

    An idle connection's socket has nothing to read unless the server sent
    something on its own: its goodbye when it shut down or ended the session,
    or end of file when the connection dropped. Only then does the pool's check
    (an empty query, one round trip) run, instead of on every checkout.
    """
    if conn.closed:
        return True
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error):
        return True
