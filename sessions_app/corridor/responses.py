"""The answers' bodies: compact JSON in the schemas' key order, 204, 304."""

from __future__ import annotations

from typing import Any

from flask import current_app
from werkzeug.wrappers import Response

from storage_backends.codec import dump_json


def json_response(
    body: Any, status: int = 200, headers: list[tuple[str, str]] | None = None
) -> Response:
    """Compact UTF-8 JSON in the schemas' key order, whatever the host's JSON provider does."""
    return json_text_response(dump_json(body), status, headers)


def json_text_response(
    text: str, status: int = 200, headers: list[tuple[str, str]] | None = None
) -> Response:
    """:func:`json_response` of a body whose JSON (``codec.dump_json``'s) is ``text``."""
    return current_app._get_current_object().response_class(
        text + "\n", status, headers, mimetype="application/json"
    )


def json_data_response(
    data: bytes, status: int = 200, headers: list[tuple[str, str]] | None = None
) -> Response:
    """A JSON answer already encoded (by :func:`etags.representation`, whose hash is its ETag)."""
    return current_app._get_current_object().response_class(
        data, status, headers, mimetype="application/json"
    )


def not_modified(headers: list[tuple[str, str]]) -> Response:
    """304: the client's copy is current; no body, the record's ETag among ``headers``."""
    return current_app._get_current_object().response_class(status=304, headers=headers)


def no_content() -> Response:
    return current_app._get_current_object().response_class(status=204)
