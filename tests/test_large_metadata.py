"""Metadata of an ADK-sized state (1 MiB a session) through the documented settings, end to
end: the body bounds, each write of metadata, the index, state documents, replays, a live
gunicorn."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from sessions_app import create_app
from tests.conftest import assert_error
from tests.servers import serving_store
from tests.test_events_api import AGENT, EVERYTHING, SESSIONS, TEXT

MIB = 1024 * 1024
# The README's profile for ADK state: 1 MiB of metadata, 1,024 keys, bodies that hold it.
LARGE = {
    "METADATA_MAX_BYTES": MIB,
    "METADATA_MAX_KEYS": 1024,
    "MAX_CONTENT_LENGTH": 2 * MIB,
}


def sized(total: int, keys: int = 512, **extra: Any) -> dict[str, Any]:
    """Metadata of ``keys`` keys that serializes to exactly ``total`` bytes."""
    value = {f"k{n:04}": "" for n in range(keys)} | extra
    pad = total - len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    assert pad > 0
    first = f"k{0:04}"
    value[first] = "x" * pad
    assert len(json.dumps(value, separators=(",", ":")).encode()) == total
    return value


@pytest.fixture
def app(storage_url: str) -> Any:
    app = create_app({"TESTING": True, "STORAGE_URL": storage_url, **LARGE})
    yield app
    app.extensions["agent_sessions"].storage.close()


@pytest.fixture
def full(keys: Any, agent: str) -> dict[str, str]:
    return keys.headers(("*", EVERYTHING))


def test_a_session_holds_a_mebibyte_of_metadata(client, full):
    metadata = sized(MIB, user_id="u-17")
    created = client.post(
        SESSIONS, json={"key": "big", "name": "Big", "metadata": metadata}, headers=full
    )
    assert created.status_code == 201, created.get_data(as_text=True)[:300]
    got = client.get(f"{SESSIONS}/big", headers=full)
    assert got.json["metadata"] == metadata and got.headers["ETag"] == created.headers["ETag"]
    listed = client.get(SESSIONS, query_string={"metadata.user_id": "u-17"}, headers=full)
    assert [s["key"] for s in listed.json["sessions"]] == ["big"]
    # One byte more is the metadata bound's, not the body's.
    over = client.post(
        SESSIONS, json={"key": "over", "name": "Over", "metadata": sized(MIB + 1)}, headers=full
    )
    assert_error(over, 400, "invalid_metadata", "metadata")
    replaced = sized(MIB, keys=1000, user_id="u-18")
    patched = client.patch(f"{SESSIONS}/big", json={"metadata": replaced}, headers=full)
    assert patched.status_code == 200 and patched.json["metadata"] == replaced
    assert (
        client.get(SESSIONS, query_string={"metadata.user_id": "u-17"}, headers=full).json[
            "sessions"
        ]
        == []
    )


def test_a_batch_grows_metadata_and_state_to_the_bound(client, full):
    client.post(SESSIONS, json={"key": "s1", "name": "One"}, headers=full)
    half = {"a": "x" * (MIB // 2 - 100)}
    batch = f"{SESSIONS}/s1/events/batch"
    body = {"events": [TEXT], "metadata_patch": half, "state_patch": {"app": half}}
    assert client.post(batch, json=body, headers=full).status_code == 201
    more = {"b": "y" * (MIB // 2 - 100)}
    body = {"events": [TEXT], "metadata_patch": more, "state_patch": {"app": more}}
    response = client.post(batch, json=body, headers=full)
    assert response.status_code == 201, response.json
    session = client.get(f"{SESSIONS}/s1", headers=full).json
    assert set(session["metadata"]) == {"a", "b"}
    state = client.get(f"/v2/agents/{AGENT}/state", query_string={"keys": "app"}, headers=full)
    assert set(state.json["state"][0]["value"]) == {"a", "b"}
    # Past the bound: refused, and nothing of the batch is written.
    body = {"events": [TEXT], "metadata_patch": {"c": "z" * 1000}}
    assert_error(client.post(batch, json=body, headers=full), 400, "invalid_metadata")
    body = {"events": [TEXT], "state_patch": {"app": {"c": "z" * 1000}}}
    assert_error(client.post(batch, json=body, headers=full), 400, "invalid_request")
    events = client.get(f"{SESSIONS}/s1/events", headers=full).json["events"]
    assert len(events) == 2


def test_a_replayed_create_answers_the_same_mebibyte(client, full):
    headers = {**full, "Idempotency-Key": "big-1"}
    body = {"key": "big", "name": "Big", "metadata": sized(MIB)}
    first = client.post(SESSIONS, json=body, headers=headers)
    again = client.post(SESSIONS, json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true" and again.data == first.data


def test_the_body_bound_still_holds(client, full):
    metadata = {"a": "x" * (2 * MIB)}
    response = client.post(
        SESSIONS, json={"key": "huge", "name": "Huge", "metadata": metadata}, headers=full
    )
    assert_error(response, 413, "payload_too_large")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_through_gunicorn(tmp_path, backend):
    settings = {f"AGENT_SESSIONS_{name}": str(value) for name, value in LARGE.items()}
    grants = f"{AGENT}=sessions:create,sessions:read,sessions:update,events:append"
    with serving_store(backend, tmp_path, settings, grants=grants) as (server, token, _):
        headers = {"x-api-key": token}
        url = f"{server.url}/v2/agents/{AGENT}/sessions"
        metadata = sized(MIB, user_id="u-17")
        created = requests.post(
            url,
            json={"key": "big", "name": "Big", "metadata": metadata},
            headers=headers,
            timeout=60,
        )
        assert created.status_code == 201, created.text[:300]
        assert (
            requests.get(f"{url}/big", headers=headers, timeout=60).json()["metadata"] == metadata
        )
        found = requests.get(url, params={"metadata.user_id": "u-17"}, headers=headers, timeout=60)
        assert [s["key"] for s in found.json()["sessions"]] == ["big"]
        over = requests.patch(
            f"{url}/big", json={"metadata": sized(MIB + 1)}, headers=headers, timeout=60
        )
        assert over.status_code == 400 and over.json()["error"] == "invalid_metadata"
