"""The HTTP corridor: request id first, one after-request hook, strict JSON bodies, cursors.

Every request the service answers walks the same way: :func:`start_request`
gives it an id (before anything else can fail), the blueprint's hooks and the
view run, and :func:`contract_headers` sets the headers of the contract on the
answer. Bodies are read by :func:`json_object`, which turns anything but a
strict UTF-8 JSON object into a 400, 413 or 415; list positions travel as
opaque page keys (:func:`encode_cursor`, :func:`decode_cursor`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from typing import Any

from flask import Blueprint, current_app, g, request
from werkzeug.exceptions import (
    ClientDisconnected,
    HTTPException,
    NotFound,
    RequestEntityTooLarge,
)
from werkzeug.routing import BaseConverter
from werkzeug.wrappers import Response

from .. import naming
from ..observability import metrics
from . import errors, rate_limits
from .request_id import request_id

# Blueprint names of the service's own answers (the API and its docs page).
SERVICE_BLUEPRINT = "agent_sessions"


# Path parameters: a segment outside its pattern matches no route (a JSON 404),
# so it never reaches the limiter or storage.


class RecordKeyConverter(BaseConverter):
    """An agent or session key: 1 to 64 letters, digits, '_' or '-'."""

    regex = rf"[{naming.KEY_CHARS}]{{1,{naming.KEY_MAX_LENGTH}}}"


class ApiKeyIdConverter(BaseConverter):
    """An API key id: ``ak_`` and at most 61 more key characters."""

    regex = rf"{naming.KEY_ID_PREFIX}[{naming.KEY_CHARS}]{{1,{naming.KEY_MAX_LENGTH - 3}}}"


class EventIdConverter(BaseConverter):
    """An event id: ``aev_`` and then letters and digits, at most 64 characters in all."""

    regex = rf"{naming.EVENT_ID_PREFIX}[0-9A-Za-z]{{1,{naming.EVENT_ID_MAX_LENGTH - 4}}}"


CONVERTERS = {
    "record_key": RecordKeyConverter,
    "api_key_id": ApiKeyIdConverter,
    "event_id": EventIdConverter,
}


class ServiceBlueprint(Blueprint):
    """A blueprint whose routes match the path as sent: ``//`` is a 404, never a redirect.

    Werkzeug merges repeated slashes by answering 308 to the merged path (an HTML
    body, a Location built from the Host header), before any hook of ours runs.
    """

    def add_url_rule(self, rule: str, *args: Any, **options: Any) -> None:
        options.setdefault("merge_slashes", False)
        super().add_url_rule(rule, *args, **options)


# The hooks below read the request, g and the app once each, through
# _get_current_object: on Python 3.11 every attribute read on a Flask proxy first
# fails on the proxy itself (an AttributeError made and dropped), some 5,000
# instructions against some 1,300 for the object.


def is_service_request(req: Any, app: Any) -> bool:
    """Whether this request is the service's: one of its blueprints, or a routing error under
    its prefix (no view matched, so no blueprint is known)."""
    blueprint = req.blueprint
    if blueprint is not None:
        return blueprint == SERVICE_BLUEPRINT or blueprint.startswith(SERVICE_BLUEPRINT + ".")
    prefix = app.extensions["agent_sessions"].url_prefix.rstrip("/") + "/"
    return (req.path + "/").startswith(prefix)


def start_request() -> Response | None:
    """The app's first before-request hook: the request id, then routing errors in JSON.

    Routing errors (404, 405) never reach a blueprint's handlers, as no view
    matched, so under the service's prefix they are answered here in the error
    shape; elsewhere they stay the host application's business.
    """
    req, app = request._get_current_object(), current_app._get_current_object()
    request_id(g._get_current_object(), req.environ)
    counted = app.extensions["agent_sessions"].metrics
    if counted is not None:
        metrics.request_started(counted, req)
    err = req.routing_exception
    if isinstance(err, HTTPException) and err.code in (404, 405) and is_service_request(req, app):
        if "//" in req.path:
            # A host's map merges slashes to find a rule: the path as sent names none.
            err = NotFound()
        return errors.handle_http_exception(err)
    if _encoded_slash(req.environ) and is_service_request(req, app):
        # No key or id holds a "/": an encoded one is not a path separator to route by.
        return errors.handle_http_exception(NotFound())
    return None


def _encoded_slash(environ: dict[str, Any]) -> bool:
    """Whether the path as sent (before decoding) holds ``%2F``, which WSGI decodes to ``/``."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    return "%2f" in raw.split("?", 1)[0].lower()


