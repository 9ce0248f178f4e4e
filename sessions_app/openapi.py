"""The OpenAPI 3 document, built from the Marshmallow schemas and the routes, and its docs page.

The document is derived from ``app.url_map``: every route served by this
package's views is described, and a view without a description below makes
the build fail, so a new endpoint cannot be left out silently. Statuses come
from what the route can do: a key check (401, 403, 429), a body (400, 413,
415), a query (400), path parameters (404), storage (503).
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from collections.abc import Callable
from importlib import metadata
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask, abort, current_app, send_from_directory, url_for
from marshmallow import Schema, fields
from swagger_ui_bundle import swagger_ui_path
from werkzeug.wrappers import Response

from . import auth, errors
from .schemas import (
    KEY_MAX_LENGTH,
    KEY_PATTERN,
    AgentCreateSchema,
    AgentListSchema,
    AgentSchema,
    AgentUpdateSchema,
    ApiKeyCreatedSchema,
    ApiKeyCreateSchema,
    ApiKeyListSchema,
    BodySchema,
    ErrorSchema,
    ListQuerySchema,
    Metadata,
    SessionCreateSchema,
    SessionListQuerySchema,
    SessionListSchema,
    SessionSchema,
    SessionUpdateSchema,
)

OPENAPI_VERSION = "3.0.3"  # the newest version the bundled Swagger UI renders
EXTENSION = "agent_sessions_openapi"
ASSET_MAX_AGE = 24 * 3600
ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png")

docs = Blueprint("agent_sessions_docs", __name__)
errors.register(docs)


class HealthSchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["ok"]})


class ReadinessSchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["ok", "unavailable"]})
    storage = fields.String(required=True, metadata={"enum": ["ok", "unavailable"]})
    rate_limit = fields.String(required=True, metadata={"enum": ["ok", "degraded"]})


def hidden(view: Callable) -> Callable:
    """Leave a route out of the document (the docs page's static assets)."""
    view.openapi_hidden = True  # type: ignore[attr-defined]
    return view


# What the routes cannot tell: per view, its tag, success status and schemas.


@dataclasses.dataclass(frozen=True)
class Doc:
    tag: str
    status: int
    response: Any = None  # a Schema class, a content map, or None for no body
    body: type[Schema] | None = None
    query: type[Schema] | None = None
    statuses: tuple[int, ...] = ()  # beyond those the route implies
    headers: tuple[str, ...] = ()  # of the success response, beyond X-Request-ID
    examples: dict[str, Any] = dataclasses.field(default_factory=dict)


RATE_LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}
HTML_PAGE = {"text/html": {"schema": {"type": "string"}}}

# The public definition's example (docs.vectara.com, "Create agent session").
SESSION_REQUEST = {
    "key": "user_12345_session",
    "name": "Customer Support Session",
    "metadata": {"user_role": "premium", "language": "en"},
}
SESSION = {
    "key": "user_12345_session",
    "agent_key": "support-agent",
    "name": "Customer Support Session",
    "description": None,
    "metadata": {"user_role": "premium", "language": "en"},
    "enabled": True,
    "tti_minutes": 0,
    "created_at": "2026-11-28T17:49:52.123Z",
    "updated_at": "2026-11-28T17:49:52.123Z",
}
AGENT = {
    "key": "support-agent",
    "name": "Support agent",
    "description": "Answers customer questions.",
    "metadata": {},
    "enabled": True,
    "created_at": "2026-11-28T17:40:00.000Z",
    "updated_at": "2026-11-28T17:40:00.000Z",
}

