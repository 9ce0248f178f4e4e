"""The HTTP layer's own rules: path parameters, the order of refusals, media types,
absent fields, bodyless answers and the characters a name may hold."""

from __future__ import annotations

from typing import Any

import pytest

from sessions_app.openapi import document
from tests.conftest import assert_error

SESSIONS = "/v2/agents/support-bot/sessions"
JSON = {"Content-Type": "application/json"}


def not_counted(response: Any) -> None:
    """The request reached neither the limiter nor storage: no limit was counted."""
    assert "X-RateLimit-Limit" not in response.headers, dict(response.headers)


# Path parameters outside their pattern match no route: a JSON 404 before
# authentication, the limiter or storage (a NUL was a 500 on PostgreSQL).

ODD_PATHS = [
    ("GET", "/v2/agents/b%00t"),
    ("GET", "/v2/agents/b%00t/sessions"),
    ("POST", "/v2/agents/b%00t/sessions"),
    ("GET", "/v2/agents/support-bot/sessions/a%00b"),
    ("PATCH", "/v2/agents/support-bot/sessions/a%00b"),
    ("DELETE", "/v2/agents/support-bot/sessions/a%00b"),
    ("DELETE", "/v2/api_keys/ak_%00"),
    ("DELETE", "/v2/api_keys/not-a-key-id"),
    ("POST", "/v2/agents/" + "k" * 65 + "/sessions"),
    ("GET", "/v2/agents/support-bot/sessions/" + "s" * 65),
    ("PATCH", "/v2/agents/" + "a" * 8000 + "/sessions/s"),
    ("DELETE", "/v2/api_keys/ak_" + "0" * 62),
]


@pytest.mark.parametrize(("method", "path"), ODD_PATHS)
def test_path_parameters_outside_their_pattern_are_a_json_404(client, full, admin, method, path):
    headers = full if "/sessions" in path else admin
    response = client.open(path, method=method, json={"name": "n"}, headers=headers)
    assert_error(response, 404, "not_found")
    not_counted(response)


def test_longest_keys_still_route(client, admin, full):
    key = "k" * 64
    response = client.post("/v2/agents", json={"key": key, "name": "Long"}, headers=admin)
    assert response.status_code == 201, response.get_json()
    response = client.post(
        f"/v2/agents/{key}/sessions", json={"key": key, "name": "n"}, headers=full
    )
    assert response.status_code == 201, response.get_json()
    assert client.get(f"/v2/agents/{key}/sessions/{key}", headers=full).status_code == 200


# Double slashes: a JSON 404, never a redirect to another resource.


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/v2/agents//sessions"),
        ("GET", "/v2//agents"),
        ("GET", "/v2/agents/support-bot//sessions"),
        ("GET", "//healthz"),
    ],
)
def test_double_slashes_are_a_404_not_a_redirect(client, admin, method, path):
    assert client.post("/v2/agents", json={"key": "sessions", "name": "S"}, headers=admin)
    response = client.open(
        path, method=method, headers=admin | {"Host": "evil.example"}, follow_redirects=False
    )
    assert response.status_code == 404, (response.status_code, response.headers)
    assert "Location" not in response.headers
    assert response.mimetype == "application/json"
    assert client.get("/v2/agents/sessions", headers=admin).status_code == 200


# The documented order: 401, 403, 404, then 400 for the query or body.

BAD_QUERIES = ["limit=0", "limit=x", "page_key=bm9wZQ", "filter=(", "filter=" + "a" * 300]


@pytest.mark.parametrize("query", BAD_QUERIES)
def test_listing_an_unknown_agent_with_a_bad_query_is_404(client, full, query):
    response = client.get(f"/v2/agents/ghost/sessions?{query}", headers=full)
    assert_error(response, 404, "agent_not_found")
    assert_error(client.get(f"{SESSIONS}?{query}", headers=full), 400, "invalid_request")


