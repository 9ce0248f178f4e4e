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
  before they touch SQLite's own lock. SQLite's busy handler polls by
  sleeping for a millisecond and more; the kernel hands a released flock to
  the next waiter at once. Measured on create-heavy load with two workers,
  the turns raise throughput by about a third.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import sqlite_utils
from sqlite_utils.utils import sqlite3

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
    dump_json,
    format_ts,
    parse_ts,
    text_matches,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# SQLite before this release can corrupt a WAL database written by several
# connections at once (https://sqlite.org/wal.html#walresetbug).
WAL_RESET_FIXED = (3, 51, 3)
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

SESSION_COLUMNS = (
    "id, agent_key, key, name, description, metadata, enabled, tti_minutes, created_at, updated_at"
)
AGENT_COLUMNS = "id, key, name, description, metadata, enabled, created_at, updated_at"
KEY_COLUMNS = (
    "id, seq, name, secret_hash, grants, admin, create_limit, created_at, expires_at, revoked_at"
)


class SQLiteStorage(Storage):
    schemes = ("sqlite",)

    def __init__(self, path: str, *, busy_timeout_ms: int = 5000, synchronous: str = "NORMAL"):
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"SQLITE_SYNCHRONOUS must be one of {', '.join(SYNCHRONOUS_MODES)}")
        self.path = path
        self.busy_timeout_ms = int(busy_timeout_ms)
        self.synchronous = synchronous
        self._local = threading.local()
        self._schema_ready_pid: int | None = None
        self._schema_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, *, options: Mapping[str, Any]) -> SQLiteStorage:
        # sqlite:////abs/path (absolute) or sqlite:///rel/path (relative), as in SQLAlchemy.
        prefix = "sqlite:///"
        if not url.startswith(prefix) or len(url) == len(prefix):
            raise ValueError("expected sqlite:////absolute/path.db or sqlite:///relative/path.db")
        return cls(
            url[len(prefix) :],
            busy_timeout_ms=options.get("SQLITE_BUSY_TIMEOUT_MS", 5000),
            synchronous=str(options.get("SQLITE_SYNCHRONOUS", "NORMAL")),
        )

    # Connections

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite_utils.Database]:
        """This thread's connection, holding this process's turn to write (see the module doc).

        The wait is not bounded here: a turn lasts one statement or transaction,
        itself bounded by the busy timeout, and the kernel releases the turn of
        a process that dies (gunicorn kills a worker stuck past its timeout).
        """
        db = self.db
        fd = self._local.writer_fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            with _translated():
                yield db
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    @property
    def db(self) -> sqlite_utils.Database:
        """This thread's connection, opened (and the schema ensured) on first use."""
        local = self._local
        pid = os.getpid()
        if getattr(local, "pid", None) != pid:
            local.db = self._connect()
            # Each thread opens its own descriptor: flock turns are per open file.
            local.writer_fd = os.open(self.path + "-writer", os.O_RDWR | os.O_CREAT, 0o600)
            local.pid = pid
        return local.db

    def _connect(self) -> sqlite_utils.Database:
        with _translated():
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_ms / 1000,
                isolation_level=None,  # autocommit; transactions are explicit
                check_same_thread=True,
            )
            db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
            db.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
            if db.journal_mode != "wal":
                db.enable_wal()
            db.execute(f"PRAGMA synchronous = {self.synchronous}")
            self._ensure_schema(db)
            return db

    def _ensure_schema(self, db: sqlite_utils.Database) -> None:
        pid = os.getpid()
        with self._schema_lock:
            if self._schema_ready_pid == pid:
                return
            with _immediate(db):
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version < SCHEMA_VERSION:
                    _create_schema(db)
                    if version == 1:
                        _index_only_expiring_sessions(db)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                elif version > SCHEMA_VERSION:
                    raise RuntimeError(
                        f"database schema version {version} is newer than this release "
                        f"understands ({SCHEMA_VERSION})"
                    )
            self._schema_ready_pid = pid

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None and self._local.pid == os.getpid():
            db.close()
        self._local = threading.local()

    def check(self) -> None:
        with _translated():
            self.db.execute("SELECT 1").fetchone()

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

    # Agents

    def create_agent(self, *, agent: Agent) -> Agent:
        with self._writing() as db:
            try:
                db.execute(
                    "INSERT INTO agents (key, name, description, metadata, enabled, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        agent.key,
                        agent.name,
                        agent.description,
                        dump_json(agent.metadata),
                        int(agent.enabled),
                        format_ts(agent.created_at),
                        format_ts(agent.updated_at),
                    ],
                )
            except sqlite3.IntegrityError:
                raise Conflict(agent.key) from None
        return agent

    def get_agent(self, *, agent_key: str) -> Agent:
        with _translated():
            row = self.db.execute(
                f"SELECT {AGENT_COLUMNS} FROM agents WHERE key = ?", [agent_key]
            ).fetchone()
        if row is None:
            raise AgentNotFound(agent_key)
        return _agent(row)

    def list_agents(self, *, limit: int, after: int | None = None) -> Page:
        with _translated():
            rows = self.db.execute(
                f"SELECT {AGENT_COLUMNS} FROM agents WHERE id > ? ORDER BY id LIMIT ?",
                [after or 0, limit + 1],
            ).fetchall()
        return _page(rows, limit, _agent)

    def update_agent(
        self, *, agent_key: str, changes: Mapping[str, Any], now: dt.datetime
    ) -> Agent:
        values = _encode_changes(changes)
        values["updated_at"] = format_ts(now)
        assignments = ", ".join(f"{column} = ?" for column in values)
        with self._writing() as db:
            row = db.execute(
                f"UPDATE agents SET {assignments} WHERE key = ? RETURNING {AGENT_COLUMNS}",
                [*values.values(), agent_key],
            ).fetchone()
        if row is None:
            raise AgentNotFound(agent_key)
        return _agent(row)

    def delete_agent(self, *, agent_key: str) -> None:
        with self._writing() as db, _immediate(db):
            if db.execute("DELETE FROM agents WHERE key = ?", [agent_key]).rowcount == 0:
                raise AgentNotFound(agent_key)
            db.execute("DELETE FROM sessions WHERE agent_key = ?", [agent_key])

    # Sessions

    def create_session(self, *, session: Session) -> Session:
        # One statement: the agent's existence and the key's uniqueness are
        # decided together, inside SQLite's single writer lock.
        with self._writing() as db:
            try:
                cursor = db.execute(
                    "INSERT INTO sessions (agent_key, key, name, description, metadata, "
                    "enabled, tti_minutes, created_at, updated_at, expires_at) "
                    "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ? "
                    "WHERE EXISTS (SELECT 1 FROM agents WHERE key = ?)",
                    [
                        session.agent_key,
                        session.key,
                        session.name,
                        session.description,
                        dump_json(session.metadata),
                        int(session.enabled),
                        session.tti_minutes,
                        format_ts(session.created_at),
                        format_ts(session.updated_at),
                        format_ts(session.expires_at),
                        session.agent_key,
                    ],
                )
            except sqlite3.IntegrityError:
                raise Conflict(session.key) from None
        if cursor.rowcount == 0:
            raise AgentNotFound(session.agent_key)
        return session

    def get_session(self, *, agent_key: str, session_key: str, now: dt.datetime) -> Session:
        with _translated():
            row = self.db.execute(
                f"SELECT {SESSION_COLUMNS}, expires_at FROM sessions "
                "WHERE agent_key = ? AND key = ?",
                [agent_key, session_key],
            ).fetchone()
            if row is None:
                raise SessionNotFound(session_key)
            if row[-1] is not None and row[-1] <= format_ts(now):
                self._delete_if_expired(row[0], now)
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
        sql = (
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE agent_key = ? AND id > ? "
            "AND (expires_at IS NULL OR expires_at > ?)"
        )
        params: list[Any] = [agent_key, after or 0, format_ts(now)]
        with _translated():
            if matches is None:
                rows = self.db.execute(
                    sql + " ORDER BY id LIMIT ?", [*params, limit + 1]
                ).fetchall()
            else:
                # The pattern runs in Python over a cursor, so SQLite reads only as
                # many rows as it takes to fill the page.
                cursor = self.db.execute(sql + " ORDER BY id", params)
                rows = []
                for row in cursor:
                    if text_matches(matches, row[3], row[4]):
                        rows.append(row)
                        if len(rows) > limit:
                            break
                cursor.close()
        return _page(rows, limit, _session)

    def update_session(
        self,
        *,
        agent_key: str,
        session_key: str,
        changes: Mapping[str, Any],
        now: dt.datetime,
    ) -> Session:
        stamp = format_ts(now)
        with self._writing() as db, _immediate(db):
            row = db.execute(
                "SELECT tti_minutes, expires_at FROM sessions WHERE agent_key = ? AND key = ?",
                [agent_key, session_key],
            ).fetchone()
            if row is None or (row[1] is not None and row[1] <= stamp):
                db.execute(
                    "DELETE FROM sessions WHERE agent_key = ? AND key = ? AND expires_at <= ?",
                    [agent_key, session_key, stamp],
                )
                raise SessionNotFound(session_key)
            values = _encode_changes(changes)
            tti = changes.get("tti_minutes", row[0])
            values["updated_at"] = stamp
            values["expires_at"] = format_ts(now + dt.timedelta(minutes=tti)) if tti else None
            assignments = ", ".join(f"{column} = ?" for column in values)
            updated = db.execute(
                f"UPDATE sessions SET {assignments} WHERE agent_key = ? AND key = ? "
                f"RETURNING {SESSION_COLUMNS}",
                [*values.values(), agent_key, session_key],
            ).fetchone()
        return _session(updated)

    def delete_session(self, *, agent_key: str, session_key: str, now: dt.datetime) -> None:
        with self._writing() as db:
            row = db.execute(
                "DELETE FROM sessions WHERE agent_key = ? AND key = ? RETURNING expires_at",
                [agent_key, session_key],
            ).fetchone()
        # An expired session is removed all the same, but it was already gone for clients.
        if row is None or (row[0] is not None and row[0] <= format_ts(now)):
            raise SessionNotFound(session_key)

    def purge_expired_sessions(self, *, now: dt.datetime) -> int:
        with self._writing() as db:
            cursor = db.execute(
                "DELETE FROM sessions WHERE expires_at IS NOT NULL AND expires_at <= ?",
                [format_ts(now)],
            )
        return cursor.rowcount

    def _delete_if_expired(self, session_id: int, now: dt.datetime) -> None:
        with self._writing() as db:
            db.execute(
                "DELETE FROM sessions WHERE id = ? AND expires_at <= ?",
                [session_id, format_ts(now)],
            )

    # API keys

    def create_api_key(self, *, api_key: ApiKey) -> ApiKey:
        with self._writing() as db:
            try:
                db.execute(
                    "INSERT INTO api_keys (id, name, secret_hash, grants, admin, create_limit, "
                    "created_at, expires_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        api_key.id,
                        api_key.name,
                        api_key.secret_hash,
                        dump_json([[g.agent, list(g.scopes)] for g in api_key.grants]),
                        int(api_key.admin),
                        api_key.create_limit,
                        format_ts(api_key.created_at),
                        format_ts(api_key.expires_at),
                        format_ts(api_key.revoked_at),
                    ],
                )
            except sqlite3.IntegrityError:
                raise Conflict(api_key.id) from None
        return api_key

    def get_api_key(self, *, key_id: str) -> ApiKey:
        with _translated():
            row = self.db.execute(
                f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?", [key_id]
            ).fetchone()
        if row is None:
            raise ApiKeyNotFound(key_id)
        return _api_key(row)

    def list_api_keys(self, *, limit: int, after: int | None = None) -> Page:
        with _translated():
            rows = self.db.execute(
                f"SELECT {KEY_COLUMNS} FROM api_keys WHERE seq > ? ORDER BY seq LIMIT ?",
                [after or 0, limit + 1],
            ).fetchall()
        # The page cursor is the sequence column, the second one here.
        return _page([(r[1], *r) for r in rows], limit, lambda r: _api_key(r[1:]))

    def revoke_api_key(self, *, key_id: str, now: dt.datetime) -> ApiKey:
        with self._writing() as db:
            db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                [format_ts(now), key_id],
            )
        return self.get_api_key(key_id=key_id)


