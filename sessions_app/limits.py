"""Rate limits: Flask-Limiter's storage and strategy, applied after authentication.

Flask-Limiter owns the storage (``RATELIMIT_STORAGE_URI``, ``RATELIMIT_STORAGE_OPTIONS``)
and the strategy (``RATELIMIT_STRATEGY``). Every limit of this service depends on
who is calling, so none runs in the extension's own before-request pass; they are
counted here, through :meth:`RateLimits.hit`:

- ``AUTH_FAILURE_LIMIT`` per client address, on each failed authentication;
- ``DEFAULT_LIMIT`` per API key on every authenticated /v2 call, or
  ``ADMIN_LIMIT`` on the admin endpoints (both from the authentication hook);
- ``SESSION_CREATE_LIMIT``, or the key's own ``create_limit``, per API key and
  agent on session creation (the create view, after the permission check).

Limit keys are built from the key id, never from the secret, and from parts that
are never empty.

With the fixed-window strategy on Redis, one Lua script counts the hit and
returns the time left in the window, so the decision and the numbers of the
``X-RateLimit-*`` headers take one round trip. It uses the same storage key as
``limits``' own fixed-window strategy, so both see the same counters.

When the storage fails (Redis stopped or stalled past ``RATELIMIT_TIMEOUT``), the
request is served with a warning logged (``RATELIMIT_FAILURE_POLICY = "open"``)
or refused with 503 and ``Retry-After`` ("closed"); the storage is then left
alone for ``RATELIMIT_FAILURE_BACKOFF`` seconds, so a stalled Redis costs one
timeout per worker per interval rather than one per request.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app, g, request
from flask_limiter import Limiter
from limits import RateLimitItem, parse_many
from limits.errors import ConfigurationError
from limits.storage import RedisStorage
from limits.strategies import FixedWindowRateLimiter

from storage_backends import Unavailable

from .errors import ApiError

log = logging.getLogger(__name__)

FAILURE_POLICIES = ("open", "closed")

# The configuration keys holding one rate limit string each.
LIMIT_SETTINGS = ("SESSION_CREATE_LIMIT", "AUTH_FAILURE_LIMIT", "DEFAULT_LIMIT", "ADMIN_LIMIT")

# Count one hit and return {count, milliseconds left in the window}, in one round
# trip. PTTL rather than TTL: whole seconds would make Retry-After lie by up to one.
# A key left without an expiry (never expected) gets one rather than living forever.
FIXED_WINDOW_HIT = """
local count = redis.call('INCRBY', KEYS[1], ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
    ttl = tonumber(ARGV[1])
    redis.call('PEXPIRE', KEYS[1], ttl)
end
return {count, ttl}
"""


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
    return uri.split(":", 1)[0].startswith(("redis", "valkey"))


def storage_options(config: Any) -> dict[str, Any]:
    """Defaults for the storage driver: Redis must answer within ``RATELIMIT_TIMEOUT``.

    ``RATELIMIT_STORAGE_OPTIONS`` given by the operator win over these.
    """
    if not is_redis(str(config["RATELIMIT_STORAGE_URI"])):
        return {}
    timeout = float(config["RATELIMIT_TIMEOUT"])
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout}


class ProcessWindows:
    """Fixed-window counters held in this process: the memory:// storage's fast path.

    ``limits``' MemoryStorage starts a timer thread every 10 ms to expire keys,
    which measured at more per request than all the rest of the counting. Here
    a window past its end is replaced when next counted, and stale windows are
    swept once every ``SWEEP_EVERY`` counts.
    """

    SWEEP_EVERY = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[str, list[float]] = {}  # key -> [count, reset_at]
        self._counted = 0

    def count(self, item: RateLimitItem, key: str) -> tuple[int, float]:
        """Count one hit; return the window's count and its end (epoch seconds)."""
        now = time.time()
        with self._lock:
            window = self._windows.get(key)
            if window is None or window[1] <= now:
                window = self._windows[key] = [0, now + item.get_expiry()]
            window[0] += 1
            self._counted += 1
            if self._counted % self.SWEEP_EVERY == 0:
                self._windows = {k: w for k, w in self._windows.items() if w[1] > now}
            return int(window[0]), window[1]

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._windows)


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
        self.extension = Limiter(key_func=client_address, storage_options=storage_options(config))
        try:
            self.extension.init_app(app)
        except ConfigurationError as err:
            raise ValueError(f"rate limits: {err}") from None
        detach_request_hooks(app, self.extension)
        self.enabled = self.extension.enabled
        self._count: Callable[[RateLimitItem, str], tuple[int, float]] | None = None
        if self.enabled and isinstance(self.strategy, FixedWindowRateLimiter):
            storage = self.storage
            if isinstance(storage, RedisStorage):
                # Registering computes the script's digest; nothing connects here.
                script = storage.get_connection().register_script(FIXED_WINDOW_HIT)
                self._count = functools.partial(self._count_redis, script, storage)
            else:
                self.windows = ProcessWindows()
                self._count = self.windows.count
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
        the storage fails, the request passes (policy "open", logged) or gets a
        503 with Retry-After ("closed").
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
        if self._count is not None:
            count, reset_at = self._count(item, item.key_for(*parts))
            return count <= item.amount, Window(item.amount, max(0, item.amount - count), reset_at)
        # Other strategies: the extension's strategy, two calls (more round trips).
        allowed = self.strategy.hit(item, *parts)
        reset_at, remaining = self.strategy.get_window_stats(item, *parts)
        return allowed, Window(item.amount, max(0, remaining), reset_at)

    @staticmethod
    def _count_redis(script: Any, storage: Any, item: RateLimitItem, key: str) -> tuple[int, float]:
        count, ttl_ms = script(keys=[storage.prefixed_key(key)], args=[item.get_expiry() * 1000, 1])
        return int(count), time.time() + int(ttl_ms) / 1000

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

    def count_request(self, key_id: str, view: Any) -> None:
        """One authenticated call: ``ADMIN_LIMIT`` on admin views, else ``DEFAULT_LIMIT``.

        Session creation is left to its own limit per key and agent, which the
        create view applies after the permission check.
        """
        scope = getattr(view, "scope", None)
        if scope == "sessions:create":
            return
        if scope == "admin":
            self.hit(current_app.config["ADMIN_LIMIT"], "admin", key_id)
        else:
            self.hit(current_app.config["DEFAULT_LIMIT"], "api", key_id)


def detach_request_hooks(app: Flask, extension: Limiter) -> None:
    """Remove the extension's per-request hooks from ``app``.

    Every limit here needs the authenticated key, so none is declared to the
    extension and its hooks would find nothing to do, at a measured cost of
    more than the counting itself (route resolution, a request context,
    header injection) on every request.
    """

    def ours(hook: Any) -> bool:
        if getattr(hook, "__self__", None) is extension:
            return True
        return isinstance(hook, functools.partial) and extension in hook.args

    for hooks in (app.before_request_funcs, app.after_request_funcs, app.teardown_request_funcs):
        hooks[None] = [hook for hook in hooks.get(None, []) if not ours(hook)]


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
