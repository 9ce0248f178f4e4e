"""The OpenAI Agents SDK session (agent_sessions_client.openai_agents) against a live
gunicorn, on SQLite and on PostgreSQL: the SDK's session semantics as its own tests
check them for SQLiteSession, and what this service adds (native events, any
session_id, pops that race, more than 100 items in one write, items past the event
bounds)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import IN_CI  # noqa: E402

try:
    import agents  # noqa: F401
except ImportError:
    if IN_CI:  # scripts/test installs the extra: CI runs these tests, never skips them
        raise
    pytest.skip("the client's openai-agents extra is not installed", allow_module_level=True)

from agents import Agent, RunConfig, Runner, SessionSettings, set_tracing_disabled  # noqa: E402
from agents.memory import SessionABC  # noqa: E402
from agents.testing import ScriptedModel, assistant_message  # noqa: E402

from agent_sessions_client import AgentSessions, Forbidden  # noqa: E402
from agent_sessions_client.openai_agents import (  # noqa: E402
    ITEM_KEY,
    AgentSessionsSession,
    session_key_for,
)
from tests.servers import serving_store  # noqa: E402

set_tracing_disabled(True)

AGENT = "support-bot"
SCOPES = "sessions:create,sessions:read,sessions:delete,events:append,events:create"
SETTINGS = {
    # A 1 MiB item is one event: the event bound above it (README: sizing the bounds).
    "AGENT_SESSIONS_EVENT_MAX_BYTES": str(2 * 1024 * 1024),
    "AGENT_SESSIONS_DEFAULT_LIMIT": "100000/minute",
    "AGENT_SESSIONS_ADMIN_LIMIT": "100000/minute",
}


class Store:
    def __init__(self, url: str, token: str):
        self.url = url
        self.token = token
        self.opened: list[AgentSessionsSession] = []

    def session(self, session_id: str | None = None, **options: Any) -> AgentSessionsSession:
        """A session of a fresh id (or ``session_id``), closed when the test ends."""
        session = AgentSessionsSession(
            session_id if session_id is not None else f"chat-{uuid.uuid4().hex}",
            base_url=self.url,
            api_key=self.token,
            agent_key=AGENT,
            **options,
        )
        self.opened.append(session)
        return session

    def close_sessions(self) -> None:
        while self.opened:
            self.opened.pop().close()

    def events(self, session: AgentSessionsSession) -> list[Any]:
        with AgentSessions(self.url, self.token) as client:
            return list(client.events.list(AGENT, session.session_key, limit=1000))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Store]:
    tmp = tmp_path_factory.mktemp(f"openai-agents-{request.param}")
    with serving_store(request.param, tmp, SETTINGS, grants=f"{AGENT}={SCOPES}") as (
        server,
        token,
        _,
    ):
        yield Store(server.url, token)


@pytest.fixture(autouse=True)
def _close_sessions(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "store" in request.fixturenames:
        request.getfixturevalue("store").close_sessions()


@pytest.fixture
def session(store: Store) -> AgentSessionsSession:
    return store.session()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def contents(items: list[Any]) -> list[Any]:
    return [item.get("content") for item in items]


# The SessionABC semantics


def test_it_is_an_sdk_session(session: AgentSessionsSession) -> None:
    assert isinstance(session, SessionABC)
    assert isinstance(session.session_settings, SessionSettings)
    assert session.session_settings.limit is None


def test_add_get_and_clear(store: Store, session: AgentSessionsSession) -> None:
    items = [user("Hello"), {"role": "assistant", "content": "Hi there!"}]
    run(session.add_items(items))
    assert run(session.get_items()) == items
    run(session.clear_session())
    assert run(session.get_items()) == []
    run(session.add_items([user("again")]))  # the session stays, and takes items again
    assert run(session.get_items()) == [user("again")]


def test_a_session_never_written_is_empty(session: AgentSessionsSession) -> None:
    assert run(session.get_items()) == []
    assert run(session.pop_item()) is None
    run(session.clear_session())
    run(session.add_items([]))
    assert run(session.get_items()) == []


def test_pop_item_takes_the_newest_until_none(session: AgentSessionsSession) -> None:
    assert run(session.pop_item()) is None
    items = [user("Hello"), {"role": "assistant", "content": "Hi there!"}, user("How are you?")]
    run(session.add_items(items))
    assert run(session.pop_item()) == items[2]
    assert run(session.get_items()) == items[:2]
    assert run(session.pop_item()) == items[1]
    assert run(session.pop_item()) == items[0]
    assert run(session.pop_item()) is None
    assert run(session.get_items()) == []


def test_sessions_are_apart(store: Store) -> None:
    one, two = store.session(), store.session()
    run(one.add_items([user("one")]))
    run(two.add_items([user("two 1"), user("two 2")]))
    assert run(two.pop_item()) == user("two 2")
    assert run(one.get_items()) == [user("one")]
    assert run(two.get_items()) == [user("two 1")]
    run(one.clear_session())
    assert run(two.get_items()) == [user("two 1")]


def test_get_items_limit_is_the_newest_in_order(session: AgentSessionsSession) -> None:
    items = [user(f"Message {i}") for i in range(6)]
    run(session.add_items(items))
    assert run(session.get_items()) == items
    assert run(session.get_items(limit=2)) == items[-2:]
    assert run(session.get_items(limit=4)) == items[-4:]
    assert run(session.get_items(limit=10)) == items
    assert run(session.get_items(limit=0)) == []
    assert run(session.get_items(limit=-1)) == items  # as SQLiteSession: no limit


def test_session_settings_as_sqlite_session(store: Store) -> None:
    session = store.session(session_settings=SessionSettings(limit=3))
    run(session.add_items([user(f"Message {i}") for i in range(5)]))
    assert contents(run(session.get_items())) == ["Message 2", "Message 3", "Message 4"]
    assert contents(run(session.get_items(limit=1))) == ["Message 4"]  # explicit wins
    from_dict = store.session(session_settings={"limit": 0})
    assert isinstance(from_dict.session_settings, SessionSettings)
    assert from_dict.session_settings.limit == 0
    assert from_dict.session_settings.resolve({"limit": 4}).limit == 4
    with pytest.raises(TypeError, match="Unknown session settings: limitt"):
        store.session(session_settings={"limitt": 1})


def test_text_of_every_kind_reads_back(session: AgentSessionsSession) -> None:
    items = [
        user("こんにちは"),
        {"role": "assistant", "content": "😊👍"},
        user("O'Reilly"),
        {"role": "assistant", "content": "Robert'); DROP TABLE students;--"},
        user('"SELECT * FROM users WHERE name = "admin";"'),
        user("$ne"),
    ]
    run(session.add_items(items))
    assert run(session.get_items()) == items


def test_writers_in_a_thread_pool_each_with_its_loop(session: AgentSessionsSession) -> None:
    def add(index: int) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(session.add_items([user(f"Message {index}")]))
        finally:
            loop.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
        list(pool.map(add, range(10)))
    assert sorted(contents(run(session.get_items()))) == sorted(f"Message {i}" for i in range(10))


def test_one_session_object_on_several_loops_at_once(session: AgentSessionsSession) -> None:
    async def both() -> None:
        await asyncio.gather(session.add_items([user("a")]), session.add_items([user("b")]))

    run(both())
    threading_loop_result: list[Any] = []
    thread = threading.Thread(target=lambda: threading_loop_result.append(run(session.get_items())))
    thread.start()
    thread.join()
    assert sorted(contents(threading_loop_result[0])) == ["a", "b"]


def test_every_item_is_popped_exactly_once_against_concurrent_writes(store: Store) -> None:
    session = store.session()
    first = [user(f"first {i}") for i in range(40)]
    run(session.add_items(first))
    popped: list[Any] = []
    added: list[Any] = []
    lock = threading.Lock()

    def pop(_: int) -> None:
        item = run(session.pop_item())
        if item is not None:
            with lock:
                popped.append(item)

    def add(index: int) -> None:
        item = user(f"later {index}")
        run(session.add_items([item]))
        with lock:
            added.append(item)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        work = [pool.submit(pop, i) for i in range(30)] + [pool.submit(add, i) for i in range(10)]
        for future in work:
            future.result()
    left = run(session.get_items())
    taken = [item["content"] for item in popped]
    assert len(taken) == len(set(taken)) == 30
    assert sorted(taken + contents(left)) == sorted(contents(first + added))


def test_concurrent_first_writes_create_the_session_once(store: Store) -> None:
    session_id = f"first-{uuid.uuid4().hex}"
    barrier = threading.Barrier(8)

    def first_write(index: int) -> None:
        own = store.session(session_id)  # each writer its own object, thread and loop
        barrier.wait()
        run(own.add_items([user(f"writer {index}")]))

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(first_write, range(8)))
    items = run(store.session(session_id).get_items())
    assert sorted(contents(items)) == sorted(f"writer {i}" for i in range(8))
    with AgentSessions(store.url, store.token) as client:
        keys = [s.key for s in client.sessions.list(AGENT, filter=session_id, limit=100)]
    assert keys == [session_id]


# Session ids


@pytest.mark.parametrize(
    "session_id",
    ["", "$ne", "会話-123", "a" * 65, "x--abc", "a/b?c#d", " ", "nul\x00in-it", "plain_id-1"],
)
def test_any_string_is_a_session_id(store: Store, session_id: str) -> None:
    session = store.session(session_id)
    key = session.session_key
    assert 1 <= len(key) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    run(session.clear_session())  # a test of its own for each id on the shared server
    run(session.add_items([user(f"in {session_id!r}")]))
    again = store.session(session_id)
    assert run(again.get_items()) == [user(f"in {session_id!r}")]
    assert session.session_id == session_id


def test_session_ids_do_not_share_keys() -> None:
    ids = ["", " ", "$ne", "-ne", "会話-123", "-123", "a" * 65, "a" * 66, "x--abc", "abc", "a/b"]
    keys = [session_key_for(session_id) for session_id in ids]
    assert len(set(keys)) == len(ids)
    assert session_key_for("plain_id-1") == "plain_id-1"
    assert session_key_for(session_key_for("a/b")) != session_key_for("a/b")
    with pytest.raises(TypeError):
        session_key_for(17)  # type: ignore[arg-type]


def test_the_first_write_creates_the_session(store: Store) -> None:
    session = store.session("会話-123 " + uuid.uuid4().hex)
    with AgentSessions(store.url, store.token) as client:
        run(session.add_items([user("Hi")]))
        made = client.sessions.get(AGENT, session.session_key)
    assert made.name == session.session_id
    assert made.metadata == {"openai_agents_session_id": session.session_id}


# Items: native events, lossless


def native_items() -> list[Any]:
    return [
        user("What is the weather?"),
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Look at this"},
                {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "auto"},
                {"type": "input_text", "text": "and this"},
            ],
        },
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
            "id": "fc_1",
            "status": "completed",
        },
        {
            "type": "function_call",
            "call_id": "call_2",
            "name": "get_weather",
            "arguments": '{ "city" : "Lyon" }',
        },
        {"type": "function_call", "call_id": "call_3", "name": "shell", "arguments": "ls -l"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {
            "type": "function_call_output",
            "call_id": "call_3",
            "output": [{"type": "input_text", "text": "total 0"}],
        },
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [{"type": "summary_text", "text": "The user wants the weather."}],
        },
        {"type": "reasoning", "id": "rs_2", "summary": [], "encrypted_content": "b64=="},
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [
                {"type": "output_text", "text": "It is sunny.", "annotations": [], "logprobs": []}
            ],
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "refusal", "refusal": "No."}],
        },
        {"role": "system", "content": "Be brief."},
        {
            "type": "web_search_call",
            "id": "ws_1",
            "status": "completed",
            "action": {"type": "search", "query": "weather"},
        },
    ]


NATIVE_TYPES = [
    "input_message",
    "input_message",
    "tool_input",
    "tool_input",
    "tool_input",
    "tool_output",
    "tool_output",
    "thinking",
    "thinking",
    "agent_output",
    "structured_output",
    "structured_output",
    "structured_output",
]


def test_items_are_native_events_and_read_back_equal(
    store: Store, session: AgentSessionsSession
) -> None:
    items = native_items()
    run(session.add_items(items))
    assert run(session.get_items()) == items
    events = store.events(session)
    assert [event.type for event in events] == NATIVE_TYPES
    assert events[0].messages == [{"type": "text", "content": "What is the weather?"}]
    assert [m["content"] for m in events[1].messages] == ["Look at this", "and this"]
    assert events[2].tool_input == {"city": "Paris"} and events[2].tool_name == "get_weather"
    assert events[3].tool_input == {"city": "Lyon"}
    assert events[4].tool_input == {"arguments": "ls -l"}
    assert events[5].tool_call_id == "call_1" and events[5].tool_output == {"output": "sunny"}
    assert events[5].tool_name == "get_weather"  # from its call in the same write
    assert events[7].content == "The user wants the weather."
    assert events[9].content == "It is sunny."
    assert events[12].schema_name == "web_search_call"
    assert all(ITEM_KEY in event.metadata for event in events)
    for expected in reversed(items):
        assert run(session.pop_item()) == expected


def test_items_past_the_event_bounds_are_kept_whole(session: AgentSessionsSession) -> None:
    deep: Any = "bottom"
    for _ in range(200):
        deep = {"next": [deep]}
    items = [
        user("NUL \x00 inside"),
        {"type": "function_call", "call_id": "c\x00", "name": "f", "arguments": "{}"},
        {"type": "custom", "deep": deep},
        {"type": "custom", "big": 2**70, "small": -(2**80), "float": 1.5e300},
        {"type": "custom", "lone": "\ud800 half", "key\x00": True},
        {"role": "user", "content": "ok"},
    ]
    run(session.add_items(items))
    assert run(session.get_items()) == items
    assert run(session.get_items(limit=2)) == items[-2:]
    assert run(session.pop_item()) == items[-1]
    assert run(session.pop_item()) == items[-2]


def test_items_at_the_edges_read_back(session: AgentSessionsSession) -> None:
    items = [
        user(""),
        {"role": "assistant", "content": ""},
        {"type": "function_call", "call_id": "c" * 256, "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c1", "name": " ", "arguments": ""},
        {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "[1, 2]"},
        {"type": "function_call_output", "call_id": "c2"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": ""}]},
        {"type": "message", "role": "user", "content": []},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": str(n)} for n in range(150)],
        },
        {"type": "", "x": None},
        {"no_type": True, "nested": {"list": [[], {}, [None, 1.0, -0.0, True]]}},
        "a bare string",
        [1, "two"],
    ]
    run(session.add_items(items))
    assert run(session.get_items()) == items
    assert run(session.pop_item()) == items[-1]


def test_a_one_mib_item(store: Store, session: AgentSessionsSession) -> None:
    big = {"role": "user", "content": "x" * (1024 * 1024)}
    run(session.add_items([user("before"), big, user("after")]))
    assert run(session.get_items(limit=2)) == [big, user("after")]
    assert run(session.get_items()) == [user("before"), big, user("after")]
    assert run(session.pop_item()) == user("after")
    assert run(session.pop_item()) == big


def test_more_than_100_items_are_one_write_all_or_nothing(
    store: Store, session: AgentSessionsSession
) -> None:
    items = [user(f"item {i}") for i in range(1000)]
    run(session.add_items(items))
    assert run(session.get_items()) == items  # pages of 1,000
    assert run(session.get_items(limit=999)) == items[1:]
    refused = [user(f"more {i}") for i in range(10)] + [user("y" * (3 * 1024 * 1024))]
    with pytest.raises(Exception) as err:
        run(session.add_items(refused))
    assert getattr(err.value, "status", None) == 413
    assert len(run(session.get_items())) == 1000  # nothing of the refused write


def test_an_item_that_is_not_json_sends_nothing(session: AgentSessionsSession) -> None:
    with pytest.raises(TypeError):
        run(session.add_items([user("fine"), {"role": "user", "content": object()}]))
    assert run(session.get_items()) == []


def test_a_front_ends_input_reads_as_a_user_message(store: Store) -> None:
    session = store.session()
    run(session.add_items([user("Hi")]))
    with AgentSessions(store.url, store.token) as client:
        client.events.create(AGENT, session.session_key, "From the web page")
        client.events.create(AGENT, session.session_key, ["two", "parts"])
        moved = {"type": "step_transition", "from_step": "a", "to_step": "b", "content": "m"}
        client.events.append(AGENT, session.session_key, [moved])
    assert run(session.get_items()) == [
        user("Hi"),
        user("From the web page"),
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "two"},
                {"type": "input_text", "text": "parts"},
            ],
        },
    ]
    # The limit counts items: the newest event, which holds none, is passed over.
    assert run(session.get_items(limit=1)) == [run(session.get_items())[-1]]
    # An event that holds no item is dropped by pop_item, as SQLiteSession drops a row
    # it cannot read, and the next item is answered.
    assert run(session.pop_item())["content"][0]["text"] == "two"


# The class: closing, subclassing, the key's scopes


def test_a_closed_session_refuses_calls(store: Store) -> None:
    session = store.session()
    session.close()
    for call in (session.add_items([]), session.get_items(), session.pop_item()):
        with pytest.raises(RuntimeError, match="closed"):
            run(call)
    shared = AgentSessions(store.url, store.token)
    borrowed = store.session(client=shared)
    borrowed.close()
    assert shared.sessions.list(AGENT, limit=1) is not None  # a shared client stays open
    shared.close()


def test_it_can_be_subclassed(store: Store) -> None:
    class Tagged(AgentSessionsSession):
        def item_to_event(self, item: Any, **kwargs: Any) -> dict[str, Any]:
            event = super().item_to_event(item, **kwargs)
            event["metadata"]["tenant"] = "acme"
            return event

    session = Tagged(
        f"sub-{uuid.uuid4().hex}", base_url=store.url, api_key=store.token, agent_key=AGENT
    )
    run(session.add_items([user("tagged")]))
    assert run(session.get_items()) == [user("tagged")]
    assert store.events(session)[0].metadata["tenant"] == "acme"
    session.close()


def test_an_agent_the_key_has_no_grant_on_is_refused(store: Store) -> None:
    reader = AgentSessionsSession(
        "x", base_url=store.url, api_key=store.token, agent_key="no-such-grant"
    )
    with pytest.raises(Forbidden):
        run(reader.add_items([user("Hi")]))
    reader.close()


class HeldUp(httpx.HTTPTransport):
    """Sends each request once ``release`` is set, telling ``sent`` it has one."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = threading.Event()
        self.release = threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.set()
        assert self.release.wait(30)
        return super().handle_request(request)


