"""Console sign-ins: an API key exchanged for a server-side session, a cookie and a CSRF token.

The browser never holds the API key. Signing in checks it as the API does
(``auth.check_token``, the failed-authentication limit per client address),
then stores a :class:`ConsoleSession` in the service's storage, shared by every
worker and host: the SHA-256 of a random token, the key's id, a random CSRF
token and an expiry. The cookie carries the token (HttpOnly, SameSite=Strict,
Secure over HTTPS, path /console). A new token is made at every sign-in (no
session fixation), and every request checks the key again, so a revoked or
expired key ends its console sessions at their next request.

Before a session exists, the sign-in form is bound to the browser by a second
random value, in a cookie and in the form (login CSRF: another site cannot
sign a visitor in as someone else).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import secrets
from typing import Any

from flask import current_app, request
from werkzeug.wrappers import Response

from .service import (
    ApiKeyNotFound,
    ConsoleSession,
    ConsoleSessionNotFound,
    auth,
    extension,
    limits,
    metrics,
    storage,
    utcnow,
)

COOKIE = "agent_sessions_console"
LOGIN_COOKIE = "agent_sessions_console_login"
COOKIE_PATH = "/console"
LOGIN_SECONDS = 60 * 60  # how long a sign-in form stays good
TOKEN_BYTES = 32


@dataclasses.dataclass
class Principal:
    """Who a console request acts as: its stored sign-in and the API key behind it."""

    console_session: ConsoleSession
    key: Any  # storage_backends.ApiKey

    @property
    def csrf_token(self) -> str:
        return self.console_session.csrf_token


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def current() -> tuple[Principal | None, str | None]:
    """The request's principal, or None and why (``"ended"``: the key was revoked or expired;
    None: no sign-in, or it ran out)."""
    token = request.cookies.get(COOKIE, "")
    if not token or len(token) > 100:
        return None, None
    store, now = storage(), utcnow()
    token_hash = hash_token(token)
    try:
        found = store.get_console_session(token_hash=token_hash, now=now)
    except ConsoleSessionNotFound:
        return None, "expired"
    try:
        key = extension().key_cache.get(store, found.key_id)
    except ApiKeyNotFound:
        key = None
    if key is None or not key.active(now):
        store.delete_console_session(token_hash=token_hash)
        return None, "ended"
    return Principal(found, key), None


def check_key(token: str) -> Any:
    """The active API key behind ``token``, or None; a failure counts against
    ``AUTH_FAILURE_LIMIT`` for this address, as on the API (429 past it)."""
    rate = limits()
    rate.refuse_if_blocked()
    key, reason = auth.check_token(storage(), token.strip(), extension().key_cache)
    if key is None:
        metrics.auth_failure(reason)
        rate.count_auth_failure()
    return key


def start(key: Any) -> tuple[str, ConsoleSession]:
    """A new sign-in for ``key``: its token (for the cookie only) and the stored record."""
    now = utcnow()
    minutes = current_app.config["CONSOLE_SESSION_MINUTES"]
    token = secrets.token_urlsafe(TOKEN_BYTES)
    record = ConsoleSession(
        token_hash=hash_token(token),
        key_id=key.id,
        csrf_token=secrets.token_urlsafe(TOKEN_BYTES),
        created_at=now,
        expires_at=now + dt.timedelta(minutes=minutes),
    )
    return token, storage().create_console_session(console_session=record)


def end() -> None:
    """End the sign-in the request's cookie names, if any."""
    token = request.cookies.get(COOKIE, "")
    if token and len(token) <= 100:
        storage().delete_console_session(token_hash=hash_token(token))


def set_cookie(response: Response, token: str) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=current_app.config["CONSOLE_SESSION_MINUTES"] * 60,
        path=COOKIE_PATH,
        secure=request.is_secure,
        httponly=True,
        samesite="Strict",
    )
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH)


def clear_cookie(response: Response) -> None:
    response.delete_cookie(
        COOKIE, path=COOKIE_PATH, secure=request.is_secure, httponly=True, samesite="Strict"
    )


def same(given: Any, expected: str) -> bool:
    """Constant-time equality of a submitted token with the expected one."""
    if not isinstance(given, str) or not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def login_token() -> str:
    """The sign-in form's value: the browser's login cookie, or a new one (see
    :func:`keep_login_token`)."""
    value = request.cookies.get(LOGIN_COOKIE, "")
    if not value or len(value) > 100:
        value = secrets.token_urlsafe(TOKEN_BYTES)
    return value


def keep_login_token(response: Response, value: str) -> None:
    response.set_cookie(
        LOGIN_COOKIE,
        value,
        max_age=LOGIN_SECONDS,
        path=COOKIE_PATH,
        secure=request.is_secure,
        httponly=True,
        samesite="Strict",
    )


def login_form_is_ours() -> bool:
    return same(request.form.get("login_token"), request.cookies.get(LOGIN_COOKIE, ""))
