"""The official ``vectara`` client (0.4.x) against a live server, unchanged."""

from __future__ import annotations

import pytest

from tests.servers import bootstrap, cli, serving

vectara = pytest.importorskip("vectara")
import httpx  # noqa: E402
from vectara import Vectara  # noqa: E402
from vectara.core.api_error import ApiError  # noqa: E402
from vectara.environment import VectaraEnvironment  # noqa: E402
from vectara.errors import ForbiddenError, NotFoundError  # noqa: E402

NO_RETRY = {"max_retries": 0}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vectara")
    env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp}/sessions.db"}
    token = bootstrap(env)
    cli("agents", "create", "other-bot", "--name", "Other", env=env)
    everywhere = cli("keys", "create", "--name", "all", "--grant", "*=sessions:create", env=env)
    # One HTTP client for every Vectara client here, closed at the end: the
    # server keeps connections alive, so a client left open would leak its socket.
    with serving(env, tmp, workers=2) as server, httpx.Client(timeout=60) as http:
        yield server, token, everywhere.stdout.strip().splitlines()[-1], http


@pytest.fixture(scope="module")
def client(server):
    url, token = server[0].url, server[1]
    return Vectara(
        api_key=token, environment=VectaraEnvironment(default=url, auth=url), httpx_client=server[3]
    )


def test_create_get_update_delete(client):
    created = client.agent_sessions.create(
        "support-bot",
        key="order-42",
        name="Order 42",
        description="Where is my parcel?",
        metadata={"customer": "c-1"},
        tti_minutes=30,
    )
    assert (created.key, created.agent_key, created.name) == ("order-42", "support-bot", "Order 42")
    assert created.metadata == {"customer": "c-1"} and created.enabled is True
    assert created.tti_minutes == 30 and created.created_at.tzinfo is not None

    fetched = client.agent_sessions.get("support-bot", "order-42")
    assert fetched.key == "order-42" and fetched.created_at == created.created_at

    updated = client.agent_sessions.update(
        "support-bot", "order-42", name="Order 42 (late)", enabled=False
    )
    assert updated.name == "Order 42 (late)" and updated.enabled is False
    assert updated.description == "Where is my parcel?"

    assert client.agent_sessions.delete("support-bot", "order-42") is None
    with pytest.raises(NotFoundError) as caught:
        client.agent_sessions.get("support-bot", "order-42")
    assert caught.value.body["error"] == "session_not_found"


def test_generated_key(client):
    created = client.agent_sessions.create("support-bot", name="Überraschung für Sie")
    assert created.key == "uberraschung-fur-sie"


def test_list_pages_and_filter(client):
    for i in range(7):
        client.agent_sessions.create("support-bot", key=f"page-{i}", name=f"paging test {i}")
    client.agent_sessions.create("support-bot", key="unrelated", name="something else")
    pager = client.agent_sessions.list("support-bot", limit=2, filter="^paging test")
    pages = list(pager.iter_pages())
    assert len(pages) == 4
    keys = [s.key for s in pager]
    assert keys == [f"page-{i}" for i in range(7)]
    every = [s.key for s in client.agent_sessions.list("support-bot", limit=3)]
    assert "unrelated" in every and len(every) == len(set(every))


def connect(server, token):
    url = server[0].url
    return Vectara(
        api_key=token, environment=VectaraEnvironment(default=url, auth=url), httpx_client=server[3]
    )


def test_errors(client, server):
    # A key granted on every agent learns that one does not exist...
    with pytest.raises(NotFoundError) as missing_agent:
        connect(server, server[2]).agent_sessions.create("ghost-bot", name="n")
    assert missing_agent.value.body["error"] == "agent_not_found"
    # ...one granted elsewhere does not.
    with pytest.raises(ForbiddenError):
        client.agent_sessions.create("ghost-bot", name="n")

    client.agent_sessions.create("support-bot", key="dup", name="first")
    with pytest.raises(ApiError) as conflict:
        client.agent_sessions.create(
            "support-bot", key="dup", name="second", request_options=NO_RETRY
        )
    assert conflict.value.status_code == 409 and conflict.value.body["error"] == "conflict"
    assert client.agent_sessions.get("support-bot", "dup").name == "first"

    # The key is granted on support-bot only.
    with pytest.raises(ForbiddenError) as forbidden:
        client.agent_sessions.list("other-bot")
    assert forbidden.value.body.request_id
    assert forbidden.value.body.messages

    url = server[0].url
    stranger = Vectara(
        api_key="ak_0000000000000000.nope",
        environment=VectaraEnvironment(default=url, auth=url),
        httpx_client=server[3],
    )
    with pytest.raises(ApiError) as unauthorized:
        stranger.agent_sessions.get("support-bot", "dup", request_options=NO_RETRY)
    assert unauthorized.value.status_code == 401