@pytest.mark.parametrize("query", BAD_QUERIES[:3])
def test_a_bad_query_without_the_grant_is_403(client, keys, agent, query):
    reader = keys.headers(("other-bot", ("sessions:read",)))
    response = client.get(f"/v2/agents/ghost/sessions?{query}", headers=reader)
    assert_error(response, 403, "forbidden")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"json": {"bogus": 1}},
        {"json": {"name": ""}},
        {"data": b"{", "headers": JSON},
        {"data": b"{}"},  # not JSON: 415 once the session is known to exist
    ],
    ids=["unknown-field", "bad-field", "invalid-json", "wrong-type"],
)
def test_patching_a_missing_record_with_a_bad_body_is_404(client, full, admin, kwargs):
    headers = kwargs.pop("headers", {})
    missing = client.patch(f"{SESSIONS}/missing", headers=full | headers, **kwargs)
    assert_error(missing, 404, "session_not_found")
    ghost = client.patch("/v2/agents/ghost/sessions/s", headers=full | headers, **kwargs)
    assert_error(ghost, 404, "agent_not_found")
    agent = client.patch("/v2/agents/ghost", headers=admin | headers, **kwargs)
    assert_error(agent, 404, "agent_not_found")


# Media types and content codings.


@pytest.mark.parametrize(
    ("method", "path", "headers", "data"),
    [
        ("POST", SESSIONS, {"Content-Encoding": "gzip"}, b'{"name": "n"}'),
        ("POST", SESSIONS, {"Content-Encoding": "br"}, b'{"name": "n"}'),
        ("POST", SESSIONS, {"Content-Type": "application/merge-patch+json"}, b'{"name": "n"}'),
        (
            "PATCH",
            f"{SESSIONS}/s",
            {"Content-Type": "application/merge-patch+json"},
            b'{"metadata": {"a": null}}',
        ),
        ("PATCH", f"{SESSIONS}/s", {"Content-Type": "application/json-patch+json"}, b"[]"),
        ("POST", SESSIONS, {"Content-Type": "application/vnd.api+json"}, b'{"name": "n"}'),
        ("POST", SESSIONS, {"Content-Type": "text/json"}, b'{"name": "n"}'),
    ],
    ids=["gzip", "br", "merge-patch-create", "merge-patch-update", "json-patch", "vnd", "text"],
)
def test_content_codings_and_patch_media_types_are_415(client, full, method, path, headers, data):
    created = client.post(
        SESSIONS, json={"key": "s", "name": "S", "metadata": {"a": 1}}, headers=full
    )
    assert created.status_code == 201
    response = client.open(path, method=method, data=data, headers=full | JSON | headers)
    assert_error(response, 415, "unsupported_media_type")
    assert client.get(f"{SESSIONS}/s", headers=full).get_json() == created.get_json()
    assert [s["key"] for s in client.get(SESSIONS, headers=full).get_json()["sessions"]] == ["s"]


def test_identity_coding_is_plain_json(client, full):
    headers = full | JSON | {"Content-Encoding": "identity"}
    assert client.post(SESSIONS, data=b'{"name": "n"}', headers=headers).status_code == 201


# Absent optional fields are left out of every answer, and documented so.


