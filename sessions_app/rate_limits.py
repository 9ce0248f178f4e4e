"""Rate limits: every limit of the service, declared on the routes it guards.

Flask-Limiter is built without an app and bound with ``init_app``; it reads
the storage (``RATELIMIT_STORAGE_URI``, ``RATELIMIT_STORAGE_OPTIONS``), the
strategy (``RATELIMIT_STRATEGY``) and builds both through ``limits``. The
limits themselves are declared with the decorators below, one on each view:

- :func:`per_key`: ``DEFAULT_LIMIT`` per API key (every session call);
- :func:`per_admin_key`: ``ADMIN_LIMIT`` per API key (agents and API keys);
- :func:`creates`: ``SESSION_CREATE_LIMIT``, or the key's own
  ``create_limit``, per API key and agent;
- :func:`guard_authentication` wraps the authentication hook:
  ``AUTH_FAILURE_LIMIT`` per client address counts failed authentications.

Each decorator runs after authentication. Limit keys are built from the key
id, never the secret, and from parts that are never empty.

Why not ``@limiter.limit``: measured with Flask's test client on a bare POST
route, Flask-Limiter's request path (its before-request pass, limit
resolution, its header hook) cost several hundred microseconds a request, and
its hooks alone, with nothing declared, 70-100 µs, against ~6 µs for the
counting; the service's whole create takes ~600 µs. So the extension's hooks
are removed and the decorators here count through the strategy and storage
it configured.

Two ``limits`` storages registered for their own URL schemes make the
counting cheap: ``memory://`` without the 10 ms expiry timer thread, and
``redis://`` where one Lua script counts the hit and returns the time left in
the window, so the decision and the ``X-RateLimit-*`` numbers take one round
trip. Both keep ``limits``' own key layout, so its strategies (and
Flask-Limiter's CLI) read the same counters.

When the storage is unreachable (Redis stopped or stalled past
``RATELIMIT_TIMEOUT``), the request is served with a warning logged
(``RATELIMIT_FAILURE_POLICY = "open"``) or refused with 503 and ``Retry-After``
("closed"); the storage is then left alone for ``RATELIMIT_FAILURE_BACKOFF``
seconds, so a stalled Redis costs one timeout per worker per interval rather
than one per request.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app, g, request
from flask_limiter import Limiter
from limits import RateLimitItem, parse_many
from limits.errors import ConfigurationError
from limits.storage import MemoryStorage, RedisStorage
from limits.strategies import FixedWindowRateLimiter

from storage_backends import Unavailable

from .errors import ApiError

log = logging.getLogger(__name__)

FAILURE_POLICIES = ("open", "closed")

# The configuration keys holding one rate limit string each.
LIMIT_SETTINGS = ("SESSION_CREATE_LIMIT", "AUTH_FAILURE_LIMIT", "DEFAULT_LIMIT", "ADMIN_LIMIT")

# The URL schemes of the storages below: "<SCHEME_PREFIX><limits' own scheme>".
SCHEME_PREFIX = "agent-sessions+"


@functools.lru_cache(maxsize=256)
def parse_limit(value: str) -> RateLimitItem:
    """One limit such as "120/minute" (parsed once per distinct string)."""
    try:
        items = parse_many(value)
    except ValueError:
        items = []
    if len(items) != 1:
        raise ValueError(f"{value!r} is not one rate limit such as 30/minute")
    return items[0]


def client_address() -> str:
    # Never empty: an empty limit key would make the limit silently skip.
    return request.remote_addr or "unknown"


def flag(value: Any) -> bool:
    """A boolean setting, also when given as a string ("true", "1", "yes")."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def is_redis(uri: str) -> bool:
    return uri.split(":", 1)[0] in RedisStorage.STORAGE_SCHEME