DOCS = {
    "create_session": Doc(
        "Sessions",
        201,
        SessionSchema,
        body=SessionCreateSchema,
        statuses=(409,),
        headers=("Location",),
        examples={"request": SESSION_REQUEST, "response": SESSION},
    ),
    "list_sessions": Doc(
        "Sessions",
        200,
        SessionListSchema,
        query=SessionListQuerySchema,
        examples={"response": {"sessions": [SESSION], "metadata": {"page_key": None}}},
    ),
    "get_session": Doc("Sessions", 200, SessionSchema, examples={"response": SESSION}),
    "update_session": Doc(
        "Sessions",
        200,
        SessionSchema,
        body=SessionUpdateSchema,
        examples={"request": {"enabled": False}, "response": SESSION | {"enabled": False}},
    ),
    "delete_session": Doc("Sessions", 204),
    "create_agent": Doc(
        "Agents",
        201,
        AgentSchema,
        body=AgentCreateSchema,
        statuses=(409,),
        headers=("Location",),
        examples={
            "request": {k: AGENT[k] for k in ("key", "name", "description")},
            "response": AGENT,
        },
    ),
    "list_agents": Doc("Agents", 200, AgentListSchema, query=ListQuerySchema),
    "get_agent": Doc("Agents", 200, AgentSchema, examples={"response": AGENT}),
    "update_agent": Doc("Agents", 200, AgentSchema, body=AgentUpdateSchema),
    "delete_agent": Doc("Agents", 204),
    "create_api_key": Doc(
        "API keys",
        201,
        ApiKeyCreatedSchema,
        body=ApiKeyCreateSchema,
        examples={
            "request": {
                "name": "support frontend",
                "grants": [
                    {"agent": "support-agent", "scopes": ["sessions:create", "sessions:read"]}
                ],
            }
        },
    ),
    "list_api_keys": Doc("API keys", 200, ApiKeyListSchema, query=ListQuerySchema),
    "revoke_api_key": Doc("API keys", 204),
    "openapi_document": Doc("Service", 200, JSON_OBJECT),
    "docs_page": Doc("Service", 200, HTML_PAGE),
    "healthz": Doc("Service", 200, HealthSchema),
    "readyz": Doc("Service", 200, ReadinessSchema, statuses=(503,)),
}

