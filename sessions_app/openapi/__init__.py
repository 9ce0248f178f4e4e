"""The OpenAPI 3 document, built from the Marshmallow schemas and the routes.

The document is derived from ``app.url_map``: every route served by this
package's views is described by the :class:`Operation` its view declares (the
same schemas the view loads and dumps with), and a view without one makes the
build fail, so a new endpoint cannot be left out silently. Statuses come
from what the route can do: a key check (401, 403, 429), a body (400, 413,
415), a query (400), path parameters (404), storage (503).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask
from marshmallow import Schema

from ..corridor import auth
from ..naming import EVENT_ID_MAX_LENGTH, EVENT_ID_PATTERN
from ..schemas import (
    KEY_MAX_LENGTH,
    KEY_PATTERN,
    BodySchema,
    ErrorSchema,
    Metadata,
    ReadinessSchema,
    SessionListQuerySchema,
)
from ..schemas.events import BoundedList, Tagged, TaggedSchema

OPENAPI_VERSION = "3.0.3"  # the newest version the bundled Swagger UI renders
EXTENSION = "agent_sessions_openapi"
SERVICE_PACKAGE = __package__.rpartition(".")[0]  # whose views the document describes
# The modules of the /v2 API's views, whose routes take a key (the health routes do not).
API_VIEWS = frozenset(
    f"{SERVICE_PACKAGE}.api.{resource}"
    for resource in ("sessions", "events", "state", "agents", "api_keys")
)


# What the routes cannot tell, declared on each view (``operation`` here, or the API's
# ``endpoint``, which also loads and dumps with the same schemas).


@dataclasses.dataclass(frozen=True)
class Operation:
    """A view's OpenAPI description: tag, success status and schemas."""

    tag: str
    status: int
    response: Any = None  # a Schema class, a content map, or None for no body
    body: type[Schema] | None = None
    query: type[Schema] | None = None
    statuses: tuple[int, ...] = ()  # beyond those the route implies
    headers: tuple[str, ...] = ()  # of the success response, beyond X-Request-ID
    examples: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Error statuses whose description is the operation's own (and which it can answer).
    errors: Mapping[int, str] = dataclasses.field(default_factory=dict)
    stream: bool = False  # the success may also be text/event-stream
    # The record answers an ETag; reads and writes of it take If-Match and If-None-Match.
    etag: bool = False
    # A create that takes an Idempotency-Key (sessions_app/corridor/idempotency.py).
    idempotent: bool = False


def operation(tag: str, status: int, response: Any = None, **kwargs: Any) -> Callable:
    """Describe a view that loads and dumps by itself (health checks, this document)."""
    described = Operation(tag, status, response, **kwargs)

    def decorator(view: Callable) -> Callable:
        view.operation = described  # type: ignore[attr-defined]
        return view

    return decorator


RATE_LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}
HTML_PAGE = {"text/html": {"schema": {"type": "string"}}}

TAGS = [
    {"name": "Sessions", "description": "Conversations between users and an agent."},
    {
        "name": "Events",
        "description": "A session's history: what users said and what the agent did.",
    },
    {
        "name": "State",
        "description": "What an agent's runtime keeps across its sessions (beyond Vectara).",
    },
    {"name": "Agents", "description": "Agents (admin keys only)."},
    {"name": "API keys", "description": "API keys and their grants (admin keys only)."},
    {"name": "Service", "description": "This document, its docs page, health and readiness."},
]

# Path parameters by name: schema and the error code of a 404 naming them.
PATH_PARAMETERS = {
    "agent_key": (
        {"type": "string", "pattern": KEY_PATTERN, "minLength": 1, "maxLength": KEY_MAX_LENGTH},
        "support-agent",
        "`agent_not_found`: no agent has this key.",
    ),
    "session_key": (
        {"type": "string", "pattern": KEY_PATTERN, "minLength": 1, "maxLength": KEY_MAX_LENGTH},
        "user_12345_session",
        "`session_not_found`: the agent has no session with this key (or it idled out).",
    ),
    "event_id": (
        {"type": "string", "pattern": EVENT_ID_PATTERN, "maxLength": EVENT_ID_MAX_LENGTH},
        "aev_5f0c2a9d8b7e4f3a1c6d2e0b",
        "`event_not_found`: the session has no event with this id.",
    ),
    "key_id": (
        {"type": "string", "pattern": f"^{auth.KEY_ID_PREFIX}[0-9a-f]+$", "maxLength": 64},
        "ak_0123456789abcdef",
        "`not_found`: no API key has this id.",
    ),
}

