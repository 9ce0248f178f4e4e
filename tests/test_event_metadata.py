"""An event's own ``metadata`` (beyond Vectara): every type takes it, bounded like session
metadata in keys, key length and depth, counted in EVENT_MAX_BYTES, kept by fork."""

from __future__ import annotations

from typing import Any

import pytest

from sessions_app import create_app
from tests.conftest import assert_error
from tests.test_events_api import EVENTS, EVERY_TYPE, EVERYTHING, SESSIONS, TEXT, all_events, batch


@pytest.fixture
def app_config() -> dict[str, Any]:
    return {}


@pytest.fixture
def app(storage_url: str, app_config: dict[str, Any]) -> Any:
    app = create_app({"TESTING": True, "STORAGE_URL": storage_url, **app_config})
    yield app
    app.extensions["agent_sessions"].storage.close()


@pytest.fixture
def full(keys: Any, agent: str) -> dict[str, str]:
    return keys.headers(("*", EVERYTHING))


@pytest.fixture
def session(client: Any, full: dict[str, str]) -> str:
    response = client.post(SESSIONS, json={"key": "s1", "name": "One"}, headers=full)
    assert response.status_code == 201, response.json
    return "s1"


META = {"adk": {"invocation_id": "e-1", "branch": "a.b"}, "author": "agent", "n": [1, None]}


def test_every_type_keeps_its_metadata(client, full, session):
    sent = [{**event, "metadata": {**META, "i": i}} for i, event in enumerate(EVERY_TYPE)]
    response = batch(client, full, *sent, EVERY_TYPE[1])
    assert response.status_code == 201, response.json
    written = response.json["events"]
    for i, answered in enumerate(written[:-1]):
        assert answered["metadata"] == {**META, "i": i}
        assert list(answered)[-1] == "metadata"  # after the type's own fields
    assert "metadata" not in written[-1]  # absent when not sent
    assert all_events(client, full) == written
    one = client.get(f"{EVENTS}/{written[4]['id']}", headers=full).json
    assert one["metadata"] == {**META, "i": 4}


def test_input_message_takes_metadata(client, full, session):
    response = client.post(EVENTS, json={**TEXT, "metadata": {"turn": 3}}, headers=full)
    assert response.status_code == 201, response.json
    [event] = response.json["events"]
    assert event["metadata"] == {"turn": 3}
    assert client.get(f"{EVENTS}/{event['id']}", headers=full).json == event
    plain = client.post(EVENTS, json={**TEXT, "metadata": None}, headers=full).json["events"][0]
    assert "metadata" not in plain  # null is absent


def test_an_empty_object_is_kept(client, full, session):
    [event] = batch(client, full, {**TEXT, "metadata": {}}).json["events"]
    assert event["metadata"] == {}


BAD_METADATA = [
    ([1], "invalid_metadata"),
    ("text", "invalid_metadata"),
    ({f"k{i}": i for i in range(65)}, "invalid_metadata"),
    ({"k" * 129: 1}, "invalid_metadata"),
    ({"": 1}, "invalid_metadata"),
    ({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}, "invalid_metadata"),
    ({"deep": [[[[[[[[1]]]]]]]]}, "invalid_metadata"),
]


@pytest.mark.parametrize(("metadata", "code"), BAD_METADATA)
def test_bounds_like_session_metadata(client, full, session, metadata, code):
    body = assert_error(
        batch(client, full, TEXT, {**TEXT, "metadata": metadata}), 400, code, "events.1.metadata"
    )
    assert body["field_errors"] == {"events.1.metadata": body["field_errors"]["events.1.metadata"]}
    assert_error(
        client.post(EVENTS, json={**TEXT, "metadata": metadata}, headers=full),
        400,
        code,
        "metadata",
    )
    assert all_events(client, full) == []  # nothing of the batch was written


def test_a_bad_metadata_among_other_errors_is_invalid_request(client, full, session):
    bad = {"type": "agent_output", "metadata": [1]}  # no content either
    assert_error(batch(client, full, bad), 400, "invalid_request", "events.0.content")


@pytest.mark.parametrize("app_config", [{"METADATA_MAX_KEYS": 2, "METADATA_MAX_DEPTH": 2}])
def test_the_session_metadata_settings_bound_it(client, full, session):
    assert batch(client, full, {**TEXT, "metadata": {"a": {"b": 1}, "c": 2}}).status_code == 201
    for metadata in ({"a": 1, "b": 2, "c": 3}, {"a": {"b": {"c": 1}}}):
        assert_error(batch(client, full, {**TEXT, "metadata": metadata}), 400, "invalid_metadata")


@pytest.mark.parametrize("app_config", [{"METADATA_MAX_BYTES": 100}])
def test_its_bytes_count_in_the_event_not_in_the_metadata_bound(client, app, full, session):
    big = {"notes": "x" * 1000}  # past METADATA_MAX_BYTES, well within EVENT_MAX_BYTES
    assert batch(client, full, {**TEXT, "metadata": big}).status_code == 201
    limit = app.config["EVENT_MAX_BYTES"]
    huge = {"notes": "x" * limit}
    body = assert_error(batch(client, full, {**TEXT, "metadata": huge}), 413, "payload_too_large")
    assert "events.0" in body["messages"][0]
    # The same event without it fits: the metadata made it too large.
    assert batch(client, full, {**TEXT}).status_code == 201


def test_fork_copies_it(client, full, session):
    ids = [e["id"] for e in batch(client, full, {**TEXT, "metadata": META}, TEXT).json["events"]]
    forked = client.post(
        SESSIONS,
        json={"key": "f1", "name": "F", "from_session": {"session_key": "s1"}},
        headers=full,
    )
    assert forked.status_code == 201, forked.json
    copies = all_events(client, full, url=f"{SESSIONS}/f1/events")
    assert [e["id"] for e in copies] == ids
    assert copies[0]["metadata"] == META and "metadata" not in copies[1]


def test_an_unknown_field_named_metadata_elsewhere_is_still_unknown(client, full, session):
    body = {"type": "compact", "summary_text": "s", "metadata": {"a": 1}}
    assert_error(client.post(EVENTS, json=body, headers=full), 400, "invalid_request", "metadata")
