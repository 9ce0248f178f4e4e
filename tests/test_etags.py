"""ETag, If-Match and If-None-Match on sessions and agents, on every backend.

The in-process part runs once per backend (the ``client`` fixture); the
concurrent part sends two PATCHes holding one ETag at once to a live gunicorn
(1 worker with its threads on memory://, 4 workers on SQLite and PostgreSQL):
every round, exactly one is 200 and the other 412, and the winner's change is
what is stored.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import threading
from collections.abc import Iterator

import pytest
import requests

from tests.conftest import assert_error
from tests.servers import Server, serving, serving_store

SESSION = "/v2/agents/support-bot/sessions/s1"
AGENT = "/v2/agents/support-bot"
CONTRACT_HEADERS = (
    "X-Request-ID",
    "X-Content-Type-Options",
    "Cache-Control",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
)


@pytest.fixture
def session(client, full, agent) -> str:
    """A session s1 of support-bot; its ETag from the create."""
    response = client.post(
        f"/v2/agents/{agent}/sessions",
        json={"key": "s1", "name": "First", "metadata": {"a": 1}},
        headers=full,
    )
    assert response.status_code == 201, response.json
    return response.headers["ETag"]


def strong(tag: str) -> bool:
    return tag.startswith('"') and tag.endswith('"') and len(tag) > 2


def test_create_get_and_patch_answer_the_etag_of_the_bytes_they_send(client, full, session):
    assert strong(session)
    got = client.get(SESSION, headers=full)
    assert got.headers["ETag"] == session
    assert got.headers["ETag"] == f'"{hashlib.blake2b(got.data, digest_size=16).hexdigest()}"'
    patched = client.patch(SESSION, json={"name": "Second"}, headers=full)
    assert patched.status_code == 200
    assert patched.headers["ETag"] not in (session, None)
    assert client.get(SESSION, headers=full).headers["ETag"] == patched.headers["ETag"]


def test_agents_answer_etags_too(client, admin, agent):
    got = client.get(AGENT, headers=admin)
    tag = got.headers["ETag"]
    assert strong(tag) and client.get(AGENT, headers=admin).headers["ETag"] == tag
    created = client.post("/v2/agents", json={"key": "other", "name": "O"}, headers=admin)
    assert created.headers["ETag"] == client.get("/v2/agents/other", headers=admin).headers["ETag"]
    seen = {tag}
    for change in ({"name": "N"}, {"description": "D"}, {"metadata": {"x": 1}}, {"enabled": False}):
        patched = client.patch(AGENT, json=change, headers=admin)
        assert patched.status_code == 200
        assert patched.headers["ETag"] not in seen, change
        seen.add(patched.headers["ETag"])
    # Lists and deletes carry none: a list is not one record, a 204 has no representation.
    assert "ETag" not in client.get("/v2/agents", headers=admin).headers


SESSION_CHANGES = [
    {"name": "Other"},
    {"description": "now described"},
    {"description": ""},
    {"metadata": {"a": 2}},
    {"metadata": {"a": 2, "b": None}},
    {"enabled": False},
    {"tti_minutes": 60},
]


def test_the_etag_changes_with_every_field_and_only_then(client, full, session, keys):
    seen = {session}
    tag = session
    for change in SESSION_CHANGES:
        patched = client.patch(SESSION, json=change, headers=full)
        assert patched.status_code == 200, patched.json
        assert patched.headers["ETag"] not in seen, change
        tag = patched.headers["ETag"]
        seen.add(tag)
        assert client.get(SESSION, headers=full).headers["ETag"] == tag
    # An event written restarts the idle clock, which the session's fields do not show.
    events = keys.headers(("support-bot", ("events:append", "events:create")))
    client.patch(SESSION, json={"enabled": True}, headers=full)
    tag = client.get(SESSION, headers=full).headers["ETag"]
    batch = {"events": [{"type": "agent_output", "content": "hi"}]}
    assert client.post(f"{SESSION}/events/batch", json=batch, headers=events).status_code == 201
    assert client.get(SESSION, headers=full).headers["ETag"] == tag
    # A metadata_patch changes a field: the tag moves with it.
    batch["metadata_patch"] = {"c": 3}
    assert client.post(f"{SESSION}/events/batch", json=batch, headers=events).status_code == 201
    assert client.get(SESSION, headers=full).headers["ETag"] != tag


def test_if_none_match_on_get_is_304_with_the_contract_headers(client, full, session):
    for value in (session, f"W/{session}", f'"other", {session}', "*"):
        response = client.get(SESSION, headers={**full, "If-None-Match": value})
        assert response.status_code == 304, value
        assert response.data == b""
        assert response.headers["ETag"] == session
        assert "Content-Type" not in response.headers
        for name in CONTRACT_HEADERS:
            assert name in response.headers, name
        assert response.headers["Cache-Control"] == "no-store"
    response = client.get(SESSION, headers={**full, "If-None-Match": '"other"'})
    assert response.status_code == 200 and response.json["name"] == "First"
    # Changed since: the full answer, with the new tag.
    client.patch(SESSION, json={"name": "Second"}, headers=full)
    response = client.get(SESSION, headers={**full, "If-None-Match": session})
    assert response.status_code == 200 and response.headers["ETag"] != session


def test_a_stale_if_match_is_412_and_changes_nothing(client, full, session):
    before = client.get(SESSION, headers=full)
    for value in ('"stale"', f"W/{session}", '""', ""):
        response = client.patch(SESSION, json={"name": "Lost"}, headers={**full, "If-Match": value})
        assert_error(response, 412, "precondition_failed")
        assert "ETag" not in response.headers
        response = client.delete(SESSION, headers={**full, "If-Match": value})
        assert_error(response, 412, "precondition_failed")
    # If-None-Match naming the current tag refuses a write too.
    response = client.patch(SESSION, json={"name": "Lost"}, headers={**full, "If-None-Match": "*"})
    assert_error(response, 412, "precondition_failed")
    after = client.get(SESSION, headers=full)
    assert after.data == before.data and after.headers["ETag"] == session
    # A GET with a stale If-Match is refused as well.
    assert_error(
        client.get(SESSION, headers={**full, "If-Match": '"x"'}), 412, "precondition_failed"
    )


def test_a_current_if_match_lets_the_write_through(client, full, session):
    response = client.patch(
        SESSION, json={"name": "Second"}, headers={**full, "If-Match": f'"x", {session}'}
    )
    assert response.status_code == 200 and response.json["name"] == "Second"
    tag = response.headers["ETag"]
    assert (
        client.patch(SESSION, json={"name": "Third"}, headers={**full, "If-Match": "*"}).json[
            "name"
        ]
        == "Third"
    )
    assert_error(
        client.patch(SESSION, json={"name": "Lost"}, headers={**full, "If-Match": tag}),
        412,
        "precondition_failed",
    )
    assert client.get(SESSION, headers=full).json["name"] == "Third"


def test_delete_with_if_match(client, full, session):
    assert_error(
        client.delete(SESSION, headers={**full, "If-Match": '"stale"'}), 412, "precondition_failed"
    )
    assert client.get(SESSION, headers=full).status_code == 200
    response = client.delete(SESSION, headers={**full, "If-Match": session})
    assert response.status_code == 204
    # Gone: a 404, whatever the condition (a precondition is ignored where the answer
    # without it would not be 2xx), and `*` matches no missing record.
    for value in (session, "*"):
        assert_error(
            client.delete(SESSION, headers={**full, "If-Match": value}), 404, "session_not_found"
        )
        assert_error(
            client.patch(SESSION, json={"name": "x"}, headers={**full, "If-Match": value}),
            404,
            "session_not_found",
        )


def test_agent_writes_with_if_match(client, admin, agent):
    tag = client.get(AGENT, headers=admin).headers["ETag"]
    assert_error(
        client.patch(AGENT, json={"name": "x"}, headers={**admin, "If-Match": '"stale"'}),
        412,
        "precondition_failed",
    )
    assert_error(
        client.delete(AGENT, headers={**admin, "If-Match": '"stale"'}), 412, "precondition_failed"
    )
    assert client.get(AGENT, headers=admin).headers["ETag"] == tag
    patched = client.patch(AGENT, json={"name": "x"}, headers={**admin, "If-Match": tag})
    assert patched.status_code == 200
    assert_error(
        client.delete(AGENT, headers={**admin, "If-Match": tag}), 412, "precondition_failed"
    )
    assert (
        client.delete(AGENT, headers={**admin, "If-Match": patched.headers["ETag"]}).status_code
        == 204
    )
    assert_error(client.get(AGENT, headers=admin), 404, "agent_not_found")


MALFORMED = ["abc", '"a" "b"', 'W/"a', '*, "a"', 'w/"a"', '"a"b', '"a\\"b"']


@pytest.mark.parametrize("value", MALFORMED)
def test_a_malformed_condition_is_a_400_after_the_404(client, full, session, value):
    for header in ("If-Match", "If-None-Match"):
        headers = {**full, header: value}
        for response in (
            client.get(SESSION, headers=headers),
            client.patch(SESSION, json={"name": "x"}, headers=headers),
            client.delete(SESSION, headers=headers),
        ):
            body = assert_error(response, 400, "invalid_request")
            assert header in body["messages"][0]
        missing = client.patch(
            "/v2/agents/support-bot/sessions/nope", json={"name": "x"}, headers=headers
        )
        assert_error(missing, 404, "session_not_found")
    assert client.get(SESSION, headers=full).json["name"] == "First"


def test_conditions_on_create_are_ignored(client, full, agent):
    response = client.post(
        f"/v2/agents/{agent}/sessions",
        json={"key": "new", "name": "N"},
        headers={**full, "If-Match": '"x"', "If-None-Match": "nonsense"},
    )
    assert response.status_code == 201 and strong(response.headers["ETag"])


# Two PATCHes with one ETag, at once, against a live gunicorn

ROUNDS = 20


@pytest.fixture(scope="module", params=["memory", "sqlite", "postgres"])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, str]]:
    """A gunicorn on a fresh store with the agent support-bot; its key."""
    tmp = tmp_path_factory.mktemp(f"etags-{request.param}")
    limits = {"AGENT_SESSIONS_DEFAULT_LIMIT": "1000000/minute"}
    with contextlib.ExitStack() as stack:
        if request.param == "memory":
            # memory:// lives in one process: one worker, its four threads, and the
            # agent and key made over HTTP by an admin key the app mints at start.
            env = {"AGENT_SESSIONS_STORAGE_URL": "memory://", **limits}
            server = stack.enter_context(
                serving(env, tmp, workers=1, app="tests.test_etags:memory_app()")
            )
            token = requests.get(f"{server.url}/token", timeout=10).text
            created = requests.post(
                f"{server.url}/v2/agents",
                json={"key": "support-bot", "name": "S"},
                headers={"x-api-key": token},
                timeout=10,
            )
            assert created.status_code == 201, created.text
        else:
            server, token, _ = stack.enter_context(serving_store(request.param, tmp, limits))
        yield server, token


def memory_app():
    """The service on memory://, with an admin key its test reads from GET /token."""
    from sessions_app import create_app
    from sessions_app.corridor.auth import new_api_key

    app = create_app()
    with app.app_context():
        _, token = new_api_key(name="admin", grants=[], admin=True)
    app.add_url_rule("/token", "token", lambda: token)
    return app


