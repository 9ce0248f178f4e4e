"""Strict JSON request bodies.

Stock ``request.get_json`` answers 500 to deeply nested JSON (RecursionError),
accepts NaN and duplicate keys, and lets lone surrogates through to storage.
This parser turns every such body into a 400 and a wrong content type into 415.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from flask import request
from werkzeug.exceptions import RequestEntityTooLarge

from .errors import ApiError

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


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


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


def json_object() -> dict[str, Any]:
    """The request body as a JSON object, or an ApiError (400, 413, 415)."""
    if not _is_json(request.mimetype):
        raise ApiError(415, "unsupported_media_type", "The body must be JSON (application/json).")
    charset = request.mimetype_params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise ApiError(415, "unsupported_media_type", "JSON bodies must be UTF-8.")
    raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    limit = request.max_content_length
    if limit is not None and request.content_length is None and len(raw) >= limit:
        # Werkzeug cuts a streamed (chunked) body at the limit without an error, so
        # a longer one would be parsed truncated; one more byte tells if it went on.
        if request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
    try:
        data = parse(raw)
    except ValueError as err:
        raise ApiError(400, "invalid_request", f"The body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "The body must be a JSON object.")
    return data
