"""The Google ADK adapter, ``agent_sessions_client.adk.AgentSessionsService``, against a live
gunicorn on SQLite and on PostgreSQL: every behaviour ADK's own session-service tests hold
its services to, and what the adapter adds (native event types, shared state written with
its event, agents made on first use, an equal event delivered twice)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.adk.errors._stale_session_error import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.sessions.base_session_service import GetSessionConfig
from google.adk.sessions.session import Session
from google.adk.tools.tool_confirmation import ToolConfirmation
from google.genai import types

from agent_sessions_client import AgentSessions
from agent_sessions_client.adk import (
    AgentNotSetUp,
    AgentSessionsService,
    agent_key,
    session_key,
    to_service_event,
    user_document,
)
from tests.conftest import postgres_schema, require_server
from tests.servers import cli, serving

# The metadata profile of an ADK-sized state (README, "Metadata of an ADK-sized state").
ADK_PROFILE = {
    "AGENT_SESSIONS_METADATA_MAX_BYTES": "1048576",
    "AGENT_SESSIONS_METADATA_MAX_KEYS": "1024",
    "AGENT_SESSIONS_MAX_CONTENT_LENGTH": "2097152",
    "AGENT_SESSIONS_DEFAULT_LIMIT": "100000/minute",
    "AGENT_SESSIONS_ADMIN_LIMIT": "100000/minute",
    "AGENT_SESSIONS_SESSION_CREATE_LIMIT": "100000/minute",
}
APP = "my_app"


@dataclasses.dataclass
class AdkServer:
    url: str
    admin: str


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def adk_server(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Iterator[AdkServer]:
    tmp = tmp_path_factory.mktemp(f"adk-{request.param}")
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp}/sessions.db"
        else:
            require_server("PostgreSQL", "127.0.0.1", 5432)
            url = stack.enter_context(postgres_schema())
        env = {"AGENT_SESSIONS_STORAGE_URL": url, **ADK_PROFILE}
        out = cli("keys", "create", "--name", "admin", "--admin", env=env).stdout
        server = stack.enter_context(serving(env, Path(tmp), workers=2))
        yield AdkServer(server.url, out.strip().splitlines()[-1])


@pytest.fixture
def loop() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture
def prefix() -> str:
    """Each test's apps are agents of its own."""
    return f"t{uuid.uuid4().hex[:10]}-"


@pytest.fixture
def service(adk_server: AdkServer, prefix: str, loop: asyncio.Runner) -> Iterator[Any]:
    """The adapter with an admin key, its calls run to their end on the test's loop."""
    adapter = AgentSessionsService(adk_server.url, adk_server.admin, agent_prefix=prefix)
    yield Synced(adapter, loop)
    loop.run(adapter.close())


@pytest.fixture
def admin(adk_server: AdkServer) -> Iterator[AgentSessions]:
    with AgentSessions(adk_server.url, adk_server.admin) as client:
        yield client


class Synced:
    def __init__(self, adapter: AgentSessionsService, loop: asyncio.Runner):
        self.adapter = adapter
        self.loop = loop

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.adapter, name)
        return lambda *args, **kwargs: self.loop.run(method(*args, **kwargs))


def user_event(text: str, **fields: Any) -> Event:
    content = types.Content(role="user", parts=[types.Part(text=text)])
    return Event(invocation_id="inv", author="user", content=content, **fields)


def test_a_session_never_created_is_none(service):
    assert service.get_session(app_name=APP, user_id="u", session_id="123") is None


def test_create_get_delete(service):
    session = service.create_session(app_name=APP, user_id="u", state={"key": "value"})
    assert (session.app_name, session.user_id, session.state) == (APP, "u", {"key": "value"})
    assert session.id and session.last_update_time <= time.time()
    got = service.get_session(app_name=APP, user_id="u", session_id=session.id)
    assert got == session
    service.delete_session(app_name=APP, user_id="u", session_id=session.id)
    assert service.get_session(app_name=APP, user_id="u", session_id=session.id) is None
    # Deleting what is not there is no error, as in ADK's services.
    service.delete_session(app_name=APP, user_id="u", session_id=session.id)


