"""The OpenAPI document: valid, complete, printed by the CLI, and honoured by the service.

The last part is schemathesis against the app in-process (WSGI), with an admin
key: the examples, coverage and fuzzing phases for every operation, and the
stateful phase across them. No response may be a server error, have a status
the document does not list for its operation, or differ from its schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from flask import Flask
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from sessions_app import create_app
from sessions_app.openapi import document
from tests.conftest import ALL_SCOPES, Keys
from tests.servers import cli

MEMORY = pytest.mark.parametrize("storage_url", ["memory"], indirect=True)
EVENTS = "/v2/agents/{agent_key}/sessions/{session_key}/events"

# Every endpoint of API.md, method and path as the document spells them.
ENDPOINTS = {
    ("POST", "/v2/agents/{agent_key}/sessions"),
    ("GET", "/v2/agents/{agent_key}/sessions"),
    ("GET", "/v2/agents/{agent_key}/sessions/{session_key}"),
    ("PATCH", "/v2/agents/{agent_key}/sessions/{session_key}"),
    ("DELETE", "/v2/agents/{agent_key}/sessions/{session_key}"),
    ("GET", f"{EVENTS}"),
    ("DELETE", f"{EVENTS}"),
    ("POST", f"{EVENTS}/pop"),
    ("GET", "/v2/agents/{agent_key}/state"),
    ("POST", f"{EVENTS}"),
    ("POST", f"{EVENTS}/batch"),
    ("GET", f"{EVENTS}/{{event_id}}"),
    ("DELETE", f"{EVENTS}/{{event_id}}"),
    ("POST", f"{EVENTS}/{{event_id}}/hide"),
    ("POST", f"{EVENTS}/{{event_id}}/unhide"),
    ("POST", "/v2/agents"),
    ("GET", "/v2/agents"),
    ("GET", "/v2/agents/{agent_key}"),
    ("PATCH", "/v2/agents/{agent_key}"),
    ("DELETE", "/v2/agents/{agent_key}"),
    ("POST", "/v2/api_keys"),
    ("GET", "/v2/api_keys"),
    ("DELETE", "/v2/api_keys/{key_id}"),
    ("GET", "/v2/openapi.json"),
    ("GET", "/v2/docs"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
}

KEYED = {"401", "403", "429", "500", "503"}
BODIED = {"400", "413", "415"}
# A record with an ETag: a malformed condition header, a failed one, and (reads) 304.
WRITE_IF = {"400", "412"}
READ_IF = WRITE_IF | {"304"}

# Statuses each operation documents: success, then every error it can answer.
# A create that takes an Idempotency-Key: 409 in use, 422 mismatch.
IDEMPOTENT = {"409", "422"}

STATUSES = [
    ("POST", "/v2/agents/{agent_key}/sessions", {"201", "404"} | KEYED | BODIED | IDEMPOTENT),
    ("GET", "/v2/agents/{agent_key}/sessions", {"200", "400", "404"} | KEYED),
    ("GET", "/v2/agents/{agent_key}/sessions/{session_key}", {"200", "404"} | KEYED | READ_IF),
    (
        "PATCH",
        "/v2/agents/{agent_key}/sessions/{session_key}",
        # 409: quota_exceeded, for metadata that grows past the agent's bytes.
        {"200", "404", "409"} | KEYED | BODIED | WRITE_IF,
    ),
    ("DELETE", "/v2/agents/{agent_key}/sessions/{session_key}", {"204", "404"} | KEYED | WRITE_IF),
    ("POST", "/v2/agents", {"201"} | KEYED | BODIED | IDEMPOTENT),
    ("GET", "/v2/agents", {"200", "400"} | KEYED),
    ("DELETE", "/v2/api_keys/{key_id}", {"204", "404"} | KEYED),
    ("POST", "/v2/api_keys", {"201"} | KEYED | BODIED),
    ("GET", EVENTS, {"200", "400", "404"} | KEYED),
    ("DELETE", EVENTS, {"204", "404"} | KEYED),
    ("POST", f"{EVENTS}/pop", {"200", "404", "409"} | KEYED | BODIED | IDEMPOTENT),
    ("GET", "/v2/agents/{agent_key}/state", {"200", "400", "404"} | KEYED),
    ("POST", EVENTS, {"201", "404"} | KEYED | BODIED | IDEMPOTENT),
    ("POST", f"{EVENTS}/batch", {"201", "404"} | KEYED | BODIED | IDEMPOTENT),
    ("GET", f"{EVENTS}/{{event_id}}", {"200", "404"} | KEYED),
    ("DELETE", f"{EVENTS}/{{event_id}}", {"204", "404"} | KEYED),
    ("POST", f"{EVENTS}/{{event_id}}/hide", {"200", "404"} | KEYED),
    ("POST", f"{EVENTS}/{{event_id}}/unhide", {"200", "404"} | KEYED),
    ("GET", "/v2/openapi.json", {"200", "500"}),
    ("GET", "/readyz", {"200", "500", "503"}),
]


RECORDS = ["/v2/agents/{agent_key}/sessions/{session_key}", "/v2/agents/{agent_key}"]


@MEMORY
@pytest.mark.parametrize("path", RECORDS)
def test_records_document_their_etag_and_conditions(doc: dict[str, Any], path: str) -> None:
    collection = path.rpartition("/")[0]
    assert "ETag" in doc["components"]["headers"]
    created = doc["paths"][collection]["post"]
    assert "ETag" in created["responses"]["201"]["headers"]
    headers = [p["name"] for p in created.get("parameters", []) if p["in"] == "header"]
    assert headers == ["Idempotency-Key"]  # no conditions on a create
    for method in ("get", "patch", "delete"):
        operation = doc["paths"][path][method]
        named = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
        assert named == {"If-Match", "If-None-Match"}, method
        assert "precondition_failed" in operation["responses"]["412"]["description"]
        success = operation["responses"]["204" if method == "delete" else "200"]
        assert ("ETag" in success["headers"]) == (method != "delete")
    not_modified = doc["paths"][path]["get"]["responses"]["304"]
    assert "content" not in not_modified and "ETag" in not_modified["headers"]
    assert "304" not in doc["paths"][path]["patch"]["responses"]
    # Lists and events have no ETag.
    assert "ETag" not in doc["paths"][collection]["get"]["responses"]["200"]["headers"]


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


@pytest.fixture
def doc(client: Any) -> dict[str, Any]:
    response = client.get("/v2/openapi.json")
    assert response.status_code == 200
    return response.get_json()


@MEMORY
def test_document_is_valid_openapi(doc: dict[str, Any]) -> None:
    validate(doc)
    assert doc["openapi"].startswith("3.")


@MEMORY
def test_document_lists_every_endpoint(doc: dict[str, Any]) -> None:
    assert {(method, path) for method, path, _ in operations(doc)} == ENDPOINTS


@MEMORY
@pytest.mark.parametrize(("method", "path", "statuses"), STATUSES)
def test_operation_statuses(doc: dict[str, Any], method: str, path: str, statuses: set) -> None:
    responses = doc["paths"][path][method.lower()]["responses"]
    assert set(responses) == statuses
    for status, response in responses.items():
        if int(status) >= 400 and path != "/readyz":
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Error"}


@MEMORY
def test_security_parameters_and_examples(doc: dict[str, Any]) -> None:
    schemes = doc["components"]["securitySchemes"]
    assert schemes["ApiKeyAuth"] == {"type": "apiKey", "in": "header", "name": "x-api-key"}
    assert schemes["BearerAuth"] == {"type": "http", "scheme": "bearer"}
    assert doc["security"] == [{"ApiKeyAuth": []}, {"BearerAuth": []}]
    for method, path, operation in operations(doc):
        public = not path.startswith("/v2/agents") and not path.startswith("/v2/api_keys")
        assert (operation.get("security") == []) is public, (method, path)
        for parameter in operation.get("parameters", []):
            if parameter["name"] in ("agent_key", "session_key"):
                assert parameter["schema"] == {
                    "type": "string",
                    "pattern": "^[0-9a-zA-Z_-]+$",
                    "minLength": 1,
                    "maxLength": 64,
                }

    create = doc["paths"]["/v2/agents/{agent_key}/sessions"]["post"]
    body = create["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/SessionCreate"}
    assert body["example"]["name"] == "Customer Support Session"
    assert "Location" in create["responses"]["201"]["headers"]

    listing = doc["paths"]["/v2/agents/{agent_key}/sessions"]["get"]
    query = {p["name"]: p["schema"] for p in listing["parameters"] if p["in"] == "query"}
    assert query["limit"] == {"type": "integer", "default": 10, "minimum": 1, "maximum": 100}
    assert set(query) == {"limit", "page_key", "filter", "metadata.KEY"}
    assert query["metadata.KEY"]["type"] == "string"
    described = next(p for p in listing["parameters"] if p["name"] == "metadata.KEY")
    assert "metadata.user_id=u-17" in described["description"]
    events = doc["paths"][f"{EVENTS}"]["get"]["parameters"]
    limit = next(p for p in events if p["name"] == "limit")["schema"]
    assert limit == {"type": "integer", "default": 10, "minimum": 1, "maximum": 1000}

    session = doc["components"]["schemas"]["SessionCreate"]["properties"]
    assert session["metadata"]["maxProperties"] == 64
    assert session["description"]["nullable"] is True


@MEMORY
def test_event_types_are_one_of_with_a_discriminator(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    answer_types = {
        "input_message", "agent_output", "thinking", "tool_input", "tool_output",
        "structured_output", "step_transition", "skill_load", "session_interrupted",
        "compaction",
    }  # fmt: skip

    def union(schema: dict[str, Any]) -> dict[str, str]:
        assert schema["discriminator"]["propertyName"] == "type"
        mapping = schema["discriminator"]["mapping"]
        assert [ref["$ref"] for ref in schema["oneOf"]] == list(mapping.values())
        for kind, ref in mapping.items():
            variant = schemas[ref.rpartition("/")[2]]
            assert variant["properties"]["type"]["enum"] == [kind]
            assert "type" in variant["required"]
        return mapping

    events = doc["paths"][f"{EVENTS}/{{event_id}}"]["get"]["responses"]["200"]
    one = union(events["content"]["application/json"]["schema"])
    assert set(one) == answer_types
    listed = union(schemas["EventPage"]["properties"]["events"]["items"])
    assert listed == one
    assert set(union(schemas["EventBatch"]["properties"]["events"]["items"])) == answer_types - {
        "compaction"
    }
    create = doc["paths"][EVENTS]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert set(union(body)) == {"input_message", "interrupt", "compact"}
    assert set(schemas["InterruptBody"]["properties"]) == {"type", "metadata", "stream_response"}
    assert set(schemas["SessionInterruptedEvent"]["properties"]) == {
        "id", "session_key", "type", "created_at", "hide_reason", "metadata",
    }  # fmt: skip
    said = schemas["InputMessageBody"]["properties"]
    assert said["behavior"]["enum"] == ["steer", "follow_up"]
    assert said["since"]["pattern"] == "^(start|aev_[0-9a-zA-Z]+)$"
    assert "100" in said["since"]["description"]
    assert schemas["InputMessageEvent"]["properties"]["behavior"]["enum"] == ["steer", "follow_up"]
    assert "behavior" not in schemas["InputMessageEvent"]["required"]
    assert "since" in create["responses"]["400"]["description"]
    assert "since" in create["responses"]["404"]["description"]
    assert set(create["responses"]["201"]["content"]) == {"application/json", "text/event-stream"}
    messages = schemas["InputMessageBody"]["properties"]["messages"]
    assert (messages["minItems"], messages["maxItems"]) == (1, 100)
    assert set(union(messages["items"])) == {"text", "skill"}
    tool = schemas["ToolOutputEvent"]
    assert set(tool["required"]) == {
        "id", "session_key", "type", "created_at", "tool_call_id",
        "tool_configuration_name", "tool_name", "tool_output",
    }  # fmt: skip
    assert "hide_reason" in tool["properties"]
    session = schemas["Session"]["properties"]
    assert session["forked_from"]["allOf"] == [{"$ref": "#/components/schemas/ForkedFrom"}]
    assert "forked_from" not in schemas["Session"]["required"]
    assert "from_session" in schemas["SessionCreate"]["properties"]
    listing = doc["paths"][EVENTS]["get"]
    query = {p["name"] for p in listing["parameters"] if p["in"] == "query"}
    assert query == {
        "limit",
        "page_key",
        "include_hidden",
        "order",
        "type",
        "include_session",
        "include_state",
    }
    path = {p["name"]: p for p in create["parameters"] if p["in"] == "path"}
    assert set(path) == {"agent_key", "session_key"}
    get = doc["paths"][f"{EVENTS}/{{event_id}}"]["get"]
    param = next(p for p in get["parameters"] if p["name"] == "event_id")
    assert param["schema"]["maxLength"] == 64
    assert "event_not_found" in get["responses"]["404"]["description"]
    assert "events:append" in doc["paths"][f"{EVENTS}/batch"]["post"]["description"]


@MEMORY
def test_document_served_without_key_with_api_headers(client: Any, app: Flask) -> None:
    response = client.get("/v2/openapi.json", headers={"X-Request-ID": "doc-1"})
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.headers["X-Request-ID"] == "doc-1"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
    # Built once per app: the same object every time.
    assert document(app) is document(app)
    assert response.get_json() == document(app)


def test_document_follows_the_app_config_and_prefix(tmp_path: Path) -> None:
    app = Flask("host")
    app.config.update(STORAGE_URL="memory://", FILTER_MAX_LENGTH=32, METADATA_MAX_KEYS=5)
    from sessions_app import init_app

    init_app(app, url_prefix="/api/v2")
    doc = app.test_client().get("/api/v2/openapi.json").get_json()
    listing = doc["paths"]["/api/v2/agents/{agent_key}/sessions"]["get"]
    query = {p["name"]: p["schema"] for p in listing["parameters"] if p["in"] == "query"}
    assert query["filter"]["maxLength"] == 32
    agent = doc["components"]["schemas"]["AgentCreate"]["properties"]
    assert agent["metadata"]["maxProperties"] == 5


def test_a_view_without_description_fails_the_build() -> None:
    app = create_app({"TESTING": True, "STORAGE_URL": "memory://"})

    def extra() -> str:
        return "x"

    extra.__module__ = "sessions_app.api"  # as if added to the blueprint
    app.add_url_rule("/v2/extra", view_func=extra)
    with pytest.raises(LookupError, match="/v2/extra"):
        document(app)


def test_cli_prints_the_document(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    printed = json.loads(cli("openapi", env={"AGENT_SESSIONS_STORAGE_URL": url}).stdout)
    app = create_app({"STORAGE_URL": url})
    assert printed == app.test_client().get("/v2/openapi.json").get_json()
    assert {(method, path) for method, path, _ in operations(printed)} == ENDPOINTS


@MEMORY
def test_docs_page_and_assets(client: Any) -> None:
    page = client.get("/v2/docs")
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    assert page.headers["Cache-Control"] == "no-store"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    html = page.get_data(as_text=True)
    assert 'data-spec-url="/v2/openapi.json"' in html
    assert "//" not in html.replace("<!DOCTYPE html>", "")  # nothing from another origin
    for name, mimetype in [
        ("swagger-ui-bundle.js", "text/javascript"),
        ("swagger-ui.css", "text/css"),
        ("init.js", "text/javascript"),
        ("favicon-32x32.png", "image/png"),
    ]:
        assert f"/v2/docs/{name}" in html
        with client.get(f"/v2/docs/{name}") as asset:
            assert asset.status_code == 200, name
            assert asset.mimetype == mimetype
            assert "max-age" in asset.headers["Cache-Control"]
            assert asset.headers["X-Content-Type-Options"] == "nosniff"
            assert "X-Request-ID" in asset.headers
    for name in ("index.html", "..%2Fsetup.cfg", "swagger-ui.js.map"):
        missing = client.get(f"/v2/docs/{name}")
        assert missing.status_code == 404
        assert missing.get_json()["error"] == "not_found"


# Contract fuzzing with schemathesis.

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
MAX_EXAMPLES = 30
STATEFUL_SCENARIOS = 15


# The document does not depend on storage: it comes from an in-memory app at
# collection time, and every generated request goes to a SQLite app.
schema = schemathesis.openapi.from_dict(
    document(create_app({"TESTING": True, "STORAGE_URL": "memory://"}))
)
schema.config.generation.update(max_examples=MAX_EXAMPLES, database="none")


def fuzz_target(path: Path) -> tuple[Flask, dict[str, str]]:
    """A SQLite app holding the records the document's examples name, and an admin key."""
    app = create_app(
        {
            "TESTING": True,
            "STORAGE_URL": f"sqlite:///{path}",
            # Room for every generated request; 429 is still documented.
            "SESSION_CREATE_LIMIT": "100000/minute",
            "DEFAULT_LIMIT": "100000/minute",
            "ADMIN_LIMIT": "100000/minute",
        }
    )
    keys = Keys(app)
    headers = {"x-api-key": keys.create(admin=True, name="fuzz")[1]}
    client = app.test_client()
    for agent in ("support-agent", "support-bot"):
        response = client.post("/v2/agents", json={"key": agent, "name": agent}, headers=headers)
        assert response.status_code == 201
    response = client.post(
        "/v2/agents/support-agent/sessions",
        json={"key": "user_12345_session", "name": "Customer Support Session"},
        headers=headers,
    )
    assert response.status_code == 201
    keys.create(("support-agent", ALL_SCOPES), name="scoped")
    # The admin key of the fuzzing holds every scope too, so event calls are served.
    everything = ALL_SCOPES + ("events:create", "events:append")
    headers = {"x-api-key": keys.create(("*", everything), admin=True, name="fuzz-all")[1]}
    response = client.post(
        "/v2/agents/support-agent/sessions/user_12345_session/events",
        json={"type": "input_message", "messages": [{"type": "text", "content": "hi"}]},
        headers=headers,
    )
    assert response.status_code == 201
    return app, headers


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Flask, dict[str, str]]]:
    app, headers = fuzz_target(tmp_path_factory.mktemp("fuzz") / "sessions.db")
    yield app, headers
    app.extensions["agent_sessions"].storage.close()


@schema.parametrize()
def test_fuzz_every_operation(case: Any, fuzz: tuple[Flask, dict[str, str]]) -> None:
    """Examples, coverage (including undeclared methods: 405) and fuzzing phases."""
    app, headers = fuzz
    case.call_and_validate(app=app, headers=headers, checks=[*CHECKS, unsupported_method])


def test_fuzz_stateful(tmp_path: Path) -> None:
    """Sequences of calls linked by the document (create, then read, update, delete).

    Each scenario starts from fresh storage, so that Hypothesis replaying one
    meets the same responses (a create is not a 409 the second time).
    """
    scenarios = iter(range(10**6))

    class Machine(schema.as_state_machine()):
        def setup(self) -> None:
            self.app, self.headers = fuzz_target(tmp_path / f"stateful-{next(scenarios)}.db")

        def teardown(self) -> None:
            self.app.extensions["agent_sessions"].storage.close()

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"app": self.app, "headers": self.headers}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS, headers=self.headers)

    Machine.run(
        settings=hypothesis.settings(
            max_examples=STATEFUL_SCENARIOS,
            stateful_step_count=10,
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
    )