ERROR_DESCRIPTIONS = {
    400: "`invalid_request`: a missing or malformed field, a body that is not a JSON object, "
    "bad JSON, an unknown field, a bad key pattern or a bad query parameter; "
    "`invalid_metadata`: metadata that is not an object or is outside its bounds.",
    401: "`unauthorized`: a missing, unknown, revoked or expired API key.",
    403: "`forbidden`: the key lacks the grant for this agent and action.",
    409: (
        "`conflict`: a record with this key already exists; the stored one is untouched. "
        "On session creation, `agent_disabled`: the agent's `enabled` is false."
    ),
    413: "`payload_too_large`: the body is over {max_body} bytes.",
    412: "`precondition_failed`: `If-Match` names none of the record's current entity tag "
    "(a weak tag never matches), or `If-None-Match` names it (or is `*`); nothing was "
    "changed.",
    422: "`idempotency_key_mismatch`: this `Idempotency-Key` was used for another request "
    "(method, path or body) of this API key; nothing was done. A new request needs a new key.",
    415: "`unsupported_media_type`: the body is not UTF-8 JSON (`application/json`), is a "
    "JSON patch format (merge-patch, json-patch), or has a `Content-Encoding` other than "
    "`identity`.",
    429: "`rate_limit_exceeded`: this key's request limit, its session-creation limit for "
    "this agent (on create), or the limit of failed authentications from this address is "
    "used up. Retry after `Retry-After` seconds.",
    500: "`internal_error`: an unexpected failure; the request id identifies it in the logs.",
    503: "`unavailable`: storage or the rate-limit backend is unreachable; retry after "
    "`Retry-After` seconds.",
}

HEADERS = {
    "X-Request-ID": {
        "description": "The request's id, also in error bodies; a sane one sent by the client "
        "is reused.",
        "schema": {"type": "string"},
    },
    "Location": {"description": "The URL of the created record.", "schema": {"type": "string"}},
    "ETag": {
        "description": "The record's strong entity tag: a hash of this representation, which "
        "changes whenever any of its fields does. Send it back in `If-Match` to change or "
        "delete the record only as you last saw it, or in `If-None-Match` to read it only "
        "when it changed.",
        "schema": {"type": "string"},
    },
    "Idempotent-Replayed": {
        "description": "`true` on an answer replayed for a repeated `Idempotency-Key`: the "
        "status, headers and body the first request was answered (an error's `request_id` "
        "names this request, as `X-Request-ID` does).",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    },
    "X-RateLimit-Limit": {
        "description": "Requests allowed in the window.",
        "schema": {"type": "integer"},
    },
    "X-RateLimit-Remaining": {
        "description": "Requests left in the window.",
        "schema": {"type": "integer"},
    },
    "X-RateLimit-Reset": {
        "description": "When the window resets (Unix time).",
        "schema": {"type": "integer"},
    },
}

# Request headers of a read or write of a record with an ETag (RFC 9110, section 13.1).
CONDITION_PARAMETERS = [
    {
        "in": "header",
        "name": "If-Match",
        "required": False,
        "description": 'Entity tags (`"..."`, comma-separated) or `*`: answer (GET) or write '
        "(PATCH, DELETE) only if the record's current ETag is one of them, compared strongly "
        "(a weak `W/` tag never matches), else 412 `precondition_failed` and nothing changes. "
        "A write checks it in the same transaction as the write itself. `*` matches any "
        "existing record. Not a list of entity tags: 400 `invalid_request`.",
        "schema": {"type": "string"},
        "example": '"5d41402abc4b2a76b9719d911017c592"',
    },
    {
        "in": "header",
        "name": "If-None-Match",
        "required": False,
        "description": "Entity tags or `*`, compared weakly: on GET, 304 with no body when "
        "the record's current ETag is one of them (or `*`); on PATCH and DELETE, 412 "
        "`precondition_failed`. Not a list of entity tags: 400 `invalid_request`.",
        "schema": {"type": "string"},
    },
]