def contract_headers(response: Response) -> Response:
    """The one after-request hook: the headers the contract puts on the service's answers.

    API and docs answers carry X-Request-ID, nosniff, Cache-Control: no-store
    (unless the view chose one, as the docs assets do) and the X-RateLimit-*
    headers of the limit the request counted against. The standalone app's other
    answers (health checks, unknown paths) carry the first two; a host's own
    routes are left alone.
    """
    req, app = request._get_current_object(), current_app._get_current_object()
    extension = app.extensions["agent_sessions"]
    if extension.metrics is not None:
        metrics.request_finished(extension.metrics, req, response.status_code)
    service = is_service_request(req, app)
    if not service and not extension.owns_app:
        return response
    state = g._get_current_object()
    headers = response.headers
    rid = request_id(state, req.environ)
    # Nothing before this hook sets these two (one extend: each set scans the headers).
    added = [("X-Request-ID", rid), ("X-Content-Type-Options", "nosniff")]
    if service:
        # Not "in": Headers answers it by raising a KeyError (an exception per request).
        if not any(name.lower() == "cache-control" for name, _ in headers.items()):
            added.append(("Cache-Control", "no-store"))
        added += rate_limits.headers(state)
    headers.extend(added)
    if response.status_code in (204, 304) or (req.method == "OPTIONS" and not response.data):
        headers.pop("Content-Type", None)  # no body, so no type
    return response


# Cursors


def encode_cursor(position: int | None) -> str | None:
    if position is None:
        return None
    return base64.urlsafe_b64encode(f"v1:{position}".encode()).decode().rstrip("=")


def decode_cursor(page_key: str) -> int:
    """The position in a page key, or ValueError."""
    return _position(_unpack(page_key))


