"""The SQL schema: its versioned migrations, its tables and the statements over them."""

from __future__ import annotations

import dataclasses
import functools
import operator

from ..base import (
    Agent,
    ApiKey,
    Session,
)

# The schema


@dataclasses.dataclass(frozen=True)
class Migration:
    """One version of the schema: statements per dialect (an empty tuple: nothing to do),
    then, when ``backfill`` names one, a method of the backend that fills what SQL alone
    cannot (it gets the migration's connection, in the migration's transaction)."""

    version: int
    summary: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]
    backfill: str | None = None


# The usage of migration 10 (storage_backends/sql/usage.py): an agent's rows, one per
# shard (a session's row id picks its shard); what a row costs beyond its texts
# (its other columns and its index entries).
SHARDS = 16
# What a row costs beyond its texts: its other columns and its index entries.
EVENT_ROW_BYTES = 160
SESSION_ROW_BYTES = 256
STATE_ROW_BYTES = 64


def event_size_sql(octets: str) -> str:
    """:func:`event_bytes` of a row of ``events``, in SQL (``octets``: the dialect's length)."""
    return (
        f"({EVENT_ROW_BYTES} + {octets.format('id')} + {octets.format('type')} "
        f"+ {octets.format('fields')})"
    )


def session_size_sql(octets: str, row: str) -> str:
    """The bytes of a session's own row (``row``: ``NEW`` or ``OLD`` in a trigger)."""
    return (
        f"({SESSION_ROW_BYTES} + {octets.format(row + '.name')} "
        f"+ coalesce({octets.format(row + '.description')}, 0) "
        f"+ 2 * {octets.format(row + '.metadata')})"
    )