@pytest.mark.slow
def test_two_patches_with_one_if_match_one_200_one_412(live: tuple[Server, str]) -> None:
    server, token = live
    base = f"{server.url}/v2/agents/support-bot/sessions"
    headers = {"x-api-key": token}
    counts = {200: 0, 412: 0}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for n in range(ROUNDS):
            url = f"{base}/race-{n}"
            response = requests.post(
                base, json={"key": f"race-{n}", "name": "Start"}, headers=headers, timeout=10
            )
            assert response.status_code == 201, response.text
            tag = requests.get(url, headers=headers, timeout=10).headers["ETag"]
            start = threading.Barrier(2)

            def patch(name: str, url: str = url, tag: str = tag, start=start) -> requests.Response:
                with requests.Session() as http:
                    http.get(server.url + "/healthz", timeout=10)  # connected before the start
                    start.wait()
                    return http.patch(
                        url, json={"name": name}, headers={**headers, "If-Match": tag}, timeout=30
                    )

            answers = list(pool.map(patch, ["A", "B"]))
            statuses = sorted(answer.status_code for answer in answers)
            assert statuses == [200, 412], [a.text for a in answers]
            winner = next(a for a in answers if a.status_code == 200)
            loser = next(a for a in answers if a.status_code == 412)
            assert loser.json()["error"] == "precondition_failed"
            stored = requests.get(url, headers=headers, timeout=10)
            assert stored.json()["name"] == winner.json()["name"]
            assert stored.headers["ETag"] == winner.headers["ETag"] != tag
            for answer in answers:
                counts[answer.status_code] += 1
    assert counts == {200: ROUNDS, 412: ROUNDS}