def test_list_by_user_and_for_all_users(service):
    for user, sid in [("u1", "s1a"), ("u1", "s1b"), ("u2", "s2a")]:
        service.create_session(app_name=APP, user_id=user, session_id=sid, state={"k": sid})
    for user, wanted in [("u1", {"s1a", "s1b"}), ("u2", {"s2a"}), (None, {"s1a", "s1b", "s2a"})]:
        listed = service.list_sessions(app_name=APP, user_id=user).sessions
        assert {s.id for s in listed} == wanted
        assert all(s.state == {"k": s.id} and s.events == [] for s in listed)
    assert service.list_sessions(app_name=APP, user_id="nobody").sessions == []
    assert service.list_sessions(app_name="never-used", user_id=None).sessions == []


def test_lists_are_ordered_by_last_update_oldest_first(service):
    for sid in ("a", "b", "c"):
        service.create_session(app_name=APP, user_id="u", session_id=sid)
    a = service.get_session(app_name=APP, user_id="u", session_id="a")
    service.append_event(a, Event(invocation_id="i", author="user", timestamp=time.time() + 5))
    listed = service.list_sessions(app_name=APP, user_id="u").sessions
    assert [s.id for s in listed] == ["b", "c", "a"]


def test_app_state_is_shared_by_every_user_and_user_state_by_one(service):
    s1 = service.create_session(
        app_name=APP, user_id="u1", session_id="s1", state={"app:k1": "v1", "user:k1": "v1"}
    )
    delta = {"app:k2": "v2", "user:k2": "v2"}
    service.append_event(
        s1, Event(invocation_id="i", author="user", actions=EventActions(state_delta=delta))
    )
    same_user = service.create_session(app_name=APP, user_id="u1", session_id="s1b")
    assert same_user.state == {"app:k1": "v1", "app:k2": "v2", "user:k1": "v1", "user:k2": "v2"}
    other = service.create_session(app_name=APP, user_id="u2", session_id="s2")
    assert other.state == {"app:k1": "v1", "app:k2": "v2"}
    got = service.get_session(app_name=APP, user_id="u1", session_id="s1")
    assert got.state["app:k2"] == "v2" and got.state["user:k2"] == "v2"
    # get_user_state answers the raw keys, and {} for a user with none.
    assert service.get_user_state(app_name=APP, user_id="u1") == {"k1": "v1", "k2": "v2"}
    assert service.get_user_state(app_name=APP, user_id="u2") == {}
    assert service.get_user_state(app_name="never-used", user_id="u2") == {}


def test_session_state_is_its_own_and_values_are_replaced_whole(service):
    s1 = service.create_session(app_name=APP, user_id="u", session_id="s1", state={"sk1": {"a": 1}})
    delta = {"sk1": {"b": 2}, "sk2": None, "k" * 200: [1, {"x": None}]}
    service.append_event(
        s1, Event(invocation_id="i", author="user", actions=EventActions(state_delta=delta))
    )
    got = service.get_session(app_name=APP, user_id="u", session_id="s1")
    assert got.state == {"sk1": {"b": 2}, "sk2": None, "k" * 200: [1, {"x": None}]}
    assert service.create_session(app_name=APP, user_id="u", session_id="s1b").state == {}


def test_temp_state_stays_in_memory(service):
    session = service.create_session(app_name=APP, user_id="u", session_id="s")
    event = Event(
        invocation_id="i", author="a1", actions=EventActions(state_delta={"temp:k": "v", "sk": 2})
    )
    service.append_event(session, event)
    assert session.state["temp:k"] == "v" and session.state["sk"] == 2
    assert "temp:k" not in event.actions.state_delta
    got = service.get_session(app_name=APP, user_id="u", session_id="s")
    assert got.state == {"sk": 2}
    assert "temp:k" not in got.events[0].actions.state_delta