def storage_options(config: Any) -> dict[str, Any]:
    """Defaults for the storage driver: Redis must answer within ``RATELIMIT_TIMEOUT``.

    ``RATELIMIT_STORAGE_OPTIONS`` given by the operator win over these.
    """
    if not is_redis(str(config["RATELIMIT_STORAGE_URI"])):
        return {}
    timeout = float(config["RATELIMIT_TIMEOUT"])
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout}


def storage_uri(uri: str) -> str:
    """The URI of this module's storage for the operator's ``memory://`` or ``redis://``."""
    scheme = uri.split(":", 1)[0]
    if scheme in (*MemoryCounters.LIMITS_SCHEMES, *RedisCounters.LIMITS_SCHEMES):
        return SCHEME_PREFIX + uri
    return uri


class MemoryCounters(MemoryStorage):
    """``limits``' memory storage without its expiry timer thread.

    ``MemoryStorage`` starts a thread every 10 ms to expire keys, which measured
    at more per request than all the rest of the counting. Here expired
    windows are dropped when next read (as ``MemoryStorage.get`` does) and
    swept once every ``SWEEP_EVERY`` counts, so memory stays bounded by the
    windows alive in the last sweep interval.
    """

    LIMITS_SCHEMES = ("memory",)
    STORAGE_SCHEME = [SCHEME_PREFIX + scheme for scheme in LIMITS_SCHEMES]
    SWEEP_EVERY = 10_000

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: Any):
        self._counted = 0
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.timer.cancel()

    def _MemoryStorage__schedule_expiry(self) -> None:  # noqa: N802 - replaces the timer
        self._counted += 1
        if self._counted % self.SWEEP_EVERY == 0:
            self._MemoryStorage__expire_events()

    def incr_with_reset(self, key: str, expiry: int, amount: int = 1) -> tuple[int, float]:
        """Count ``amount``; return the window's count and its end (epoch seconds)."""
        with self.locks[key]:
            count = self.incr(key, expiry, amount)
            return count, self.expirations.get(key, time.time())

    def keys(self) -> list[str]:
        """The limit keys of the windows still open."""
        now = time.time()
        return [key for key, end in list(self.expirations.items()) if end > now]


class RedisCounters(RedisStorage):
    """``limits``' Redis storage, plus one script that counts and returns the window's end."""

    LIMITS_SCHEMES = tuple(RedisStorage.STORAGE_SCHEME)
    STORAGE_SCHEME = [SCHEME_PREFIX + scheme for scheme in LIMITS_SCHEMES]

    # Count one hit and return {count, milliseconds left in the window}, in one
    # round trip, on the key limits' fixed window uses. PTTL rather than TTL:
    # whole seconds would make Retry-After lie by up to one. A key left without
    # an expiry (never expected) gets one rather than living forever.
    SCRIPT_INCR_WITH_RESET = """
    local count = redis.call('INCRBY', KEYS[1], ARGV[2])
    local ttl = redis.call('PTTL', KEYS[1])
    if ttl < 0 then
        ttl = tonumber(ARGV[1])
        redis.call('PEXPIRE', KEYS[1], ttl)
    end
    return {count, ttl}
    """

    def __init__(self, uri: str, **options: Any):
        super().__init__(uri.removeprefix(SCHEME_PREFIX), **options)

    def initialize_storage(self, uri: str) -> None:
        super().initialize_storage(uri)
        # Registering computes the script's digest; nothing connects here.
        self.lua_incr_with_reset = self.get_connection().register_script(
            self.SCRIPT_INCR_WITH_RESET
        )

    def incr_with_reset(self, key: str, expiry: int, amount: int = 1) -> tuple[int, float]:
        """Count ``amount``; return the window's count and its end (epoch seconds)."""
        count, ttl_ms = self.lua_incr_with_reset([self.prefixed_key(key)], [expiry * 1000, amount])
        return int(count), time.time() + int(ttl_ms) / 1000


