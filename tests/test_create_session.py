"""POST /v2/agents/{agent_key}/sessions: the central endpoint, to the letter of the contract."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import SESSION_FIELDS, assert_error

URL = "/v2/agents/support-bot/sessions"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
KEY = re.compile(r"^[0-9a-zA-Z_-]{1,64}$")


def post(client, headers, body, **kwargs):
    return client.post(URL, json=body, headers=headers, **kwargs)


def test_created_with_every_field(client, full):
    body = {
        "key": "chat-1",
        "name": "Billing question",
        "description": "A customer asks about invoices",
        "metadata": {"customer": {"id": 42, "tier": "gold"}, "tags": ["a", "b"]},
        "enabled": False,
        "tti_minutes": 30,
    }
    response = post(client, full, body)
    assert response.status_code == 201, response.json
    session = response.get_json()
    assert list(session) == SESSION_FIELDS
    assert {k: session[k] for k in body} == body
    assert session["agent_key"] == "support-bot"
    assert TIMESTAMP.match(session["created_at"]) and session["created_at"] == session["updated_at"]
    assert response.headers["Location"] == f"{URL}/chat-1"
    assert response.headers["Content-Type"] == "application/json"
    fetched = client.get(response.headers["Location"], headers=full)
    assert fetched.status_code == 200 and fetched.get_json() == session


def test_defaults(client, full):
    session = post(client, full, {"name": "Just a name"}).get_json()
    assert "description" not in session  # absent, not null
    assert session["metadata"] == {}
    assert session["enabled"] is True
    assert session["tti_minutes"] == 0


def test_null_means_absent(client, full):
    body = {"key": None, "name": "n", "description": None, "metadata": None, "enabled": None}
    response = post(client, full, body | {"tti_minutes": None})
    assert response.status_code == 201, response.json
    session = response.get_json()
    assert session["metadata"] == {} and session["enabled"] is True and session["tti_minutes"] == 0
    assert session["key"] == "n"


def test_null_name_is_missing(client, full):
    assert_error(post(client, full, {"name": None}), 400, "invalid_request", "name")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Billing Question", "billing-question"),
        ("Café crème  à  Zürich", "cafe-creme-a-zurich"),
        ("会话 测试", "hui-hua-ce-shi"),
        ("Привет мир", "privet-mir"),
        ("مرحبا", "mrhb"),
        ("🎉🎉", "session"),
        ("!!!", "session"),
        ("under_score and-dash", "under-score-and-dash"),
        ("x" * 255, "x" * 48),
    ],
)
def test_generated_keys_are_readable_slugs(client, full, name, expected):
    response = post(client, full, {"name": name})
    assert response.status_code == 201, response.json
    key = response.get_json()["key"]
    assert KEY.match(key)
    assert key == expected


def test_generated_keys_never_collide(client, full):
    keys = [post(client, full, {"name": "Same name"}).get_json()["key"] for _ in range(20)]
    assert keys[0] == "same-name"
    assert len(set(keys)) == 20
    assert all(KEY.match(k) and k.startswith("same-name") for k in keys)


def test_generated_key_skips_a_supplied_one(client, full):
    assert post(client, full, {"key": "hello", "name": "other"}).status_code == 201
    key = post(client, full, {"name": "Hello"}).get_json()["key"]
    assert key != "hello" and key.startswith("hello-")


def test_duplicate_key_is_conflict_and_keeps_the_original(client, full):
    first = post(client, full, {"key": "k", "name": "first"}).get_json()
    assert_error(post(client, full, {"key": "k", "name": "second"}), 409, "conflict")
    assert client.get(f"{URL}/k", headers=full).get_json() == first


def test_same_key_under_two_agents(client, full, admin):
    client.post("/v2/agents", json={"key": "other", "name": "Other"}, headers=admin)
    assert post(client, full, {"key": "k", "name": "a"}).status_code == 201
    response = client.post(
        "/v2/agents/other/sessions", json={"key": "k", "name": "b"}, headers=full
    )
    assert response.status_code == 201


BAD_BODIES = [
    # (body, error code, field)
    ({}, "invalid_request", "name"),
    ({"name": ""}, "invalid_request", "name"),
    ({"name": "   "}, "invalid_request", "name"),
    ({"name": "x" * 256}, "invalid_request", "name"),
    ({"name": 5}, "invalid_request", "name"),
    ({"name": ["a"]}, "invalid_request", "name"),
    ({"name": "n", "description": "x" * 2001}, "invalid_request", "description"),
    ({"name": "n", "description": 1}, "invalid_request", "description"),
    ({"name": "n", "key": ""}, "invalid_request", "key"),
    ({"name": "n", "key": "has space"}, "invalid_request", "key"),
    ({"name": "n", "key": "slash/es"}, "invalid_request", "key"),
    ({"name": "n", "key": "trailing\n"}, "invalid_request", "key"),
    ({"name": "n", "key": "ünï"}, "invalid_request", "key"),
    ({"name": "n", "key": "k" * 65}, "invalid_request", "key"),
    ({"name": "n", "key": 12}, "invalid_request", "key"),
    ({"name": "n", "enabled": "true"}, "invalid_request", "enabled"),
    ({"name": "n", "enabled": 1}, "invalid_request", "enabled"),
    ({"name": "n", "enabled": 0}, "invalid_request", "enabled"),
    ({"name": "n", "tti_minutes": -1}, "invalid_request", "tti_minutes"),
    ({"name": "n", "tti_minutes": 1.5}, "invalid_request", "tti_minutes"),
    ({"name": "n", "tti_minutes": "5"}, "invalid_request", "tti_minutes"),
    ({"name": "n", "tti_minutes": True}, "invalid_request", "tti_minutes"),
    ({"name": "n", "tti_minutes": 2**31}, "invalid_request", "tti_minutes"),
    ({"name": "n", "agent_key": "other"}, "invalid_request", "agent_key"),
    ({"name": "n", "created_at": "2020-01-01T00:00:00.000Z"}, "invalid_request", "created_at"),
    ({"name": "n", "updated_at": "2020-01-01T00:00:00.000Z"}, "invalid_request", "updated_at"),
    ({"name": "n", "from_session": "x"}, "invalid_request", "from_session"),  # an object
    ({"name": "n", "metadata": []}, "invalid_metadata", "metadata"),
    ({"name": "n", "metadata": "text"}, "invalid_metadata", "metadata"),
    ({"name": "n", "metadata": 3}, "invalid_metadata", "metadata"),
    ({"name": "n", "metadata": {f"k{i}": i for i in range(65)}}, "invalid_metadata", "metadata"),
    ({"name": "n", "metadata": {"": 1}}, "invalid_metadata", "metadata"),
    ({"name": "n", "metadata": {"k" * 129: 1}}, "invalid_metadata", "metadata"),
    (
        {"name": "n", "metadata": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}},
        "invalid_metadata",
        "metadata",
    ),
    ({"name": "n", "metadata": {"a": [[[[[[[[1]]]]]]]]}}, "invalid_metadata", "metadata"),
    ({"name": "n", "metadata": {"big": "x" * 16400}}, "invalid_metadata", "metadata"),
]


@pytest.mark.parametrize(("body", "code", "field"), BAD_BODIES)
def test_bad_bodies(client, full, body, code, field):
    body_text = json.dumps(body)
    response = client.post(URL, data=body_text, headers=full, content_type="application/json")
    assert_error(response, 400, code, field)
    listing = client.get(URL, headers=full).get_json()
    assert listing["sessions"] == []  # nothing stored


def test_metadata_at_its_bounds_is_accepted(client, full):
    eight_deep = {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}
    wide = {f"k{i}": i for i in range(64)}
    for metadata in (eight_deep, wide, {"k" * 128: None}, {"big": "x" * 16000}):
        response = post(client, full, {"name": "n", "metadata": metadata})
        assert response.status_code == 201, response.json
        assert response.get_json()["metadata"] == metadata


def test_messages_name_the_fields(client, full):
    body = assert_error(post(client, full, {"bogus": 1}), 400, "invalid_request")
    assert body["field_errors"] == {
        "name": "Missing data for required field.",
        "bogus": "Unknown field.",
    }
    assert "bogus: Unknown field." in body["messages"]


RAW_BODIES = [
    # (raw body, content type, status, code)
    (b'{"name": "n"', "application/json", 400, "invalid_request"),
    (b"", "application/json", 400, "invalid_request"),
    (b"[]", "application/json", 400, "invalid_request"),
    (b'"name"', "application/json", 400, "invalid_request"),
    (b"null", "application/json", 400, "invalid_request"),
    (b'{"name": "n", "name": "m"}', "application/json", 400, "invalid_request"),
    (b'{"name": NaN}', "application/json", 400, "invalid_request"),
    (b'{"name": "n", "metadata": {"x": Infinity}}', "application/json", 400, "invalid_request"),
    (b'{"name": "n", "metadata": {"x": 1e999}}', "application/json", 400, "invalid_request"),
    (
        b'{"name": "n", "metadata": {"x": 18446744073709551616}}',
        "application/json",
        400,
        "invalid_request",
    ),
    (b'{"name": "n\\u0000"}', "application/json", 400, "invalid_request"),
    (b'{"name": "n", "metadata": {"k\\u0000": 1}}', "application/json", 400, "invalid_request"),
    (b'{"name": "\\ud800"}', "application/json", 400, "invalid_request"),
    (b'{"name": "\xff\xfe"}', "application/json", 400, "invalid_request"),
    (b"[" * 1000 + b"]" * 1000, "application/json", 400, "invalid_request"),
    (
        b'{"name": "n", "metadata": ' + b'{"a":' * 1000 + b"1" + b"}" * 1001,
        "application/json",
        400,
        "invalid_request",
    ),
    (b'{"name": "n"}', "text/plain", 415, "unsupported_media_type"),
    (b'{"name": "n"}', "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    (b'{"name": "n"}', "application/json; charset=latin-1", 415, "unsupported_media_type"),
    (b'{"name": "n"}', None, 415, "unsupported_media_type"),
]


@pytest.mark.parametrize(("raw", "content_type", "status", "code"), RAW_BODIES)
def test_raw_bodies(client, full, raw, content_type, status, code):
    headers = dict(full)
    if content_type:
        headers["Content-Type"] = content_type
    assert_error(client.post(URL, data=raw, headers=headers), status, code)
    assert client.get(URL, headers=full).get_json()["sessions"] == []


@pytest.mark.parametrize(
    "raw",
    [
        b'{"name": "emoji \\ud83d\\ude00"}',
        b'{"name": "literal \\\\u0000 text"}',
        b'{"name": "n", "metadata": {"x": 9223372036854775807, "y": -9223372036854775808}}',
    ],
)
def test_edge_bodies_that_are_valid(client, full, raw):
    response = client.post(URL, data=raw, headers=full | {"Content-Type": "application/json"})
    assert response.status_code == 201, response.json
    assert response.get_json()["name"] == json.loads(raw)["name"]


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_content_types_accepted(client, full, content_type):
    response = client.post(
        URL, data=b'{"name": "n"}', headers=full | {"Content-Type": content_type}
    )
    assert response.status_code == 201


def test_body_over_the_limit_is_413(client, full):
    raw = json.dumps({"name": "n", "description": "x" * 70_000}).encode()
    assert_error(
        client.post(URL, data=raw, headers=full | {"Content-Type": "application/json"}),
        413,
        "payload_too_large",
    )


def test_body_limit_is_configurable(storage_url, tmp_path):
    from sessions_app import create_app
    from tests.conftest import Keys

    app = create_app({"TESTING": True, "STORAGE_URL": storage_url, "MAX_CONTENT_LENGTH": 100})
    client = app.test_client()
    admin = Keys(app).headers(admin=True)
    client.post("/v2/agents", json={"key": "support-bot", "name": "S"}, headers=admin)
    assert client.post(URL, json={"name": "n"}, headers=admin).status_code == 201
    assert_error(
        client.post(URL, json={"name": "n" * 120}, headers=admin), 413, "payload_too_large"
    )


def test_unknown_agent(client, full):
    response = client.post("/v2/agents/nobody/sessions", json={"name": "n"}, headers=full)
    assert_error(response, 404, "agent_not_found")


def test_unknown_agent_beats_a_bad_body(client, full):
    response = client.post("/v2/agents/nobody/sessions", json={"bogus": 1}, headers=full)
    assert_error(response, 404, "agent_not_found")


def test_request_id_is_reused_when_sane(client, full):
    response = client.post(URL, json={"name": "n"}, headers=full | {"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    bad = client.post(URL, json={}, headers=full | {"X-Request-ID": "no spaces <script>"})
    body = assert_error(bad, 400, "invalid_request")
    assert body["request_id"] != "no spaces <script>"


def test_response_headers(client, full):
    response = post(client, full, {"name": "n"})
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-RateLimit-Limit"] == "120"
    assert int(response.headers["X-RateLimit-Remaining"]) == 119