# The request header of a create that can be retried safely (sessions_app/corridor/idempotency.py).
IDEMPOTENCY_PARAMETER = {
    "in": "header",
    "name": "Idempotency-Key",
    "required": False,
    "description": "1 to 255 printable ASCII characters other than a comma (repeated "
    "fields arrive joined by commas, so one field only), unique per request (a UUID, say), "
    "scoped to the API key. The first request with it is processed and its answer (2xx or "
    "4xx) remembered for 24 hours; a retry with the same key, method, path and body gets "
    "that answer again, with `Idempotent-Replayed: true`, and writes nothing. The same key "
    "with another body, path or method: 422 `idempotency_key_mismatch`. While the first is "
    "still in flight: 409 `idempotency_key_in_use` with `Retry-After`. A 5xx is not "
    "remembered, nor a refusal before the body was read (401, 403, 429, a body that is not "
    "a JSON object). Malformed: 400 `invalid_request`.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -+\\--~]+$"},
    "example": "0b4c7d62-9a51-4e0f-8f3b-2f6a1c9d7e44",
}
IN_USE = (
    " `idempotency_key_in_use`: a request with this `Idempotency-Key` is still being "
    "processed; retry after `Retry-After` seconds."
)

INFO_DESCRIPTION = """\
Conversational sessions between users and AI agents.

Every request under `/v2` except this document and its docs page needs an API
key, sent as `x-api-key: <key>` or `Authorization: Bearer <key>`. A missing or
bad key is 401; a key without the grant for the agent and action is 403, whether
or not the agent exists; only then comes 404 for a missing agent, then 400 for a
bad body.

Every error is JSON of the `Error` schema, including 404 for unknown routes and
405 (with `Allow`) for a method a path does not serve.
"""


_RULE_ARGUMENT = re.compile(r"<(?:[^<>:]+:)?([^<>]+)>")


def _path_template(rule: str) -> str:
    return _RULE_ARGUMENT.sub(r"{\1}", rule)


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _headers(*names: str) -> dict[str, Any]:
    return {name: _ref("headers", name) for name in ("X-Request-ID", *names)}


def _union(converter: Any, variants: Mapping[str, Any]) -> dict[str, Any]:
    """``oneOf`` the variants' schemas, with a ``discriminator`` on ``type``."""
    refs = {kind: converter.resolve_nested_schema(schema) for kind, schema in variants.items()}
    return {
        "oneOf": list(refs.values()),
        "discriminator": {
            "propertyName": "type",
            "mapping": {kind: ref["$ref"] for kind, ref in refs.items()},
        },
    }


def _field_attributes(config: Any) -> Callable[..., dict[str, Any]]:
    """What the schemas say in code rather than in field arguments, as apispec attributes."""

    def attributes(converter: Any, field: Any, **kwargs: Any) -> dict[str, Any]:
        found: dict[str, Any] = {}
        if isinstance(field, Tagged):
            return _union(converter, field.variants)
        if isinstance(field.parent, BodySchema) and not field.required:
            found["nullable"] = True  # JSON null means "absent" in request bodies
        if isinstance(field, Metadata):
            found["maxProperties"] = config["METADATA_MAX_KEYS"]
        if isinstance(field, BoundedList) and isinstance(field.high, str):
            found.update(minItems=field.low, maxItems=config[field.high])
        if field.name == "filter" and isinstance(field.parent, SessionListQuerySchema):
            found["maxLength"] = config["FILTER_MAX_LENGTH"]
        return found

    return attributes


