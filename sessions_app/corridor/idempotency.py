"""Idempotency-Key: a retried create answers what the first one did, and writes nothing twice.

A POST that creates something (a session, an event, a batch of events, an
agent) may carry one ``Idempotency-Key``: 1 to 255 printable ASCII
characters but the comma (repeated fields arrive joined by commas), scoped to
the API key that sends it. The first request with a key claims it
in the storage, committed at once so that every worker and host sees the
claim; then its body is checked by its schema, and the request runs in one
unit of work (``Storage.atomic``) with the record of its answer, so the write
and the answer that remembers it commit together or not at all (the schema's
check holds no writer). A later request with the key gets:

- the same method, path and body (JSON compared as parsed, key order aside):
  the remembered status, headers and body, with ``Idempotent-Replayed: true``
  (a remembered error's ``request_id`` names the retry, as its X-Request-ID does);
- another method, path or body: 422 ``idempotency_key_mismatch``;
- while the first is still in flight: 409 ``idempotency_key_in_use`` with
  ``Retry-After``. A claim whose request died unanswered (its worker killed)
  is taken over by the same request once ``IDEMPOTENCY_KEY_LOCK_SECONDS``
  have passed; should the first still answer after that, its write is undone
  (it no longer holds the key) and it answers 409.

The answers of the operation are remembered, 2xx and 4xx alike, for
``IDEMPOTENCY_KEY_TTL_SECONDS``; a 5xx is not (the retry is processed for
real). Refusals that come before the claim are not either: a missing or
refused key (401, 403), a limit (429), a body that is not a JSON object.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Callable
from typing import Any

from flask import current_app, g, request
from werkzeug.wrappers import Response

from storage_backends import Answer, IdempotencyKeyLost, StorageError
from storage_backends.codec import dump_json, utcnow

from . import errors
from .errors import ApiError
from .request_id import request_id

log = logging.getLogger("sessions_app.idempotency")  # the name log filters select it by

HEADER = "Idempotency-Key"
ENVIRON_KEY = "HTTP_IDEMPOTENCY_KEY"
REPLAYED = "Idempotent-Replayed"
MAX_LENGTH = 255
# Printable ASCII but the comma: a server joins repeated header fields with commas,
# so two keys sent at once would pass for one.
_KEY = re.compile(rf"[\x20-\x2b\x2d-\x7e]{{1,{MAX_LENGTH}}}\Z")
# Set by the server on every answer: not part of what is remembered.
_NOT_REMEMBERED = frozenset({"content-length"})


def requested(environ: dict[str, Any]) -> str | None:
    """The request's Idempotency-Key, None without one; a 400 for a malformed one."""
    value = environ.get(ENVIRON_KEY)
    if value is None:
        return None
    if not _KEY.match(value) or not value.strip(" "):
        raise ApiError(
            400,
            "invalid_request",
            f"{HEADER}: must be one field of 1 to {MAX_LENGTH} printable ASCII characters "
            "other than a comma.",
        )
    return value


def fingerprint(method: str, path: str, body: dict[str, Any]) -> str:
    """What makes two requests the same one: method, path and the body as parsed."""
    try:
        canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    except RecursionError:
        # The parser takes a body nested to a few frames short of the limit; this
        # encoding runs deeper. Such a body is not valid for any create anyway.
        raise ApiError(
            400, "invalid_request", "The body is not valid JSON: the body is nested too deeply"
        ) from None
    digest = hashlib.blake2b(digest_size=16)
    for part in (method, path, canonical):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def remembered(
    key: str,
    body: dict[str, Any],
    respond: Callable[[], Response],
    load: Callable[[], None] | None = None,
) -> Response:
    """Answer the request ``respond`` makes once per ``key``, or the remembered answer.

    ``load`` checks the body (the schema) after the claim and before the unit of
    work, so that the writer is not held for it; its refusal is remembered too.
    """
    storage = current_app.extensions["agent_sessions"].storage
    config = current_app.config
    scope = g.api_key.id
    # The agent in the path keeps the record, in its usage (none for /v2/agents).
    agent_key = (request.view_args or {}).get("agent_key")
    mine = fingerprint(request.method, request.path, body)
    token = secrets.token_hex(16)
    now = utcnow()
    record = storage.claim_idempotency_key(
        scope=scope,
        key=key,
        fingerprint=mine,
        token=token,
        now=now,
        locked_until=now + dt.timedelta(seconds=config["IDEMPOTENCY_KEY_LOCK_SECONDS"]),
        expires_at=now + dt.timedelta(seconds=config["IDEMPOTENCY_KEY_TTL_SECONDS"]),
    )
    if record.fingerprint != mine:
        raise mismatch()
    if record.answer is not None:
        return replay(record.answer)
    if record.token != token:
        raise in_use()

    def finish(response: Response) -> Response:
        answer = Answer(
            response.status_code,
            tuple(
                (name, value)
                for name, value in response.headers.items()
                if name.lower() not in _NOT_REMEMBERED
            ),
            response.get_data(),
        )
        try:
            storage.finish_idempotency_key(
                scope=scope, key=key, token=token, answer=answer, agent_key=agent_key
            )
        except IdempotencyKeyLost:
            raise in_use() from None
        return response

    def release() -> None:
        try:
            storage.release_idempotency_key(scope=scope, key=key, token=token)
        except StorageError as err:  # the claim waits out its lock instead
            log.warning("idempotency key not released: %s", err)

    if load is not None:
        try:
            load()
        except Exception as err:
            refused = errors.client_error_response(err)
            if refused is None:
                release()
                raise
            return finish(refused)
    try:
        with storage.atomic():
            response = respond()
            if response.status_code >= 500:
                raise _ServerError(response)
            return finish(response)
    except _ServerError as failed:  # rolled back; the retry is processed anew
        release()
        return failed.response
    except Exception as err:
        if isinstance(err, ApiError) and err.error == "idempotency_key_in_use":
            raise
        refused = errors.client_error_response(err)
        if refused is None:  # a 5xx: the retry is processed anew
            release()
            raise
        # Rolled back, so nothing was written: the refusal is remembered on its own.
        return finish(refused)


class _ServerError(Exception):
    """A view answered a 5xx without raising: its unit of work is rolled back all the same."""

    def __init__(self, response: Response):
        super().__init__(response.status_code)
        self.response = response


def replay(answer: Answer) -> Response:
    """The remembered answer, marked replayed. A remembered error names its request in
    ``request_id``, which the contract has equal to ``X-Request-ID``: it names this one."""
    body = answer.body
    if answer.status >= 400:
        body = _naming_this_request(body)
    response = current_app.response_class(body, answer.status, list(answer.headers))
    response.headers[REPLAYED] = "true"
    return response


def _naming_this_request(body: bytes) -> bytes:
    try:
        error = json.loads(body)
    except ValueError:
        return body
    if not isinstance(error, dict) or "request_id" not in error:
        return body
    error["request_id"] = request_id()
    return (dump_json(error) + "\n").encode()


def mismatch() -> ApiError:
    return ApiError(
        422,
        "idempotency_key_mismatch",
        f"{HEADER}: this key was used for another request (method, path or body); "
        "a new request needs a new key.",
    )


def in_use() -> ApiError:
    return ApiError(
        409,
        "idempotency_key_in_use",
        f"{HEADER}: a request with this key is still being processed; retry after it.",
        headers={"Retry-After": "1"},
    )