TAGS = [
    {"name": "Sessions", "description": "Conversations between users and an agent."},
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
    409: "`conflict`: a record with this key already exists; the stored one is untouched.",
    413: "`payload_too_large`: the body is over {max_body} bytes.",
    415: "`unsupported_media_type`: the body is not UTF-8 JSON (`application/json`).",
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


def _field_attributes(config: Any) -> Callable[..., dict[str, Any]]:
    """What the schemas say in code rather than in field arguments, as apispec attributes."""

    def attributes(converter: Any, field: Any, **kwargs: Any) -> dict[str, Any]:
        found: dict[str, Any] = {}
        if isinstance(field.parent, BodySchema) and not field.required:
            found["nullable"] = True  # JSON null means "absent" in request bodies
        if isinstance(field, Metadata):
            found["maxProperties"] = config["METADATA_MAX_KEYS"]
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
            if not view.__module__.startswith(f"{__package__}.") or getattr(
                view, "openapi_hidden", False
            ):
                continue
            name = rule.endpoint.rpartition(".")[2]
            doc = DOCS.get(name)
            if doc is None:
                raise LookupError(f"{rule.rule}: view {rule.endpoint} has no OpenAPI description")
            operations = {
                method.lower(): self.operation(name, view, _RULE_ARGUMENT.findall(rule.rule), doc)
                for method in sorted(rule.methods - {"HEAD", "OPTIONS"})
            }
            self.spec.path(path=_path_template(rule.rule), operations=operations)
        return self.spec.to_dict()

    def operation(
        self, name: str, view: Callable, arguments: list[str], doc: Doc
    ) -> dict[str, Any]:
        summary = (view.__doc__ or name).strip().splitlines()[0]
        needs_key = view.__module__ == f"{__package__}.api" and not getattr(view, "public", False)
        operation: dict[str, Any] = {
            "operationId": name,
            "tags": [doc.tag],
            "summary": summary.rstrip("."),
            "parameters": [self.path_parameter(arg) for arg in arguments],
        }
        scope = getattr(view, "scope", None)
        if scope == "admin":
            operation["description"] = "Needs an admin key."
        elif scope:
            operation["description"] = f"Needs a key with `{scope}` on the agent."
        if not needs_key:
            operation["security"] = []
        statuses = {500, *doc.statuses}
        if needs_key:
            statuses |= {401, 403, 429, 503}
        if doc.query is not None:
            operation["parameters"].append({"in": "query", "schema": doc.query})
            statuses.add(400)
        if doc.body is not None:
            content: dict[str, Any] = {"schema": doc.body}
            if "request" in doc.examples:
                content["example"] = doc.examples["request"]
            operation["requestBody"] = {"required": True, "content": {"application/json": content}}
            statuses |= {400, 413, 415}
        if arguments:
            statuses.add(404)
        responses = {str(doc.status): self.success(doc, needs_key)}
        for status in sorted(statuses):
            responses[str(status)] = self.error(status, doc, arguments)
        operation["responses"] = responses
        if not operation["parameters"]:
            del operation["parameters"]
        return operation

    def path_parameter(self, name: str) -> dict[str, Any]:
        schema, example, _ = PATH_PARAMETERS.get(name, ({"type": "string"}, None, None))
        parameter = {"in": "path", "name": name, "required": True, "schema": schema}
        if example is not None:
            parameter["example"] = example
        return parameter

    def success(self, doc: Doc, needs_key: bool) -> dict[str, Any]:
        descriptions = {200: "OK.", 201: "Created.", 204: "Done; no body."}
        response: dict[str, Any] = {"description": descriptions[doc.status]}
        # Every authenticated call counts against a limit of its key.
        response["headers"] = _headers(*doc.headers, *(RATE_LIMIT_HEADERS if needs_key else ()))
        if doc.response is not None:
            if isinstance(doc.response, dict):
                response["content"] = doc.response
            else:
                content: dict[str, Any] = {"schema": doc.response}
                if "response" in doc.examples:
                    content["example"] = doc.examples["response"]
                response["content"] = {"application/json": content}
        return response

    def error(self, status: int, doc: Doc, arguments: list[str]) -> dict[str, Any]:
        if status == 503 and doc.response is ReadinessSchema:
            return {
                "description": "Not ready: storage is unreachable, or the rate-limit storage "
                "is and the service fails closed.",
                "headers": _headers(),
                "content": {"application/json": {"schema": ReadinessSchema}},
            }
        if status == 404:
            reasons = [PATH_PARAMETERS[arg][2] for arg in arguments if arg in PATH_PARAMETERS]
            reasons.append("`not_found`: the path does not name a route.")
            description = " ".join(reasons)
        else:
            description = ERROR_DESCRIPTIONS[status].format(
                max_body=self.config["MAX_CONTENT_LENGTH"]
            )
        headers: tuple[str, ...] = ()
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


# The document and the docs page: no key needed.


@docs.after_request
def finish(response: Response) -> Response:
    """The headers every API response carries; assets keep their own Cache-Control."""
    response.headers["X-Request-ID"] = errors.request_id()
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


@docs.get("/openapi.json")
@auth.public
def openapi_document() -> Response:
    """This OpenAPI document."""
    document(current_app)
    body = current_app.extensions[EXTENSION][1]
    return current_app.response_class(body, mimetype="application/json")


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Agent Sessions API</title>
<link rel="stylesheet" href="{css}">
<link rel="icon" type="image/png" href="{icon}">
</head>
<body>
<div id="swagger-ui" data-spec-url="{spec}"></div>
<script src="{bundle}"></script>
<script src="{init}"></script>
</body>
</html>
"""

# A file rather than an inline script, so the page's CSP can forbid inline scripts.
INIT_JS = """\
window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.specUrl,
    domNode: root,
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
"""

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


@docs.get("/docs")
@auth.public
def docs_page() -> Response:
    """An HTML page rendering this document (Swagger UI, served by the service itself)."""

    def asset(name: str) -> str:
        return html.escape(url_for(".docs_asset", name=name))

    page = PAGE.format(
        css=asset("swagger-ui.css"),
        icon=asset("favicon-32x32.png"),
        bundle=asset("swagger-ui-bundle.js"),
        init=asset("init.js"),
        spec=html.escape(url_for(".openapi_document")),
    )
    response = current_app.response_class(page, mimetype="text/html")
    response.headers["Content-Security-Policy"] = PAGE_CSP
    return response


@docs.get("/docs/<name>")
@auth.public
@hidden
def docs_asset(name: str) -> Response:
    """Swagger UI's files, from the installed swagger-ui-bundle package."""
    if name == "init.js":
        response = current_app.response_class(INIT_JS, mimetype="text/javascript")
        response.cache_control.public = True
        response.cache_control.max_age = ASSET_MAX_AGE
        return response
    if name not in ASSETS:
        abort(404)
    return send_from_directory(swagger_ui_path, name, max_age=ASSET_MAX_AGE)
