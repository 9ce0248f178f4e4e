"""Every setting of the service, with its default and how it is checked.

Each key can be set from the environment as ``AGENT_SESSIONS_<KEY>`` (values
are parsed as JSON when they parse, as with Flask's ``from_prefixed_env``), or
by the mapping given to ``create_app``. :func:`check` runs once at start-up:
a value of the wrong type or range stops the server and the CLI with one line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, MutableMapping
from typing import Any


class ConfigError(ValueError):
    """The configuration cannot be served; the message is one line for the operator."""


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
    # Session events: the bytes of one event as answered (larger is a 413, never
    # truncated), the bytes of a POST /events/batch body (the other bodies keep
    # MAX_CONTENT_LENGTH), and the nesting depth of an event's JSON values
    # (tool_input, tool_output, structured_output content).
    EVENT_MAX_BYTES = 256 * 1024
    EVENTS_MAX_CONTENT_LENGTH = 4 * 1024 * 1024
    # The events one POST /events/batch may hold (Vectara's own bound is 100): one
    # all-or-nothing write of a whole turn or import, within EVENTS_MAX_CONTENT_LENGTH.
    EVENTS_BATCH_MAX = 1000
    EVENT_MAX_DEPTH = 32
    # A page of GET .../events also ends early, with a page_key, once its events
    # serialize to this many bytes (always at least one event).
    EVENTS_PAGE_MAX_BYTES = 1024 * 1024
    # Storage quotas (storage_backends/sql/usage.py): the bytes one agent stores
    # and the events one session holds, hidden ones included; 0: no bound.
    AGENT_MAX_BYTES = 1 << 30
    SESSION_MAX_EVENTS = 100_000
    # Seconds a client has to take each write of its answer (the head, the body, a
    # piece of a streamed one), in gunicorn's worker: then the connection is
    # reset, logged with the request id, and the request thread is free.
    SEND_TIMEOUT = 10.0
    # Number of trusted reverse proxies in front of the service (for client addresses).
    PROXY_COUNT = 0

    # Idempotency-Key (sessions_app/corridor/idempotency.py): seconds an answer is remembered
    # for retries, and seconds after which a claim whose request never answered
    # (its worker was killed) may be taken over by a retry.
    IDEMPOTENCY_KEY_TTL_SECONDS = 24 * 60 * 60
    IDEMPOTENCY_KEY_LOCK_SECONDS = 30

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

    # memory:// under several gunicorn workers gives each a store of its own,
    # which no CLI reaches: refused unless this is true (a benchmark app that
    # seeds every worker's store alike).
    MEMORY_PER_WORKER = False
    # Observability (sessions_app/observability/). METRICS_ENABLED:
    # None means on for the standalone service (create_app), off in a host's init_app.
    # METRICS_BIND ("HOST:PORT"): /metrics on an address of its own, served by the
    # gunicorn master, instead of on the service's. LOG_FORMAT: "text" or "json"
    # (gunicorn's access and error logs, and the service's own). TRACING_ENABLED:
    # None means on when the otel extra is installed and OTEL_EXPORTER_OTLP_ENDPOINT
    # (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set.
    METRICS_ENABLED: bool | None = None
    METRICS_BIND: str | None = None
    # METRICS_TOKEN: the bearer token GET /metrics needs (Authorization: Bearer TOKEN),
    # 16 to 1024 characters of RFC 6750's token68. Without it the page is served only
    # on METRICS_BIND: the service's own /metrics answers 401.
    METRICS_TOKEN: str | None = None
    LOG_FORMAT = "text"
    TRACING_ENABLED: bool | None = None

    # The browser console at /console/ (sessions_app/console): on unless false. A
    # sign-in lasts this many minutes, however active (then the API key is asked again).
    CONSOLE_ENABLED = True
    CONSOLE_SESSION_MINUTES = 8 * 60

    DEBUG = False
    TESTING = False


#: Names read from the environment outside ``Config``: by gunicorn.conf.py and
#: the worker (``AGENT_SESSIONS_<NAME>``). With ``Config``'s keys, every name an
#: operator may set; any other ``AGENT_SESSIONS_*`` name is a typo to warn about.
SERVER_SETTINGS: tuple[str, ...] = ("BIND", "WORKERS", "THREADS", "TIMEOUT", "HEADER_TIMEOUT")


def known_settings() -> list[str]:
    return sorted({key for key in dir(Config) if key.isupper()} | set(SERVER_SETTINGS))


Check = Callable[[str, Any], Any]


def integer(low: int, high: int = 2**63 - 1) -> Check:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, not {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{name} must be between {low} and {high}, not {value}")
        return value

    return check


def number(low: float, high: float) -> Check:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number, not {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{name} must be between {low} and {high}, not {value}")
        return float(value)

    return check


def choice(*allowed: str) -> Check:
    def check(name: str, value: Any) -> str:
        text = str(value).strip()
        for option in allowed:
            if text.lower() == option.lower():
                return option
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")

    return check


def flag(name: str, value: Any) -> bool:
    """A boolean, also when given as text ("true", "1", "yes", "on" and their opposites)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{name} must be true or false, not {value!r}")


