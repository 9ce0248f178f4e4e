"""The session list's ``metadata.KEY=VALUE`` parameters over HTTP: matches, paging, the
index kept by every write, and every refusal."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import assert_error
from tests.test_events_api import EVERYTHING

AGENT = "support-bot"
SESSIONS = f"/v2/agents/{AGENT}/sessions"


@pytest.fixture
def full(keys: Any, agent: str) -> dict[str, str]:
    return keys.headers(("*", EVERYTHING))


def create(client: Any, headers: dict[str, str], key: str, **body: Any) -> None:
    response = client.post(
        SESSIONS, json={"key": key, "name": f"Chat {key}", **body}, headers=headers
    )
    assert response.status_code == 201, response.json


def listed(client: Any, headers: dict[str, str], url: str = SESSIONS, **query: Any) -> list[str]:
    found, page_key, pages = [], None, 0
    while True:
        params = {**query, **({"page_key": page_key} if page_key else {})}
        response = client.get(url, query_string=params, headers=headers)
        assert response.status_code == 200, response.json
        found += [s["key"] for s in response.json["sessions"]]
        page_key = response.json["metadata"].get("page_key")
        pages += 1
        if page_key is None:
            return found
        assert pages < 1000


def test_matches_and_pages(client, full):
    for n in range(12):
        create(client, full, f"s{n:02}", metadata={"user_id": f"u-{n % 3}", "n": n, "vip": n < 4})
    ones = [f"s{n:02}" for n in range(12) if n % 3 == 1]
    for limit in (1, 2, 10):
        assert listed(client, full, **{"metadata.user_id": "u-1", "limit": limit}) == ones
    assert listed(client, full, **{"metadata.n": "7"}) == ["s07"]
    assert listed(client, full, **{"metadata.vip": "true", "metadata.user_id": "u-1"}) == ["s01"]
    assert listed(client, full, **{"metadata.user_id": "u-1", "filter": "s1[0-9]"}) == ["s10"]
    assert listed(client, full, **{"metadata.user_id": "u-1", "filter": "(?i)CHAT S0"}) == [
        "s01",
        "s04",
        "s07",
    ]
    assert listed(client, full, **{"metadata.user_id": "nobody"}) == []
    four = {"metadata.user_id": "u-1", "metadata.vip": "false", "metadata.n": "10"}
    assert listed(client, full, **four, **{"metadata.x": "y"}) == []
    assert listed(client, full, **four) == ["s10"]


def test_the_index_follows_patch_and_batch(client, full):
    create(client, full, "a", metadata={"user_id": "u-1"})
    create(client, full, "b")
    q = {"metadata.user_id": "u-1"}
    client.patch(f"{SESSIONS}/b", json={"metadata": {"user_id": "u-1"}}, headers=full)
    assert listed(client, full, **q) == ["a", "b"]
    batch = client.post(
        f"{SESSIONS}/a/events/batch",
        json={
            "events": [{"type": "agent_output", "content": "x"}],
            "metadata_patch": {"user_id": None},
        },
        headers=full,
    )
    assert batch.status_code == 201, batch.json
    assert listed(client, full, **q) == ["b"]
    assert client.delete(f"{SESSIONS}/b", headers=full).status_code == 204
    assert listed(client, full, **q) == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"metadata." + "k" * 129: "x"}, "metadata." + "k" * 129),
        ({"metadata.": "x"}, "metadata."),
        ({f"metadata.k{n}": "x" for n in range(5)}, "metadata.KEY"),
        ({"metadata.k": "a\x00b"}, "metadata.k"),
        ({"metadata.k\x00": "a"}, "metadata.k\x00"),
        ({"metadata": "x"}, "metadata"),
        ({"metadata.k": "x", "limit": "0"}, "limit"),
    ],
)
def test_refusals(client, full, query, field):
    assert_error(
        client.get(SESSIONS, query_string=query, headers=full), 400, "invalid_request", field
    )


def test_a_key_given_twice_is_refused(client, full):
    response = client.get(f"{SESSIONS}?metadata.k=a&metadata.k=b", headers=full)
    assert_error(response, 400, "invalid_request", "metadata.k")
    ok = client.get(f"{SESSIONS}?metadata.k=a&metadata.j=a", headers=full)
    assert ok.status_code == 200


def test_the_key_bound_is_the_metadata_setting(app, client, full):
    app.config["METADATA_MAX_KEY_LENGTH"] = 4
    assert (
        client.get(SESSIONS, query_string={"metadata.abcd": "x"}, headers=full).status_code == 200
    )
    assert_error(
        client.get(SESSIONS, query_string={"metadata.abcde": "x"}, headers=full),
        400,
        "invalid_request",
        "metadata.abcde",
    )


def test_order_of_refusals(client, keys, full):
    bad = {f"metadata.k{n}": "x" for n in range(5)}
    assert_error(client.get(SESSIONS, query_string=bad), 401, "unauthorized")
    writer = keys.headers((AGENT, ("sessions:create",)))
    assert_error(client.get(SESSIONS, query_string=bad, headers=writer), 403, "forbidden")
    missing = "/v2/agents/nobody/sessions"
    assert_error(client.get(missing, query_string=bad, headers=full), 404, "agent_not_found")
    assert_error(
        client.get(missing, query_string={"metadata.k": "x"}, headers=full), 404, "agent_not_found"
    )
