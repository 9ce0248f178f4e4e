"""Idempotency-Key answers that break the contract: found by attacking a live server.

Each test here fails on the code as it stands; the fix makes it pass.
"""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import ALL_SCOPES

SESSIONS = "/v2/agents/support-bot/sessions"
EVERY_SCOPE = (*ALL_SCOPES, "events:create", "events:append")


@pytest.fixture
def writer(keys, agent) -> dict[str, str]:
    return keys.headers(("*", EVERY_SCOPE))


@pytest.mark.parametrize("storage_url", ["sqlite"], indirect=True)
def test_a_body_nested_to_the_parsers_limit_is_never_a_500_with_a_key(client, keys, agent):
    """The parser takes a body nested just short of the recursion limit; the
    fingerprint, serialised a few frames deeper, must not turn it into a 500.

    Live, under gunicorn: ``'{"name":"d","x":' + '[' * 978 + ']' * 978 + '}'``
    on any of the creates, with an Idempotency-Key, is 500 (RecursionError in
    ``idempotency.fingerprint``); without the header it is a 400.
    """
    # Its own create limit, so that every depth reaches the parser, not a 429.
    writer = keys.headers(("*", EVERY_SCOPE), create_limit="1000000/minute")
    seen = {}
    for depth in range(600, 1100):
        body = '{"name": "d", "x": ' + "[" * depth + "]" * depth + "}"
        response = client.post(
            SESSIONS,
            data=body,
            content_type="application/json",
            headers={**writer, "Idempotency-Key": str(uuid.uuid4())},
        )
        seen.setdefault(response.status_code, depth)
    assert 429 not in seen, seen
    assert all(status < 500 for status in seen), seen


@pytest.mark.parametrize("storage_url", ["sqlite"], indirect=True)
def test_a_replayed_refusal_names_its_own_request_id_in_body_and_header(client, writer):
    """Every error's ``request_id`` is its ``X-Request-ID`` header (API.md, Errors).

    A replayed 4xx keeps the first answer's body, with the first request's id,
    under the replay's new ``X-Request-ID``: the two disagree.
    """
    headers = {**writer, "Idempotency-Key": "refusal-1"}
    first = client.post(SESSIONS, json={"name": ""}, headers=headers)
    assert first.status_code == 400
    replay = client.post(SESSIONS, json={"name": ""}, headers=headers)
    assert replay.status_code == 400
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json()["request_id"] == replay.headers["X-Request-ID"]
