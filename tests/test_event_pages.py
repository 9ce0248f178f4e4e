"""Event pages beyond Vectara's 100: up to 1,000 events, and never past
EVENTS_PAGE_MAX_BYTES (the page ends early with a page_key to go on)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sessions_app import create_app
from tests.conftest import assert_error
from tests.test_events_api import EVENTS, EVERYTHING, SESSIONS, batch


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


def write(client: Any, headers: dict[str, str], count: int, content: str = "") -> list[str]:
    ids = []
    for start in range(0, count, 100):
        events = [
            {"type": "agent_output", "content": f"{n}{content}"}
            for n in range(start, min(count, start + 100))
        ]
        response = batch(client, headers, *events)
        assert response.status_code == 201, response.json
        ids += [e["id"] for e in response.json["events"]]
    return ids


def pages(client: Any, headers: dict[str, str], **query: Any) -> list[list[str]]:
    found, page_key = [], None
    while True:
        params = {**query, **({"page_key": page_key} if page_key else {})}
        response = client.get(EVENTS, query_string=params, headers=headers)
        assert response.status_code == 200, response.json
        assert response.data.endswith(b"\n") and json.loads(response.data) == response.json
        found.append([e["id"] for e in response.json["events"]])
        page_key = response.json["metadata"].get("page_key")
        if page_key is None:
            return found
        assert len(found) < 10_000


@pytest.mark.parametrize("storage_url", ["sqlite", "postgres"], indirect=True)
def test_a_page_of_a_thousand(client, full, session):
    ids = write(client, full, 1200)
    assert [len(p) for p in pages(client, full, limit=1000)] == [1000, 200]
    assert sum(pages(client, full, limit=1000), []) == ids
    assert sum(pages(client, full, limit=1000, order="desc"), []) == ids[::-1]
    default = client.get(EVENTS, headers=full).json
    assert [e["id"] for e in default["events"]] == ids[:10] and "page_key" in default["metadata"]


def test_past_a_thousand_is_refused(client, full, session):
    for limit in ("1001", "0", "-1", "1e3"):
        assert_error(
            client.get(EVENTS, query_string={"limit": limit}, headers=full),
            400,
            "invalid_request",
            "limit",
        )
    assert client.get(EVENTS, query_string={"limit": "1000"}, headers=full).status_code == 200


@pytest.mark.parametrize("app_config", [{"EVENTS_PAGE_MAX_BYTES": 4096}])
def test_a_page_ends_at_its_byte_bound_and_goes_on(client, full, session):
    ids = write(client, full, 40, content="x" * 800)  # under 1,000 bytes an event
    for order, expected in (("asc", ids), ("desc", ids[::-1])):
        walked = pages(client, full, limit=1000, order=order)
        assert sum(walked, []) == expected  # nothing missed, nothing twice
        assert {len(p) for p in walked[:-1]} == {4}
    first = client.get(EVENTS, query_string={"limit": 1000}, headers=full)
    assert len(first.data) <= 4096 + 200  # the events, and the page's own few bytes
    # A page of fewer events than the bound holds is whole.
    assert len(client.get(EVENTS, query_string={"limit": 3}, headers=full).json["events"]) == 3


@pytest.mark.parametrize("app_config", [{"EVENTS_PAGE_MAX_BYTES": 1024}])
def test_an_event_larger_than_the_bound_is_a_page_of_its_own(client, full, session):
    ids = write(client, full, 3, content="y" * 5000)
    assert pages(client, full, limit=100) == [[ids[0]], [ids[1]], [ids[2]]]
    hidden = client.post(f"{EVENTS}/{ids[1]}/hide", headers=full)
    assert hidden.status_code == 200
    assert pages(client, full, limit=100) == [[ids[0]], [ids[2]]]
    assert pages(client, full, limit=100, include_hidden="true", order="desc") == [
        [ids[2]],
        [ids[1]],
        [ids[0]],
    ]


@pytest.mark.parametrize("app_config", [{"EVENTS_PAGE_MAX_BYTES": 4096}])
def test_a_page_reads_no_more_events_than_its_byte_bound_holds(app, client, full, session):
    # 1,000 events of EVENT_MAX_BYTES would be 256 MiB read for a 1 MiB answer: the
    # storage hands over what the bound holds and the one event past it, no more.
    ids = write(client, full, 300, content="x" * 800)
    storage = app.extensions["agent_sessions"].storage
    read, handed = storage.list_events, []

    def spy(**kwargs: Any) -> Any:
        page = read(**kwargs)
        handed.append(len(page.items))
        return page

    storage.list_events = spy
    for order, expected in (("asc", ids), ("desc", ids[::-1])):
        handed.clear()
        assert sum(pages(client, full, limit=1000, order=order), []) == expected
        assert handed and max(handed) <= 6, handed
    handed.clear()
    kinds = {"limit": 1000, "type": "agent_output,thinking", "include_hidden": "true"}
    assert sum(pages(client, full, **kinds), []) == ids
    assert max(handed) <= 6, handed