def test_a_session_belongs_to_its_user(service):
    s1 = service.create_session(app_name=APP, user_id="u1", session_id="s1")
    service.append_event(s1, Event(invocation_id="i", author="user"))
    service.create_session(app_name=APP, user_id="u2", session_id="s1")
    got = service.get_session(app_name=APP, user_id="u2", session_id="s1")
    assert got.user_id == "u2" and got.events == []
    assert service.get_session(app_name=APP, user_id="u3", session_id="s1") is None


def test_no_two_app_names_share_an_agent():
    mapped = agent_key("my app")
    assert mapped.startswith("my-app-") and agent_key("support-bot") == "support-bot"
    # An app literally named as another app's agent gets one of its own.
    for name, prefix in ((mapped, ""), ("app-" + "0" * 24, ""), (mapped[3:], "my-")):
        assert agent_key(name, prefix) != prefix + name
        assert re.fullmatch(r"[0-9A-Za-z_-]{1,64}", agent_key(name, prefix))
    assert agent_key(mapped[3:], "my-") == agent_key(mapped)


def test_session_ids(service):
    service.create_session(app_name=APP, user_id="u", session_id="existing", state={"keep": 1})
    for again in ("existing", "  existing  "):
        with pytest.raises(AlreadyExistsError, match="existing"):
            service.create_session(app_name=APP, user_id="u", session_id=again, state={"keep": 2})
    got = service.get_session(app_name=APP, user_id="u", session_id=" existing ")
    assert got.id == "existing" and got.state == {"keep": 1}
    assert service.create_session(app_name=APP, user_id="u", session_id="   ").id.strip()
    odd = service.create_session(app_name=APP, user_id="ü ser/1", session_id="会話 #1?" + "x" * 100)
    assert service.get_session(app_name=APP, user_id="ü ser/1", session_id=odd.id) == odd
    service.delete_session(app_name=APP, user_id="u", session_id="  existing")
    assert service.get_session(app_name=APP, user_id="u", session_id="existing") is None


def test_concurrent_creates_of_one_id(adk_server, prefix, loop):
    adapter = AgentSessionsService(adk_server.url, adk_server.admin, agent_prefix=prefix)

    async def race() -> list[Any]:
        await adapter.create_session(app_name=APP, user_id="u", session_id="warm")
        return await asyncio.gather(
            *(adapter.create_session(app_name=APP, user_id="u", session_id="r") for _ in range(4)),
            return_exceptions=True,
        )

    results = loop.run(race())
    loop.run(adapter.close())
    assert sum(isinstance(r, Session) for r in results) == 1
    assert all(isinstance(r, (Session, AlreadyExistsError)) for r in results), results


def test_events_read_back_equal_every_field(service):
    session = service.create_session(app_name=APP, user_id="u")
    blob = types.Content(
        role="user", parts=[types.Part.from_bytes(data=b"\x00img", mime_type="image/png")]
    )
    complete = Event(
        invocation_id="invocation",
        author="user",
        content=types.Content(role="user", parts=[types.Part(text="test_text")]),
        turn_complete=True,
        partial=False,
        actions=EventActions(
            artifact_delta={"file": 0},
            transfer_to_agent="agent",
            escalate=True,
            requested_tool_confirmations={
                "call_1": ToolConfirmation(hint="sure?", confirmed=False, payload={"id": "album_1"})
            },
        ),
        long_running_tool_ids={"tool1"},
        error_code="error_code",
        error_message="error_message",
        interrupted=True,
        grounding_metadata=types.GroundingMetadata(web_search_queries=["query1"]),
        usage_metadata=types.GenerateContentResponseUsageMetadata(
            prompt_token_count=1, candidates_token_count=1, total_token_count=2
        ),
        citation_metadata=types.CitationMetadata(),
        custom_metadata={"custom_key": "custom_value"},
        timestamp=time.time() + 1.123,
        input_transcription=types.Transcription(text="in", finished=True),
        output_transcription=types.Transcription(text="out", finished=True),
    )
    with_bytes = Event(
        invocation_id="invocation",
        author="user",
        content=blob,
        grounding_metadata=types.GroundingMetadata(
            search_entry_point=types.SearchEntryPoint(sdk_blob=b"sdk_blob")
        ),
        timestamp=time.time() + 2,
    )
    odd_state = Event(
        invocation_id="i",
        author="user",
        timestamp=time.time() + 3,
        actions=EventActions(state_delta={"callback": lambda: 1, "ok": 2}),
    )
    for event in (complete, with_bytes, odd_state):
        service.append_event(session, event)
    got = service.get_session(app_name=APP, user_id="u", session_id=session.id)
    assert got.events[:2] == [complete, with_bytes]
    assert got.events[1].content == blob
    assert got.events[0].actions.requested_tool_confirmations["call_1"].payload == {"id": "album_1"}
    assert got.state["ok"] == 2 and isinstance(got.state["callback"], str)
    assert got.last_update_time == pytest.approx(odd_state.timestamp, abs=1e-6)