def test_absent_optional_fields_are_left_out(client, full, admin):
    session = client.post(SESSIONS, json={"key": "s", "name": "S"}, headers=full).get_json()
    assert "description" not in session
    assert "description" not in client.get(f"{SESSIONS}/s", headers=full).get_json()
    assert client.get(SESSIONS, headers=full).get_json()["metadata"] == {}
    page = client.get(f"{SESSIONS}?limit=1", headers=full).get_json()
    assert page["metadata"] == {}
    client.post(SESSIONS, json={"key": "t", "name": "T"}, headers=full)
    assert isinstance(
        client.get(f"{SESSIONS}?limit=1", headers=full).get_json()["metadata"]["page_key"], str
    )
    agent = client.get("/v2/agents/support-bot", headers=admin).get_json()
    assert "description" not in agent
    assert client.get("/v2/agents?limit=100", headers=admin).get_json()["metadata"] == {}
    made = client.post("/v2/api_keys", json={"name": "k"}, headers=admin).get_json()
    for field in ("create_limit", "expires_at", "revoked_at"):
        assert field not in made, made
    listed = client.get("/v2/api_keys?limit=100", headers=admin).get_json()
    assert listed["metadata"] == {}
    assert all("expires_at" not in key and "create_limit" not in key for key in listed["api_keys"])
    client.delete(f"/v2/api_keys/{made['id']}", headers=admin)
    listed = client.get("/v2/api_keys?limit=100", headers=admin).get_json()["api_keys"]
    revoked = next(key for key in listed if key["id"] == made["id"])
    assert isinstance(revoked["revoked_at"], str) and revoked["state"] == "revoked"


@pytest.mark.parametrize("storage_url", ["memory"], indirect=True)
def test_the_document_says_absent_not_null(app):
    schemas = document(app)["components"]["schemas"]
    for name, fields in [
        ("Session", ["description"]),
        ("Agent", ["description"]),
        ("ListMetadata", ["page_key"]),
        ("ApiKey", ["create_limit", "expires_at", "revoked_at"]),
    ]:
        for field in fields:
            assert "nullable" not in schemas[name]["properties"][field], (name, field)
            assert field not in schemas[name].get("required", []), (name, field)


# Answers without a body carry no Content-Type.


def test_bodyless_answers_have_no_content_type(client, full, admin):
    client.post(SESSIONS, json={"key": "s", "name": "S"}, headers=full)
    deleted = client.delete(f"{SESSIONS}/s", headers=full)
    assert deleted.status_code == 204
    assert "Content-Type" not in deleted.headers
    # OPTIONS is refused on the API (see test_limits), so it answers in the error shape.
    options = client.options(SESSIONS, headers=full)
    assert options.status_code == 405
    assert options.headers["Content-Type"] == "application/json"
    assert options.headers["X-Content-Type-Options"] == "nosniff"
    made = client.post("/v2/api_keys", json={"name": "k"}, headers=admin).get_json()
    revoked = client.delete(f"/v2/api_keys/{made['id']}", headers=admin)
    assert revoked.status_code == 204 and "Content-Type" not in revoked.headers


# Names and descriptions: no control characters, and a name is not blank.