def test_a_cancelled_write_is_finished_and_then_cancelled(store: Store) -> None:
    transport = HeldUp()
    http = httpx.Client(transport=transport)
    client = AgentSessions(store.url, store.token, http_client=http)
    session = store.session(client=client)

    async def cancel_midway() -> None:
        task = asyncio.create_task(session.add_items([user("once")]))
        assert await asyncio.to_thread(transport.sent.wait, 30)  # the write is under way
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()  # a second cancellation changes nothing
        transport.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    run(cancel_midway())
    assert run(session.get_items()) == [user("once")]  # written once, not lost
    http.close()


# The Runner over the adapter


def two_turns(session: AgentSessionsSession, call: Callable[..., Any]) -> ScriptedModel:
    model = ScriptedModel()
    agent = Agent(name="assistant", model=model)
    model.enqueue([assistant_message("San Francisco")])
    assert call(agent, "What city is the Golden Gate Bridge in?", session).final_output == (
        "San Francisco"
    )
    model.enqueue([assistant_message("California")])
    assert call(agent, "What state is it in?", session).final_output == "California"
    return model


def test_two_turns_of_runner_run(store: Store, session: AgentSessionsSession) -> None:
    model = two_turns(session, lambda agent, text, s: run(Runner.run(agent, text, session=s)))
    second = model.calls[-1].input
    assert second[0] == user("What city is the Golden Gate Bridge in?")
    assert second[1]["content"][0]["text"] == "San Francisco"
    assert second[-1] == user("What state is it in?")
    assert [event.type for event in store.events(session)] == [
        "input_message",
        "agent_output",
        "input_message",
        "agent_output",
    ]