def _usage_migration() -> Migration:
    """Migration 10: every agent's usage, for its quotas (storage_backends/sql/usage.py)."""
    sqlite_len, pg_len = "length(CAST({} AS BLOB))", "octet_length({}::text)"

    def backfill(octets: str) -> tuple[str, ...]:
        return (
            "UPDATE sessions SET event_count = (SELECT count(*) FROM events "
            "WHERE session_id = sessions.id), event_bytes = (SELECT "
            f"coalesce(sum({event_size_sql(octets)}), 0) FROM events "
            "WHERE session_id = sessions.id)",
            "INSERT INTO agent_usage (agent_key, shard, sessions, events, bytes) "
            f"SELECT agent_key, id % {SHARDS}, count(*), sum(event_count), "
            f"sum(event_bytes + {session_size_sql(octets, 's')}) FROM sessions AS s "
            f"GROUP BY agent_key, id % {SHARDS}",
            "INSERT INTO agent_usage (agent_key, shard, sessions, events, bytes) "
            f"SELECT agent_key, 0, 0, 0, sum({STATE_ROW_BYTES} + {octets.format('value')}) "
            "FROM agent_state WHERE true GROUP BY agent_key ON CONFLICT (agent_key, shard) "
            "DO UPDATE SET bytes = agent_usage.bytes + excluded.bytes",
        )

    def changes(octets: str) -> dict[str, str]:
        new, old = session_size_sql(octets, "NEW"), session_size_sql(octets, "OLD")
        return {
            "insert": "INSERT INTO agent_usage (agent_key, shard, sessions, events, bytes) "
            f"VALUES (NEW.agent_key, NEW.id % {SHARDS}, 1, NEW.event_count, "
            f"NEW.event_bytes + {new}) ON CONFLICT (agent_key, shard) DO UPDATE SET "
            "sessions = agent_usage.sessions + 1, events = agent_usage.events + excluded.events, "
            "bytes = agent_usage.bytes + excluded.bytes;",
            "delete": "UPDATE agent_usage SET sessions = sessions - 1, "
            f"events = events - OLD.event_count, bytes = bytes - OLD.event_bytes - {old} "
            f"WHERE agent_key = OLD.agent_key AND shard = OLD.id % {SHARDS};",
            "update": f"UPDATE agent_usage SET bytes = bytes + {new} - {old} "
            f"WHERE agent_key = NEW.agent_key AND shard = NEW.id % {SHARDS};",
        }

    lite, pg = changes(sqlite_len), changes(pg_len)
    when = {
        "insert": "INSERT",
        "delete": "DELETE",
        "update": "UPDATE OF name, description, metadata",
    }
    return Migration(
        10,
        "every agent's usage, for its quotas (storage_backends/sql/usage.py)",
        # A session's row carries its events' count and bytes, which its deletion
        # (whichever statement it is) takes off its agent's usage, in its trigger.
        sqlite=(
            "ALTER TABLE sessions ADD COLUMN event_count INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE sessions ADD COLUMN event_bytes INTEGER NOT NULL DEFAULT 0",
            # An answered record's agent (the one in its path), the shard it is
            # counted in and its bytes; records answered before stay uncounted.
            "ALTER TABLE idempotency_keys ADD COLUMN agent_key TEXT",
            "ALTER TABLE idempotency_keys ADD COLUMN usage_shard INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE idempotency_keys ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0",
            "CREATE TABLE IF NOT EXISTS agent_usage (agent_key TEXT NOT NULL, "
            "shard INTEGER NOT NULL, sessions INTEGER NOT NULL, events INTEGER NOT NULL, "
            "bytes INTEGER NOT NULL, PRIMARY KEY (agent_key, shard)) WITHOUT ROWID",
            *backfill(sqlite_len),
            *(
                f"CREATE TRIGGER IF NOT EXISTS sessions_{op}_usage AFTER {when[op]} ON sessions "
                f"BEGIN {lite[op]} END"
                for op in ("insert", "delete", "update")
            ),
        ),
        postgres=(
            "ALTER TABLE sessions ADD COLUMN IF NOT EXISTS event_count bigint NOT NULL DEFAULT 0",
            "ALTER TABLE sessions ADD COLUMN IF NOT EXISTS event_bytes bigint NOT NULL DEFAULT 0",
            "ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS agent_key text",
            "ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS usage_shard integer "
            "NOT NULL DEFAULT 0",
            "ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS stored_bytes bigint "
            "NOT NULL DEFAULT 0",
            """CREATE TABLE IF NOT EXISTS agent_usage (
            agent_key text NOT NULL REFERENCES agents (key) ON DELETE CASCADE,
            shard integer NOT NULL, PRIMARY KEY (agent_key, shard),
            sessions bigint NOT NULL, events bigint NOT NULL, bytes bigint NOT NULL)""",
            *backfill(pg_len),
            "CREATE OR REPLACE FUNCTION sessions_usage() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN IF TG_OP = 'INSERT' THEN {pg['insert']} "
            f"ELSIF TG_OP = 'DELETE' THEN {pg['delete']} ELSE {pg['update']} END IF; "
            "RETURN NULL; END $$",
            *(
                f"CREATE OR REPLACE TRIGGER sessions_{op}_usage AFTER {when[op]} ON sessions "
                "FOR EACH ROW EXECUTE FUNCTION sessions_usage()"
                for op in ("insert", "delete", "update")
            ),
        ),
    )


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
        "console sign-ins (storage_backends/sql/console.py)",
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
    Migration(
        6,
        "SQLite: agent and session row ids never reused (AUTOINCREMENT)",
        # Without AUTOINCREMENT SQLite gives the next row the newest id plus one,
        # so the id of the newest session, once it is deleted, went to the next
        # session created, in any agent: a page cursor or a call that held the
        # old id then read the new session. SQLite cannot change a primary key
        # in place: each table is rebuilt in this migration's transaction (a new
        # table, the rows copied with their ids, the old one dropped with its
        # indexes and trigger, the new one renamed, then those made again), as
        # sqlite.org/lang_altertable.html#otheralter describes. sqlite_sequence
        # starts at the highest id kept. PostgreSQL's identity columns never
        # reuse a value.
        sqlite=(
            "CREATE TABLE agents_rebuilt (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "key TEXT NOT NULL, name TEXT NOT NULL, description TEXT, metadata TEXT NOT NULL, "
            "enabled INTEGER NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL)",
            "INSERT INTO agents_rebuilt (id, key, name, description, metadata, enabled, "
            "created_at, updated_at) SELECT id, key, name, description, metadata, enabled, "
            "created_at, updated_at FROM agents ORDER BY id",
            "DROP TABLE agents",
            "ALTER TABLE agents_rebuilt RENAME TO agents",
            "CREATE UNIQUE INDEX idx_agents_key ON agents (key)",
            "CREATE TABLE sessions_rebuilt (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "agent_key TEXT NOT NULL, key TEXT NOT NULL, name TEXT NOT NULL, description TEXT, "
            "metadata TEXT NOT NULL, enabled INTEGER NOT NULL, tti_minutes INTEGER NOT NULL, "
            "created_at TEXT NOT NULL, updated_at TEXT NOT NULL, expires_at TEXT, "
            "forked_from TEXT, active_at TEXT)",
            "INSERT INTO sessions_rebuilt (id, agent_key, key, name, description, metadata, "
            "enabled, tti_minutes, created_at, updated_at, expires_at, forked_from, active_at) "
            "SELECT id, agent_key, key, name, description, metadata, enabled, tti_minutes, "
            "created_at, updated_at, expires_at, forked_from, active_at FROM sessions ORDER BY id",
            # Dropping a table fires none of its triggers: the events stay.
            "DROP TABLE sessions",
            "ALTER TABLE sessions_rebuilt RENAME TO sessions",
            "CREATE UNIQUE INDEX idx_sessions_agent_key_key ON sessions (agent_key, key)",
            "CREATE INDEX idx_sessions_agent_key_id ON sessions (agent_key, id)",
            "CREATE INDEX idx_sessions_expiring ON sessions (expires_at) "
            "WHERE expires_at IS NOT NULL",
            "CREATE TRIGGER sessions_delete_events AFTER DELETE ON sessions "
            "BEGIN DELETE FROM events WHERE session_id = OLD.id; END",
        ),
        postgres=(),
    ),
    Migration(
        7,
        "the metadata index of the session list (storage_backends/sql/sessions.py)",
        # One row per top-level metadata key whose value is a string, number or
        # boolean, as codec.metadata_index_entries gives it (long texts by their
        # digest, so every row fits a btree). The lookup index serves a page of
        # one agent's sessions with key = value in session order, from any
        # cursor; the primary key serves a session's own rows. Rows go with
        # their session in the statement that removes it (trigger, cascade).
        sqlite=(
            "CREATE TABLE IF NOT EXISTS session_metadata (session_id INTEGER NOT NULL, "
            "key TEXT NOT NULL, agent_key TEXT NOT NULL, value TEXT NOT NULL, "
            "PRIMARY KEY (session_id, key)) WITHOUT ROWID",
            "CREATE INDEX IF NOT EXISTS idx_session_metadata_lookup "
            "ON session_metadata (agent_key, key, value, session_id)",
            "CREATE TRIGGER IF NOT EXISTS sessions_delete_metadata AFTER DELETE ON sessions "
            "BEGIN DELETE FROM session_metadata WHERE session_id = OLD.id; END",
        ),
        postgres=(
            """CREATE TABLE IF NOT EXISTS session_metadata (
            session_id bigint NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            key text NOT NULL, PRIMARY KEY (session_id, key),
            agent_key text NOT NULL, value text NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS session_metadata_lookup "
            "ON session_metadata (agent_key, key, value, session_id)",
        ),
        backfill="_index_sessions_after",
    ),
    Migration(
        8,
        "an agent's state documents (storage_backends/sql/state.py)",
        # One JSON object per (agent, key), written by event batches' state_patch;
        # the rows go with their agent (a cascade, or delete_agent on SQLite).
        sqlite=(
            "CREATE TABLE IF NOT EXISTS agent_state (agent_key TEXT NOT NULL, key TEXT NOT NULL, "
            "value TEXT NOT NULL, updated_at TEXT NOT NULL, PRIMARY KEY (agent_key, key)) "
            "WITHOUT ROWID",
        ),
        postgres=(
            """CREATE TABLE IF NOT EXISTS agent_state (
            agent_key text NOT NULL REFERENCES agents (key) ON DELETE CASCADE,
            key text NOT NULL, PRIMARY KEY (agent_key, key),
            value json NOT NULL, updated_at timestamptz NOT NULL)""",
        ),
    ),
    Migration(
        9,
        "a deleted session's events freed after its deletion (storage_backends/sql/released.py)",
        # Removing a session used to remove its events in the same statement
        # (a trigger, a cascade): seconds of holding SQLite's one writer for a
        # large history. Now the statement that removes a session notes its id
        # here when it had events, which are unreachable from then on (reads
        # find a session's events through its live row, and row ids are never
        # reused); they are freed afterwards in chunks of a few milliseconds,
        # each its own transaction. A crash between the two leaves the note,
        # and the next deletion or purge finishes the work.
        sqlite=(
            "CREATE TABLE IF NOT EXISTS released_sessions (session_id INTEGER PRIMARY KEY)",
            "DROP TRIGGER IF EXISTS sessions_delete_events",
            "CREATE TRIGGER IF NOT EXISTS sessions_release_events AFTER DELETE ON sessions "
            "WHEN EXISTS (SELECT 1 FROM events WHERE session_id = OLD.id) "
            "BEGIN INSERT OR IGNORE INTO released_sessions (session_id) VALUES (OLD.id); END",
        ),
        postgres=(
            "CREATE TABLE IF NOT EXISTS released_sessions (session_id bigint PRIMARY KEY)",
            "ALTER TABLE events DROP CONSTRAINT IF EXISTS events_session_id_fkey",
            """CREATE OR REPLACE FUNCTION release_session_events() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                IF EXISTS (SELECT 1 FROM events WHERE session_id = OLD.id) THEN
                    INSERT INTO released_sessions (session_id) VALUES (OLD.id)
                    ON CONFLICT DO NOTHING;
                END IF;
                RETURN NULL;
            END $$""",
            "DROP TRIGGER IF EXISTS sessions_release_events ON sessions",
            "CREATE TRIGGER sessions_release_events AFTER DELETE ON sessions "
            "FOR EACH ROW EXECUTE FUNCTION release_session_events()",
        ),
    ),
    _usage_migration(),
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

LIVE = "(expires_at IS NULL OR expires_at > ?)"
# One agent's live sessions in keyset order, read from the (agent_key, id) index;
# the session's expires_at comes last, after the record's fields.
SESSION_SELECT = (
    f"SELECT {SESSIONS.position}, {', '.join(SESSIONS.fields)}, expires_at FROM sessions"
)
SESSION_PAGE = f"{SESSION_SELECT} WHERE agent_key = ? AND id > ? AND {LIVE} ORDER BY id"
SESSION_TEXT = operator.itemgetter(
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
DELETE_SESSION = "DELETE FROM sessions WHERE agent_key = ? AND key = ? RETURNING id, expires_at"
DELETE_EXPIRED_SESSION = "DELETE FROM sessions WHERE agent_key = ? AND key = ? AND expires_at <= ?"
DELETE_EXPIRED_BY_ID = "DELETE FROM sessions WHERE id = ? AND expires_at <= ?"
# A chunk of the expired sessions, by the sweep's index; a fork's placeholder (forks.py)
# only once it is older than any copy (parameters: now, that age's start, the chunk's size).
PURGE_EXPIRED = (
    "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions "
    "WHERE expires_at IS NOT NULL AND expires_at <= ? "
    "AND (substr(key, 1, 1) <> '~' OR created_at <= ?) ORDER BY expires_at LIMIT ?) "
    "RETURNING key"
)
PURGE_CHUNK = 500  # sessions per transaction of purge_expired_sessions
# Freeing the events of removed sessions (released.py). Parameters: the row id twice, a count.
RELEASED_SESSIONS = "SELECT session_id FROM released_sessions ORDER BY session_id LIMIT ?"
FREE_EVENTS = (
    "DELETE FROM events WHERE session_id = ? AND seq IN (SELECT seq FROM events "
    "/*INDEXED BY idx_events_session_seq*/ WHERE session_id = ? ORDER BY seq LIMIT ?)"
)
FORGET_RELEASED = "DELETE FROM released_sessions WHERE session_id = ?"

# Events. A session's events are found by the session's row id. A read or a
# change of events finds that id in its own statement, from the agent key,
# the session key and ``now`` (the session must be live): a lookup in a
# statement before would let a session deleted meanwhile (and, were ids
# reused, another agent's session) answer. Where no row comes back, the caller
# looks at the session to tell a missing session from a missing event.
SESSION_ID = f"(SELECT id FROM sessions WHERE agent_key = ? AND key = ? AND {LIVE})"
EVENT_COLUMNS = ("seq", "id", "type", "fields", "created_at", "hide_reason")
INSERT_EVENT = (
    "INSERT INTO events (session_id, id, type, fields, created_at, hide_reason) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
# Parameters: agent_key, session_key, now, event id.
GET_EVENT = (
    f"SELECT {', '.join(EVENT_COLUMNS)} FROM events WHERE session_id = {SESSION_ID} AND id = ?"
)
HIDE_EVENT = (
    f"UPDATE events SET hide_reason = ? WHERE session_id = {SESSION_ID} AND id = ? "
    f"RETURNING {', '.join(EVENT_COLUMNS)}"
)
DELETE_EVENT = f"DELETE FROM events WHERE session_id = {SESSION_ID} AND id = ?"
# The newest event, whole: one probe of (session_id, seq), from its end.
LAST_EVENT = (
    f"SELECT {', '.join(EVENT_COLUMNS)} FROM events /*INDEXED BY idx_events_session_seq*/ "
    "WHERE session_id = ? ORDER BY seq DESC LIMIT 1"
)
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
    "UPDATE idempotency_keys SET status = ?, headers = ?, body = ?, agent_key = ?, "
    "usage_shard = ?, stored_bytes = ? "
    "WHERE scope = ? AND key = ? AND token = ? AND status IS NULL"
)
RELEASE_IDEMPOTENCY_KEY = (
    "DELETE FROM idempotency_keys WHERE scope = ? AND key = ? AND token = ? AND status IS NULL"
)
PURGE_IDEMPOTENCY_KEYS = (
    "DELETE FROM idempotency_keys WHERE expires_at <= ? "
    "RETURNING agent_key, usage_shard, stored_bytes"
)
# An expired record a claim is about to replace, and what it held.
DROP_EXPIRED_IDEMPOTENCY_KEY = (
    "DELETE FROM idempotency_keys WHERE scope = ? AND key = ? AND expires_at <= ? "
    "RETURNING agent_key, usage_shard, stored_bytes"
)
IDEMPOTENCY_ROW_BYTES = 128
FIND_SESSION = "SELECT id, expires_at FROM sessions WHERE agent_key = ? AND key = ?"
SESSION_EXISTS = "SELECT 1 FROM sessions WHERE id = ?"
# The metadata index (migration 7).
INSERT_METADATA = (
    "INSERT INTO session_metadata (session_id, key, agent_key, value) VALUES (?, ?, ?, ?)"
)
INSERT_SESSION_ID = INSERT_SESSION + " RETURNING id"
#: :data:`INSERT_SESSION_ID` answering too the agent's bytes before it (its
#: triggers' charge comes after the RETURNING values on SQLite and PostgreSQL)
#: and the new row's, as they charge it (``{size}``: :func:`session_size_sql`)
INSERT_SESSION_USAGE = (
    INSERT_SESSION_ID
    + ", (SELECT coalesce(sum(bytes), 0) FROM agent_usage WHERE agent_key = ?), {size}"
)
DELETE_METADATA = "DELETE FROM session_metadata WHERE session_id = ?"
DELETE_METADATA_KEY = DELETE_METADATA + " AND key = ?"
INDEX_BATCH = 10_000  # sessions per read of a backfill
INDEX_ROWS = 200  # rows per INSERT of the index (4 parameters each, within any driver's bound)


# One condition and no filter: the page itself, one index entry and one session row a row.
METADATA_PAGE = (
    f"SELECT s.{SESSIONS.position}, {', '.join('s.' + f for f in SESSIONS.fields)}, s.expires_at "
    "FROM session_metadata AS m /*INDEXED BY idx_session_metadata_lookup*/ "
    "JOIN sessions AS s ON s.id = m.session_id "
    "WHERE m.agent_key = ? AND m.key = ? AND m.value = ? AND m.session_id > ? "
    f"AND (s.expires_at IS NULL OR s.expires_at > ?) ORDER BY m.session_id LIMIT ?"
)


@functools.lru_cache(maxsize=64)
def insert_metadata_rows(count: int) -> str:
    """One INSERT of ``count`` rows of the metadata index (cheaper than as many statements)."""
    return INSERT_METADATA + ", (?, ?, ?, ?)" * (count - 1)


def metadata_scan_query(conditions: int) -> str:
    """The rows a page of ``metadata.KEY=VALUE`` reads, in session order, from a cursor.

    Parameters: a key and value for each condition after the first, then agent_key,
    the first condition's key and value, and the cursor. The first condition's index range
    drives the read (one entry a row); each row says whether the session is live
    (its expires_at), its name and description (for ``filter``), and whether it
    meets the other conditions, each one probe of the primary key.
    """
    others = " AND ".join(
        "EXISTS (SELECT 1 FROM session_metadata AS o WHERE o.session_id = m.session_id "
        "AND o.key = ? AND o.value = ?)"
        for _ in range(conditions - 1)
    )
    return (
        f"SELECT m.session_id, s.name, s.description, s.expires_at, {others or '1 = 1'} "
        "FROM session_metadata AS m /*INDEXED BY idx_session_metadata_lookup*/ "
        "JOIN sessions AS s ON s.id = m.session_id "
        "WHERE m.agent_key = ? AND m.key = ? AND m.value = ? AND m.session_id > ? "
        "ORDER BY m.session_id"
    )


EVENT_BATCH = 1_000  # rows per query of iter_events
IMPORT_BATCH = 10_000  # rows per executemany of import_session and load_events


def limit_clause(rows: int) -> str:
    """`` LIMIT n`` with the integer written in the statement.

    A bound ``LIMIT ?`` makes SQLite prepare the statement again on every run (its
    planner reads the bound value); the text of a checked integer is as safe.
    """
    if type(rows) is not int or rows < 0:
        raise ValueError(f"not a row count: {rows!r}")
    return f" LIMIT {rows}"


@functools.lru_cache(maxsize=512)
def event_page_query(
    descending: bool,
    include_hidden: bool,
    types: int,
    cursor: bool,
    by_id: bool = False,
    rows: int | None = None,
    columns: str | None = None,
) -> tuple[str, bool]:
    """The statement of a page of events, and whether it is a union of one per type.

    Parameters, in order: with no types, the session's agent key, its key
    and ``now`` (:data:`SESSION_ID`), the cursor (when ``cursor``) and the
    limit; with ``types`` types, those per type (each with the type after
    ``now``) and the page's limit. ``by_id``: the session by its row id (one
    parameter) instead, for a caller that holds that id (an export, the
    transaction of an append). With several types, each type's branch reads
    its own index, in order, up to the limit,
    and the union keeps the first ``limit`` of those: a page reads at most
    ``types * limit`` index entries at any depth, where one ``type IN (...)``
    scan would read and sort every matching row past the cursor.

    ``rows``: the limit written into the statement (:func:`limit_clause`), and
    then not a parameter. ``columns``: what each row holds, ``seq`` first (by
    default :data:`EVENT_COLUMNS`).
    """
    where = "session_id = ?" if by_id else f"session_id = {SESSION_ID}"
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
    limit = " LIMIT ?" if rows is None else limit_clause(rows)
    one = (
        f"SELECT {columns or ', '.join(EVENT_COLUMNS)} FROM events /*INDEXED BY {index}*/ "
        f"WHERE {where} ORDER BY {order}{limit}"
    )
    if types <= 1:
        return one, False
    branches = " UNION ALL ".join(f"SELECT * FROM ({one}) AS t{i}" for i in range(types))
    return f"{branches} ORDER BY {order}{limit}", True
