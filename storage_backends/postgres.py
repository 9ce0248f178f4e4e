"""PostgreSQL storage through psycopg 3: one connection pool per process.

Rules this module keeps:

- Nothing connects before the first call, and a pool belongs to the process
  that opened it: after a fork (``gunicorn --preload``) the child opens its
  own, so no connection is ever shared between processes.
- The schema is created, or migrated, on first use in a transaction holding
  ``pg_advisory_xact_lock``: ``CREATE TABLE IF NOT EXISTS`` alone is not safe
  when several processes or hosts start together. Applied versions are
  recorded in ``schema_migrations``.
- The unique constraint on (agent_key, key) decides create races. A foreign
  key with ``ON DELETE CASCADE`` makes sure a create racing the deletion of
  its agent can never leave a session behind.
- Every way of not reaching the server (refused, restarting, shut down, pool
  timeout) becomes :class:`Unavailable`. Connections are tested on checkout,
  and a failed test replaces every idle connection, since after a server
  restart all of them are dead.

The tables live in the first schema of the connection's ``search_path``; pick
another than ``public`` with libpq's ``options`` in the URL, for example
``postgresql://app@db/sessions?options=-csearch_path%3Dagent_sessions``.

Settings (config keys): ``POSTGRES_POOL_MIN`` (1) and ``POSTGRES_POOL_MAX`` (4)
connections per process; ``POSTGRES_TIMEOUT`` (5 seconds) to connect, to get a
connection from the pool and to wait for a lock; ``POSTGRES_STATEMENT_TIMEOUT_MS``
(15000) per statement.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import functools
import json
import logging
import math
import os
import select
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from .base import (
    Agent,
    AgentNotFound,
    ApiKey,
    ApiKeyNotFound,
    Conflict,
    Grant,
    Page,
    Session,
    SessionNotFound,
    Storage,
    Unavailable,
    text_matches,
)

log = logging.getLogger(__name__)
# The pool logs every failed reconnection. Keep that out of stderr (the CLI answers
# in one line) unless the host configures logging, as gunicorn.conf.py does.
logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())

# Any constant works, as long as every release uses the same one.
MIGRATION_LOCK_ID = 0x6167_656E_7473  # "agents"

# version -> statements; append new versions, never edit applied ones.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE IF NOT EXISTS agents (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, key text NOT NULL UNIQUE,
            name text NOT NULL, description text, metadata jsonb NOT NULL,
            enabled boolean NOT NULL,
            created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS sessions (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            agent_key text NOT NULL REFERENCES agents (key) ON DELETE CASCADE,
            key text NOT NULL, UNIQUE (agent_key, key),
            name text NOT NULL, description text, metadata jsonb NOT NULL,
            enabled boolean NOT NULL, tti_minutes integer NOT NULL,
            created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
            expires_at timestamptz)""",
        # Keyset pages of one agent; idle-expiry purges.
        "CREATE INDEX IF NOT EXISTS sessions_agent_id ON sessions (agent_key, id)",
        "CREATE INDEX IF NOT EXISTS sessions_expires_at ON sessions (expires_at) "
        "WHERE expires_at IS NOT NULL",
        """CREATE TABLE IF NOT EXISTS api_keys (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id text NOT NULL UNIQUE,
            name text NOT NULL, secret_hash text NOT NULL, grants jsonb NOT NULL,
            admin boolean NOT NULL, create_limit text, created_at timestamptz NOT NULL,
            expires_at timestamptz, revoked_at timestamptz)""",
    ),
}
SCHEMA_VERSION = max(MIGRATIONS)

# Stored fields, named as the dataclass fields. Rows are read as (sequence, *fields).
AGENT_COLUMNS = ("key", "name", "description", "metadata", "enabled", "created_at", "updated_at")
SESSION_COLUMNS = ("agent_key", "tti_minutes", *AGENT_COLUMNS)
KEY_COLUMNS = ("id", "name", "secret_hash", "grants", "admin", "create_limit")
KEY_COLUMNS += ("created_at", "expires_at", "revoked_at")
AGENT_SELECT = "SELECT id, " + ", ".join(AGENT_COLUMNS) + " FROM agents"
SESSION_SELECT = "SELECT id, " + ", ".join(SESSION_COLUMNS) + ", expires_at FROM sessions"
KEY_SELECT = "SELECT seq, " + ", ".join(KEY_COLUMNS) + " FROM api_keys"
AGENT_FIELDS = frozenset({"name", "description", "metadata", "enabled"})
SESSION_FIELDS = AGENT_FIELDS | {"tti_minutes"}
LIVE_SESSION = "(expires_at IS NULL OR expires_at > %s)"
# One agent's live sessions in keyset order, read from the (agent_key, id) index.
SESSION_PAGE = f"{SESSION_SELECT} WHERE agent_key = %s AND id > %s AND {LIVE_SESSION} ORDER BY id"

