"""The API key views (admin): create, list, revoke."""

from __future__ import annotations

import dataclasses
from typing import Any

from flask import request

from storage_backends import ApiKey, Grant
from storage_backends.codec import utcnow

from ..corridor import auth, idempotency, rate_limits
from ..corridor.errors import ApiError
from ..openapi.examples import (
    API_KEY_REQUEST,
)
from ..schemas import (
    ApiKeyCreatedSchema,
    ApiKeyCreateSchema,
    ApiKeyListSchema,
    ListQuerySchema,
)
from .endpoint import bp, endpoint, page_body, service


@bp.post("/api_keys")
@rate_limits.per_admin_key
@auth.require_admin
@endpoint(
    "API keys",
    201,
    ApiKeyCreatedSchema,
    body=ApiKeyCreateSchema,
    examples={"request": API_KEY_REQUEST},
)
def create_api_key(body: dict[str, Any]) -> Any:
    """Create an API key; its secret appears in this response only."""
    if idempotency.ENVIRON_KEY in request.environ:
        # A replay would show the secret twice; a retry that must not make a second
        # key looks for the first by name (GET /api_keys) instead.
        raise ApiError(
            400,
            "invalid_request",
            f"{idempotency.HEADER}: not taken here: a key's secret is shown once only.",
        )
    body["grants"] = [Grant(grant["agent"], tuple(grant["scopes"])) for grant in body["grants"]]
    key, token = auth.new_api_key(**body)
    return NewApiKey(**vars(key), secret=token)


@dataclasses.dataclass
class NewApiKey(ApiKey):
    """A key just made, with its token: the one answer that shows it."""

    secret: str = ""


@bp.get("/api_keys")
@rate_limits.per_admin_key
@auth.require_admin
@endpoint("API keys", 200, ApiKeyListSchema, query=ListQuerySchema)
def list_api_keys(query: dict[str, Any]) -> Any:
    """List API keys (never their secrets)."""
    return page_body(service().storage.list_api_keys(**query), "api_keys")


@bp.delete("/api_keys/<api_key_id:key_id>")
@rate_limits.per_admin_key
@auth.require_admin
@endpoint("API keys", 204)
def revoke_api_key(key_id: str) -> None:
    """Revoke an API key."""
    service().storage.revoke_api_key(key_id=key_id, now=utcnow())
    service().key_cache.forget(key_id)  # this worker sees the revocation at once