@dataclasses.dataclass(frozen=True)
class Window:
    """What one limit says about the current request: the X-RateLimit-* numbers."""

    limit: int
    remaining: int
    reset_at: float  # epoch seconds when the budget is back

    def retry_after(self) -> int:
        return max(1, math.ceil(self.reset_at - time.time()))


class RateLimits:
    """Per-app limiter state, kept in ``app.extensions["agent_sessions"]``."""

    def __init__(self, app: Flask):
        config = app.config
        policy = config["RATELIMIT_FAILURE_POLICY"]
        if policy not in FAILURE_POLICIES:
            raise ValueError(f"RATELIMIT_FAILURE_POLICY must be one of {FAILURE_POLICIES}")
        self.fail_closed = policy == "closed"
        for name in LIMIT_SETTINGS:
            try:
                parse_limit(str(config[name]))
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        uri = str(config["RATELIMIT_STORAGE_URI"])
        self.shared = not uri.startswith("memory:")
        if flag(config["RATELIMIT_REQUIRE_SHARED"]) and not self.shared:
            raise ValueError(
                "RATELIMIT_REQUIRE_SHARED is set but RATELIMIT_STORAGE_URI is memory://, "
                "which counts per process; use a shared storage such as redis://host:6379/0"
            )
        self.prefix = str(config["RATELIMIT_KEY_PREFIX"] or "")
        self.backoff = float(config["RATELIMIT_FAILURE_BACKOFF"])
        self.extension = Limiter(
            key_func=client_address,
            storage_uri=storage_uri(uri),
            storage_options=storage_options(config),
        )
        try:
            self.extension.init_app(app)
        except ConfigurationError as err:
            raise ValueError(f"rate limits: {err}") from None
        detach_request_hooks(app, self.extension)
        self.enabled = self.extension.enabled
        self.degraded = False
        self._retry_at = 0.0  # time.monotonic() before which the storage is left alone

    @property
    def strategy(self) -> Any:
        return self.extension.limiter

    @property
    def storage(self) -> Any:
        return self.extension.storage

    def check(self) -> bool:
        """True when the limiter storage answers (a successful check ends the backoff)."""
        if not self.enabled:
            return True
        try:
            ok = bool(self.storage.check())
        except Exception:  # noqa: BLE001 - any storage failure means "not ready"
            ok = False
        if ok:
            self._retry_at = 0.0
        return ok

    def hit(self, limit: str, *identifiers: str) -> None:
        """Count one request against ``limit`` for ``identifiers``; raise 429 past it.

        The numbers are kept in ``g.rate_limit`` for the response headers. When
        the storage is unreachable, the request passes (policy "open", logged)
        or gets a 503 with Retry-After ("closed").
        """
        if not self.enabled:
            return
        if not all(identifiers):
            # A programming error, not a request error: never count under a blank key.
            raise ValueError(f"empty rate-limit key part in {identifiers!r}")
        item = parse_limit(limit)
        parts = (self.prefix, *identifiers) if self.prefix else identifiers
        if time.monotonic() < self._retry_at:
            self._storage_failed(None)
            return
        try:
            allowed, window = self._hit(item, parts)
        except Exception as err:  # noqa: BLE001 - storage drivers raise anything
            self._retry_at = time.monotonic() + self.backoff
            self._storage_failed(err)
            return
        if self.degraded:
            self.degraded = False
            log.warning("rate-limit storage answers again; limits are enforced again")
        g.rate_limit = window
        if not allowed:
            raise ApiError(
                429,
                "rate_limit_exceeded",
                f"Rate limit of {limit} exceeded; retry later.",
                headers={"Retry-After": str(window.retry_after())},
            )

    def _hit(self, item: RateLimitItem, parts: tuple[str, ...]) -> tuple[bool, Window]:
        strategy, storage = self.strategy, self.storage
        if isinstance(strategy, FixedWindowRateLimiter) and hasattr(storage, "incr_with_reset"):
            count, reset_at = storage.incr_with_reset(item.key_for(*parts), item.get_expiry())
            return count <= item.amount, Window(item.amount, max(0, item.amount - count), reset_at)
        # Other strategies or storages: two calls (more round trips).
        allowed = strategy.hit(item, *parts)
        reset_at, remaining = strategy.get_window_stats(item, *parts)
        return allowed, Window(item.amount, max(0, remaining), reset_at)

    def _storage_failed(self, err: Exception | None) -> None:
        if err is not None and not self.degraded:
            log.warning(
                "rate-limit storage unreachable (%s: %s); %s until it answers",
                type(err).__name__,
                err,
                "requests are refused with 503" if self.fail_closed else "limits are not enforced",
            )
        self.degraded = True
        if self.fail_closed:
            retry_after = max(1, math.ceil(self._retry_at - time.monotonic()))
            raise Unavailable("rate-limit storage unreachable", retry_after=retry_after)

    def count_auth_failure(self) -> None:
        """One failed authentication from this client address (429 past the limit)."""
        self.hit(current_app.config["AUTH_FAILURE_LIMIT"], "auth-failure", client_address())

    def count_create(self, key: Any, agent_key: str) -> None:
        """A session creation: the key's own limit, else ``SESSION_CREATE_LIMIT``, per agent."""
        limit = key.create_limit or current_app.config["SESSION_CREATE_LIMIT"]
        self.hit(limit, "create", key.id, agent_key)