def _create_schema(db: sqlite_utils.Database) -> None:
    db["agents"].create(
        {
            "id": int,
            "key": str,
            "name": str,
            "description": str,
            "metadata": str,
            "enabled": int,
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
        not_null={"key", "name", "metadata", "enabled", "created_at", "updated_at"},
        if_not_exists=True,
    )
    db["agents"].create_index(["key"], unique=True, if_not_exists=True)
    db["sessions"].create(
        {
            "id": int,
            "agent_key": str,
            "key": str,
            "name": str,
            "description": str,
            "metadata": str,
            "enabled": int,
            "tti_minutes": int,
            "created_at": str,
            "updated_at": str,
            "expires_at": str,
        },
        pk="id",
        not_null={
            "agent_key",
            "key",
            "name",
            "metadata",
            "enabled",
            "tti_minutes",
            "created_at",
            "updated_at",
        },
        if_not_exists=True,
    )
    # (agent_key, key) decides create races; (agent_key, id) serves keyset pages.
    db["sessions"].create_index(["agent_key", "key"], unique=True, if_not_exists=True)
    db["sessions"].create_index(["agent_key", "id"], if_not_exists=True)
    # Only sessions that can expire are indexed for the sweep: the others (the
    # default, tti_minutes 0) cost one index write less on every insert.
    db.execute(
        "CREATE INDEX IF NOT EXISTS idx_sessions_expiring ON sessions (expires_at) "
        "WHERE expires_at IS NOT NULL"
    )
    db["api_keys"].create(
        {
            "seq": int,
            "id": str,
            "name": str,
            "secret_hash": str,
            "grants": str,
            "admin": int,
            "create_limit": str,
            "created_at": str,
            "expires_at": str,
            "revoked_at": str,
        },
        pk="seq",
        not_null={"id", "name", "secret_hash", "grants", "admin", "created_at"},
        if_not_exists=True,
    )
    db["api_keys"].create_index(["id"], unique=True, if_not_exists=True)


def _index_only_expiring_sessions(db: sqlite_utils.Database) -> None:
    """Schema 1 to 2: the index on every session's expires_at gives way to the partial one."""
    db.execute("DROP INDEX IF EXISTS idx_sessions_expires_at")


@contextlib.contextmanager
def _immediate(db: sqlite_utils.Database) -> Iterator[None]:
    """A write transaction that takes the write lock up front (see the module docstring)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.conn.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


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


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Turn SQLite's operational failures into :class:`Unavailable`."""
    try:
        yield
    except (sqlite3.OperationalError, sqlite3.DatabaseError) as err:
        if isinstance(err, sqlite3.IntegrityError):
            raise
        message = str(err).lower()
        if any(marker in message for marker in _UNAVAILABLE_MARKERS):
            log.warning("sqlite unavailable: %s", err)
            raise Unavailable(f"sqlite: {err}") from err
        raise
    except OSError as err:
        # The database's directory cannot be made or reached (a file in its
        # path, no permission, a read-only or full file system).
        log.warning("sqlite unavailable: %s", err)
        raise Unavailable(f"sqlite: {err}") from err


def _encode_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    encoded = {}
    for field, value in changes.items():
        if field == "metadata":
            value = dump_json(value)
        elif field == "enabled":
            value = int(value)
        encoded[field] = value
    return encoded


def _page(rows: list[Any], limit: int, build: Any) -> Page:
    """Rows were fetched with ``limit + 1``: the extra one only says another page exists."""
    more = len(rows) > limit
    rows = rows[:limit]
    return Page([build(r) for r in rows], rows[-1][0] if more else None)


def _agent(row: Any) -> Agent:
    return Agent(
        key=row[1],
        name=row[2],
        description=row[3],
        metadata=json.loads(row[4]),
        enabled=bool(row[5]),
        created_at=parse_ts(row[6]),
        updated_at=parse_ts(row[7]),
    )


def _session(row: Any) -> Session:
    return Session(
        agent_key=row[1],
        key=row[2],
        name=row[3],
        description=row[4],
        metadata=json.loads(row[5]),
        enabled=bool(row[6]),
        tti_minutes=row[7],
        created_at=parse_ts(row[8]),
        updated_at=parse_ts(row[9]),
    )


def _api_key(row: Any) -> ApiKey:
    return ApiKey(
        id=row[0],
        name=row[2],
        secret_hash=row[3],
        grants=[Grant(agent, tuple(scopes)) for agent, scopes in json.loads(row[4])],
        admin=bool(row[5]),
        create_limit=row[6],
        created_at=parse_ts(row[7]),
        expires_at=parse_ts(row[8]),
        revoked_at=parse_ts(row[9]),
    )
