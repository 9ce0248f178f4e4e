"""Entity tags of sessions and agents, and the conditional requests they answer (RFC 9110).

A record's ``ETag`` is a hash of its representation: the exact bytes of the JSON
the API answers for it. It changes whenever any field the API shows changes, and
never otherwise (an event written restarts a session's idle clock, which the
representation does not show). It is strong: equal tags mean equal bytes.

``If-Match`` and ``If-None-Match`` are lists of entity tags, or ``*``. On a
read they are checked against the record just read; on a write (PATCH,
DELETE) the storage checks them against the record as stored, in the write's
own transaction (:class:`Conditions` is the backend's ``precondition``), so two
writers holding one tag cannot both succeed. If-Match compares strongly (a weak
tag, ``W/"..."``, never matches); If-None-Match weakly. A header that is not
such a list is a 400: ignoring it would turn a guarded write into a blind one.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from marshmallow import Schema

from storage_backends.codec import dump_json

from .errors import ApiError

ANY = "*"
# entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, with etagc = %x21 / %x23-7E / obs-text;
# list elements are separated by commas and optional white space (empty ones allowed).
_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
_LEADING = re.compile(r"[ \t,]*")
_AFTER = re.compile(r"[ \t]*(?:(,)[ \t,]*)?")


def representation(body: Any) -> bytes:
    """The bytes the API answers for a dumped record (``responses.json_response``'s)."""
    return (dump_json(body) + "\n").encode()


def tag(data: bytes) -> str:
    """The strong entity tag of a representation."""
    return f'"{hashlib.blake2b(data, digest_size=16).hexdigest()}"'


def parse(header: str, value: str) -> str | list[tuple[bool, str]]:
    """``*``, or the (weak, opaque tag) pairs of an If-Match / If-None-Match value.

    Raises a 400 :class:`ApiError` naming the header for anything else.
    """
    if value.strip(" \t") == ANY:
        return ANY
    tags = []
    at = _LEADING.match(value).end()
    while at < len(value):
        found = _TAG.match(value, at)
        if found is None:
            raise ApiError(
                400,
                "invalid_request",
                f'{header}: not "*" or a list of entity tags such as "abc", W/"abc".',
            )
        tags.append((found.group(1) is not None, f'"{found.group(2)}"'))
        after = _AFTER.match(value, found.end())
        if after.group(1) is None and after.end() < len(value):
            raise ApiError(
                400, "invalid_request", f"{header}: entity tags must be separated by commas."
            )
        at = after.end()
    return tags


class Conditions:
    """A request's If-Match and If-None-Match, checked against a record's entity tag."""

    __slots__ = ("if_match", "if_none_match", "schema")

    def __init__(self, environ: dict[str, Any], schema: Schema):
        raw = environ.get("HTTP_IF_MATCH")
        self.if_match = None if raw is None else parse("If-Match", raw)
        raw = environ.get("HTTP_IF_NONE_MATCH")
        self.if_none_match = None if raw is None else parse("If-None-Match", raw)
        self.schema = schema

    @classmethod
    def of_request(cls, environ: dict[str, Any], schema: Schema) -> Conditions | None:
        """The request's conditions, or None when it sends neither header (the usual case)."""
        if "HTTP_IF_MATCH" not in environ and "HTTP_IF_NONE_MATCH" not in environ:
            return None
        return cls(environ, schema)

    def matches(self, etag: str) -> bool:
        """Whether If-Match holds (strong comparison) for a record with this tag."""
        if self.if_match is None or self.if_match == ANY:
            return True
        return any(not weak and opaque == etag for weak, opaque in self.if_match)

    def none_match(self, etag: str) -> bool:
        """Whether If-None-Match holds (weak comparison): no listed tag is this one."""
        if self.if_none_match is None:
            return True
        if self.if_none_match == ANY:
            return False
        return all(opaque != etag for _, opaque in self.if_none_match)

    def __call__(self, record: Any) -> bool:
        """The storage's precondition for a write: both headers hold for the stored record."""
        etag = tag(representation(self.schema.dump(record)))
        return self.matches(etag) and self.none_match(etag)