def current() -> RateLimits:
    return current_app.extensions["agent_sessions"].limits


def detach_request_hooks(app: Flask, extension: Limiter) -> None:
    """Remove the extension's per-request hooks from ``app``.

    Every limit here is declared with the decorators of this module, so the
    extension's hooks would find nothing to do, at a measured cost of more
    than the counting itself (route resolution, limit filtering, header
    injection) on every request.
    """

    def ours(hook: Any) -> bool:
        if getattr(hook, "__self__", None) is extension:
            return True
        return isinstance(hook, functools.partial) and extension in hook.args

    for hooks in (app.before_request_funcs, app.after_request_funcs, app.teardown_request_funcs):
        hooks[None] = [hook for hook in hooks.get(None, []) if not ours(hook)]


# The decorators: one on each view, after authentication, before the permission check.


def _declared(count: Callable[..., None]) -> Callable[[Callable], Callable]:
    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            count(g.api_key, *args, **kwargs)
            return view(*args, **kwargs)

        return wrapper

    return decorator


per_key = _declared(
    lambda key, *_, **__: current().hit(current_app.config["DEFAULT_LIMIT"], "api", key.id)
)
per_key.__doc__ = "Count the call against ``DEFAULT_LIMIT`` for the calling key."

per_admin_key = _declared(
    lambda key, *_, **__: current().hit(current_app.config["ADMIN_LIMIT"], "admin", key.id)
)
per_admin_key.__doc__ = "Count the call against ``ADMIN_LIMIT`` for the calling key."

creates = _declared(lambda key, agent_key, **_: current().count_create(key, agent_key))
creates.__doc__ = "Count a session creation (see :meth:`RateLimits.count_create`)."


def guard_authentication(authenticate: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap the authentication hook with ``AUTH_FAILURE_LIMIT`` per client address."""

    @functools.wraps(authenticate)
    def hook() -> Any:
        try:
            return authenticate()
        except ApiError as err:
            if err.status == 401:
                current().count_auth_failure()
            raise

    return hook


def headers() -> list[tuple[str, str]]:
    """The X-RateLimit-* headers of the limit this request counted against, if any."""
    window = g.get("rate_limit")
    if window is None:
        return []
    return [
        ("X-RateLimit-Limit", str(window.limit)),
        ("X-RateLimit-Remaining", str(window.remaining)),
        ("X-RateLimit-Reset", str(math.ceil(window.reset_at))),
    ]