def text(name: str, value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"{name} must be a string, not {value!r}")
    return str(value)


def optional_text(name: str, value: Any) -> str | None:
    return None if value is None or value == "" else text(name, value)


def optional(inner: Check) -> Check:
    def check(name: str, value: Any) -> Any:
        return None if value is None else inner(name, value)

    return check


def address(name: str, value: Any) -> str | None:
    """``HOST:PORT`` (an IPv6 host in brackets), or None when empty."""
    text_value = optional_text(name, value)
    if text_value is None:
        return None
    host, _, port = text_value.rpartition(":")
    if not host or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{name} must be HOST:PORT, such as 127.0.0.1:9100, not {value!r}")
    return text_value


_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]{16,1024}=*")


def bearer_token(name: str, value: Any) -> str | None:
    """A bearer token (RFC 6750's token68, 16 to 1024 characters), or None when empty."""
    text_value = optional_text(name, value)
    if text_value is None:
        return None
    if not _BEARER_TOKEN.fullmatch(text_value):
        raise ValueError(
            f"{name} must be 16 to 1024 letters, digits and -._~+/ (a bearer token), "
            f"not a value of {len(text_value)} characters"  # the secret is not repeated
        )
    return text_value


def mapping(name: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, not {value!r}")
    return value


#: How each setting is checked (and normalized) at start-up. Rate-limit strings
#: are checked by the rate-limit module, which knows their grammar and bounds.
CHECKS: dict[str, Check] = {
    "STORAGE_URL": optional_text,
    "SQLITE_BUSY_TIMEOUT_MS": integer(0, 3_600_000),
    "SQLITE_SYNCHRONOUS": choice("NORMAL", "FULL", "EXTRA", "OFF"),
    # None only where a host application's own Flask default is kept.
    "MAX_CONTENT_LENGTH": optional(integer(2, 1 << 30)),
    "METADATA_MAX_KEYS": integer(1, 100_000),
    "METADATA_MAX_KEY_LENGTH": integer(1, 100_000),
    "METADATA_MAX_DEPTH": integer(1, 100),
    "METADATA_MAX_BYTES": integer(2, 1 << 30),
    "FILTER_MAX_LENGTH": integer(1, 100_000),
    "EVENT_MAX_BYTES": integer(1024, 1 << 30),
    "EVENTS_MAX_CONTENT_LENGTH": integer(1024, 1 << 30),
    "EVENTS_BATCH_MAX": integer(1, 100_000),
    "EVENT_MAX_DEPTH": integer(1, 200),
    "EVENTS_PAGE_MAX_BYTES": integer(1024, 1 << 30),
    "AGENT_MAX_BYTES": integer(0, 1 << 62),
    "SESSION_MAX_EVENTS": integer(0, 1 << 62),
    "SEND_TIMEOUT": number(0.1, 3600),
    "FILTER_SCAN_ROWS": integer(1, 10_000_000),
    "FILTER_SCAN_SECONDS": number(0.001, 60),
    "IDEMPOTENCY_KEY_TTL_SECONDS": integer(1, 366 * 24 * 60 * 60),
    "IDEMPOTENCY_KEY_LOCK_SECONDS": integer(1, 24 * 60 * 60),
    "POSTGRES_POOL_MIN": integer(0, 1000),
    "POSTGRES_POOL_MAX": integer(1, 1000),
    "POSTGRES_TIMEOUT": number(0.001, 3600),
    "POSTGRES_STATEMENT_TIMEOUT_MS": integer(0, 86_400_000),
    "PROXY_COUNT": integer(0, 100),
    "RATELIMIT_STORAGE_URI": text,
    "RATELIMIT_STORAGE_OPTIONS": mapping,
    "RATELIMIT_STRATEGY": text,
    "RATELIMIT_KEY_PREFIX": text,
    "RATELIMIT_FAILURE_POLICY": choice("open", "closed"),
    "RATELIMIT_TIMEOUT": number(0.001, 3600),
    "RATELIMIT_FAILURE_BACKOFF": number(0, 3600),
    "RATELIMIT_REQUIRE_SHARED": flag,
    "MEMORY_PER_WORKER": flag,
    "METRICS_ENABLED": optional(flag),
    "METRICS_BIND": address,
    "METRICS_TOKEN": bearer_token,
    "LOG_FORMAT": choice("text", "json"),
    "TRACING_ENABLED": optional(flag),
    "CONSOLE_ENABLED": flag,
    "CONSOLE_SESSION_MINUTES": integer(1, 31 * 24 * 60),
}


def check(config: MutableMapping[str, Any]) -> None:
    """Check every known setting in ``config`` and store its normalized value.

    Raises ValueError with a one-line message naming the first bad setting.
    """
    for name, check_one in CHECKS.items():
        if name in config:
            config[name] = check_one(name, config[name])
    if config.get("POSTGRES_POOL_MIN", 0) > config.get("POSTGRES_POOL_MAX", 1):
        raise ValueError("POSTGRES_POOL_MIN must not be above POSTGRES_POOL_MAX")
