"""Rate limits: Flask-Limiter's storage and strategy, applied on the routes after authentication.

Flask-Limiter owns the storage (``RATELIMIT_STORAGE_URI``) and the strategy
(``RATELIMIT_STRATEGY``). The limits that depend on the authenticated key are
applied by the views through :meth:`RateLimits.hit`, which calls the limiter
strategy directly: the decision and the numbers for the ``X-RateLimit-*``
headers come from one hit plus one stats read, with none of the extension's
per-request route resolution.
"""

from __future__ import annotations

import functools
import logging
import math
import time

from flask import Flask, current_app, g, request
from flask_limiter import Limiter
from limits import RateLimitItem, parse_many
from werkzeug.wrappers import Response

from storage_backends import Unavailable

from .errors import ApiError

log = logging.getLogger(__name__)

FAILURE_POLICIES = ("open", "closed")


@functools.lru_cache(maxsize=256)
def parse_limit(value: str) -> RateLimitItem:
    """One limit such as "120/minute" (parsed once per distinct string)."""
    items = parse_many(value)
    if len(items) != 1:
        raise ValueError(f"expected exactly one rate limit, got {value!r}")
    return items[0]


def client_address() -> str:
    # Never empty: an empty limit key would make the limit silently skip.
    return request.remote_addr or "unknown"


class RateLimits:
    """Per-app limiter state, kept in ``app.extensions["agent_sessions"]``."""

    def __init__(self, app: Flask):
        config = app.config
        policy = config["RATELIMIT_FAILURE_POLICY"]
        if policy not in FAILURE_POLICIES:
            raise ValueError(f"RATELIMIT_FAILURE_POLICY must be one of {FAILURE_POLICIES}")
        self.fail_closed = policy == "closed"
        parse_limit(config["SESSION_CREATE_LIMIT"])
        parse_limit(config["AUTH_FAILURE_LIMIT"])
        self.extension = Limiter(key_func=client_address)
        # Nothing is limited by the extension's own before-request pass: every
        # limit here needs the authenticated key, so the views apply them.
        self.extension.request_filter(lambda: True)
        self.extension.init_app(app)
        self.degraded = False

    @property
    def strategy(self):
        return self.extension.limiter

    def check(self) -> bool:
        """True when the limiter storage answers."""
        try:
            return bool(self.extension.storage.check())
        except Exception:  # noqa: BLE001 - any storage failure means "not ready"
            return False

    def hit(self, limit: str, *identifiers: str) -> None:
        """Count one request against ``limit`` for ``identifiers``; raise 429 past it.

        The numbers are kept for the response headers. When the storage fails,
        the request passes (policy "open", logged) or gets a 503 ("closed").
        """
        item = parse_limit(limit)
        try:
            allowed = self.strategy.hit(item, *identifiers)
            reset_at, remaining = self.strategy.get_window_stats(item, *identifiers)
        except Exception as err:  # noqa: BLE001 - storage drivers raise anything
            self.degraded = True
            if self.fail_closed:
                raise Unavailable(f"rate-limit storage: {err}", retry_after=1) from err
            log.warning("rate-limit storage failed, request allowed: %s", type(err).__name__)
            return
        self.degraded = False
        g.rate_limit = (item.amount, remaining, reset_at)
        if not allowed:
            raise ApiError(
                429,
                "rate_limit_exceeded",
                f"Rate limit of {limit} exceeded; retry later.",
                headers={"Retry-After": str(max(1, math.ceil(reset_at - time.time())))},
            )

    def count_auth_failure(self) -> None:
        self.hit(current_app.config["AUTH_FAILURE_LIMIT"], "auth-failure", client_address())


def add_headers(response: Response) -> Response:
    """After-request: the X-RateLimit-* headers of the limit this request counted against."""
    numbers = g.get("rate_limit")
    if numbers is not None:
        limit, remaining, reset_at = numbers
        response.headers["X-RateLimit-Limit"] = str(limit)
        response.headers["X-RateLimit-Remaining"] = str(remaining)
        response.headers["X-RateLimit-Reset"] = str(math.ceil(reset_at))
    return response