BAD_NAMES = [
    "\u200b",
    "\u200b\u2060\ufeff",
    " \u200b ",
    "\u3164",
    "\u2800\u2800",
    "\u0301",
    "\u115f\u1160 \uffa0",
    "Evil\nfake-agent",
    "tab\there",
    "esc\x1b[2J",
    "bell\x07",
    "del\x7f",
    "c1\x85",
    "c1\x9b31m",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_refuse_blanks_and_control_characters(client, full, admin, name):
    for path, body, headers in [
        (SESSIONS, {"name": name}, full),
        ("/v2/agents", {"key": "a", "name": name}, admin),
        ("/v2/api_keys", {"name": name}, admin),
    ]:
        assert_error(client.post(path, json=body, headers=headers), 400, "invalid_request", "name")
    client.post(SESSIONS, json={"key": "s", "name": "S"}, headers=full)
    response = client.patch(f"{SESSIONS}/s", json={"name": name}, headers=full)
    assert_error(response, 400, "invalid_request", "name")


@pytest.mark.parametrize("description", ["esc\x1b]0;pwned\x07", "nul-free\x01", "c1\x9c"])
def test_descriptions_refuse_control_characters(client, full, admin, description):
    response = client.post(SESSIONS, json={"name": "n", "description": description}, headers=full)
    assert_error(response, 400, "invalid_request", "description")
    body = {"key": "a", "name": "A", "description": description}
    assert_error(
        client.post("/v2/agents", json=body, headers=admin), 400, "invalid_request", "description"
    )


def test_descriptions_keep_tabs_and_line_breaks(client, full):
    text = "line one\nline two\r\n\tindented"
    response = client.post(
        SESSIONS, json={"name": "Zero\u200bwidth inside", "description": text}, headers=full
    )
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["description"] == text


# An agent whose enabled is false takes no new sessions.


def test_a_disabled_agent_takes_no_new_sessions(client, full, admin):
    assert (
        client.post(SESSIONS, json={"key": "old", "name": "Old"}, headers=full).status_code == 201
    )
    agent = "/v2/agents/support-bot"
    assert client.patch(agent, json={"enabled": False}, headers=admin).status_code == 200
    for body in ({"name": "New"}, {"key": "new", "name": "New"}):
        assert_error(client.post(SESSIONS, json=body, headers=full), 409, "agent_disabled")
    # Its sessions stay readable, changeable and deletable.
    assert [s["key"] for s in client.get(SESSIONS, headers=full).get_json()["sessions"]] == ["old"]
    patched = client.patch(f"{SESSIONS}/old", json={"name": "Renamed"}, headers=full)
    assert patched.status_code == 200
    assert client.patch(agent, json={"enabled": True}, headers=admin).status_code == 200
    assert (
        client.post(SESSIONS, json={"key": "new", "name": "New"}, headers=full).status_code == 201
    )
    assert client.delete(f"{SESSIONS}/old", headers=full).status_code == 204


# Unknown fields are refused even when sent as null (null only means "absent" for known ones).


@pytest.mark.parametrize("field", ["bogus", "agent_key", "created_at", "updated_at"])
def test_unknown_fields_sent_as_null_are_refused(client, full, field):
    refused = client.post(SESSIONS, json={"name": "n", field: None}, headers=full)
    assert_error(refused, 400, "invalid_request")
    assert field in refused.get_json()["field_errors"]
    assert client.post(SESSIONS, json={"key": "s", "name": "S"}, headers=full).status_code == 201
    refused = client.patch(f"{SESSIONS}/s", json={field: None}, headers=full)
    assert_error(refused, 400, "invalid_request")
    assert field in refused.get_json()["field_errors"]
    assert [s["key"] for s in client.get(SESSIONS, headers=full).get_json()["sessions"]] == ["s"]


# A very long integer is out of range, in our words, not the interpreter's.


@pytest.mark.parametrize("digits", [21, 5000, 60_000])
def test_a_long_integer_is_out_of_range_in_our_words(client, full, digits):
    raw = b'{"name": "n", "metadata": {"x": ' + b"9" * digits + b"}}"
    response = client.post(SESSIONS, data=raw, headers=full | JSON)
    assert_error(response, 400, "invalid_request")
    message = " ".join(response.get_json()["messages"])
    assert "64-bit range" in message, message
    assert "sys." not in message and "4300" not in message, message


# An empty description is no description: "" clears it, and answers leave it out.


def test_an_empty_description_is_no_description(client, full, admin):
    made = client.post(SESSIONS, json={"key": "s", "name": "S", "description": ""}, headers=full)
    assert made.status_code == 201 and "description" not in made.get_json()
    described = client.patch(f"{SESSIONS}/s", json={"description": "D"}, headers=full)
    assert described.get_json()["description"] == "D"
    cleared = client.patch(f"{SESSIONS}/s", json={"description": ""}, headers=full)
    assert cleared.status_code == 200 and "description" not in cleared.get_json()
    assert "description" not in client.get(f"{SESSIONS}/s", headers=full).get_json()
    agent = "/v2/agents/support-bot"
    client.patch(agent, json={"description": "A"}, headers=admin)
    cleared = client.patch(agent, json={"description": ""}, headers=admin)
    assert cleared.status_code == 200 and "description" not in cleared.get_json()