def test_two_turns_of_run_sync_and_run_streamed(session: AgentSessionsSession) -> None:
    def streamed(agent: Agent, text: str, s: AgentSessionsSession) -> Any:
        async def go() -> Any:
            result = Runner.run_streamed(agent, text, session=s)
            async for _ in result.stream_events():
                pass
            return result

        return run(go())

    def in_a_thread(agent: Agent, text: str, s: AgentSessionsSession) -> Any:
        def go() -> Any:
            # run_sync runs on the thread's event loop: one of the thread's own, closed after.
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                return Runner.run_sync(agent, text, session=s)
            finally:
                asyncio.set_event_loop(None)
                loop.close()

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(go).result()

    model = two_turns(session, in_a_thread)
    assert len(model.calls[-1].input) == 3
    model = two_turns(session, streamed)
    assert len(model.calls[-1].input) == 7  # both conversations, then the new question


def test_run_config_limits_the_history_the_model_sees(session: AgentSessionsSession) -> None:
    run(session.add_items([user(f"Turn {i}") for i in range(10)]))
    model = ScriptedModel()
    model.enqueue([assistant_message("Got it")])
    settings = RunConfig(session_settings=SessionSettings(limit=2))
    run(Runner.run(Agent(name="a", model=model), "New", session=session, run_config=settings))
    assert model.calls[-1].input == [user("Turn 8"), user("Turn 9"), user("New")]