def test_last_update_time_is_the_events(service):
    session = service.create_session(app_name=APP, user_id="u")
    stamp = session.last_update_time + 10
    service.append_event(session, Event(invocation_id="i", author="user", timestamp=stamp))
    assert session.last_update_time == pytest.approx(stamp, abs=1e-6)
    got = service.get_session(app_name=APP, user_id="u", session_id=session.id)
    assert got.last_update_time == pytest.approx(stamp, abs=1e-6)


def test_a_stale_session_is_refused_and_writes_nothing(service):
    original = service.create_session(app_name=APP, user_id="u")
    now = time.time()
    first = Event(
        invocation_id="inv1",
        author="user",
        timestamp=now + 1,
        actions=EventActions(state_delta={"sk1": "v1"}),
    )
    service.append_event(original, first)
    updated = service.get_session(app_name=APP, user_id="u", session_id=original.id)
    service.append_event(
        updated,
        Event(
            invocation_id="inv2",
            author="user",
            timestamp=now + 2,
            actions=EventActions(state_delta={"sk2": "v2"}),
        ),
    )
    late = Event(
        invocation_id="inv3",
        author="user",
        timestamp=now + 3,
        actions=EventActions(state_delta={"sk3": "v3", "app:a": 1, "user:b": 2}),
    )
    with pytest.raises(StaleSessionError, match="modified in storage"):
        service.append_event(original, late)
    final = service.get_session(app_name=APP, user_id="u", session_id=original.id)
    assert [e.invocation_id for e in final.events] == ["inv1", "inv2"]
    # The refused event's shared state was refused with it: one transaction.
    assert final.state == {"sk1": "v1", "sk2": "v2"}
    assert service.get_user_state(app_name=APP, user_id="u") == {}


def test_of_two_stale_copies_one_writes(adk_server, prefix, loop):
    adapter = AgentSessionsService(adk_server.url, adk_server.admin, agent_prefix=prefix)

    async def rounds() -> Session:
        session = await adapter.create_session(app_name=APP, user_id="u")
        for i in range(4):
            latest = await adapter.get_session(app_name=APP, user_id="u", session_id=session.id)
            copies = [latest.model_copy(deep=True) for _ in range(2)]
            results = await asyncio.gather(
                *(
                    adapter.append_event(
                        c,
                        Event(
                            invocation_id=f"inv{i}-{n}",
                            author="user",
                            actions=EventActions(state_delta={f"k{i}-{n}": n}),
                        ),
                    )
                    for n, c in enumerate(copies)
                ),
                return_exceptions=True,
            )
            assert sorted(type(r).__name__ for r in results) == ["Event", "StaleSessionError"]
        return await adapter.get_session(app_name=APP, user_id="u", session_id=session.id)

    final = loop.run(rounds())
    loop.run(adapter.close())
    assert len(final.events) == 4 and len(final.state) == 4