def _unpack(page_key: str) -> str:
    try:
        return base64.urlsafe_b64decode(page_key + "=" * (-len(page_key) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError(page_key) from None


def _position(raw: str) -> int:
    version, _, position = raw.partition(":")
    # Positions are 64-bit signed integers in every backend: larger ones never exist.
    if version != "v1" or not position.isdigit() or len(position) > 19:
        raise ValueError(raw)
    if int(position) > INT64_MAX:
        raise ValueError(raw)
    return int(position)


def _cursor_tag(scope: str, descending: bool) -> str:
    digest = hashlib.blake2b(scope.encode(), digest_size=6).hexdigest()
    return ("d" if descending else "a") + digest


def encode_scoped_cursor(position: int | None, *, scope: str, descending: bool) -> str | None:
    """A page key that only the list it came from (``scope``, direction) accepts back."""
    if position is None:
        return None
    raw = f"v1:{position}:{_cursor_tag(scope, descending)}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_scoped_cursor(page_key: str, *, scope: str, descending: bool) -> int:
    """The position in a page key of :func:`encode_scoped_cursor`, or ValueError.

    A page key of another list, or of the same list in the other direction, is
    refused: its position means nothing there.
    """
    head, _, tag = _unpack(page_key).rpartition(":")
    if tag != _cursor_tag(scope, descending):
        raise ValueError(page_key)
    return _position(head)


# Strict JSON request bodies.
#
# Stock ``request.get_json`` answers 500 to deeply nested JSON (RecursionError),
# accepts NaN and duplicate keys, and lets lone surrogates through to storage.
# This parser turns every such body into a 400 and a wrong content type into 415.

INT64_MAX = 2**63 - 1
# A \u escape of a surrogate half, which JSON allows but UTF-8 cannot store.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class _BadJSON(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _BadJSON(f"duplicate key {key!r}")
            seen.add(key)
    return result


def _bounded_int(text: str) -> int:
    # Twenty characters hold every 64-bit integer; a longer text is out of range
    # without converting it (Python refuses over 4,300 digits, in its own words).
    if len(text) > 20:
        raise _BadJSON("integer out of the 64-bit range")
    value = int(text)
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise _BadJSON("integer out of the 64-bit range")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadJSON("number out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise _BadJSON(f"{name} is not valid JSON")


def _check_strings(value: Any) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise _BadJSON("strings must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _BadJSON("strings must not contain unpaired surrogates") from None
    elif isinstance(value, dict):
        for key, child in value.items():
            _check_strings(key)
            _check_strings(child)
    elif isinstance(value, list):
        for child in value:
            _check_strings(child)


_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates,
    parse_int=_bounded_int,
    parse_float=_finite_float,
    parse_constant=_reject_constant,
)


def parse(raw: bytes) -> Any:
    """Parse a JSON document, raising ValueError for anything not strictly valid."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadJSON("the body is not valid UTF-8") from None
    try:
        data = _DECODER.decode(text)  # json.loads would build a decoder per call
    except RecursionError:
        raise _BadJSON("the body is nested too deeply") from None
    # Escapes can produce NUL or unpaired surrogates; look closer only when one may be there.
    if "\\u0000" in text or _SURROGATE_ESCAPE.search(text):
        try:
            _check_strings(data)
        except RecursionError:
            raise _BadJSON("the body is nested too deeply") from None
    return data


def _unsupported(message: str) -> errors.ApiError:
    return errors.ApiError(415, "unsupported_media_type", message)


def read_body(limit: int, req: Any) -> bytes:
    """The raw body of request ``req``, at most ``limit`` bytes (else 413), or 400 when the
    stream is malformed."""
    req.max_content_length = limit  # the service's own bound, whatever the host's
    environ = req.environ
    declared = req.content_length
    try:
        if declared is not None and "wsgi.input_terminated" in environ:
            return _read_declared(environ["wsgi.input"], declared, limit)
        raw = req.get_data(cache=False)  # raises 413 past the limit
        if declared is None and len(raw) >= limit:
            # Werkzeug cuts a streamed (chunked) body at the limit without an error, so
            # a longer one would be parsed truncated; one more byte tells if it went on.
            if req.environ["wsgi.input"].read(1):
                raise RequestEntityTooLarge()
    except (HTTPException, TimeoutError) as err:
        # A read past the server's deadline for the body (socket.timeout), which
        # Werkzeug reports as a client gone (ClientDisconnected, a 400).
        if isinstance(err, TimeoutError) or isinstance(err.__context__, TimeoutError):
            raise errors.ApiError(
                408, "invalid_request", "The request body was not sent in time."
            ) from None
        raise
    except Exception:
        # The server could not decode the body it was sent (a chunk size that is not
        # hex, a chunk shorter than its size): the client's fault, whatever the server.
        raise errors.ApiError(
            400, "invalid_request", "The body could not be read: malformed transfer encoding."
        ) from None
    return raw


def _read_declared(stream: Any, length: int, limit: int) -> bytes:
    """A body of a declared length from a server that ends the stream there
    (``wsgi.input_terminated``): one read, where Werkzeug's wrapper of the stream
    reads it a chunk at a time. The same refusals: 413 past the limit, and a
    client gone (or too slow, ``socket.timeout``) is Werkzeug's ClientDisconnected."""
    if length > limit:
        raise RequestEntityTooLarge()
    try:
        return stream.read(length)
    except (OSError, ValueError) as err:
        raise ClientDisconnected() from err


def json_object(limit: int | None, req: Any) -> dict[str, Any]:
    """The body of request ``req`` as a JSON object, or an ApiError (400, 413, 415).

    ``limit``: its bytes at most (None: the service's ``max_body``).
    """
    # application/json only: a +json type names a format of its own (merge-patch,
    # json-patch, ...) whose meaning this API does not apply.
    if req.mimetype != "application/json":
        raise _unsupported("The body must be JSON (application/json).")
    charset = req.mimetype_params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise _unsupported("JSON bodies must be UTF-8.")
    environ = req.environ
    encoding = environ.get("HTTP_CONTENT_ENCODING", "identity").strip().lower()
    if encoding not in ("identity", ""):
        raise _unsupported("Content-Encoding is not supported; send the body as it is.")
    # The server decodes chunked framing only: any other transfer coding (gzip,
    # chunked) would reach the parser still coded. 501, as the server answers it.
    codings = environ.get("HTTP_TRANSFER_ENCODING", "").lower().split(",")
    if any(coding.strip() not in ("chunked", "identity", "") for coding in codings):
        raise errors.ApiError(
            501, "invalid_request", "Transfer-Encoding other than chunked is not supported."
        )
    if limit is None:
        limit = current_app._get_current_object().extensions["agent_sessions"].max_body
    raw = read_body(limit, req)
    try:
        data = parse(raw)
    except ValueError as err:
        raise errors.ApiError(
            400, "invalid_request", f"The body is not valid JSON: {err}"
        ) from None
    if not isinstance(data, dict):
        raise errors.ApiError(400, "invalid_request", "The body must be a JSON object.")
    return data