# Failures that mean "try again later", not "this request is wrong". The pool's
# own errors (PoolTimeout, PoolClosed, TooManyRequests) are OperationalErrors,
# and so are AdminShutdown, CannotConnectNow, QueryCanceled and lock timeouts.
UNAVAILABLE_ERRORS = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    errors.ReadOnlySqlTransaction,
)


class PostgresStorage(Storage):
    schemes = ("postgresql", "postgres")

    def __init__(
        self,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 4,
        timeout: float = 5.0,
        statement_timeout_ms: int = 15000,
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
        self._pool: ConnectionPool | None = None
        self._pool_pid: int | None = None
        self._schema_ready = False

    @classmethod
    def from_url(cls, url: str, *, options: Mapping[str, Any]) -> PostgresStorage:
        """Raise ValueError for a URL libpq cannot parse; never connect."""
        try:
            conninfo_to_dict(url)
        except psycopg.ProgrammingError as err:
            raise ValueError(str(err).splitlines()[0]) from None
        return cls(
            url,
            min_size=options.get("POSTGRES_POOL_MIN", 1),
            max_size=options.get("POSTGRES_POOL_MAX", 4),
            timeout=options.get("POSTGRES_TIMEOUT", 5),
            statement_timeout_ms=options.get("POSTGRES_STATEMENT_TIMEOUT_MS", 15000),
        )

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
        pool = ConnectionPool(
            self.conninfo,
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
        with _translated(), pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK_ID])
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
            current = row.fetchone()[0]
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"database schema version {current} is newer than this release "
                    f"understands ({SCHEMA_VERSION})"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", [version])
                log.info("postgresql schema migrated to version %s", version)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in autocommit mode: each statement commits on its own.

        Raises :class:`Unavailable` when the server cannot be reached.
        """
        with _translated(), self._get_pool().connection() as conn:
            yield conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in one transaction: committed on success, else rolled back.

        Raises :class:`Unavailable` when the server cannot be reached.
        """
        with self._connection() as conn, conn.transaction():
            yield conn

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

    # Agents

    def create_agent(self, *, agent: Agent) -> Agent:
        try:
            with self._connection() as conn:
                conn.execute(_insert("agents", AGENT_COLUMNS), _values(agent, AGENT_COLUMNS))
        except errors.UniqueViolation:
            raise Conflict(agent.key) from None
        return agent

    def get_agent(self, *, agent_key: str) -> Agent:
        with self._connection() as conn:
            row = conn.execute(AGENT_SELECT + " WHERE key = %s", [agent_key]).fetchone()
        if row is None:
            raise AgentNotFound(agent_key)
        return _agent(row)

    def list_agents(self, *, limit: int, after: int | None = None) -> Page:
        with self._connection() as conn:
            rows = conn.execute(
                AGENT_SELECT + " WHERE id > %s ORDER BY id LIMIT %s",
                [after or 0, limit + 1],
            ).fetchall()
        return _page(rows, limit, _agent)

    def update_agent(
        self, *, agent_key: str, changes: Mapping[str, Any], now: dt.datetime
    ) -> Agent:
        assignments, params = _assignments(changes, AGENT_FIELDS, now)
        query = sql.SQL("UPDATE agents SET {} WHERE key = %s RETURNING id, {}").format(
            assignments, _columns(AGENT_COLUMNS)
        )
        with self._connection() as conn:
            row = conn.execute(query, [*params, agent_key]).fetchone()
        if row is None:
            raise AgentNotFound(agent_key)
        return _agent(row)

    def delete_agent(self, *, agent_key: str) -> None:
        # The foreign key's ON DELETE CASCADE removes the sessions in the same statement.
        with self._connection() as conn:
            deleted = conn.execute("DELETE FROM agents WHERE key = %s", [agent_key]).rowcount
        if deleted == 0:
            raise AgentNotFound(agent_key)

    # Sessions

    def create_session(self, *, session: Session) -> Session:
        # One statement: the agent's existence and the key's uniqueness are
        # decided together; the foreign key settles a race with delete_agent.
        columns = (*SESSION_COLUMNS, "expires_at")
        try:
            with self._connection() as conn:
                inserted = conn.execute(
                    _insert("sessions", columns)
                    + " WHERE EXISTS (SELECT 1 FROM agents WHERE key = %s)",
                    [*_values(session, columns), session.agent_key],
                ).rowcount
        except errors.UniqueViolation:
            raise Conflict(session.key) from None
        except errors.ForeignKeyViolation:
            raise AgentNotFound(session.agent_key) from None
        if inserted == 0:
            raise AgentNotFound(session.agent_key)
        return session

    def get_session(self, *, agent_key: str, session_key: str, now: dt.datetime) -> Session:
        with self._connection() as conn:
            row = conn.execute(
                SESSION_SELECT + " WHERE agent_key = %s AND key = %s",
                [agent_key, session_key],
            ).fetchone()
            expired = row is not None and row[-1] is not None and row[-1] <= now
            if expired:
                conn.execute(
                    "DELETE FROM sessions WHERE id = %s AND expires_at <= %s", [row[0], now]
                )
        # Raised after the commit, so that the removal of an expired session sticks.
        if row is None or expired:
            raise SessionNotFound(session_key)
        return _session(row)

    def list_sessions(
        self,
        *,
        agent_key: str,
        limit: int,
        now: dt.datetime,
        after: int | None = None,
        matches: Any = None,
    ) -> Page:
        query = SESSION_PAGE
        params: list[Any] = [agent_key, after or 0, now]
        if matches is None:
            with self._connection() as conn:
                rows = conn.execute(query + " LIMIT %s", [*params, limit + 1]).fetchall()
        else:
            # The pattern runs in Python over a server-side cursor, fetched in
            # batches, so only as many rows are read as it takes to fill the page
            # (a server-side cursor lives in a transaction).
            with self._transaction() as conn:
                rows = []
                with conn.cursor(name="list_sessions") as cursor:
                    cursor.itersize = max(100, 2 * limit)
                    cursor.execute(query, params)
                    for row in cursor:
                        name, description = row[4], row[5]
                        if text_matches(matches, name, description):
                            rows.append(row)
                            if len(rows) > limit:
                                break
        return _page(rows, limit, _session)

    def update_session(
        self,
        *,
        agent_key: str,
        session_key: str,
        changes: Mapping[str, Any],
        now: dt.datetime,
    ) -> Session:
        assignments, params = _assignments(changes, SESSION_FIELDS, now)
        # expires_at moves with updated_at, by the new tti_minutes or the stored one.
        if "tti_minutes" in changes:
            tti = changes["tti_minutes"]
            expires = sql.SQL("%s")
            params.append(now + dt.timedelta(minutes=tti) if tti else None)
        else:
            expires = sql.SQL(
                "CASE WHEN tti_minutes > 0 THEN %s + make_interval(mins => tti_minutes) END"
            )
            params.append(now)
        query = sql.SQL(
            "UPDATE sessions SET {}, expires_at = {} "
            "WHERE agent_key = %s AND key = %s AND " + LIVE_SESSION + " RETURNING id, {}"
        ).format(assignments, expires, _columns(SESSION_COLUMNS))
        with self._connection() as conn:
            row = conn.execute(query, [*params, agent_key, session_key, now]).fetchone()
            if row is None:
                conn.execute(
                    "DELETE FROM sessions WHERE agent_key = %s AND key = %s AND expires_at <= %s",
                    [agent_key, session_key, now],
                )
        if row is None:
            raise SessionNotFound(session_key)
        return _session(row)

    def delete_session(self, *, agent_key: str, session_key: str, now: dt.datetime) -> None:
        with self._connection() as conn:
            row = conn.execute(
                "DELETE FROM sessions WHERE agent_key = %s AND key = %s RETURNING expires_at",
                [agent_key, session_key],
            ).fetchone()
        # An expired session is removed all the same, but it was already gone for clients.
        if row is None or (row[0] is not None and row[0] <= now):
            raise SessionNotFound(session_key)

    def purge_expired_sessions(self, *, now: dt.datetime) -> int:
        with self._connection() as conn:
            return conn.execute(
                "DELETE FROM sessions WHERE expires_at IS NOT NULL AND expires_at <= %s", [now]
            ).rowcount

    # API keys

    def create_api_key(self, *, api_key: ApiKey) -> ApiKey:
        try:
            with self._connection() as conn:
                conn.execute(_insert("api_keys", KEY_COLUMNS), _values(api_key, KEY_COLUMNS))
        except errors.UniqueViolation:
            raise Conflict(api_key.id) from None
        return api_key

    def get_api_key(self, *, key_id: str) -> ApiKey:
        with self._connection() as conn:
            row = conn.execute(KEY_SELECT + " WHERE id = %s", [key_id]).fetchone()
        if row is None:
            raise ApiKeyNotFound(key_id)
        return _api_key(row)

    def list_api_keys(self, *, limit: int, after: int | None = None) -> Page:
        with self._connection() as conn:
            rows = conn.execute(
                KEY_SELECT + " WHERE seq > %s ORDER BY seq LIMIT %s",
                [after or 0, limit + 1],
            ).fetchall()
        return _page(rows, limit, _api_key)

    def revoke_api_key(self, *, key_id: str, now: dt.datetime) -> ApiKey:
        # One statement, idempotent: a second revocation keeps the first date.
        with self._connection() as conn:
            row = conn.execute(
                sql.SQL(
                    "UPDATE api_keys SET revoked_at = coalesce(revoked_at, %s) WHERE id = %s "
                    "RETURNING seq, {}"
                ).format(_columns(KEY_COLUMNS)),
                [now, key_id],
            ).fetchone()
        if row is None:
            raise ApiKeyNotFound(key_id)
        return _api_key(row)


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Turn every failure to reach the server into :class:`Unavailable`."""
    try:
        yield
    except UNAVAILABLE_ERRORS as err:
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        log.warning("postgresql unavailable: %s", reason)
        raise Unavailable(f"postgresql: {reason}") from err


def _assignments(
    changes: Mapping[str, Any], allowed: frozenset[str], now: dt.datetime
) -> tuple[sql.Composable, list[Any]]:
    """``col = %s, ...`` for ``changes`` plus ``updated_at``, with the parameters.

    Raises ValueError for a field that cannot change.
    """
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"cannot change {', '.join(sorted(unknown))}")
    columns = [sql.SQL("{} = %s").format(sql.Identifier(field)) for field in changes]
    columns.append(sql.SQL("updated_at = %s"))
    return sql.SQL(", ").join(columns), [*_values(changes, tuple(changes)), now]


def _columns(columns: tuple[str, ...]) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, columns))


def _insert(table: str, columns: tuple[str, ...]) -> str:
    """``INSERT ... SELECT`` of one row, so that callers may add a WHERE clause."""
    return f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(['%s'] * len(columns))}"


def _values(record: Any, columns: tuple[str, ...]) -> list[Any]:
    """The parameters for ``columns`` from a record (or a mapping), JSON fields as jsonb."""
    get = record.get if isinstance(record, Mapping) else lambda c: getattr(record, c)
    values = []
    for column in columns:
        value = get(column)
        if column == "grants":
            value = [[grant.agent, list(grant.scopes)] for grant in value]
        values.append(_jsonb(value) if column in ("metadata", "grants") else value)
    return values


def _jsonb(value: Any) -> Jsonb:
    return Jsonb(value, dumps=_dump_json)


def _dump_json(value: Any) -> str:
    """JSON text whose numbers come back from jsonb as the same Python values.

    jsonb keeps numbers as ``numeric``, and reads ``1e+16`` back as the integer
    10000000000000000: such floats are written with a fraction (``...0.0``) so
    that they still read as floats, equal to what was stored.
    """
    if isinstance(value, float) and "e+" in repr(value):
        return format(decimal.Decimal(repr(value)), "f") + ".0"
    if isinstance(value, dict):
        items = (
            f"{json.dumps(str(k), ensure_ascii=False)}:{_dump_json(v)}" for k, v in value.items()
        )
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_dump_json(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _page(rows: list[Any], limit: int, build: Callable[[Any], Any]) -> Page:
    """Rows were fetched with ``limit + 1``: the extra one only says another page exists."""
    more = len(rows) > limit
    rows = rows[:limit]
    return Page([build(r) for r in rows], rows[-1][0] if more else None)


def _record(cls: type, columns: tuple[str, ...], row: Any) -> Any:
    """A record from a row of (sequence, *columns, ...); timestamps in UTC."""
    fields = dict(zip(columns, row[1:], strict=False))
    for column, value in fields.items():
        if isinstance(value, dt.datetime):
            fields[column] = value.astimezone(dt.UTC)
    if "grants" in fields:
        fields["grants"] = [Grant(agent, tuple(scopes)) for agent, scopes in fields["grants"]]
    return cls(**fields)


_agent = functools.partial(_record, Agent, AGENT_COLUMNS)
_session = functools.partial(_record, Session, SESSION_COLUMNS)
_api_key = functools.partial(_record, ApiKey, KEY_COLUMNS)


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
