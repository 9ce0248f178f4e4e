"""API keys: minting, hashing, authentication hook and permission checks."""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import Any

from flask import Flask, Request, current_app, g

from storage_backends import ApiKey, ApiKeyNotFound, Grant, Storage
from storage_backends.codec import utcnow

from ..naming import KEY_ID_PREFIX
from ..observability import metrics
from .errors import ApiError
from .keycache import KeyCache

_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def mint_key() -> tuple[str, str, str]:
    """A new key as (key id, full token shown once, hash of its secret)."""
    key_id = KEY_ID_PREFIX + secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return key_id, f"{key_id}.{secret}", hash_secret(secret)


def resolve(storage: Storage, token: str) -> ApiKey | None:
    """The active key behind ``token``, or None. One lookup by id, then a constant-time compare."""
    return check_token(storage, token)[0]


def check_token(
    storage: Storage, token: str, cache: KeyCache | None = None
) -> tuple[ApiKey | None, str]:
    """The active key behind ``token`` and "ok", or None and why not.

    The reasons (the ``reason`` label of the auth-failure metric): ``missing``,
    ``malformed``, ``unknown_key``, ``wrong_secret``, ``expired``, ``revoked``.
    With ``cache``, a key found less than a second ago is not read again; the
    secret and the expiry are still checked here on every call.
    """
    if not token:
        return None, "missing"
    key_id, _, secret = token.partition(".")
    if not key_id.startswith(KEY_ID_PREFIX) or not secret or len(token) > 200:
        return None, "malformed"
    try:
        if cache is None:
            key = storage.get_api_key(key_id=key_id)
        else:
            key = cache.get(storage, key_id)
    except ApiKeyNotFound:
        hmac.compare_digest(hash_secret(secret), _DUMMY_HASH)
        return None, "unknown_key"
    if not hmac.compare_digest(hash_secret(secret), key.secret_hash):
        return None, "wrong_secret"
    state = key.state(utcnow())
    return (key, "ok") if state == "active" else (None, state)


def presented_token(environ: dict[str, Any]) -> str:
    """The key from ``x-api-key`` or ``Authorization: Bearer``; never from the query string.

    ``environ`` is the request's (as request.headers reads them, without its KeyError
    when absent). An empty ``x-api-key`` counts as absent, so it cannot hide a Bearer key.
    """
    token = environ.get("HTTP_X_API_KEY", "").strip()
    if not token:
        scheme, _, value = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() == "bearer":
            token = value.strip()
    return token or ""


def public(view: Callable) -> Callable:
    """Mark a view as answering without an API key."""
    view.public = True  # type: ignore[attr-defined]
    return view


def needs_key(app: Flask, req: Request) -> bool:
    """Whether this request's view needs an API key (an unknown route or a public view does not)."""
    view = app.view_functions.get(req.endpoint or "")
    return view is not None and not getattr(view, "public", False)


def authenticate(app: Flask, req: Request) -> None:
    """The request's key must be valid (else 401); it is kept in ``g.api_key``.

    The blueprint's before-request hook, under :func:`rate_limits.guard_authentication`,
    which calls it only for views that :func:`needs_key`, with the app and the request
    at hand (each read through Flask's proxies costs more than the object).
    """
    service = app.extensions["agent_sessions"]
    key, reason = check_token(service.storage, presented_token(req.environ), service.key_cache)
    if key is None:
        metrics.auth_failure(reason)
        raise ApiError(401, "unauthorized", "Missing or invalid API key.")
    g._get_current_object().api_key = key


def require(scope: str, *others: str) -> Callable:
    """The key must hold ``scope`` (or one of ``others``) on the agent in the URL (else 403,
    whether it exists or not). With several, the view checks which one its input needs
    (:func:`check`)."""
    scopes = (scope, *others)

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapper(agent_key: str, **kwargs: Any) -> Any:
            key = g._get_current_object().api_key
            if not any(key.allows(agent_key, one) for one in scopes):
                needed = " or ".join(scopes)
                raise ApiError(403, "forbidden", f"This key lacks {needed} on this agent.")
            return view(agent_key=agent_key, **kwargs)

        wrapper.scope = " or ".join(scopes)  # type: ignore[attr-defined]
        return wrapper

    return decorator


def check(agent_key: str, scope: str, where: str = "this agent") -> None:
    """403 unless the request's key holds ``scope`` on ``agent_key`` (``where`` says which)."""
    if not g._get_current_object().api_key.allows(agent_key, scope):
        raise ApiError(403, "forbidden", f"This key lacks {scope} on {where}.")


def require_admin(view: Callable) -> Callable:
    @functools.wraps(view)
    def wrapper(**kwargs: Any) -> Any:
        if not g._get_current_object().api_key.admin:
            raise ApiError(403, "forbidden", "This operation needs an admin key.")
        return view(**kwargs)

    wrapper.scope = "admin"  # type: ignore[attr-defined]
    return wrapper


def new_api_key(
    *,
    name: str,
    grants: list[Grant],
    admin: bool = False,
    create_limit: str | None = None,
    expires_at: Any = None,
) -> tuple[ApiKey, str]:
    """Store a new key; return it with its token (the only time the token exists)."""
    key_id, token, secret_hash = mint_key()
    key = ApiKey(
        id=key_id,
        name=name,
        secret_hash=secret_hash,
        grants=grants,
        admin=admin,
        create_limit=create_limit,
        created_at=utcnow(),
        expires_at=expires_at,
    )
    storage = current_app.extensions["agent_sessions"].storage
    return storage.create_api_key(api_key=key), token
