"""Every operation of the SQL backends, written once over a small dialect.

:class:`SQLStorage` holds the statements and what they mean; a backend
subclass supplies only what differs between databases:

- ``placeholder``: the statements here are written with ``?``; PostgreSQL's
  driver wants ``%s``.
- the encodings of JSON, timestamps and flags (``encode_*`` and ``decode_*``);
- connections and transactions: ``_reading`` (a read), ``_writing`` (one
  write statement, in autocommit), ``_transaction`` (statements that commit
  together), ``_update_transaction`` (update_session's UPDATE, and the removal
  of the session it found expired), ``_scan`` (rows read lazily, for filters);
  inside an open :meth:`SQLStorage.atomic` block each of them uses its
  connection (``_unit``), and a transaction of its own becomes a savepoint;
- ``row_lock``: what a SELECT adds to hold its row until the transaction ends
  (PostgreSQL's ``FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE`` already holds the
  whole database), so a write's precondition and the write see one version;
- error mapping: ``unique_violation`` and ``missing_reference`` are the
  driver's exceptions for a duplicate key and a missing agent; failures to
  reach the database become :class:`Unavailable` inside the connection hooks;
- the schema's bookkeeping: where the applied version is recorded.

Rows become records in one way, by column name (:class:`Table`). The schema is
one ordered list of versioned migrations (:data:`MIGRATIONS`), with DDL per
dialect where the two databases' types differ.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime as dt
import functools
import itertools
import operator
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import config

from .base import (
    ANY_LAST_EVENT,
    HIDDEN_BY_COMPACTION,
    Agent,
    AgentDisabled,
    AgentNotFound,
    Answer,
    ApiKey,
    ApiKeyNotFound,
    Conflict,
    Event,
    EventNotFound,
    Grant,
    IdempotencyKeyLost,
    IdempotencyRecord,
    Page,
    Precondition,
    PreconditionFailed,
    SchemaTooNew,
    Session,
    SessionDisabled,
    SessionNotFound,
    StaleHistory,
    Storage,
    Unavailable,
)
from .codec import dump_json, filter_rows, merge_patch

# The schema


@dataclasses.dataclass(frozen=True)
class Migration:
    """One version of the schema: statements per dialect (an empty tuple: nothing to do)."""

    version: int
    summary: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


# Append new versions; never edit one a release has applied. A database records
# the last version applied (SQLite in PRAGMA user_version, PostgreSQL in the
# table schema_migrations) and is refused when it is newer than this list.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "agents, sessions and API keys",
        sqlite=(
            "CREATE TABLE IF NOT EXISTS agents (id INTEGER PRIMARY KEY, key TEXT NOT NULL, "
            "name TEXT NOT NULL, description TEXT, metadata TEXT NOT NULL, "
            "enabled INTEGER NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL)",
            "CREATE UNIQUE INDEX IF NOT EXISTS idx_agents_key ON agents (key)",
            "CREATE TABLE IF NOT EXISTS sessions (id INTEGER PRIMARY KEY, "
            "agent_key TEXT NOT NULL, key TEXT NOT NULL, name TEXT NOT NULL, description TEXT, "
            "metadata TEXT NOT NULL, enabled INTEGER NOT NULL, tti_minutes INTEGER NOT NULL, "
            "created_at TEXT NOT NULL, updated_at TEXT NOT NULL, expires_at TEXT)",
            # (agent_key, key) decides create races; (agent_key, id) serves keyset pages.
            "CREATE UNIQUE INDEX IF NOT EXISTS idx_sessions_agent_key_key "
            "ON sessions (agent_key, key)",
            "CREATE INDEX IF NOT EXISTS idx_sessions_agent_key_id ON sessions (agent_key, id)",
            "CREATE INDEX IF NOT EXISTS idx_sessions_expires_at ON sessions (expires_at)",
            "CREATE TABLE IF NOT EXISTS api_keys (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, "
            "name TEXT NOT NULL, secret_hash TEXT NOT NULL, grants TEXT NOT NULL, "
            "admin INTEGER NOT NULL, create_limit TEXT, created_at TEXT NOT NULL, "
            "expires_at TEXT, revoked_at TEXT)",
            "CREATE UNIQUE INDEX IF NOT EXISTS idx_api_keys_id ON api_keys (id)",
        ),
        postgres=(
            """CREATE TABLE IF NOT EXISTS agents (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, key text NOT NULL UNIQUE,
            name text NOT NULL, description text, metadata jsonb NOT NULL,
            enabled boolean NOT NULL,
            created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL)""",
            # The foreign key makes sure a create racing the deletion of its agent
            # can never leave a session behind.
            """CREATE TABLE IF NOT EXISTS sessions (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            agent_key text NOT NULL REFERENCES agents (key) ON DELETE CASCADE,
            key text NOT NULL, UNIQUE (agent_key, key),
            name text NOT NULL, description text, metadata jsonb NOT NULL,
            enabled boolean NOT NULL, tti_minutes integer NOT NULL,
            created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
            expires_at timestamptz)""",
            "CREATE INDEX IF NOT EXISTS sessions_agent_id ON sessions (agent_key, id)",
            "CREATE INDEX IF NOT EXISTS sessions_expires_at ON sessions (expires_at) "
            "WHERE expires_at IS NOT NULL",
            """CREATE TABLE IF NOT EXISTS api_keys (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id text NOT NULL UNIQUE,
            name text NOT NULL, secret_hash text NOT NULL, grants jsonb NOT NULL,
            admin boolean NOT NULL, create_limit text, created_at timestamptz NOT NULL,
            expires_at timestamptz, revoked_at timestamptz)""",
        ),
    ),
    Migration(
        2,
        "only expiring sessions in the sweep's index; JSON kept as the text written",
        # Sessions that never expire (the default) cost one index write less per insert.
        sqlite=(
            "DROP INDEX IF EXISTS idx_sessions_expires_at",
            "CREATE INDEX IF NOT EXISTS idx_sessions_expiring ON sessions (expires_at) "
            "WHERE expires_at IS NOT NULL",
        ),
        # jsonb re-sorts object keys and reads -0.0 back as 0: json keeps the text
        # as written, so every backend answers the same bytes for one session.
        postgres=(
            "ALTER TABLE agents ALTER COLUMN metadata TYPE json USING metadata::json",
            "ALTER TABLE sessions ALTER COLUMN metadata TYPE json USING metadata::json",
            "ALTER TABLE api_keys ALTER COLUMN grants TYPE json USING grants::json",
        ),
    ),
    Migration(
        3,
        "session events; a session's fork source and the last restart of its idle clock",
        # seq is the page cursor: AUTOINCREMENT, so that a number is never
        # reused after the newest event is deleted. Each listing has an index
        # that holds exactly its rows in seq order (visible ones: partial on
        # hide_reason IS NULL; one type: type before seq), so a page at any
        # depth reads limit + 1 entries, never the hidden or other-typed rows.
        # The trigger removes a session's events in the statement that removes
        # the session, whichever statement it is (delete, expiry, purge, the
        # agent's deletion, a replacement on create).
        sqlite=(
            "ALTER TABLE sessions ADD COLUMN forked_from TEXT",
            "ALTER TABLE sessions ADD COLUMN active_at TEXT",
            "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "session_id INTEGER NOT NULL, id TEXT NOT NULL, type TEXT NOT NULL, "
            "created_at TEXT NOT NULL, hide_reason TEXT, fields TEXT NOT NULL)",
            "CREATE UNIQUE INDEX IF NOT EXISTS idx_events_session_event ON events (session_id, id)",
            "CREATE INDEX IF NOT EXISTS idx_events_session_seq ON events (session_id, seq)",
            "CREATE INDEX IF NOT EXISTS idx_events_visible ON events (session_id, seq) "
            "WHERE hide_reason IS NULL",
            "CREATE INDEX IF NOT EXISTS idx_events_type ON events (session_id, type, seq)",
            "CREATE INDEX IF NOT EXISTS idx_events_visible_type "
            "ON events (session_id, type, seq) WHERE hide_reason IS NULL",
            "CREATE TRIGGER IF NOT EXISTS sessions_delete_events AFTER DELETE ON sessions "
            "BEGIN DELETE FROM events WHERE session_id = OLD.id; END",
        ),
        postgres=(
            "ALTER TABLE sessions ADD COLUMN IF NOT EXISTS forked_from json",
            "ALTER TABLE sessions ADD COLUMN IF NOT EXISTS active_at timestamptz",
            # The key is (session_id, seq): with an index on seq alone, the planner
            # may read it in order and skip other sessions' rows for a page (its
            # statistics make a large session look dense), a cost that grows with
            # the store. Every index here starts with session_id.
            """CREATE TABLE IF NOT EXISTS events (
            seq bigint GENERATED ALWAYS AS IDENTITY,
            session_id bigint NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            PRIMARY KEY (session_id, seq),
            id text NOT NULL, UNIQUE (session_id, id), type text NOT NULL,
            created_at timestamptz NOT NULL, hide_reason text, fields json NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS events_visible ON events (session_id, seq) "
            "WHERE hide_reason IS NULL",
            "CREATE INDEX IF NOT EXISTS events_type ON events (session_id, type, seq)",
            "CREATE INDEX IF NOT EXISTS events_visible_type ON events (session_id, type, seq) "
            "WHERE hide_reason IS NULL",
        ),
    ),
    Migration(
        4,
        "idempotency keys: a request's answer, remembered for its retries",
        # status is NULL while the claiming request is in flight; the answer's
        # headers are a JSON list of [name, value] pairs, its body the bytes sent.
        sqlite=(
            "CREATE TABLE IF NOT EXISTS idempotency_keys (scope TEXT NOT NULL, key TEXT NOT NULL, "
            "fingerprint TEXT NOT NULL, token TEXT NOT NULL, status INTEGER, headers TEXT, "
            "body BLOB, locked_until TEXT NOT NULL, expires_at TEXT NOT NULL, "
            "PRIMARY KEY (scope, key))",
            "CREATE INDEX IF NOT EXISTS idx_idempotency_keys_expires_at "
            "ON idempotency_keys (expires_at)",
        ),
        postgres=(
            """CREATE TABLE IF NOT EXISTS idempotency_keys (
            scope text NOT NULL, key text NOT NULL, PRIMARY KEY (scope, key),
            fingerprint text NOT NULL, token text NOT NULL, status integer, headers json,
            body bytea, locked_until timestamptz NOT NULL, expires_at timestamptz NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS idempotency_keys_expires_at "
            "ON idempotency_keys (expires_at)",
        ),
    ),
    Migration(
        5,
        "console sign-ins (storage_backends/console_sql.py)",
        # The hash of the cookie's token, never the token; every sign-in removes
        # the expired ones through the expiry's index.
        sqlite=(
            "CREATE TABLE IF NOT EXISTS console_sessions (token_hash TEXT PRIMARY KEY, "
            "key_id TEXT NOT NULL, csrf_token TEXT NOT NULL, created_at TEXT NOT NULL, "
            "expires_at TEXT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS idx_console_sessions_expires_at "
            "ON console_sessions (expires_at)",
        ),
        postgres=(
            """CREATE TABLE IF NOT EXISTS console_sessions (
            token_hash text PRIMARY KEY, key_id text NOT NULL, csrf_token text NOT NULL,
            created_at timestamptz NOT NULL, expires_at timestamptz NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS console_sessions_expires_at "
            "ON console_sessions (expires_at)",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


@dataclasses.dataclass(frozen=True)
class Table:
    """A table as records see it: the position column (the page cursor), then the fields."""

    name: str
    record: type
    position: str
    fields: tuple[str, ...]
    json: tuple[str, ...]
    times: tuple[str, ...]
    flags: tuple[str, ...]
    changeable: frozenset[str] = frozenset()

    @functools.cached_property
    def select(self) -> str:
        return f"SELECT {self.position}, {', '.join(self.fields)} FROM {self.name}"

    @functools.cached_property
    def returning(self) -> str:
        return f"RETURNING {self.position}, {', '.join(self.fields)}"


AGENTS = Table(
    "agents",
    Agent,
    "id",
    ("key", "name", "description", "metadata", "enabled", "created_at", "updated_at"),
    json=("metadata",),
    times=("created_at", "updated_at"),
    flags=("enabled",),
    changeable=frozenset({"name", "description", "metadata", "enabled"}),
)
SESSIONS = Table(
    "sessions",
    Session,
    "id",
    ("agent_key", "key", "name", "description", "metadata", "enabled", "tti_minutes")
    + ("created_at", "updated_at", "forked_from", "active_at"),
    json=("metadata", "forked_from"),
    times=("created_at", "updated_at", "active_at"),
    flags=("enabled",),
    changeable=frozenset({"name", "description", "metadata", "enabled", "tti_minutes"}),
)
API_KEYS = Table(
    "api_keys",
    ApiKey,
    "seq",
    ("id", "name", "secret_hash", "grants", "admin", "create_limit")
    + ("created_at", "expires_at", "revoked_at"),
    json=("grants",),
    times=("created_at", "expires_at", "revoked_at"),
    flags=("admin",),
)
# What a session insert writes: its fields and the expiry the queries index.
SESSION_INSERT_COLUMNS = (*SESSIONS.fields, "expires_at")

_LIVE = "(expires_at IS NULL OR expires_at > ?)"
# One agent's live sessions in keyset order, read from the (agent_key, id) index;
# the session's expires_at comes last, after the record's fields.
SESSION_SELECT = (
    f"SELECT {SESSIONS.position}, {', '.join(SESSIONS.fields)}, expires_at FROM sessions"
)
SESSION_PAGE = f"{SESSION_SELECT} WHERE agent_key = ? AND id > ? AND {_LIVE} ORDER BY id"
_SESSION_TEXT = operator.itemgetter(
    1 + SESSIONS.fields.index("name"), 1 + SESSIONS.fields.index("description")
)


def _insert(table: str, columns: tuple[str, ...]) -> str:
    """``INSERT ... SELECT`` of one row, so that callers may add a WHERE clause."""
    return f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join('?' * len(columns))}"


INSERT_AGENT = _insert("agents", AGENTS.fields)
# One statement: the agent's existence and the key's uniqueness are decided together.
INSERT_SESSION = (
    _insert("sessions", SESSION_INSERT_COLUMNS)
    # A disabled agent takes no new sessions; which of the two stopped it is
    # looked up only when no row went in.
    + " WHERE EXISTS (SELECT 1 FROM agents WHERE key = ? AND enabled)"
)
INSERT_API_KEY = _insert("api_keys", API_KEYS.fields)
GET_AGENT = f"{AGENTS.select} WHERE key = ?"
AGENT_PAGE = f"{AGENTS.select} WHERE id > ? ORDER BY id LIMIT ?"
GET_SESSION = f"{SESSION_SELECT} WHERE agent_key = ? AND key = ?"
GET_API_KEY = f"{API_KEYS.select} WHERE id = ?"
API_KEY_PAGE = f"{API_KEYS.select} WHERE seq > ? ORDER BY seq LIMIT ?"
# Idempotent: a second revocation keeps the first date.
REVOKE_API_KEY = (
    f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ? {API_KEYS.returning}"
)
DELETE_SESSION = "DELETE FROM sessions WHERE agent_key = ? AND key = ? RETURNING expires_at"
DELETE_EXPIRED_SESSION = "DELETE FROM sessions WHERE agent_key = ? AND key = ? AND expires_at <= ?"
DELETE_EXPIRED_BY_ID = "DELETE FROM sessions WHERE id = ? AND expires_at <= ?"
PURGE_EXPIRED = "DELETE FROM sessions WHERE expires_at IS NOT NULL AND expires_at <= ?"

# Events. A session's events are found by the session's row id, which the
# session's own lookup (by agent and key, checking its expiry) gives first.
EVENT_COLUMNS = ("seq", "id", "type", "fields", "created_at", "hide_reason")
EVENT_SELECT = f"SELECT {', '.join(EVENT_COLUMNS)} FROM events WHERE session_id = ?"
INSERT_EVENT = (
    "INSERT INTO events (session_id, id, type, fields, created_at, hide_reason) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
GET_EVENT = f"{EVENT_SELECT} AND id = ?"
# One probe of (session_id, seq), from its end.
LAST_EVENT_ID = (
    "SELECT id FROM events /*INDEXED BY idx_events_session_seq*/ "
    "WHERE session_id = ? ORDER BY seq DESC LIMIT 1"
)
# Idempotency keys. A claim goes in where the key holds nothing, or replaces a
# record expired at ``now`` or an unanswered claim of the same request whose lock
# ended; it returns a row only when it went in (the database decides racing claims).
CLAIM_IDEMPOTENCY_KEY = (
    "INSERT INTO idempotency_keys (scope, key, fingerprint, token, locked_until, expires_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (scope, key) DO UPDATE SET "
    "fingerprint = excluded.fingerprint, token = excluded.token, status = NULL, "
    "headers = NULL, body = NULL, locked_until = excluded.locked_until, "
    "expires_at = excluded.expires_at "
    "WHERE idempotency_keys.expires_at <= ? OR (idempotency_keys.status IS NULL "
    "AND idempotency_keys.locked_until <= ? "
    "AND idempotency_keys.fingerprint = excluded.fingerprint) "
    "RETURNING token"
)
GET_IDEMPOTENCY_KEY = (
    "SELECT fingerprint, token, status, headers, body FROM idempotency_keys "
    "WHERE scope = ? AND key = ?"
)
FINISH_IDEMPOTENCY_KEY = (
    "UPDATE idempotency_keys SET status = ?, headers = ?, body = ? "
    "WHERE scope = ? AND key = ? AND token = ? AND status IS NULL"
)
RELEASE_IDEMPOTENCY_KEY = (
    "DELETE FROM idempotency_keys WHERE scope = ? AND key = ? AND token = ? AND status IS NULL"
)
PURGE_IDEMPOTENCY_KEYS = "DELETE FROM idempotency_keys WHERE expires_at <= ?"
FIND_SESSION = "SELECT id, expires_at FROM sessions WHERE agent_key = ? AND key = ?"
EVENT_BATCH = 1_000  # rows per query of iter_events
IMPORT_BATCH = 10_000  # rows per executemany of import_session and load_events


@functools.lru_cache(maxsize=64)
def event_page_query(
    descending: bool, include_hidden: bool, types: int, cursor: bool
) -> tuple[str, bool]:
    """The statement of a page of events, and whether it is a union of one per type.

    Parameters, in order: with no types, session_id, the cursor (when
    ``cursor``) and the limit; with ``types`` types, those three per type
    (each with the type after session_id) and the page's limit. With several
    types, each type's branch reads its own index, in order, up to the limit,
    and the union keeps the first ``limit`` of those: a page reads at most
    ``types * limit`` index entries at any depth, where one ``type IN (...)``
    scan would read and sort every matching row past the cursor.
    """
    where = "session_id = ?"
    if types:
        where += " AND type = ?"
    if not include_hidden:
        where += " AND hide_reason IS NULL"
    if cursor:
        where += " AND seq < ?" if descending else " AND seq > ?"
    order = "seq DESC" if descending else "seq"
    index = "idx_events_" + ("visible" if not include_hidden else "") + ("_type" if types else "")
    index = {"idx_events_": "idx_events_session_seq", "idx_events__type": "idx_events_type"}.get(
        index, index
    )
    one = (
        f"SELECT {', '.join(EVENT_COLUMNS)} FROM events /*INDEXED BY {index}*/ "
        f"WHERE {where} ORDER BY {order} LIMIT ?"
    )
    if types <= 1:
        return one, False
    branches = " UNION ALL ".join(f"SELECT * FROM ({one}) AS t{i}" for i in range(types))
    return f"{branches} ORDER BY {order} LIMIT ?", True


def identity(value: Any) -> Any:
    """The encoding of a value the driver adapts by itself."""
    return value


@functools.lru_cache(maxsize=256)
def with_hints(statement: str) -> str:
    """A statement with its ``/*INDEXED BY name*/`` comments made SQLite's index hints.

    SQLite's planner knows only each index's average number of rows per
    session: with one large session in the table, it may read the table in
    seq order and skip other sessions' rows, a cost that grows with the store.
    The hint pins the index that holds exactly a query's rows (and fails the
    statement if that index cannot serve it). PostgreSQL keeps per-value
    statistics, and reads the comments as comments.
    """
    return _HINT.sub(r"\1", statement)


_HINT = re.compile(r"/\*(INDEXED BY \w+)\*/")


@functools.lru_cache(maxsize=256)
def to_pyformat(statement: str) -> str:
    """A statement written with ``?`` placeholders, in the ``%s`` style (no literal ``%``)."""
    return statement.replace("?", "%s")


def _builder(table: Table, decoder: Callable[[Table, str], Any]) -> Callable[[Any], Any]:
    """A function from a row of (position, *fields) to the table's record, by column name.

    Written out once per table, as ``dataclasses`` writes ``__init__``: a call
    with each field taken from its place in the row and decoded where the
    dialect needs it, a third cheaper per row than a loop over the columns.
    """
    namespace: dict[str, Any] = {"record": table.record}
    arguments = []
    for index, column in enumerate(table.fields, start=1):
        decode = decoder(table, column)
        if decode is None:
            arguments.append(f"{column}=row[{index}]")
        else:
            namespace[f"decode_{column}"] = decode
            arguments.append(f"{column}=decode_{column}(row[{index}])")
    exec(f"def build(row):\n    return record({', '.join(arguments)})", namespace)
    return namespace["build"]


class SQLStorage(Storage, abc.ABC):
    """The operations of :class:`Storage` in SQL; subclasses supply the dialect."""

    #: which statements of a :class:`Migration` this dialect runs
    dialect_name: str
    placeholder = "?"
    unique_violation: type[BaseException] | tuple[type[BaseException], ...] = ()
    missing_reference: type[BaseException] | tuple[type[BaseException], ...] = ()
    #: a SQL expression for a session's new expires_at from its stored tti_minutes
    #: and a ``?`` for the time of the update
    expires_from_tti: str
    #: ``{}`` in it is a JSON column: true when that column's text holds the ``?``
    json_contains: str
    #: whether deleting an agent deletes its sessions by itself (a foreign key)
    sessions_cascade = False
    #: appended to a SELECT in a write transaction: the row stays this transaction's
    #: until it ends (nothing for a database whose write transactions hold it all)
    row_lock = ""

    filter_scan_rows = config.Config.FILTER_SCAN_ROWS
    filter_scan_seconds = config.Config.FILTER_SCAN_SECONDS

    def _read_filter_options(self, options: Mapping[str, Any]) -> None:
        """The filtered list's budget, from the settings (config.Config has the defaults)."""
        rows = int(options.get("FILTER_SCAN_ROWS", config.Config.FILTER_SCAN_ROWS))
        seconds = float(options.get("FILTER_SCAN_SECONDS", config.Config.FILTER_SCAN_SECONDS))
        if rows < 1 or seconds <= 0:
            raise ValueError("FILTER_SCAN_ROWS and FILTER_SCAN_SECONDS must be positive")
        self.filter_scan_rows, self.filter_scan_seconds = rows, seconds

    # The dialect

    @staticmethod
    @abc.abstractmethod
    def encode_json(value: Any) -> Any: ...

    @staticmethod
    @abc.abstractmethod
    def decode_json(value: Any) -> Any: ...

    @staticmethod
    @abc.abstractmethod
    def encode_ts(value: dt.datetime | None) -> Any: ...

    @staticmethod
    @abc.abstractmethod
    def decode_ts(value: Any) -> dt.datetime | None: ...

    encode_flag: Callable[[bool], Any] = staticmethod(identity)

    @abc.abstractmethod
    def _reading(self) -> contextlib.AbstractContextManager[Any]:
        """A connection for reads."""

    @abc.abstractmethod
    def _writing(self) -> contextlib.AbstractContextManager[Any]:
        """A connection for one write statement, committed on its own."""

    @abc.abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[Any]:
        """A connection in one write transaction: committed on success, else rolled back."""

    @abc.abstractmethod
    def _update_transaction(self) -> contextlib.AbstractContextManager[Any]:
        """Where update_session runs its UPDATE and, when it found none live, the removal."""

    @abc.abstractmethod
    def _scan(
        self, query: str, params: list[Any], batch: int
    ) -> contextlib.AbstractContextManager[Iterable[Any]]:
        """The rows of ``query``, read as they are consumed."""

    #: per thread: ``unit``, the connection of the open atomic() block, if any
    _local: threading.local

    def _unit(self) -> Any:
        """The connection of this thread's open :meth:`atomic` block, or None."""
        return getattr(self._local, "unit", None)

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """One :meth:`_transaction` for the block, whose connection every call inside
        uses (the dialect's ``_reading``, ``_writing`` and ``_transaction`` look for it:
        a transaction of their own becomes a savepoint). Nested, a savepoint."""
        nested = self._unit() is not None
        with self._transaction() as conn:
            if nested:
                yield
                return
            self._local.unit = conn
            try:
                yield
            finally:
                self._local.unit = None

    def _sql(self, statement: str) -> str:
        return with_hints(statement) if self.placeholder == "?" else to_pyformat(statement)

    def _migrate_from(self, conn: Any, current: int) -> list[int]:
        """Apply every migration after ``current`` on ``conn``; return the versions applied.

        Raises :class:`SchemaTooNew` for a database newer than :data:`MIGRATIONS`.
        """
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(current, SCHEMA_VERSION)
        applied = []
        for migration in MIGRATIONS:
            if migration.version <= current:
                continue
            for statement in getattr(migration, self.dialect_name):
                conn.execute(statement)
            self._record_version(conn, migration.version)
            applied.append(migration.version)
        return applied

    @abc.abstractmethod
    def _record_version(self, conn: Any, version: int) -> None:
        """Note in the database that ``version`` is applied."""

    # Rows and records

    def _encode(self, table: Table, record: Any, columns: tuple[str, ...]) -> list[Any]:
        """The parameters for ``columns`` from a record or a mapping of field to value."""
        get = record.get if isinstance(record, Mapping) else functools.partial(getattr, record)
        return [
            get(column) if encode is None else encode(get(column))
            for column, encode in self._encoders(table, columns)
        ]

    def _record(self, table: Table, row: Any) -> Any:
        """A record from a row of (position, *fields, ...)."""
        build = self._plans.get(table.name)
        if build is None:
            build = self._plans[table.name] = _builder(table, self._decoder)
        return build(row)

    @functools.cached_property
    def _plans(self) -> dict[Any, Any]:
        return {}

    def _encoders(self, table: Table, columns: tuple[str, ...]) -> Any:
        """(column, encoder or None) for ``columns``, worked out once per table and columns."""
        plan = self._plans.get((table.name, columns))
        if plan is None:
            plan = self._plans[table.name, columns] = tuple(
                (column, self._encoder(table, column)) for column in columns
            )
        return plan

    def _encoder(self, table: Table, column: str) -> Callable[[Any], Any] | None:
        if column == "grants":
            encode_json = self.encode_json
            return lambda grants: encode_json([[g.agent, list(g.scopes)] for g in grants])
        if column == "forked_from":
            encode_json = self.encode_json
            return lambda value: None if value is None else encode_json(value)
        if column in table.json:
            return self.encode_json
        if column in table.flags:
            return None if self.encode_flag is identity else self.encode_flag
        if column in table.times or column == "expires_at":
            return None if self.encode_ts is identity else self.encode_ts
        return None

    def _decoder(self, table: Table, column: str) -> Callable[[Any], Any] | None:
        decode_json = self.decode_json
        if column == "grants":
            return lambda value: [
                Grant(agent, tuple(scopes)) for agent, scopes in decode_json(value)
            ]
        if column in table.json:
            if decode_json is identity:
                return None
            if column == "forked_from":
                return lambda value: None if value is None else decode_json(value)
            return decode_json
        if column in table.times:
            return self.decode_ts
        if column in table.flags:
            return bool
        return None

    def _page(self, table: Table, rows: list[Any], limit: int) -> Page:
        """Rows were fetched with ``limit + 1``: the extra one only says another page exists."""
        more = len(rows) > limit
        rows = rows[:limit]
        return Page([self._record(table, r) for r in rows], rows[-1][0] if more else None)

    def _assignments(
        self, table: Table, changes: Mapping[str, Any], now: dt.datetime
    ) -> tuple[str, list[Any]]:
        """``col = ?, ...`` for ``changes`` plus ``updated_at``, with the parameters.

        Raises ValueError for a field that cannot change.
        """
        unknown = set(changes) - table.changeable
        if unknown:
            raise ValueError(f"cannot change {', '.join(sorted(unknown))}")
        columns = (*changes, "updated_at")
        values = self._encode(table, {**changes, "updated_at": now}, columns)
        return ", ".join(f"{column} = ?" for column in columns), values

    def _live(self, expires_at: Any, now: dt.datetime) -> bool:
        expires = self.decode_ts(expires_at)
        return expires is None or expires > now

    # Agents

    def create_agent(self, *, agent: Agent) -> Agent:
        try:
            with self._writing() as conn:
                conn.execute(self._sql(INSERT_AGENT), self._encode(AGENTS, agent, AGENTS.fields))
        except self.unique_violation:
            raise Conflict(agent.key) from None
        return agent

    def get_agent(self, *, agent_key: str) -> Agent:
        with self._reading() as conn:
            row = conn.execute(self._sql(GET_AGENT), [agent_key]).fetchone()
        if row is None:
            raise AgentNotFound(agent_key)
        return self._record(AGENTS, row)

    def list_agents(self, *, limit: int, after: int | None = None) -> Page:
        with self._reading() as conn:
            rows = conn.execute(
                self._sql(AGENT_PAGE),
                [after or 0, limit + 1],
            ).fetchall()
        return self._page(AGENTS, rows, limit)

    def update_agent(
        self,
        *,
        agent_key: str,
        changes: Mapping[str, Any],
        now: dt.datetime,
        precondition: Precondition[Agent] | None = None,
    ) -> Agent:
        assignments, params = self._assignments(AGENTS, changes, now)
        query = f"UPDATE agents SET {assignments} WHERE key = ? {AGENTS.returning}"
        if precondition is None:
            with self._writing() as conn:
                row = conn.execute(self._sql(query), [*params, agent_key]).fetchone()
        else:
            with self._transaction() as conn:
                self._check_agent(conn, agent_key, precondition)
                row = conn.execute(self._sql(query), [*params, agent_key]).fetchone()
        if row is None:
            raise AgentNotFound(agent_key)
        return self._record(AGENTS, row)

    def _check_agent(self, conn: Any, agent_key: str, precondition: Precondition[Agent]) -> None:
        """Hold the agent's row in ``conn``'s transaction and check ``precondition`` on it."""
        row = self._held(conn, GET_AGENT, [agent_key])
        if row is None:
            raise AgentNotFound(agent_key)
        if not precondition(self._record(AGENTS, row)):
            raise PreconditionFailed(agent_key)

    def _held(self, conn: Any, query: str, params: list[Any]) -> Any:
        """The first row of ``query``, held against other writers until ``conn``'s
        transaction ends, so that a check on it and the write after it see one version."""
        return conn.execute(self._sql(query + self.row_lock), params).fetchone()

    def delete_agent(
        self, *, agent_key: str, precondition: Precondition[Agent] | None = None
    ) -> None:
        with self._transaction() as conn:
            if precondition is not None:
                self._check_agent(conn, agent_key, precondition)
            deleted = conn.execute(self._sql("DELETE FROM agents WHERE key = ?"), [agent_key])
            if deleted.rowcount == 0:
                raise AgentNotFound(agent_key)
            if not self.sessions_cascade:
                conn.execute(self._sql("DELETE FROM sessions WHERE agent_key = ?"), [agent_key])
            self._end_grants(conn, agent_key)

    def _end_grants(self, conn: Any, agent_key: str) -> None:
        """Remove the grants naming the agent, so that a new agent with its key inherits none."""
        named = self.json_contains.format("grants")
        rows = conn.execute(
            self._sql(f"SELECT seq, grants FROM api_keys WHERE {named}"), [dump_json(agent_key)]
        ).fetchall()
        for seq, stored in rows:
            grants = self.decode_json(stored)
            kept = [grant for grant in grants if grant[0] != agent_key]
            if len(kept) != len(grants):
                conn.execute(
                    self._sql("UPDATE api_keys SET grants = ? WHERE seq = ?"),
                    [self.encode_json(kept), seq],
                )

    # Sessions

    def create_session(self, *, session: Session) -> Session:
        params = [*self._encode(SESSIONS, session, SESSION_INSERT_COLUMNS), session.agent_key]
        try:
            with self._writing() as conn:
                inserted = conn.execute(self._sql(INSERT_SESSION), params).rowcount
        except self.unique_violation:
            inserted = self._replace_expired_session(session, params)
        except self.missing_reference:
            raise AgentNotFound(session.agent_key) from None
        if inserted == 0:
            self.get_agent(agent_key=session.agent_key)  # AgentNotFound
            raise AgentDisabled(session.agent_key)
        return session

    def _replace_expired_session(self, session: Session, params: list[Any]) -> int:
        """The key is taken: by a live session (:class:`Conflict`) or by one idle past its TTI.

        An expired session is gone for clients, so it gives way: it is removed
        in the same transaction as the insert that takes its key.
        """
        now = self.encode_ts(session.created_at)
        try:
            with self._transaction() as conn:
                removed = conn.execute(
                    self._sql(DELETE_EXPIRED_SESSION), [session.agent_key, session.key, now]
                ).rowcount
                if removed == 0:
                    raise Conflict(session.key)
                return conn.execute(self._sql(INSERT_SESSION), params).rowcount
        except self.unique_violation:
            raise Conflict(session.key) from None

    def get_session(self, *, agent_key: str, session_key: str, now: dt.datetime) -> Session:
        with self._reading() as conn:
            row = conn.execute(
                self._sql(GET_SESSION),
                [agent_key, session_key],
            ).fetchone()
        if row is None:
            raise SessionNotFound(session_key)
        if not self._live(row[-1], now):
            with self._writing() as conn:
                conn.execute(
                    self._sql(DELETE_EXPIRED_BY_ID),
                    [row[0], self.encode_ts(now)],
                )
            raise SessionNotFound(session_key)
        return self._record(SESSIONS, row)

    def list_sessions(
        self,
        *,
        agent_key: str,
        limit: int,
        now: dt.datetime,
        after: int | None = None,
        matches: Any = None,
    ) -> Page:
        params: list[Any] = [agent_key, after or 0, self.encode_ts(now)]
        if matches is None:
            with self._reading() as conn:
                rows = conn.execute(
                    self._sql(SESSION_PAGE + " LIMIT ?"), [*params, limit + 1]
                ).fetchall()
            return self._page(SESSIONS, rows, limit)
        # The pattern runs in Python over rows read as it goes, so only as many
        # are read as it takes to fill the page, or to spend the scan's budget.
        with self._scan(self._sql(SESSION_PAGE), params, max(100, 2 * limit)) as scanned:
            rows, stopped = filter_rows(
                scanned,
                limit=limit,
                matches=matches,
                text=_SESSION_TEXT,
                position=operator.itemgetter(0),
                max_rows=self.filter_scan_rows,
                max_seconds=self.filter_scan_seconds,
            )
        if stopped is None:
            return self._page(SESSIONS, rows, limit)
        return Page([self._record(SESSIONS, r) for r in rows], stopped)

    def update_session(
        self,
        *,
        agent_key: str,
        session_key: str,
        changes: Mapping[str, Any],
        now: dt.datetime,
        precondition: Precondition[Session] | None = None,
    ) -> Session:
        assignments, params = self._assignments(SESSIONS, changes, now)
        # expires_at moves with updated_at, by the new tti_minutes or the stored one.
        if "tti_minutes" in changes:
            tti = changes["tti_minutes"]
            expires = "?"
            params.append(self.encode_ts(now + dt.timedelta(minutes=tti)) if tti else None)
        else:
            expires = self.expires_from_tti
            params.append(self.encode_ts(now))
        # An update restarts the idle clock.
        query = (
            f"UPDATE sessions SET {assignments}, expires_at = {expires}, active_at = ? "
            f"WHERE agent_key = ? AND key = ? AND {_LIVE} {SESSIONS.returning}"
        )
        stamp = self.encode_ts(now)
        if precondition is not None:
            with self._transaction() as conn:
                row = None
                if self._check_session(conn, agent_key, session_key, now, precondition):
                    row = conn.execute(
                        self._sql(query), [*params, stamp, agent_key, session_key, stamp]
                    ).fetchone()
            if row is None:
                raise SessionNotFound(session_key)
            return self._record(SESSIONS, row)
        with self._update_transaction() as conn:
            row = conn.execute(
                self._sql(query), [*params, stamp, agent_key, session_key, stamp]
            ).fetchone()
            if row is None:
                # Gone means gone: an expired session is removed by the call that noticed.
                conn.execute(self._sql(DELETE_EXPIRED_SESSION), [agent_key, session_key, stamp])
        if row is None:
            raise SessionNotFound(session_key)
        return self._record(SESSIONS, row)

    def _check_session(
        self,
        conn: Any,
        agent_key: str,
        session_key: str,
        now: dt.datetime,
        precondition: Precondition[Session],
    ) -> int | None:
        """Hold the session's row in ``conn``'s transaction and check ``precondition`` on it;
        its row id, or None when no live session has the key (an expired one is then
        removed in this transaction, which the caller lets commit)."""
        row = self._held(conn, GET_SESSION, [agent_key, session_key])
        if row is None:
            return None
        if not self._live(row[-1], now):
            conn.execute(self._sql(DELETE_EXPIRED_BY_ID), [row[0], self.encode_ts(now)])
            return None
        if not precondition(self._record(SESSIONS, row)):
            raise PreconditionFailed(session_key)
        return row[0]

    def delete_session(
        self,
        *,
        agent_key: str,
        session_key: str,
        now: dt.datetime,
        precondition: Precondition[Session] | None = None,
    ) -> None:
        if precondition is not None:
            with self._transaction() as conn:
                session_id = self._check_session(conn, agent_key, session_key, now, precondition)
                if session_id is not None:
                    conn.execute(self._sql("DELETE FROM sessions WHERE id = ?"), [session_id])
            if session_id is None:
                raise SessionNotFound(session_key)
            return
        with self._writing() as conn:
            row = conn.execute(
                self._sql(DELETE_SESSION),
                [agent_key, session_key],
            ).fetchone()
        # An expired session is removed all the same, but it was already gone for clients.
        if row is None or not self._live(row[0], now):
            raise SessionNotFound(session_key)

    def purge_expired_sessions(self, *, now: dt.datetime) -> int:
        with self._writing() as conn:
            return conn.execute(
                self._sql(PURGE_EXPIRED),
                [self.encode_ts(now)],
            ).rowcount

    # Idempotency keys

    def claim_idempotency_key(
        self,
        *,
        scope: str,
        key: str,
        fingerprint: str,
        token: str,
        now: dt.datetime,
        locked_until: dt.datetime,
        expires_at: dt.datetime,
    ) -> IdempotencyRecord:
        encode = self.encode_ts
        claim = [scope, key, fingerprint, token, encode(locked_until), encode(expires_at)]
        claim += [encode(now), encode(now)]
        # A record purged between the claim and the read is claimed again.
        for _ in range(3):
            with self._writing() as conn:
                if conn.execute(self._sql(CLAIM_IDEMPOTENCY_KEY), claim).fetchone() is not None:
                    return IdempotencyRecord(fingerprint, token)
            with self._reading() as conn:
                row = conn.execute(self._sql(GET_IDEMPOTENCY_KEY), [scope, key]).fetchone()
            if row is not None:
                stored_fingerprint, stored_token, status, headers, body = row
                answer = None
                if status is not None:
                    pairs = tuple((name, value) for name, value in self.decode_json(headers))
                    answer = Answer(status, pairs, bytes(body))
                return IdempotencyRecord(stored_fingerprint, stored_token, answer)
        raise Unavailable("the idempotency key could not be claimed; retry")

    def finish_idempotency_key(self, *, scope: str, key: str, token: str, answer: Answer) -> None:
        headers = self.encode_json([list(pair) for pair in answer.headers])
        params = [answer.status, headers, answer.body, scope, key, token]
        with self._writing() as conn:
            if conn.execute(self._sql(FINISH_IDEMPOTENCY_KEY), params).rowcount == 0:
                raise IdempotencyKeyLost(key)

    def release_idempotency_key(self, *, scope: str, key: str, token: str) -> None:
        with self._writing() as conn:
            conn.execute(self._sql(RELEASE_IDEMPOTENCY_KEY), [scope, key, token])

    def purge_expired_idempotency_keys(self, *, now: dt.datetime) -> int:
        with self._writing() as conn:
            return conn.execute(self._sql(PURGE_IDEMPOTENCY_KEYS), [self.encode_ts(now)]).rowcount

    # Events

    def _event(self, row: Any, session_key: str) -> Event:
        """An event from a row of :data:`EVENT_COLUMNS`."""
        _, event_id, kind, fields, created_at, hide_reason = row
        return Event(
            id=event_id,
            session_key=session_key,
            type=kind,
            fields=self.decode_json(fields),
            created_at=self.decode_ts(created_at),
            hide_reason=hide_reason,
        )

    def _event_params(self, session_id: int, event: Event) -> list[Any]:
        """The parameters of :data:`INSERT_EVENT` for ``event`` in the session ``session_id``."""
        return [
            session_id,
            event.id,
            event.type,
            self.encode_json(event.fields),
            self.encode_ts(event.created_at),
            event.hide_reason,
        ]

    def _session_id(self, agent_key: str, session_key: str, now: dt.datetime) -> int:
        """The row id of a live session, for reads.

        Raises :class:`SessionNotFound`, also for a session expired at ``now``
        (which is then removed, with its events).
        """
        with self._reading() as conn:
            row = conn.execute(self._sql(FIND_SESSION), [agent_key, session_key]).fetchone()
        if row is None:
            raise SessionNotFound(session_key)
        if not self._live(row[1], now):
            with self._writing() as conn:
                conn.execute(self._sql(DELETE_EXPIRED_BY_ID), [row[0], self.encode_ts(now)])
            raise SessionNotFound(session_key)
        return row[0]

    def _touch(
        self, conn: Any, agent_key: str, session_key: str, now: dt.datetime
    ) -> tuple[int, Session] | None:
        """Restart a live session's idle clock in ``conn``'s transaction; (row id, session).

        The UPDATE holds the session's row until the transaction ends, so
        writers of one session's history take turns (SQLite's writers already
        do, in BEGIN IMMEDIATE). None when no live session has the key: an
        expired one is then removed, in this transaction, which the caller
        lets commit before it raises :class:`SessionNotFound`. Raises
        :class:`SessionDisabled` (rolling the restart back) for a session that
        takes no events.
        """
        stamp = self.encode_ts(now)
        row = conn.execute(
            self._sql(
                f"UPDATE sessions SET active_at = ?, expires_at = {self.expires_from_tti} "
                f"WHERE agent_key = ? AND key = ? AND {_LIVE} {SESSIONS.returning}"
            ),
            [stamp, stamp, agent_key, session_key, stamp],
        ).fetchone()
        if row is None:
            conn.execute(self._sql(DELETE_EXPIRED_SESSION), [agent_key, session_key, stamp])
            return None
        session = self._record(SESSIONS, row)
        if not session.enabled:
            raise SessionDisabled(session_key)
        return row[0], session

    def append_events(
        self,
        *,
        agent_key: str,
        session_key: str,
        events: list[Event],
        now: dt.datetime,
        if_last_event_id: Any = ANY_LAST_EVENT,
        metadata_patch: Mapping[str, Any] | None = None,
        check_metadata: Callable[[dict[str, Any]], None] | None = None,
    ) -> Session:
        ids = [event.id for event in events]
        if len(set(ids)) != len(ids):
            raise Conflict("an event id appears twice in the batch")
        try:
            with self._transaction() as conn:
                touched = self._touch(conn, agent_key, session_key, now)
                if touched is not None:
                    session_id, session = touched
                    if if_last_event_id is not ANY_LAST_EVENT:
                        last = conn.execute(self._sql(LAST_EVENT_ID), [session_id]).fetchone()
                        if (None if last is None else last[0]) != if_last_event_id:
                            raise StaleHistory(session_key)
                    if metadata_patch is not None:
                        session = self._patch_metadata(
                            conn, session_id, session, metadata_patch, check_metadata, now
                        )
                    if events:
                        self._execute_many(
                            conn,
                            self._sql(INSERT_EVENT),
                            [self._event_params(session_id, event) for event in events],
                        )
        except self.unique_violation:
            raise Conflict("an event id of the batch is already in the session") from None
        if touched is None:
            raise SessionNotFound(session_key)
        return session

    def _patch_metadata(
        self,
        conn: Any,
        session_id: int,
        session: Session,
        patch: Mapping[str, Any],
        check: Callable[[dict[str, Any]], None] | None,
        now: dt.datetime,
    ) -> Session:
        """Apply a merge patch to the session's metadata; ``updated_at`` moves if it changed."""
        metadata = merge_patch(session.metadata, dict(patch))
        if check is not None:
            check(metadata)
        if metadata == session.metadata:
            return session
        row = conn.execute(
            self._sql(
                f"UPDATE sessions SET metadata = ?, updated_at = ? WHERE id = ? "
                f"{SESSIONS.returning}"
            ),
            [self.encode_json(metadata), self.encode_ts(now), session_id],
        ).fetchone()
        return self._record(SESSIONS, row)

    def list_events(
        self,
        *,
        agent_key: str,
        session_key: str,
        limit: int,
        now: dt.datetime,
        after: int | None = None,
        descending: bool = False,
        include_hidden: bool = False,
        types: frozenset[str] | None = None,
    ) -> Page:
        session_id = self._session_id(agent_key, session_key, now)
        kinds: list[str | None] = [None] if types is None else sorted(types)
        if not kinds:
            return Page([], None)
        query, union = event_page_query(
            descending, include_hidden, 0 if types is None else len(kinds), after is not None
        )
        cursor = [] if after is None else [after]
        params: list[Any] = []
        for kind in kinds:
            params += [session_id, *([] if kind is None else [kind]), *cursor, limit + 1]
        if union:
            params.append(limit + 1)
        with self._reading() as conn:
            rows = conn.execute(self._sql(query), params).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return Page([self._event(row, session_key) for row in rows], rows[-1][0] if more else None)

    def get_event(
        self, *, agent_key: str, session_key: str, event_id: str, now: dt.datetime
    ) -> Event:
        session_id = self._session_id(agent_key, session_key, now)
        with self._reading() as conn:
            row = conn.execute(self._sql(GET_EVENT), [session_id, event_id]).fetchone()
        if row is None:
            raise EventNotFound(event_id)
        return self._event(row, session_key)

    def set_event_hidden(
        self,
        *,
        agent_key: str,
        session_key: str,
        event_id: str,
        hide_reason: str | None,
        now: dt.datetime,
    ) -> Event:
        session_id = self._session_id(agent_key, session_key, now)
        with self._writing() as conn:
            row = conn.execute(
                self._sql(
                    "UPDATE events SET hide_reason = ? WHERE session_id = ? AND id = ? "
                    f"RETURNING {', '.join(EVENT_COLUMNS)}"
                ),
                [hide_reason, session_id, event_id],
            ).fetchone()
        if row is None:
            raise EventNotFound(event_id)
        return self._event(row, session_key)

    def delete_event(
        self, *, agent_key: str, session_key: str, event_id: str, now: dt.datetime
    ) -> None:
        session_id = self._session_id(agent_key, session_key, now)
        with self._writing() as conn:
            deleted = conn.execute(
                self._sql("DELETE FROM events WHERE session_id = ? AND id = ?"),
                [session_id, event_id],
            ).rowcount
        if deleted == 0:
            raise EventNotFound(event_id)

    def compact_events(
        self,
        *,
        agent_key: str,
        session_key: str,
        up_to_event_id: str | None,
        compaction: Event,
        now: dt.datetime,
    ) -> Event:
        try:
            with self._transaction() as conn:
                touched = self._touch(conn, agent_key, session_key, now)
                if touched is not None:
                    session_id, _ = touched
                    if up_to_event_id is not None:
                        bound = self._event_seq(conn, session_id, up_to_event_id, visible=False)
                    else:
                        # Everything before the last visible input message, or everything.
                        row = conn.execute(
                            self._sql(
                                "SELECT seq FROM events /*INDEXED BY idx_events_visible_type*/ "
                                "WHERE session_id = ? "
                                "AND type = 'input_message' AND hide_reason IS NULL "
                                "ORDER BY seq DESC LIMIT 1"
                            ),
                            [session_id],
                        ).fetchone()
                        bound = None if row is None else row[0] - 1
                    turns = self._count(
                        conn, session_id, "type = 'input_message' AND hide_reason IS NULL", bound
                    )
                    hidden = conn.execute(
                        self._sql(
                            "UPDATE events /*INDEXED BY idx_events_visible*/ "
                            "SET hide_reason = ? WHERE session_id = ? "
                            "AND hide_reason IS NULL" + ("" if bound is None else " AND seq <= ?")
                        ),
                        [HIDDEN_BY_COMPACTION, session_id, *([] if bound is None else [bound])],
                    ).rowcount
                    stored = self._add_compaction(
                        conn, session_id, session_key, compaction, turns, hidden
                    )
        except self.unique_violation:
            raise Conflict(compaction.id) from None
        if touched is None:
            raise SessionNotFound(session_key)
        return stored

    def _event_seq(self, conn: Any, session_id: int, event_id: str, *, visible: bool) -> int:
        """The sequence number of an event (``visible``: of a visible one), else EventNotFound."""
        query = "SELECT seq FROM events WHERE session_id = ? AND id = ?"
        if visible:
            query += " AND hide_reason IS NULL"
        row = conn.execute(self._sql(query), [session_id, event_id]).fetchone()
        if row is None:
            raise EventNotFound(event_id)
        return row[0]

    def _count(self, conn: Any, session_id: int, condition: str, bound: int | None) -> int:
        """How many of the session's events meet ``condition``, up to ``bound`` (a seq)."""
        query = f"SELECT count(*) FROM events WHERE session_id = ? AND {condition}"
        params: list[Any] = [session_id]
        if bound is not None:
            query += " AND seq <= ?"
            params.append(bound)
        return conn.execute(self._sql(query), params).fetchone()[0]

    def _add_compaction(
        self,
        conn: Any,
        session_id: int,
        session_key: str,
        compaction: Event,
        turns: int,
        hidden: int,
    ) -> Event:
        """Append the compaction event, with its counts of what it hid."""
        stored = dataclasses.replace(
            compaction,
            session_key=session_key,
            fields={**compaction.fields, "turns_compacted": turns, "events_compacted": hidden},
        )
        conn.execute(self._sql(INSERT_EVENT), self._event_params(session_id, stored))
        return stored

    def _insert_session(self, conn: Any, session: Session) -> int:
        """create_session inside ``conn``'s transaction; return the new row's id.

        An expired session holding the key is removed first (with its events).
        """
        conn.execute(
            self._sql(DELETE_EXPIRED_SESSION),
            [session.agent_key, session.key, self.encode_ts(session.created_at)],
        )
        params = [*self._encode(SESSIONS, session, SESSION_INSERT_COLUMNS), session.agent_key]
        row = conn.execute(self._sql(INSERT_SESSION + " RETURNING id"), params).fetchone()
        if row is None:
            agent = conn.execute(
                self._sql("SELECT 1 FROM agents WHERE key = ?"), [session.agent_key]
            ).fetchone()
            raise (AgentNotFound if agent is None else AgentDisabled)(session.agent_key)
        return row[0]

    def fork_session(
        self,
        *,
        session: Session,
        source_agent_key: str,
        source_session_key: str,
        include_up_to_event_id: str | None = None,
        compact_up_to_event_id: str | None = None,
        compaction: Event | None = None,
    ) -> Session:
        try:
            with self._transaction() as conn:
                source = conn.execute(
                    self._sql(FIND_SESSION), [source_agent_key, source_session_key]
                ).fetchone()
                if source is None or not self._live(source[1], session.created_at):
                    raise SessionNotFound(source_session_key)
                source_id = source[0]
                bound = None
                if include_up_to_event_id is not None:
                    bound = self._event_seq(conn, source_id, include_up_to_event_id, visible=True)
                compact_bound = None
                if compact_up_to_event_id is not None:
                    compact_bound = self._event_seq(
                        conn, source_id, compact_up_to_event_id, visible=True
                    )
                    if bound is not None and compact_bound > bound:
                        raise EventNotFound(compact_up_to_event_id)
                # The last event to copy, which bounds the copy against later appends.
                last = conn.execute(
                    self._sql(
                        "SELECT seq, id FROM events /*INDEXED BY idx_events_visible*/ "
                        "WHERE session_id = ? AND hide_reason IS NULL"
                        + ("" if bound is None else " AND seq <= ?")
                        + " ORDER BY seq DESC LIMIT 1"
                    ),
                    [source_id, *([] if bound is None else [bound])],
                ).fetchone()
                forked_from = {"agent_key": source_agent_key, "session_key": source_session_key}
                if last is not None:
                    forked_from["event_id"] = last[1]
                session = dataclasses.replace(session, forked_from=forked_from)
                session_id = self._insert_session(conn, session)
                if last is not None:
                    conn.execute(
                        self._sql(
                            "INSERT INTO events "
                            "(session_id, id, type, fields, created_at, hide_reason) "
                            "SELECT ?, id, type, fields, created_at, "
                            "CASE WHEN seq <= ? THEN ? END "
                            "FROM events /*INDEXED BY idx_events_visible*/ "
                            "WHERE session_id = ? AND hide_reason IS NULL AND seq <= ? "
                            "ORDER BY seq"
                        ),
                        [session_id, compact_bound or 0, HIDDEN_BY_COMPACTION, source_id, last[0]],
                    )
                if compact_bound is not None and compaction is not None:
                    hidden = self._count(conn, session_id, "hide_reason IS NOT NULL", None)
                    turns = self._count(
                        conn, session_id, "type = 'input_message' AND hide_reason IS NOT NULL", None
                    )
                    self._add_compaction(conn, session_id, session.key, compaction, turns, hidden)
        except self.unique_violation:
            raise Conflict(session.key) from None
        except self.missing_reference:
            raise AgentNotFound(session.agent_key) from None
        return session

    def iter_events(self, *, agent_key: str, session_key: str, now: dt.datetime) -> Iterator[Event]:
        session_id = self._session_id(agent_key, session_key, now)
        return self._iter_events(session_id, session_key)

    def _iter_events(self, session_id: int, session_key: str) -> Iterator[Event]:
        query = self._sql(event_page_query(False, True, 0, True)[0])
        after = 0
        while True:
            with self._reading() as conn:
                rows = conn.execute(query, [session_id, after, EVENT_BATCH]).fetchall()
            for row in rows:
                yield self._event(row, session_key)
            if len(rows) < EVENT_BATCH:
                return
            after = rows[-1][0]

    def import_session(self, *, session: Session, events: Iterable[Event]) -> int:
        stored = 0
        try:
            with self._transaction() as conn:
                session_id = self._insert_session(conn, session)
                statement = self._sql(INSERT_EVENT)
                rows = (self._event_params(session_id, event) for event in events)
                while chunk := list(itertools.islice(rows, IMPORT_BATCH)):
                    self._execute_many(conn, statement, chunk)
                    stored += len(chunk)
        except self.unique_violation:
            raise Conflict(f"{session.key} or an event id given twice") from None
        except self.missing_reference:
            raise AgentNotFound(session.agent_key) from None
        return stored

    # API keys

    def create_api_key(self, *, api_key: ApiKey) -> ApiKey:
        try:
            with self._writing() as conn:
                conn.execute(
                    self._sql(INSERT_API_KEY), self._encode(API_KEYS, api_key, API_KEYS.fields)
                )
        except self.unique_violation:
            raise Conflict(api_key.id) from None
        return api_key

    def get_api_key(self, *, key_id: str) -> ApiKey:
        with self._reading() as conn:
            row = conn.execute(self._sql(GET_API_KEY), [key_id]).fetchone()
        if row is None:
            raise ApiKeyNotFound(key_id)
        return self._record(API_KEYS, row)

    def list_api_keys(self, *, limit: int, after: int | None = None) -> Page:
        with self._reading() as conn:
            rows = conn.execute(
                self._sql(API_KEY_PAGE),
                [after or 0, limit + 1],
            ).fetchall()
        return self._page(API_KEYS, rows, limit)

    def revoke_api_key(self, *, key_id: str, now: dt.datetime) -> ApiKey:
        with self._writing() as conn:
            row = conn.execute(
                self._sql(REVOKE_API_KEY),
                [self.encode_ts(now), key_id],
            ).fetchone()
        if row is None:
            raise ApiKeyNotFound(key_id)
        return self._record(API_KEYS, row)

    # Bulk loading (benchmarks and tests that need many rows)

    def load_sessions(self, sessions: Iterable[Session], *, batch: int = 10_000) -> int:
        """Insert many sessions, ``batch`` to a transaction; return how many were stored.

        The statement is create_session's (sessions of a missing agent are
        skipped); a key that exists already raises :class:`Conflict`.
        """
        stored = 0
        statement = self._sql(INSERT_SESSION)
        rows = ([*self._encode(SESSIONS, s, SESSION_INSERT_COLUMNS), s.agent_key] for s in sessions)
        while True:
            chunk = [row for _, row in zip(range(batch), rows, strict=False)]
            if not chunk:
                return stored
            try:
                with self._transaction() as conn:
                    stored += self._execute_many(conn, statement, chunk)
            except self.unique_violation:
                raise Conflict("a session key of the batch exists") from None

    def load_events(
        self,
        *,
        agent_key: str,
        session_key: str,
        events: Iterable[Event],
        batch: int = IMPORT_BATCH,
    ) -> int:
        """Append many events to a session as given, ``batch`` to a transaction; return how many.

        For benchmarks and tests: no check of the session's state or of the
        last event, and the idle clock stays. Raises :class:`SessionNotFound`
        and :class:`Conflict` (an id already in the session; earlier batches stay).
        """
        with self._reading() as conn:
            row = conn.execute(self._sql(FIND_SESSION), [agent_key, session_key]).fetchone()
        if row is None:
            raise SessionNotFound(session_key)
        stored = 0
        statement = self._sql(INSERT_EVENT)
        rows = (self._event_params(row[0], event) for event in events)
        while chunk := list(itertools.islice(rows, batch)):
            try:
                with self._transaction() as conn:
                    self._execute_many(conn, statement, chunk)
            except self.unique_violation:
                raise Conflict("an event id of the batch is already in the session") from None
            stored += len(chunk)
        return stored

    @abc.abstractmethod
    def _execute_many(self, conn: Any, statement: str, rows: list[list[Any]]) -> int:
        """Run ``statement`` once per row; return the rows inserted."""