class _Builder:
    def __init__(self, app: Flask):
        self.config = app.config
        self.plugin = MarshmallowPlugin()
        try:
            version = metadata.version("agent-sessions")
        except metadata.PackageNotFoundError:
            version = "0.0.0"
        self.spec = APISpec(
            title="Agent Sessions API",
            version=version,
            openapi_version=OPENAPI_VERSION,
            plugins=[self.plugin],
            info={"description": INFO_DESCRIPTION},
            tags=TAGS,
            security=[{"ApiKeyAuth": []}, {"BearerAuth": []}],
        )
        self.plugin.converter.add_attribute_function(_field_attributes(app.config))
        components = self.spec.components
        components.security_scheme(
            "ApiKeyAuth", {"type": "apiKey", "in": "header", "name": "x-api-key"}
        )
        components.security_scheme("BearerAuth", {"type": "http", "scheme": "bearer"})
        for name, header in HEADERS.items():
            components.header(name, header)
        components.schema("Error", schema=ErrorSchema)
        self.app = app

    def build(self) -> dict[str, Any]:
        for rule in self.app.url_map.iter_rules():
            view = self.app.view_functions[rule.endpoint]
            if not view.__module__.startswith(f"{SERVICE_PACKAGE}.") or getattr(
                view, "openapi_hidden", False
            ):
                continue
            name = rule.endpoint.rpartition(".")[2]
            doc = getattr(view, "operation", None)
            if doc is None:
                raise LookupError(f"{rule.rule}: view {rule.endpoint} has no OpenAPI description")
            operations = {
                method.lower(): self.describe(
                    name, view, _RULE_ARGUMENT.findall(rule.rule), doc, method
                )
                for method in sorted(rule.methods - {"HEAD", "OPTIONS"})
            }
            self.spec.path(path=_path_template(rule.rule), operations=operations)
        return self.spec.to_dict()

    def describe(
        self, name: str, view: Callable, arguments: list[str], doc: Operation, method: str = "GET"
    ) -> dict[str, Any]:
        summary = (view.__doc__ or name).strip().splitlines()[0]
        needs_key = view.__module__ in API_VIEWS and not getattr(view, "public", False)
        described: dict[str, Any] = {
            "operationId": name,
            "tags": [doc.tag],
            "summary": summary.rstrip("."),
            "parameters": [self.path_parameter(arg) for arg in arguments],
        }
        scope = getattr(view, "scope", None)
        if scope == "admin":
            described["description"] = "Needs an admin key."
        elif scope:
            needed = " or ".join(f"`{one}`" for one in scope.split(" or "))
            described["description"] = f"Needs a key with {needed} on the agent."
        if not needs_key:
            described["security"] = []
        statuses = {500, *doc.statuses}
        if needs_key:
            statuses |= {401, 403, 429, 503}
        if doc.query is not None:
            described["parameters"].append({"in": "query", "schema": doc.query})
            statuses.add(400)
        if doc.body is not None:
            content: dict[str, Any] = {"schema": self.schema(doc.body)}
            if "request" in doc.examples:
                content["example"] = doc.examples["request"]
            described["requestBody"] = {"required": True, "content": {"application/json": content}}
            statuses |= {400, 413, 415}
        if arguments:
            statuses.add(404)
        conditional = doc.etag and method != "POST"
        if conditional:
            described["parameters"] += [dict(one) for one in CONDITION_PARAMETERS]
            statuses |= {400, 412}
        if doc.idempotent:
            described["parameters"].append(dict(IDEMPOTENCY_PARAMETER))
            statuses |= {400, 409, 422}
        statuses |= set(doc.errors)
        responses = {str(doc.status): self.success(doc, needs_key)}
        if conditional and method == "GET":
            responses["304"] = {
                "description": "Not modified: `If-None-Match` names the record's current "
                "entity tag (or is `*`). No body.",
                "headers": _headers("ETag", *(RATE_LIMIT_HEADERS if needs_key else ())),
            }
        for status in sorted(statuses):
            responses[str(status)] = self.error(status, doc, arguments)
        described["responses"] = responses
        if not described["parameters"]:
            del described["parameters"]
        return described

    def schema(self, schema: Any) -> Any:
        """A schema class as apispec takes it; a union of schemas as ``oneOf``."""
        if isinstance(schema, type) and issubclass(schema, TaggedSchema):
            return _union(self.plugin.converter, schema.VARIANTS)
        return schema

    def path_parameter(self, name: str) -> dict[str, Any]:
        schema, example, _ = PATH_PARAMETERS.get(name, ({"type": "string"}, None, None))
        parameter = {"in": "path", "name": name, "required": True, "schema": schema}
        if example is not None:
            parameter["example"] = example
        return parameter

    def success(self, doc: Operation, needs_key: bool) -> dict[str, Any]:
        descriptions = {200: "OK.", 201: "Created.", 204: "Done; no body."}
        response: dict[str, Any] = {"description": descriptions[doc.status]}
        # Every authenticated call counts against a limit of its key.
        etag = ("ETag",) if doc.etag and doc.response is not None else ()
        replayed = ("Idempotent-Replayed",) if doc.idempotent else ()
        response["headers"] = _headers(
            *doc.headers, *etag, *replayed, *(RATE_LIMIT_HEADERS if needs_key else ())
        )
        if doc.response is not None:
            if isinstance(doc.response, dict):
                response["content"] = doc.response
            else:
                content: dict[str, Any] = {"schema": self.schema(doc.response)}
                if "response" in doc.examples:
                    content["example"] = doc.examples["response"]
                response["content"] = {"application/json": content}
                if doc.stream:
                    response["content"]["text/event-stream"] = {
                        "schema": {
                            "type": "string",
                            "description": "With `stream_response: true`: one `data:` line "
                            "holding each event written (the schema of `events` items), "
                            'then `data: {"type":"end"}`, each followed by a blank line.',
                        }
                    }
        return response

    def error(self, status: int, doc: Operation, arguments: list[str]) -> dict[str, Any]:
        if status == 503 and doc.response is ReadinessSchema:
            return {
                "description": "Not ready: storage is unreachable, or the rate-limit storage "
                "is and the service fails closed.",
                "headers": _headers(),
                "content": {"application/json": {"schema": ReadinessSchema}},
            }
        config = self.app.config
        sizes = {
            "max_body": self.app.extensions["agent_sessions"].max_body,
            "events_max_body": config["EVENTS_MAX_CONTENT_LENGTH"],
            "event_max_bytes": config["EVENT_MAX_BYTES"],
        }
        if status in doc.errors:
            description = doc.errors[status].format(**sizes)
        elif status == 404:
            reasons = [PATH_PARAMETERS[arg][2] for arg in arguments if arg in PATH_PARAMETERS]
            reasons.append("`not_found`: the path does not name a route.")
            description = " ".join(reasons)
        else:
            description = ERROR_DESCRIPTIONS[status].format(**sizes)
        if status == 400 and doc.etag:
            description += (
                " `invalid_request` too: an `If-Match` or `If-None-Match` that is not `*` or "
                "a list of entity tags."
            )
        if status == 400 and doc.idempotent:
            description += " `invalid_request` too: a malformed `Idempotency-Key`."
        if status == 409 and doc.idempotent:
            description += IN_USE
        headers: tuple[str, ...] = ()
        if status == 409 and doc.idempotent:
            headers = ("Retry-After",)
        if status == 429:
            headers = ("Retry-After", *RATE_LIMIT_HEADERS)
        elif status == 503:
            headers = ("Retry-After",)
        content: dict[str, Any] = {"schema": ErrorSchema}
        if status == 400 and doc.body is not None:
            content["example"] = {
                "error": "invalid_request",
                "messages": ["name: Missing data for required field."],
                "field_errors": {"name": "Missing data for required field."},
                "request_id": "3f6c1d2a9b8e4f70a1b2c3d4e5f60718",
            }
        return {
            "description": description,
            "headers": _headers(*headers),
            "content": {"application/json": content},
        }


def document(app: Flask) -> dict[str, Any]:
    """The app's OpenAPI document, built on first use and kept in ``app.extensions``."""
    cached = app.extensions.get(EXTENSION)
    if cached is None:
        spec = _Builder(app).build()
        cached = app.extensions[EXTENSION] = (spec, json.dumps(spec, ensure_ascii=False).encode())
    return cached[0]
