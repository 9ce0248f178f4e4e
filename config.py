"""Configuration defaults. Every key can be set from the environment as
``AGENT_SESSIONS_<KEY>`` (values are parsed as JSON when they parse, as with
Flask's ``from_prefixed_env``), or by the mapping given to ``create_app``.
"""

from __future__ import annotations


class Config:
    # Storage: None means a SQLite file in the instance folder.
    STORAGE_URL: str | None = None
    SQLITE_BUSY_TIMEOUT_MS = 5000
    # NORMAL survives a killed process; only FULL also survives power loss.
    SQLITE_SYNCHRONOUS = "NORMAL"
    # PostgreSQL: connections per process, seconds to connect, to get a pooled
    # connection and to wait for a lock, and milliseconds per statement.
    POSTGRES_POOL_MIN = 1
    POSTGRES_POOL_MAX = 4
    POSTGRES_TIMEOUT = 5
    POSTGRES_STATEMENT_TIMEOUT_MS = 15000
    # The work of one filtered session list: it ends its page early, with a
    # page_key to continue, after reading this many sessions or spending this
    # many seconds, whichever comes first.
    FILTER_SCAN_ROWS = 20_000
    FILTER_SCAN_SECONDS = 0.25

    # Requests
    MAX_CONTENT_LENGTH = 64 * 1024
    METADATA_MAX_KEYS = 64
    METADATA_MAX_KEY_LENGTH = 128
    METADATA_MAX_DEPTH = 8
    METADATA_MAX_BYTES = 16 * 1024
    FILTER_MAX_LENGTH = 256
    # Number of trusted reverse proxies in front of the service (for client addresses).
    PROXY_COUNT = 0

    # Rate limits (Flask-Limiter reads the RATELIMIT_* keys itself).
    RATELIMIT_STORAGE_URI = "memory://"
    RATELIMIT_STRATEGY = "fixed-window"
    RATELIMIT_KEY_PREFIX = "agent-sessions"
    SESSION_CREATE_LIMIT = "120/minute"
    AUTH_FAILURE_LIMIT = "20/minute"
    # What to do when the rate-limit storage is unreachable: "open" serves the
    # request and logs a warning, "closed" answers 503.
    RATELIMIT_FAILURE_POLICY = "open"
    # Every other authenticated /v2 call, per API key; admin endpoints, per API key.
    DEFAULT_LIMIT = "600/minute"
    ADMIN_LIMIT = "120/minute"
    # Seconds Redis has to connect and to answer (socket timeouts; defaults for
    # RATELIMIT_STORAGE_OPTIONS with redis:// URIs).
    RATELIMIT_TIMEOUT = 0.5
    # After a storage failure, seconds during which each worker applies the
    # failure policy without trying the storage again.
    RATELIMIT_FAILURE_BACKOFF = 1.0
    # Refuse to start on memory:// (which counts per process) when true.
    RATELIMIT_REQUIRE_SHARED = False

    DEBUG = False
    TESTING = False


class TestingConfig(Config):
    TESTING = True
