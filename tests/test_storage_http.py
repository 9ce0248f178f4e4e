"""Storage behaviour as clients see it, the same on every backend."""

from __future__ import annotations

import base64

import pytest

from .conftest import assert_error

MAX_POSITION = 2**63 - 1


def page_key(position: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{position}".encode()).decode().rstrip("=")


LISTS = ["/v2/agents", "/v2/agents/support-bot/sessions", "/v2/api_keys"]


@pytest.mark.parametrize("path", LISTS)
def test_a_page_key_past_the_largest_position_is_a_400(client, admin, agent, path):
    # 9999999999999999999: the crafted key of the review, past a 64-bit integer.
    assert page_key(9999999999999999999) == "djE6OTk5OTk5OTk5OTk5OTk5OTk5OQ"
    for position in (MAX_POSITION + 1, 9999999999999999999):
        response = client.get(path, query_string={"page_key": page_key(position)}, headers=admin)
        assert_error(response, 400, "invalid_request")
    response = client.get(path, query_string={"page_key": page_key(MAX_POSITION)}, headers=admin)
    assert response.status_code == 200, response.get_data(as_text=True)


def test_every_backend_answers_the_metadata_bytes_as_sent(client, full, agent):
    sent = b'{"zeta":-0.0,"alpha":1e+16,"mid":[1.5,{"b":null,"a":"\xc3\xa9"}]}'
    body = b'{"key":"s1","name":"n","metadata":' + sent + b"}"
    created = client.post(
        f"/v2/agents/{agent}/sessions",
        data=body,
        headers={**full, "Content-Type": "application/json"},
    )
    assert created.status_code == 201, created.get_data(as_text=True)
    fetched = client.get(f"/v2/agents/{agent}/sessions/s1", headers=full)
    assert b'"metadata":' + sent in fetched.get_data()
    listed = client.get(f"/v2/agents/{agent}/sessions", headers=full)
    assert b'"metadata":' + sent in listed.get_data()