def test_get_session_config(service):
    session = service.create_session(app_name=APP, user_id="u")
    for stamp in range(1, 6):
        service.append_event(session, Event(author="user", timestamp=stamp))

    def read(**config: Any) -> list[float]:
        got = service.get_session(
            app_name=APP, user_id="u", session_id=session.id, config=GetSessionConfig(**config)
        )
        return [e.timestamp for e in got.events]

    assert read() == [1, 2, 3, 4, 5]
    assert read(num_recent_events=0) == []
    assert read(num_recent_events=3) == [3, 4, 5]
    assert read(after_timestamp=4.0) == [4, 5]
    assert read(after_timestamp=50) == []
    assert read(after_timestamp=4.0, num_recent_events=3) == [4, 5]
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        GetSessionConfig(num_recent_events=-1)


def test_partial_events_are_not_stored(service):
    session = service.create_session(app_name=APP, user_id="u")
    service.append_event(session, Event(author="user", partial=True))
    assert session.events == []
    assert service.get_session(app_name=APP, user_id="u", session_id=session.id).events == []


def test_appending_to_a_session_that_is_not_there(service):
    gone = service.create_session(app_name=APP, user_id="u")
    service.delete_session(app_name=APP, user_id="u", session_id=gone.id)
    never = Session(app_name=APP, user_id="u", id="never_created")
    unknown_app = Session(app_name="never-used", user_id="u", id="x")
    for session in (gone, never, unknown_app):
        with pytest.raises(SessionNotFoundError):
            service.append_event(session, Event(invocation_id="i", author="user"))


def test_native_event_types_that_the_vectara_client_reads(service, admin, adk_server, prefix):
    session = service.create_session(app_name=APP, user_id="u", session_id="native")
    call = types.FunctionCall(id="c1", name="find_invoice", args={"customer": "c-17"})
    response = types.FunctionResponse(id="c1", name="find_invoice", response={"invoice": "INV-9"})
    model = "model"
    events = [
        user_event("Where is my invoice?"),
        Event(
            author="bot",
            content=types.Content(role=model, parts=[types.Part(text="hmm", thought=True)]),
        ),
        Event(
            author="bot", content=types.Content(role=model, parts=[types.Part(function_call=call)])
        ),
        Event(
            author="bot",
            content=types.Content(role="user", parts=[types.Part(function_response=response)]),
        ),
        Event(
            author="bot",
            content=types.Content(role=model, parts=[types.Part(text="It was sent Monday.")]),
        ),
        Event(author="bot", actions=EventActions(state_delta={"done": True})),
    ]
    for event in events:
        service.append_event(session, event)
    agent, key = agent_key(APP, prefix), session_key("u", "native")
    stored = list(admin.events.list(agent, key, limit=100))
    assert [e.type for e in stored] == [
        "input_message",
        "thinking",
        "tool_input",
        "tool_output",
        "agent_output",
        "structured_output",
    ]
    assert stored[0].messages == [{"type": "text", "content": "Where is my invoice?"}]
    assert stored[2].tool_name == "find_invoice" and stored[2].tool_input == {"customer": "c-17"}
    assert stored[3].tool_output == {"invoice": "INV-9"} and stored[3].tool_call_id == "c1"
    assert stored[4].content == "It was sent Monday."
    assert all(e.metadata["author"] == ev.author for e, ev in zip(stored, events, strict=True))
    # Plain text is said once, by the native field: not again in the metadata.
    assert "Where is my invoice" not in stored[0].metadata["adk_event"]
    got = service.get_session(app_name=APP, user_id="u", session_id="native")
    assert got.events == events
    # The official client parses the same history.
    from vectara import Vectara
    from vectara.environment import VectaraEnvironment

    env = VectaraEnvironment(default=adk_server.url, auth=adk_server.url)
    with httpx.Client() as http:
        official = Vectara(api_key=adk_server.admin, environment=env, httpx_client=http)
        read = [e.type for e in official.agent_events.list(agent, key)]
    assert read == [e.type for e in stored]
    # What the front end writes is read by ADK as the user's text.
    admin.events.create(agent, key, "And the May one?")
    last = service.get_session(app_name=APP, user_id="u", session_id="native").events[-1]
    assert last.author == "user" and last.content.parts[0].text == "And the May one?"


