"""Rate limits: every limit of the service, declared on the routes it guards.

Flask-Limiter is built without an app and bound with ``init_app``; it reads
the storage (``RATELIMIT_STORAGE_URI``, ``RATELIMIT_STORAGE_OPTIONS``), the
strategy (``RATELIMIT_STRATEGY``) and builds both through ``limits``. The
limits themselves are declared with the decorators below, one on each view:

- :func:`per_key`: ``DEFAULT_LIMIT`` per API key (every session call);
- :func:`per_admin_key`: ``ADMIN_LIMIT`` per API key (agents and API keys);
- :func:`creates`: ``SESSION_CREATE_LIMIT``, or the key's own
  ``create_limit``, per API key and agent, for a key that may create on an
  agent that exists; any other POST to the route counts as ``DEFAULT_LIMIT``;
- :func:`guard_authentication` wraps the authentication hook:
  ``AUTH_FAILURE_LIMIT`` per client address counts failed authentications, and
  once an address has used it up, its requests are refused before any key is
  read, until the window ends.

Each decorator runs after authentication and before the permission check, so
every authenticated request counts once, whatever its outcome (a 403 too),
against exactly one limit. Limiter state is bounded per key whatever the URL
says: a counter per key, plus one per agent that exists for creations. Limit
keys are built from the key id, never the secret, and from parts that are
never empty.

Why not ``@limiter.limit``: measured with Flask's test client on a bare POST
route, Flask-Limiter's request path (its before-request pass, limit
resolution, its header hook) cost several hundred microseconds a request, and
its hooks alone, with nothing declared, 70-100 µs, against ~6 µs for the
counting; the service's whole create takes ~600 µs. So the extension's hooks
are removed and the decorators here count through the strategy and storage
it configured.

Three ``limits`` storages registered for their own URL schemes make the
counting cheap: ``memory://`` without the 10 ms expiry timer thread, and
``redis://`` where one Lua script counts the hit and returns the time left in
the window, so the decision and the ``X-RateLimit-*`` numbers take one round
trip. Both keep ``limits``' own key layout, so its strategies (and, on Redis,
Flask-Limiter's CLI) read the same counters. Under gunicorn with several
workers, ``memory://`` counts in a SQLite file of the server's own instead
(:mod:`sessions_app.serving.host_counters`, path in ``COUNTERS_ENV``, set by
``gunicorn.conf.py``), so the limits are exact across the workers of a host.
Flask-Limiter's CLI, a process of its own, sees neither the workers' memory
nor that file: only Redis is shared with it.

When the storage is unreachable (Redis stopped or stalled past
``RATELIMIT_TIMEOUT``), the request is served with a warning logged
(``RATELIMIT_FAILURE_POLICY = "open"``) or refused with 503 and ``Retry-After``
("closed"); the storage is then left alone for ``RATELIMIT_FAILURE_BACKOFF``
seconds, so a stalled Redis costs one timeout per worker per interval rather
than one per request. Any other storage error (Redis refusing a command) is a
bug, not an outage: it is logged as an error, that one request passes
uncounted, and no back-off starts.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app, g, request
from flask_limiter import Limiter
from limits import RateLimitItem, parse_many
from limits.errors import ConfigurationError
from limits.storage import MemoryStorage, RedisStorage
from limits.strategies import FixedWindowRateLimiter
from limits.util import SINGLE_EXPR

from storage_backends import AgentNotFound, Unavailable

from ..serving.host_counters import SCHEME as HOST_SCHEME
from .auth import needs_key
from .errors import ApiError

log = logging.getLogger("sessions_app.rate_limits")  # the name log filters select it by

FAILURE_POLICIES = ("open", "closed")

# The configuration keys holding one rate limit string each.
LIMIT_SETTINGS = ("SESSION_CREATE_LIMIT", "AUTH_FAILURE_LIMIT", "DEFAULT_LIMIT", "ADMIN_LIMIT")

# Bounds of every limit, whether set in configuration, by the CLI or through the
# API: a count past a billion or a period past a day is a typo, and would
# overflow the storage's expiry (Redis refuses the PEXPIRE) or promise a
# Retry-After of eons.
MAX_AMOUNT = 1_000_000_000
MAX_PERIOD_SECONDS = 86_400
BOUNDS = f"1 to {MAX_AMOUNT:,} requests per period, a period of 1 second to 1 day"

# The scope whose creations have their own limit per key and agent.
CREATE_SCOPE = "sessions:create"

# Addresses refused for failed authentications, remembered per process.
MAX_BLOCKED_ADDRESSES = 10_000

# Agents found to exist are taken on trust for this long (seconds), per process,
# so that creations do not pay a storage read each; at most this many are kept.
AGENT_TRUST_SECONDS = 1.0
MAX_TRUSTED_AGENTS = 4096

# The URL schemes of the storages below: "<SCHEME_PREFIX><limits' own scheme>".
SCHEME_PREFIX = "agent-sessions+"

# The counters file memory:// counts in, when set (by gunicorn.conf.py, for its workers).
COUNTERS_ENV = "_AGENT_SESSIONS_RATELIMIT_COUNTERS"


@functools.lru_cache(maxsize=256)
def parse_limit(value: str) -> RateLimitItem:
    """One limit such as "120/minute", within the bounds (parsed once per distinct string).

    Raises ValueError, with a one-line message, for anything else.
    """
    try:
        items = parse_many(value) if len(value) <= 100 else []
    except ValueError:
        items = []
    if len(items) != 1:
        raise ValueError(f"{value[:100]!r} is not one rate limit such as 30/minute")
    item = items[0]
    # limits reads a period of 0 ("5/0 seconds") as 1: refuse it rather than guess.
    match = SINGLE_EXPR.match(value.strip())
    if match is not None and match.group(3) is not None and int(match.group(3)) == 0:
        raise ValueError(f"{value!r} is out of bounds: {BOUNDS}")
    if not (1 <= item.amount <= MAX_AMOUNT and 1 <= item.get_expiry() <= MAX_PERIOD_SECONDS):
        raise ValueError(f"{value!r} is out of bounds: {BOUNDS}")
    return item


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


def storage_uri(uri: str, strategy: str = "fixed-window") -> str:
    """The URI of this module's storage for the operator's ``memory://`` or ``redis://``.

    ``memory://`` with a counters file given in ``COUNTERS_ENV`` (gunicorn's
    workers) counts in that file; the file keeps fixed windows only, so other
    strategies stay in the process.
    """
    scheme = uri.split(":", 1)[0]
    counters = os.environ.get(COUNTERS_ENV)
    if scheme in MemoryCounters.LIMITS_SCHEMES and counters and strategy == "fixed-window":
        return f"{HOST_SCHEME}://{counters}"
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

    def unreachable(self, err: Exception) -> bool:
        return False  # nothing to reach: whatever is raised here is a bug


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

    def unreachable(self, err: Exception) -> bool:
        """A failed connection or a timeout, as opposed to a command Redis refused (a bug)."""
        module = self.dependency
        return isinstance(err, (module.ConnectionError, module.TimeoutError, OSError))


class LimiterUnavailable(Unavailable):
    """The rate-limit storage is unreachable and the policy is "closed": a 503."""

    source = "rate_limit_storage"  # what was unavailable, for the metrics


@dataclasses.dataclass(frozen=True)
class Window:
    """What one limit says about the current request: the X-RateLimit-* numbers."""

    limit: int
    remaining: int
    reset_at: float  # epoch seconds when the budget is back
    over: bool = False  # this request went past the limit

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
        # Read once, as checked: the decorators count against these.
        self.default_limit = str(config["DEFAULT_LIMIT"])
        self.admin_limit = str(config["ADMIN_LIMIT"])
        uri = str(config["RATELIMIT_STORAGE_URI"])
        self.shared = not uri.startswith("memory:")
        if flag(config["RATELIMIT_REQUIRE_SHARED"]) and not self.shared:
            raise ValueError(
                "RATELIMIT_REQUIRE_SHARED is set but RATELIMIT_STORAGE_URI is memory://, "
                "which counts on one host only (in the process, or for the workers of one "
                "gunicorn server); use a storage shared by every host such as "
                "redis://host:6379/0"
            )
        self.prefix = str(config["RATELIMIT_KEY_PREFIX"] or "")
        self.backoff = float(config["RATELIMIT_FAILURE_BACKOFF"])
        self.extension = Limiter(
            key_func=client_address,
            storage_uri=storage_uri(uri, str(config["RATELIMIT_STRATEGY"])),
            storage_options=storage_options(config),
        )
        try:
            self.extension.init_app(app)
        except ConfigurationError as err:
            raise ValueError(f"rate limits: {err}") from None
        detach_request_hooks(app, self.extension)
        self.enabled = self.extension.enabled
        # Counted inside this process (so per worker when there are several).
        self.per_process = isinstance(self.storage, MemoryStorage)
        self.degraded = False
        self._retry_at = 0.0  # time.monotonic() before which the storage is left alone
        # Client address -> the auth-failure window it has used up (see refuse_if_blocked).
        self._blocked: dict[str, Window] = {}
        # Agent key -> time.monotonic() until which it is known to exist (see count_create).
        self._agents: dict[str, float] = {}
        # The app's metrics (observability.metrics), when on: every decision is counted.
        self.metrics: Any = None

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
        window = self.count(limit, *identifiers)
        if window is not None and window.over:
            raise too_many(f"Rate limit of {limit} exceeded; retry later.", window)

    def count(self, limit: str, *identifiers: str) -> Window | None:
        """Count one request; return its window (also in ``g.rate_limit``), None if uncounted."""
        if not self.enabled:
            return None
        if not all(identifiers):
            # A programming error, not a request error: never count under a blank key.
            raise ValueError(f"empty rate-limit key part in {identifiers!r}")
        item = parse_limit(limit)
        parts = (self.prefix, *identifiers) if self.prefix else identifiers
        kind = identifiers[0]
        if time.monotonic() < self._retry_at:
            self._storage_failed(None, kind)
            return None
        try:
            window = self._hit(item, parts)
        except Exception as err:  # noqa: BLE001 - storage drivers raise anything
            if not getattr(self.storage, "unreachable", lambda _: True)(err):
                # Not an outage: the other requests are counted as usual.
                log.error("rate-limit storage refused to count %s", limit, exc_info=True)
                self._decided(kind, "failed_open")
                return None
            self._retry_at = time.monotonic() + self.backoff
            self._storage_failed(err, kind)
            return None
        if self.degraded:
            self.degraded = False
            log.warning("rate-limit storage answers again; limits are enforced again")
        g._get_current_object().rate_limit = window
        if self.metrics is not None:
            # Limits counted per API key carry its id (second part); auth failures, an address.
            key_id = identifiers[1] if kind != "auth-failure" else None
            self.metrics.window(kind, key_id, window)
        return window

    def _decided(self, kind: str, decision: str) -> None:
        if self.metrics is not None:
            self.metrics.decision(kind, decision)

    def _hit(self, item: RateLimitItem, parts: tuple[str, ...]) -> Window:
        strategy, storage = self.strategy, self.storage
        if isinstance(strategy, FixedWindowRateLimiter) and hasattr(storage, "incr_with_reset"):
            count, reset_at = storage.incr_with_reset(item.key_for(*parts), item.get_expiry())
            return Window(item.amount, max(0, item.amount - count), reset_at, count > item.amount)
        # Other strategies or storages: two calls (more round trips).
        allowed = strategy.hit(item, *parts)
        reset_at, remaining = strategy.get_window_stats(item, *parts)
        return Window(item.amount, max(0, remaining), reset_at, not allowed)

    def _storage_failed(self, err: Exception | None, kind: str) -> None:
        if err is not None and not self.degraded:
            log.warning(
                "rate-limit storage unreachable (%s: %s); %s until it answers",
                type(err).__name__,
                err,
                "requests are refused with 503" if self.fail_closed else "limits are not enforced",
            )
        self.degraded = True
        self._decided(kind, "failed_closed" if self.fail_closed else "failed_open")
        if self.fail_closed:
            retry_after = max(1, math.ceil(self._retry_at - time.monotonic()))
            raise LimiterUnavailable("rate-limit storage unreachable", retry_after=retry_after)

    def refuse_if_blocked(self) -> None:
        """429 for an address that has used up ``AUTH_FAILURE_LIMIT``, until its window ends.

        Checked before any key is read, so that past the limit a right key
        cannot be told from a wrong one, and guessing gets no faster than the
        limit. Each process remembers the addresses it saw use up the limit
        (no storage round trip per request): with one process, or with Redis
        from the first failure each worker sees past the limit.
        """
        if not self._blocked:
            return
        address = client_address()
        window = self._blocked.get(address)
        if window is None:
            return
        if window.reset_at <= time.time():
            self._blocked.pop(address, None)
            return
        g.rate_limit = window
        self._decided("auth-failure", "limited")
        raise too_many("Too many failed authentications from this address; retry later.", window)

    def count_auth_failure(self) -> None:
        """One failed authentication from this client address (429 past the limit)."""
        limit = current_app.config["AUTH_FAILURE_LIMIT"]
        address = client_address()
        window = self.count(limit, "auth-failure", address)
        if window is None or window.remaining > 0:
            return
        if len(self._blocked) >= MAX_BLOCKED_ADDRESSES:
            now = time.time()
            self._blocked = {a: w for a, w in self._blocked.items() if w.reset_at > now}
            if len(self._blocked) >= MAX_BLOCKED_ADDRESSES:
                self._blocked.clear()  # a flood of addresses: forget, the storage still counts
        self._blocked[address] = dataclasses.replace(window, over=True)
        if window.over:
            raise too_many(f"Rate limit of {limit} exceeded; retry later.", window)

    def count_create(self, key: Any, agent_key: str) -> None:
        """A POST to an agent's sessions: the creation limit if the key may create there.

        Only an agent that exists gets a counter of its own, so made-up agent
        keys in URLs leave no state behind. The price is one storage read by
        primary key, once a second per agent and process (measured on SQLite
        about a third of the storage's own create; on memory:// and
        PostgreSQL a fifth to a third).
        """
        if key.allows(agent_key, CREATE_SCOPE) and self._agent_exists(agent_key):
            self.hit(create_limit(key), "create", key.id, agent_key)
        else:
            self.hit(current_app.config["DEFAULT_LIMIT"], "api", key.id)

    def _agent_exists(self, agent_key: str) -> bool:
        now = time.monotonic()
        if self._agents.get(agent_key, 0.0) > now:
            return True
        try:
            current_app.extensions["agent_sessions"].storage.get_agent(agent_key=agent_key)
        except AgentNotFound:
            return False
        if len(self._agents) >= MAX_TRUSTED_AGENTS:
            self._agents.clear()
        self._agents[agent_key] = now + AGENT_TRUST_SECONDS
        return True


def too_many(message: str, window: Window) -> ApiError:
    return ApiError(
        429, "rate_limit_exceeded", message, headers={"Retry-After": str(window.retry_after())}
    )


def create_limit(key: Any) -> str:
    """The key's own creation limit, or ``SESSION_CREATE_LIMIT``.

    A key stored before limits were bounded may hold one out of bounds: it is
    ignored, with a warning, rather than sent to the storage.
    """
    own = key.create_limit
    if own:
        try:
            parse_limit(own)
            return own
        except ValueError as err:
            log.warning("API key %s: create_limit ignored (%s)", key.id, err)
    return current_app._get_current_object().config["SESSION_CREATE_LIMIT"]


def current() -> RateLimits:
    return current_app._get_current_object().extensions["agent_sessions"].limits


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


def _limited(view: Callable, count: Callable[[Any, dict[str, Any]], None]) -> Callable:
    @functools.wraps(view)
    def wrapper(**kwargs: Any) -> Any:
        count(g._get_current_object().api_key, kwargs)
        return view(**kwargs)

    # Flask's automatic OPTIONS answer would skip the view, and with it the
    # limit and the permission check: OPTIONS is a 405 instead (see README).
    wrapper.provide_automatic_options = False  # type: ignore[attr-defined]
    return wrapper


def per_key(view: Callable) -> Callable:
    """The view counts against ``DEFAULT_LIMIT`` for the calling key."""

    def count(key: Any, _: dict[str, Any]) -> None:
        limits = current()
        limits.hit(limits.default_limit, "api", key.id)

    return _limited(view, count)


def per_admin_key(view: Callable) -> Callable:
    """The view counts against ``ADMIN_LIMIT`` for the calling key."""

    def count(key: Any, _: dict[str, Any]) -> None:
        limits = current()
        limits.hit(limits.admin_limit, "admin", key.id)

    return _limited(view, count)


def creates(view: Callable) -> Callable:
    """The view creates a session: see :meth:`RateLimits.count_create`."""
    return _limited(view, lambda key, args: current().count_create(key, args["agent_key"]))


def guard_authentication(authenticate: Callable[[Flask, Any], Any]) -> Callable[[], Any]:
    """Wrap the authentication hook with ``AUTH_FAILURE_LIMIT`` per client address."""

    @functools.wraps(authenticate)
    def hook() -> Any:
        app, req = current_app._get_current_object(), request._get_current_object()
        if not needs_key(app, req):
            return None  # public pages answer whoever asks
        limits = app.extensions["agent_sessions"].limits
        limits.refuse_if_blocked()
        try:
            return authenticate(app, req)
        except ApiError as err:
            if err.status == 401:
                limits.count_auth_failure()
            raise

    return hook


def headers(state: Any) -> list[tuple[str, str]]:
    """The X-RateLimit-* headers of the limit this request counted against, if any
    (``state``: the request's ``g``)."""
    window = state.get("rate_limit")
    if window is None:
        return []
    return [
        ("X-RateLimit-Limit", str(window.limit)),
        ("X-RateLimit-Remaining", str(window.remaining)),
        ("X-RateLimit-Reset", str(math.ceil(window.reset_at))),
    ]