def test_an_equal_event_delivered_again_is_stored_once(service, admin, prefix):
    session = service.create_session(app_name=APP, user_id="u")
    copy = session.model_copy(deep=True)
    event = user_event("hello", actions=EventActions(state_delta={"n": 1}))
    service.append_event(session, event)
    # Delivered again from a copy taken before: no second event, no error.
    assert service.append_event(copy, event.model_copy(deep=True)) == event
    assert len(copy.events) == 1
    got = service.get_session(app_name=APP, user_id="u", session_id=session.id)
    assert got.events == [event]
    service.append_event(got, user_event("next"))  # the marker still holds
    impostor = user_event("not the same", id=event.id)
    with pytest.raises(AlreadyExistsError):
        service.append_event(got, impostor)
    assert len(list(admin.events.list(agent_key(APP, prefix), session_key("u", session.id)))) == 2


def test_agents_are_made_on_first_use_by_an_admin_key_only(adk_server, admin, prefix, loop):
    as_admin = AgentSessionsService(adk_server.url, adk_server.admin, agent_prefix=prefix)
    loop.run(as_admin.create_session(app_name="new app/ü", user_id="u"))
    made = agent_key("new app/ü", prefix)
    assert made.startswith(prefix + "new-app") and admin.agents.get(made).name == "new app/ü"
    loop.run(as_admin.close())
    scopes = ["sessions:create", "sessions:read", "sessions:delete", "events:append"]
    runtime = admin.api_keys.create(name="runtime", grants={"*": scopes}).secret
    adapter = AgentSessionsService(adk_server.url, runtime, agent_prefix=prefix)
    with pytest.raises(AgentNotSetUp, match=f"agents create {prefix}other") as refused:
        loop.run(adapter.create_session(app_name="other", user_id="u"))
    assert refused.value.agent_key == prefix + "other"
    # On an agent that exists, the runtime's key is all it needs.
    session = loop.run(
        adapter.create_session(app_name="new app/ü", user_id="u", state={"app:x": 1})
    )
    loop.run(adapter.append_event(session, user_event("hi")))
    assert (
        loop.run(adapter.get_session(app_name="new app/ü", user_id="u", session_id=session.id))
        == session
    )
    loop.run(adapter.close())


def test_sessions_not_made_by_adk_are_not_listed(service, admin, prefix):
    service.create_session(app_name=APP, user_id="u", session_id="mine")
    admin.sessions.create(agent_key(APP, prefix), name="Front end's", metadata={"user_id": "u"})
    assert [s.id for s in service.list_sessions(app_name=APP, user_id="u").sessions] == ["mine"]
    assert [s.id for s in service.list_sessions(app_name=APP).sessions] == ["mine"]


def test_users_with_many_sessions_list_past_a_page_and_many_users_past_a_state_read(service):
    for n in range(105):
        service.create_session(app_name=APP, user_id="many", session_id=f"s{n}")
    for n in range(20):
        service.create_session(
            app_name=APP, user_id=f"user {n}", session_id="x", state={"user:n": n}
        )
    assert len(service.list_sessions(app_name=APP, user_id="many").sessions) == 105
    everyone = service.list_sessions(app_name=APP).sessions
    assert len(everyone) == 125
    assert {s.state.get("user:n") for s in everyone if s.user_id != "many"} == set(range(20))
    assert user_document("user 1").startswith("user@")


def test_a_long_history_is_read_in_two_requests(service, admin, prefix, loop):
    session = service.create_session(app_name=APP, user_id="u")
    events = [user_event(f"turn {n}", timestamp=1000.0 + n) for n in range(2000)]
    agent, key = agent_key(APP, prefix), session_key("u", session.id)
    for start in (0, 1000):
        admin.events.append(agent, key, [to_service_event(e) for e in events[start : start + 1000]])
    adapter = service.adapter
    sent: list[str] = []

    async def read() -> Session:
        client = adapter._client
        send = client._http.send

        async def counting(request: Any, **kwargs: Any) -> Any:
            sent.append(str(request.url))
            return await send(request, **kwargs)

        client._http.send = counting
        try:
            return await adapter.get_session(app_name=APP, user_id="u", session_id=session.id)
        finally:
            client._http.send = send

    got = loop.run(read())
    assert got.events == events
    assert len(sent) == 2, sent
    # Appending on what was read: the newest event read is the history's last.
    service.append_event(got, user_event("one more"))


def test_shared_state_another_client_wrote_reads_as_it_is(service, admin, prefix):
    service.create_session(app_name=APP, user_id="u", session_id="s", state={"app:n": "17"})
    agent = agent_key(APP, prefix)
    # A runtime of another kind writes plain JSON values to the same documents.
    admin.events.append(
        agent,
        session_key("u", "s"),
        [],
        state_patch={"app": {"greeting": "Bonjour", "count": 3}, "user:u": {"lang": "fr"}},
    )
    got = service.get_session(app_name=APP, user_id="u", session_id="s")
    assert got.state == {
        "app:n": "17",
        "app:greeting": "Bonjour",
        "app:count": 3,
        "user:lang": "fr",
    }


class LoseAppendAnswers(httpx.AsyncBaseTransport):
    """Sends each request for real, and loses the answer of the first ``count`` appends
    of an event (as a connection that breaks once the server has written them)."""

    def __init__(self, count: int):
        self.inner = httpx.AsyncHTTPTransport()
        self.count = count
        self.lost: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        await response.aread()
        appending = request.url.path.endswith("/batch") and b'"aev_' in request.content
        if appending and self.count > 0:
            self.count -= 1
            self.lost.append(request.url.path)
            await response.aclose()
            raise httpx.ReadError("connection reset after the answer was sent", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_an_append_whose_answer_was_lost_is_written_once(adk_server, admin, prefix, loop):
    transport = LoseAppendAnswers(count=1)

    async def run() -> tuple[Session, Session]:
        async with httpx.AsyncClient(transport=transport) as http:
            adapter = AgentSessionsService(
                adk_server.url, adk_server.admin, agent_prefix=prefix, http_client=http
            )
            session = await adapter.create_session(app_name=APP, user_id="u", session_id="lossy")
            event = user_event("hello", actions=EventActions(state_delta={"user:seen": True}))
            await adapter.append_event(session, event)  # the answer is lost; the retry holds
            await adapter.append_event(session, user_event("and again"))
            got = await adapter.get_session(app_name=APP, user_id="u", session_id="lossy")
            return session, got

    session, got = loop.run(run())
    assert transport.lost, "no answer was lost"
    assert [e.content.parts[0].text for e in got.events] == ["hello", "and again"]
    assert got.events == session.events and got.state == {"user:seen": True}
    stored = admin.events.list(agent_key(APP, prefix), session_key("u", "lossy"))
    assert len(list(stored)) == 2


def test_one_service_from_several_event_loops(adk_server, prefix):
    """As ADK's sync ``Runner.run`` uses it: each call in a thread with a loop of its own."""
    adapter = AgentSessionsService(adk_server.url, adk_server.admin, agent_prefix=prefix)

    async def turn(n: int) -> int:
        session = await adapter.create_session(app_name=APP, user_id="u", session_id=f"t{n}")
        await adapter.append_event(session, user_event(f"turn {n}"))
        got = await adapter.get_session(app_name=APP, user_id="u", session_id=f"t{n}")
        await adapter.close()
        return len(got.events)

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        counts = list(pool.map(lambda n: asyncio.run(turn(n)), range(6)))
    assert counts == [1] * 6

    async def listing() -> set[str]:
        async with adapter:  # closes this loop's connections
            listed = await adapter.list_sessions(app_name=APP, user_id="u")
        return {s.id for s in listed.sessions}

    assert asyncio.run(listing()) == {f"t{n}" for n in range(6)}
