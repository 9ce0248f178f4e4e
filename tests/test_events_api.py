"""Session events over HTTP: every endpoint, its errors, scopes, fork, SSE and hostile input."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from sessions_app import create_app
from storage_backends.codec import dump_json
from tests.conftest import ALL_SCOPES, assert_error
from tests.servers import cli

EVENT_SCOPES = ("events:create", "events:append")
EVERYTHING = ALL_SCOPES + EVENT_SCOPES

AGENT = "support-bot"
SESSIONS = f"/v2/agents/{AGENT}/sessions"
S1 = f"{SESSIONS}/s1"
EVENTS = f"{S1}/events"
BATCH = f"{EVENTS}/batch"

TEXT = {"type": "input_message", "messages": [{"type": "text", "content": "hello"}]}
TOOL = {"tool_call_id": "call_1", "tool_configuration_name": "kb", "tool_name": "search"}
TOOL_INPUT = {"type": "tool_input", **TOOL, "tool_input": {"q": "x"}}
TOOL_OUTPUT = {"type": "tool_output", **TOOL, "tool_output": {"hits": []}}
EVERY_TYPE = [
    {"type": "input_message", "messages": [{"type": "skill", "skill_name": "greet"}]},
    {**TEXT, "behavior": "follow_up"},
    {"type": "session_interrupted"},
    {"type": "agent_output", "content": "hi"},
    {"type": "thinking"},
    {"type": "thinking", "content": "hmm"},
    TOOL_INPUT,
    {**TOOL_OUTPUT, "error": True},
    TOOL_OUTPUT,
    {"type": "structured_output", "schema_name": "order", "content": [1, {"a": None}]},
    {"type": "structured_output", "schema_name": "order", "content": None},
    {"type": "step_transition", "from_step": "a", "to_step": "b", "content": "go"},
    {"type": "skill_load", "skill_name": "greet", "content": "Say hi."},
]


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


def batch(client: Any, headers: dict[str, str], *events: dict, url: str = BATCH, **extra: Any):
    return client.post(url, json={"events": list(events), **extra}, headers=headers)


def all_events(client: Any, headers: dict[str, str], url: str = EVENTS, **query: Any) -> list:
    found, page_key = [], None
    while True:
        params = {"limit": 100, **query, **({"page_key": page_key} if page_key else {})}
        response = client.get(url, query_string=params, headers=headers)
        assert response.status_code == 200, response.json
        found += response.json["events"]
        page_key = response.json["metadata"].get("page_key")
        if page_key is None:
            return found


# Writing and reading


def test_every_type_round_trips(client, full, session):
    response = batch(client, full, *EVERY_TYPE)
    assert response.status_code == 201, response.json
    written = response.json["events"]
    assert response.json["session_key"] == "s1"
    for sent, answered in zip(EVERY_TYPE, written, strict=True):
        assert answered["id"].startswith("aev_") and len(answered["id"]) <= 64
        assert answered["session_key"] == "s1" and answered["created_at"].endswith("Z")
        assert "hide_reason" not in answered
        expected = {"error": False} if sent["type"] == "tool_output" else {}
        assert {
            k: v for k, v in answered.items() if k not in ("id", "session_key", "created_at")
        } == {
            **expected,
            **sent,
        }
    assert all_events(client, full) == written
    one = client.get(f"{EVENTS}/{written[5]['id']}", headers=full)
    assert one.status_code == 200 and one.json == written[5]


def test_input_message_answer_and_stream(client, full, session):
    response = client.post(EVENTS, json=TEXT, headers=full)
    assert response.status_code == 201
    [event] = response.json["events"]
    assert event["type"] == "input_message" and event["messages"] == TEXT["messages"]

    streamed = client.post(EVENTS, json={**TEXT, "stream_response": True}, headers=full)
    assert streamed.status_code == 201
    assert streamed.mimetype == "text/event-stream"
    frames = streamed.get_data(as_text=True).split("\n\n")
    assert frames[-1] == "" and len(frames) == 3
    assert frames[0].startswith("data: ") and "\n" not in frames[0]
    stored = json.loads(frames[0][len("data: ") :])
    assert json.loads(frames[1][len("data: ") :]) == {"type": "end"}
    assert client.get(f"{EVENTS}/{stored['id']}", headers=full).json == stored
    assert [e["id"] for e in all_events(client, full)] == [event["id"], stored["id"]]


def test_pages_both_ways_filters_and_hidden(client, full, session):
    ids = []
    for i in range(7):
        kind = {"type": "agent_output", "content": str(i)} if i % 2 else TEXT
        ids += [e["id"] for e in batch(client, full, kind).json["events"]]
    assert client.post(f"{EVENTS}/{ids[3]}/hide", headers=full).json["hide_reason"] == "manual"

    visible = [i for i in ids if i != ids[3]]
    for limit in (1, 2, 3, 10):
        assert [e["id"] for e in all_events(client, full, limit=limit)] == visible
        newest = all_events(client, full, limit=limit, order="desc")
        assert [e["id"] for e in newest] == visible[::-1]
        hidden = all_events(client, full, limit=limit, include_hidden="true")
        assert [e["id"] for e in hidden] == ids
        assert all_events(client, full, limit=limit, include_hidden="false") != hidden
    outputs = all_events(client, full, type="agent_output", include_hidden="true")
    assert [e["id"] for e in outputs] == ids[1::2]
    both = all_events(client, full, type="agent_output,input_message")
    assert [e["id"] for e in both] == visible
    first = client.get(EVENTS, query_string={"limit": 2}, headers=full).json
    assert len(first["events"]) == 2 and "page_key" in first["metadata"]
    default = client.get(EVENTS, headers=full).json
    assert len(default["events"]) == 6 and default["metadata"] == {}

    # get returns hidden events; unhide brings it back.
    assert client.get(f"{EVENTS}/{ids[3]}", headers=full).json["hide_reason"] == "manual"
    shown = client.post(f"{EVENTS}/{ids[3]}/unhide", headers=full)
    assert shown.status_code == 200 and "hide_reason" not in shown.json
    assert [e["id"] for e in all_events(client, full)] == ids

    deleted = client.delete(f"{EVENTS}/{ids[0]}", headers=full)
    assert deleted.status_code == 204 and deleted.data == b""
    assert_error(client.get(f"{EVENTS}/{ids[0]}", headers=full), 404, "event_not_found")
    assert_error(client.delete(f"{EVENTS}/{ids[0]}", headers=full), 404, "event_not_found")
    assert [e["id"] for e in all_events(client, full)] == ids[1:]


@pytest.mark.parametrize("app_config", [{"EVENTS_PAGE_MAX_BYTES": 4096}])
def test_a_page_ends_early_once_it_holds_its_bytes(client, full, session):
    small = {"type": "agent_output", "content": "x" * 1500}  # about 1.6 KB as answered
    large = {"type": "agent_output", "content": "y" * 10_000}  # alone past the bound
    ids = [e["id"] for e in batch(client, full, small, small, small, large, small).json["events"]]
    for order, expected in (("asc", ids), ("desc", ids[::-1])):
        sizes, page_key = [], None
        while True:
            query = {"limit": 100, "order": order, **({"page_key": page_key} if page_key else {})}
            answer = client.get(EVENTS, query_string=query, headers=full)
            assert answer.status_code == 200, answer.json
            sizes.append([e["id"] for e in answer.json["events"]])
            assert sum(len(json.dumps(e)) for e in answer.json["events"][1:]) < 4096
            page_key = answer.json["metadata"].get("page_key")
            if page_key is None:
                break
        assert [i for page in sizes for i in page] == expected  # each event once, in order
        # Two small ones fit, a third does not; the large one comes alone.
        pages = [len(page) for page in sizes]
        assert pages == ([2, 1, 1, 1] if order == "asc" else [1, 1, 2, 1]), pages


def test_page_keys_are_bound_to_their_list(client, full, session):
    client.post(SESSIONS, json={"key": "s2", "name": "Two"}, headers=full)
    for url in (BATCH, f"{SESSIONS}/s2/events/batch"):
        batch(client, full, TEXT, TEXT, TEXT, url=url)
    asc = client.get(EVENTS, query_string={"limit": 1}, headers=full).json["metadata"]["page_key"]
    desc = client.get(EVENTS, query_string={"limit": 1, "order": "desc"}, headers=full)
    desc = desc.json["metadata"]["page_key"]
    other = f"{SESSIONS}/s2/events"
    refused = [
        (other, {"page_key": asc}),  # another session's
        (EVENTS, {"page_key": asc, "order": "desc"}),  # the other order's
        (EVENTS, {"page_key": desc}),
        (EVENTS, {"page_key": "djE6MQ"}),  # a session list's page key (v1:1)
        (EVENTS, {"page_key": "!!!"}),
        (EVENTS, {"page_key": "x" * 300}),
        (EVENTS, {"page_key": ""}),
    ]
    for url, query in refused:
        assert_error(client.get(url, query_string=query, headers=full), 400, "invalid_request")
    ok = client.get(EVENTS, query_string={"page_key": desc, "order": "desc"}, headers=full)
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "100000"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"include_hidden": "1"}, "include_hidden"),
        ({"include_hidden": "True"}, "include_hidden"),
        ({"include_hidden": ""}, "include_hidden"),
        ({"order": "up"}, "order"),
        ({"type": "agent_output,nope"}, "type"),
        ({"type": ""}, "type"),
        ({"type": "agent_output,"}, "type"),
    ],
)
def test_bad_list_queries(client, full, session, query, field):
    assert_error(
        client.get(EVENTS, query_string=query, headers=full), 400, "invalid_request", field
    )


# Bad bodies


BAD_EVENTS = [
    ({"type": "agent_output"}, "events.0.content"),
    ({"type": "agent_output", "content": 5}, "events.0.content"),
    ({"type": "agent_output", "content": "x", "extra": 1}, "events.0.extra"),
    ({"type": "nope"}, "events.0.type"),
    ({"content": "x"}, "events.0.type"),
    ({"type": 5}, "events.0.type"),
    ({"type": "compaction", "turns_compacted": 1}, "events.0.type"),
    ({**TOOL_INPUT, "tool_name": ""}, "events.0.tool_name"),
    ({**TOOL_INPUT, "tool_name": None}, "events.0.tool_name"),
    ({**TOOL_INPUT, "tool_name": "t" * 256}, "events.0.tool_name"),
    ({**TOOL_INPUT, "tool_input": []}, "events.0.tool_input"),
    ({**TOOL_INPUT, "tool_input": "{}"}, "events.0.tool_input"),
    ({**TOOL_OUTPUT, "error": "no"}, "events.0.error"),
    ({**TOOL_OUTPUT, "tool_input": {}}, "events.0.tool_input"),
    ({**TOOL_INPUT, "id": "evt_1"}, "events.0.id"),
    ({**TOOL_INPUT, "id": "aev_" + "a" * 61}, "events.0.id"),
    ({**TOOL_INPUT, "id": "aev_a-b"}, "events.0.id"),
    ({**TOOL_INPUT, "id": "aev_"}, "events.0.id"),
    ({"type": "structured_output", "content": 1}, "events.0.schema_name"),
    ({"type": "input_message", "messages": []}, "events.0.messages"),
    ({"type": "input_message", "messages": [{"type": "image"}]}, "events.0.messages.0.type"),
    ({"type": "input_message", "messages": [{"type": "text"}]}, "events.0.messages.0.content"),
    ({"type": "input_message", "messages": "hi"}, "events.0.messages"),
    ({"type": "step_transition", "from_step": "a", "content": "c"}, "events.0.to_step"),
    ({**TEXT, "behavior": "queue"}, "events.0.behavior"),
    ({**TEXT, "since": "start"}, "events.0.since"),
    ({"type": "session_interrupted", "content": "x"}, "events.0.content"),
    ({"type": "interrupt"}, "events.0.type"),
    ("agent_output", "events.0"),
]


@pytest.mark.parametrize(("event", "field"), BAD_EVENTS)
def test_bad_batch_events(client, full, session, event, field):
    response = batch(client, full, {"type": "agent_output", "content": "fine"}, event)
    field = field.replace("events.0", "events.1")
    assert_error(response, 400, "invalid_request", field)
    assert all_events(client, full, include_hidden="true") == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "events"),
        ({"events": []}, "events"),
        ({"events": [TEXT] * 1001}, "events"),
        ({"events": {"type": "thinking"}}, "events"),
        ({"events": [TEXT], "if_last_event_id": "nope"}, "if_last_event_id"),
        ({"events": [TEXT], "if_last_event_id": 5}, "if_last_event_id"),
        ({"events": [TEXT], "metadata_patch": [1]}, "metadata_patch"),
        ({"events": [TEXT], "metadata": {}}, "metadata"),
    ],
)
def test_bad_batch_bodies(client, full, session, body, field):
    assert_error(client.post(BATCH, json=body, headers=full), 400, "invalid_request", field)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "agent_output", "content": "x"}, "type"),
        ({"type": "interrupted"}, "type"),
        ({"type": "session_interrupted"}, "type"),
        ({"type": "interrupt", "messages": TEXT["messages"]}, "messages"),
        ({"type": "interrupt", "since": "start"}, "since"),
        ({"type": "interrupt", "stream_response": "yes"}, "stream_response"),
        ({"messages": TEXT["messages"]}, "type"),
        ({"type": "input_message"}, "messages"),
        (
            {"type": "input_message", "messages": [{"type": "text", "content": "x"}] * 101},
            "messages",
        ),
        ({**TEXT, "stream_response": "yes"}, "stream_response"),
        ({**TEXT, "since": "evt_1"}, "since"),
        ({**TEXT, "since": ""}, "since"),
        ({**TEXT, "since": "START"}, "since"),
        ({**TEXT, "since": 5}, "since"),
        ({**TEXT, "since": "aev_" + "a" * 61}, "since"),
        ({**TEXT, "behavior": "queue"}, "behavior"),
        ({**TEXT, "behavior": "Steer"}, "behavior"),
        ({**TEXT, "behavior": True}, "behavior"),
        ({"type": "compact", "summary_text": "s", "since": "start"}, "since"),
        ({"type": "compact"}, "summary_text"),
        ({"type": "compact", "summary_text": ""}, "summary_text"),
        (
            {"type": "compact", "summary_text": "s", "compact_up_to_event_id": "x"},
            "compact_up_to_event_id",
        ),
        ({"type": "compact", "summary_text": "s", "compaction_message": "m"}, "compaction_message"),
    ],
)
def test_bad_create_bodies(client, full, session, body, field):
    assert_error(client.post(EVENTS, json=body, headers=full), 400, "invalid_request", field)


def test_hostile_input(client, full, session, app):
    huge = {"type": "input_message", "messages": [{"type": "text", "content": ""}] * 100_000}
    response = client.post(BATCH, json={"events": [huge]}, headers=full)
    assert response.status_code in (400, 413)
    assert_error(client.post(EVENTS, json=huge, headers=full), 413, "payload_too_large")

    depth = app.config["EVENT_MAX_DEPTH"]
    assert depth == 32

    def nested(levels: int) -> dict:
        value: dict = {}
        for _ in range(levels - 1):
            value = {"a": value}
        return value

    deep = {**TOOL_INPUT, "tool_input": nested(depth + 1)}
    assert_error(batch(client, full, deep), 400, "invalid_request", "events.0.tool_input")
    deep_list = {"type": "structured_output", "schema_name": "s", "content": [[[[]]]]}
    for _ in range(depth):
        deep_list["content"] = [deep_list["content"]]
    assert_error(batch(client, full, deep_list), 400, "invalid_request", "events.0.content")
    assert batch(client, full, {**TOOL_INPUT, "tool_input": nested(depth)}).status_code == 201

    # 10,000 levels in a few kilobytes: the parser refuses it, no RecursionError.
    bomb = (
        '{"events": [{"type": "structured_output", "schema_name": "s", "content": ' + "[" * 10_000
    )
    response = client.post(
        BATCH, data=bomb + "]" * 10_000 + "}]}", headers=full, content_type="application/json"
    )
    assert_error(response, 400, "invalid_request")

    for text in ('"a\\u0000b"', '"\\ud800"', '"\\udfff x"'):
        raw = f'{{"events": [{{"type": "agent_output", "content": {text}}}]}}'
        response = client.post(BATCH, data=raw, headers=full, content_type="application/json")
        assert_error(response, 400, "invalid_request")
        raw = f'{{"type": "input_message", "messages": [{{"type": "text", "content": {text}}}]}}'
        response = client.post(EVENTS, data=raw, headers=full, content_type="application/json")
        assert_error(response, 400, "invalid_request")
    assert_error(
        client.post(BATCH, data="[]", headers=full, content_type="application/json"),
        400,
        "invalid_request",
    )
    assert_error(
        client.post(BATCH, data="x", headers=full, content_type="text/plain"),
        415,
        "unsupported_media_type",
    )
    # An event id that is not one matches no route.
    for bad in ("evt_1", "aev_a-b", "aev_" + "a" * 61, "aev_%00"):
        assert_error(client.get(f"{EVENTS}/{bad}", headers=full), 404, "not_found")
    assert [e["type"] for e in all_events(client, full)] == ["tool_input"]


@pytest.mark.parametrize(
    "app_config", [{"EVENT_MAX_BYTES": 4096, "EVENTS_MAX_CONTENT_LENGTH": 16384}]
)
def test_size_bounds(client, full, session):
    fits = {"type": "agent_output", "content": "x" * 3500}
    too_big = {"type": "agent_output", "content": "x" * 4096}
    response = batch(client, full, fits, too_big)
    body = assert_error(response, 413, "payload_too_large")
    assert "events.1" in body["messages"][0]
    assert all_events(client, full) == []
    assert_error(batch(client, full, *[fits] * 5), 413, "payload_too_large")  # body > 16 KiB
    assert batch(client, full, fits, fits, fits).status_code == 201
    message = {"type": "input_message", "messages": [{"type": "text", "content": "y" * 4000}]}
    assert_error(client.post(EVENTS, json=message, headers=full), 413, "payload_too_large")
    compact = {"type": "compact", "summary_text": "z" * 5000}
    assert_error(client.post(EVENTS, json=compact, headers=full), 413, "payload_too_large")
    assert len(all_events(client, full)) == 3


def stored_size(event: dict[str, Any]) -> int:
    """The size of an answered event as the bound counts it (compact JSON, as answered)."""
    return len(dump_json(event).encode())


@pytest.mark.parametrize("app_config", [{"EVENT_MAX_BYTES": 4096}])
def test_a_compaction_is_held_to_the_size_bound_as_stored(
    client, full, session, storage_url, tmp_path
):
    """Its counts and ids count: a compaction, or a fork's, past EVENT_MAX_BYTES as it
    would be stored is a 413 and nothing is written; what is stored exports and imports."""
    twin = f"{SESSIONS}/s2"  # a key as long as s1: the session_key is in the size
    assert client.post(SESSIONS, json={"key": "s2", "name": "Two"}, headers=full).status_code == 201
    turns = [TEXT, {"type": "agent_output", "content": "a"}, TEXT]
    for url in (BATCH, f"{twin}/events/batch"):
        assert batch(client, full, *turns, url=url).status_code == 201
    # The same compaction of the twin, with a one-character summary, gives the size.
    small = client.post(
        f"{twin}/events", json={"type": "compact", "summary_text": "s"}, headers=full
    )
    assert small.status_code == 201 and small.json["events"][0]["events_compacted"] == 2
    room = 4096 - (stored_size(small.json["events"][0]) - 1)  # the summary's largest length
    over = {"type": "compact", "summary_text": "z" * (room + 1)}
    body = assert_error(client.post(EVENTS, json=over, headers=full), 413, "payload_too_large")
    assert "summary_text" in body["messages"][0] and "4097 bytes" in body["messages"][0]
    assert [e.get("hide_reason") for e in all_events(client, full, include_hidden="true")] == [
        None
    ] * 3
    fits = client.post(EVENTS, json={**over, "summary_text": "z" * room}, headers=full)
    assert fits.status_code == 201, fits.json
    assert stored_size(fits.json["events"][0]) == 4096

    anchor = all_events(client, full, url=f"{twin}/events")[0]["id"]
    fork = {
        "key": "fork",
        "name": "Fork",
        "from_session": {
            "session_key": "s2",
            "compact_up_to_event_id": anchor,
            "summary_text": "z" * 20_000,
        },
    }
    body = assert_error(client.post(SESSIONS, json=fork, headers=full), 413, "payload_too_large")
    assert "from_session.summary_text" in body["messages"][0]
    assert_error(client.get(f"{SESSIONS}/fork", headers=full), 404, "session_not_found")
    fork["from_session"]["summary_text"] = "short"
    assert client.post(SESSIONS, json=fork, headers=full).status_code == 201

    if storage_url == "memory://":
        return  # the CLI cannot reach a memory store
    # What was stored comes back through an export and an import.
    env = {"AGENT_SESSIONS_STORAGE_URL": storage_url, "AGENT_SESSIONS_EVENT_MAX_BYTES": "4096"}
    path = tmp_path / "s1.jsonl"
    path.write_text(cli("sessions", "export", AGENT, "s1", env=env).stdout)
    assert client.delete(S1, headers=full).status_code == 204
    cli("sessions", "import", str(path), env=env)
    assert all_events(client, full, include_hidden="true")[-1] == fits.json["events"][0]


def test_batch_bodies_past_the_usual_limit(client, full, session):
    events = [{"type": "agent_output", "content": "x" * 20_000} for _ in range(50)]  # ~1 MB
    response = batch(client, full, *events)
    assert response.status_code == 201, response.json
    assert len(all_events(client, full)) == 50
    # Other bodies keep the usual 64 KiB.
    big = {"key": "big", "name": "n", "description": "d", "metadata": {"x": "y" * 70_000}}
    assert_error(client.post(SESSIONS, json=big, headers=full), 413, "payload_too_large")


# History conditions, metadata, ids


def test_if_last_event_id(client, full, session):
    first = batch(client, full, TEXT, if_last_event_id=None)
    assert first.status_code == 201
    last = first.json["events"][0]["id"]
    assert_error(batch(client, full, TEXT, if_last_event_id=None), 409, "conflict")
    assert_error(batch(client, full, TEXT, if_last_event_id="aev_nope"), 409, "conflict")
    second = batch(client, full, TEXT, if_last_event_id=last)
    assert second.status_code == 201
    newest = second.json["events"][0]["id"]
    # Hidden or not, the last event is the last one.
    client.post(f"{EVENTS}/{newest}/hide", headers=full)
    assert_error(batch(client, full, TEXT, if_last_event_id=last), 409, "conflict")
    assert batch(client, full, TEXT, if_last_event_id=newest).status_code == 201
    assert batch(client, full, TEXT).status_code == 201  # absent: no check
    assert len(all_events(client, full, include_hidden="true")) == 4


def test_metadata_patch(client, full, session, app):
    client.patch(S1, json={"metadata": {"keep": 1, "drop": 2, "deep": {"a": 1}}}, headers=full)
    patch = {"drop": None, "deep": {"b": 2}, "new": "x"}
    assert batch(client, full, TEXT, metadata_patch=patch).status_code == 201
    assert client.get(S1, headers=full).json["metadata"] == {
        "keep": 1,
        "deep": {"a": 1, "b": 2},
        "new": "x",
    }
    too_many = {f"k{i}": i for i in range(app.config["METADATA_MAX_KEYS"])}
    for bad in (
        too_many,
        {"x" * 200: 1},
        {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {}}}}}}}}},
    ):
        response = batch(client, full, TEXT, metadata_patch=bad)
        assert_error(response, 400, "invalid_metadata", "metadata_patch")
    # A patch nested far past the bound is refused before any merge (no recursion).
    deep: dict = {}
    for _ in range(700):
        deep = {"a": deep}
    body = b'{"events": [{"type": "agent_output", "content": "x"}], "metadata_patch": '
    body += json.dumps(deep).encode() + b"}"
    response = client.post(BATCH, data=body, headers=full | {"Content-Type": "application/json"})
    assert response.status_code == 400, response.get_data()[:300]
    assert response.json["error"] in ("invalid_metadata", "invalid_request")
    assert len(all_events(client, full)) == 1
    assert client.get(S1, headers=full).json["metadata"]["new"] == "x"


def test_a_metadata_patch_changes_a_value_to_its_python_equal(client, full, session):
    client.patch(S1, json={"metadata": {"flag": 1, "off": 0, "n": 2, "z": 0.0}}, headers=full)
    before = client.get(S1, headers=full)
    body = b'{"events": [{"type": "agent_output", "content": "x"}], "metadata_patch": '
    body += b'{"flag": true, "off": false, "n": 2.0, "z": -0.0}}'
    response = client.post(BATCH, data=body, headers=full | {"Content-Type": "application/json"})
    assert response.status_code == 201, response.get_data(as_text=True)
    after = client.get(S1, headers=full)
    assert b'"metadata":{"flag":true,"off":false,"n":2.0,"z":-0.0}' in after.get_data()
    assert after.headers["ETag"] != before.headers["ETag"]
    # A PATCH of the session's metadata tells them apart too, and so does its ETag.
    response = client.patch(
        S1, json={"metadata": {"flag": 1, "off": 0, "n": 2, "z": 0.0}}, headers=full
    )
    assert b'"metadata":{"flag":1,"off":0,"n":2,"z":0.0}' in response.get_data()
    assert response.headers["ETag"] not in (after.headers["ETag"], before.headers["ETag"])


def test_own_ids_and_duplicates(client, full, session):
    mine = {"type": "agent_output", "content": "a", "id": "aev_Import01"}
    assert batch(client, full, mine).json["events"][0]["id"] == "aev_Import01"
    assert_error(batch(client, full, TEXT, mine), 409, "conflict")
    twice = {**mine, "id": "aev_Import02"}
    assert_error(batch(client, full, twice, twice), 409, "conflict")
    assert [e["id"] for e in all_events(client, full)] == ["aev_Import01"]
    assert client.get(f"{EVENTS}/aev_Import01", headers=full).json["content"] == "a"


SEEN = {"type": "agent_output", "content": "seen", "id": "aev_Seen1"}
TWICE = {"type": "agent_output", "content": "twice", "id": "aev_Twice1"}

# What can be wrong with a batch at once, each as what it does to the request
# (a dict of url, events and body fields) or to the session (the client, its
# key and URL); and the answer when it is all that is wrong: status, code and
# whether the message is the stale history's.
BATCH_FAILURES = {
    "unknown session": (
        lambda client, full, url, req: req.update(url=f"{SESSIONS}/nope/events/batch"),
        (404, "session_not_found", False),
    ),
    "event size": (
        lambda client, full, url, req: req["events"].append(
            {"type": "agent_output", "content": "x" * 4096}
        ),
        (413, "payload_too_large", False),
    ),
    "metadata bounds": (
        lambda client, full, url, req: req.update(metadata_patch={"c": 3}),
        (400, "invalid_metadata", False),
    ),
    "disabled session": (
        lambda client, full, url, req: client.patch(url, json={"enabled": False}, headers=full),
        (409, "session_disabled", False),
    ),
    "if_last_event_id": (
        lambda client, full, url, req: req.update(if_last_event_id="aev_0"),
        (409, "conflict", True),
    ),
    "id in the session": (
        lambda client, full, url, req: req["events"].append(SEEN),
        (409, "conflict", False),
    ),
    "id twice in the batch": (
        lambda client, full, url, req: req["events"].extend([TWICE, TWICE]),
        (409, "conflict", False),
    ),
}


@pytest.mark.parametrize("app_config", [{"EVENT_MAX_BYTES": 4096, "METADATA_MAX_KEYS": 2}])
def test_a_batch_is_refused_for_its_first_failure_in_the_contract_order(client, full, agent):
    # The order of the table: the path's 404, the body's own faults (413, then what
    # the patch would make of the metadata), then the session's state.
    for n, names in enumerate(itertools.combinations(BATCH_FAILURES, 2)):
        url = f"{SESSIONS}/p{n}"
        metadata = {"a": 1, "b": 2}
        created = client.post(
            SESSIONS, json={"key": f"p{n}", "name": "n", "metadata": metadata}, headers=full
        )
        assert created.status_code == 201, created.json
        assert batch(client, full, SEEN, url=f"{url}/events/batch").status_code == 201
        req: dict[str, Any] = {"url": f"{url}/events/batch", "events": [TEXT]}
        for name in names:
            BATCH_FAILURES[name][0](client, full, url, req)
        status, code, stale = BATCH_FAILURES[names[0]][1]
        response = batch(client, full, *req.pop("events"), **req)
        body = assert_error(response, status, code)
        assert ("if_last_event_id" in body["messages"][0]) is stale, (names, body)
        assert [e["id"] for e in all_events(client, full, f"{url}/events")] == ["aev_Seen1"]
        assert client.get(url, headers=full).json["metadata"] == metadata


def test_disabled_session_takes_no_events(client, full, session):
    event_id = batch(client, full, TEXT).json["events"][0]["id"]
    client.patch(S1, json={"enabled": False}, headers=full)
    assert_error(client.post(EVENTS, json=TEXT, headers=full), 409, "session_disabled")
    assert_error(batch(client, full, TEXT), 409, "session_disabled")
    compact = {"type": "compact", "summary_text": "s"}
    assert_error(client.post(EVENTS, json=compact, headers=full), 409, "session_disabled")
    assert client.get(EVENTS, headers=full).status_code == 200
    assert client.post(f"{EVENTS}/{event_id}/hide", headers=full).status_code == 200
    assert client.delete(f"{EVENTS}/{event_id}", headers=full).status_code == 204


def test_compact(client, full, session):
    ids = [
        e["id"]
        for e in batch(client, full, TEXT, {"type": "agent_output", "content": "a"}).json["events"]
    ]
    ids += [
        e["id"]
        for e in batch(client, full, TEXT, {"type": "agent_output", "content": "b"}).json["events"]
    ]
    response = client.post(
        EVENTS, json={"type": "compact", "summary_text": "They said hello."}, headers=full
    )
    assert response.status_code == 201
    [compaction] = response.json["events"]
    assert compaction["type"] == "compaction" and compaction["summary_text"] == "They said hello."
    assert (compaction["turns_compacted"], compaction["events_compacted"]) == (1, 2)
    assert compaction["summary_key"]
    listed = all_events(client, full, include_hidden="true")
    assert [e.get("hide_reason") for e in listed] == ["compaction", "compaction", None, None, None]
    assert [e["id"] for e in all_events(client, full)] == ids[2:] + [compaction["id"]]

    anchored = {"type": "compact", "summary_text": "s", "compact_up_to_event_id": ids[2]}
    again = client.post(EVENTS, json={**anchored, "stream_response": True}, headers=full)
    assert again.status_code == 201 and again.mimetype == "text/event-stream"
    assert json.loads(again.get_data(as_text=True).split("\n\n")[0][6:])["events_compacted"] == 1
    missing = {**anchored, "compact_up_to_event_id": "aev_missing"}
    assert_error(client.post(EVENTS, json=missing, headers=full), 404, "event_not_found")
    # A hidden anchor is refused, as a fork refuses it, and nothing is written.
    assert client.post(f"{EVENTS}/{ids[3]}/hide", headers=full).status_code == 200
    before = all_events(client, full, include_hidden="true")
    for hidden in (ids[3], ids[0]):  # hidden by hand, hidden by a compaction
        refused = {**anchored, "compact_up_to_event_id": hidden}
        assert_error(client.post(EVENTS, json=refused, headers=full), 404, "event_not_found")
    assert all_events(client, full, include_hidden="true") == before


# Input for a running agent: behavior, since, interrupt

INTERRUPT = {"type": "interrupt"}


def say(client: Any, headers: dict[str, str], **extra: Any) -> Any:
    return client.post(EVENTS, json={**TEXT, **extra}, headers=headers)


def test_behavior_is_stored_and_returned(client, full, session):
    for behavior in ("steer", "follow_up"):
        response = say(client, full, behavior=behavior)
        assert response.status_code == 201, response.json
        [event] = response.json["events"]
        assert event["behavior"] == behavior
        assert client.get(f"{EVENTS}/{event['id']}", headers=full).json == event
    plain = say(client, full, behavior=None).json["events"][0]
    assert "behavior" not in plain
    assert [e.get("behavior") for e in all_events(client, full)] == ["steer", "follow_up", None]


def test_since_answers_what_followed_with_the_new_input(client, full, session):
    output = {"type": "agent_output", "content": "a"}
    written = batch(client, full, TEXT, output, {"type": "thinking"}, output).json["events"]
    ids = [e["id"] for e in written]
    client.post(f"{EVENTS}/{ids[2]}/hide", headers=full)

    response = say(client, full, since=ids[1], behavior="steer")
    assert response.status_code == 201 and response.json["session_key"] == "s1"
    *followed, new = response.json["events"]
    assert followed == [written[3]]  # hidden ids[2] left out; as stored
    assert new["behavior"] == "steer" and new["id"] not in ids
    assert client.get(f"{EVENTS}/{new['id']}", headers=full).json == new
    # From a hidden event, from the newest, from the start.
    assert [e["id"] for e in say(client, full, since=ids[2]).json["events"][:2]] == [
        ids[3],
        new["id"],
    ]
    newest = all_events(client, full)[-1]["id"]
    [alone] = say(client, full, since=newest).json["events"]
    assert alone["id"] != newest
    start = say(client, full, since="start").json["events"]
    assert start == all_events(client, full)
    assert [e["id"] for e in start[:3]] == [ids[0], ids[1], ids[3]]
    # Streamed: each event on its line, then the end.
    streamed = say(client, full, since=ids[3], stream_response=True)
    assert streamed.status_code == 201 and streamed.mimetype == "text/event-stream"
    frames = streamed.get_data(as_text=True).split("\n\n")
    events = [json.loads(frame[len("data: ") :]) for frame in frames[:-2]]
    assert events == all_events(client, full)[3:]
    assert frames[-2:] == ['data: {"type":"end"}', ""]


def test_since_of_an_unknown_event_writes_nothing(client, full, session):
    batch(client, full, TEXT)
    other = client.post(SESSIONS, json={"key": "s2", "name": "Two"}, headers=full)
    assert other.status_code == 201
    theirs = batch(client, full, TEXT, url=f"{SESSIONS}/s2/events/batch").json["events"][0]
    for anchor in ("aev_missing", theirs["id"]):
        assert_error(say(client, full, since=anchor), 404, "event_not_found")
    assert len(all_events(client, full, include_hidden="true")) == 1
    assert_error(
        client.post(f"{SESSIONS}/nope/events", json={**TEXT, "since": "x"}, headers=full),
        404,
        "session_not_found",
    )


def test_since_answers_at_most_a_page(client, full, session):
    first = batch(client, full, *[{"type": "agent_output", "content": str(i)} for i in range(99)])
    fits = say(client, full, since="start")
    assert fits.status_code == 201 and len(fits.json["events"]) == 100
    body = assert_error(say(client, full, since="start"), 400, "invalid_request", "since")
    assert "100" in body["field_errors"]["since"]
    assert "nothing was written" in body["field_errors"]["since"]
    assert len(all_events(client, full)) == 100
    # Hidden events are not listed, so they do not count.
    client.post(f"{EVENTS}/{first.json['events'][0]['id']}/hide", headers=full)
    assert len(say(client, full, since="start").json["events"]) == 100
    assert len(say(client, full, since=first.json["events"][1]["id"]).json["events"]) == 100


@pytest.mark.parametrize("app_config", [{"EVENTS_PAGE_MAX_BYTES": 4096}])
def test_since_answers_at_most_a_page_of_bytes(client, full, session):
    """A few large events are refused as many small ones are: 400, and the input unwritten."""
    big = {"type": "agent_output", "content": "x" * 1990}  # 2,004 bytes of fields
    first = batch(client, full, big, big).json["events"]  # with an input: 4,056; two: 4,104
    fits = say(client, full, since="start")
    assert fits.status_code == 201 and len(fits.json["events"]) == 3
    before = all_events(client, full)
    body = assert_error(say(client, full, since="start"), 400, "invalid_request", "since")
    assert "4096 bytes" in body["field_errors"]["since"]
    assert "nothing was written" in body["field_errors"]["since"]
    assert all_events(client, full) == before
    # What follows a later anchor still fits.
    assert len(say(client, full, since=first[1]["id"]).json["events"]) == 2


def test_interrupt_appends_a_session_interrupted_event(client, keys, full, session):
    said = say(client, full).json["events"][0]
    response = client.post(EVENTS, json=INTERRUPT, headers=full)
    assert response.status_code == 201 and response.json["session_key"] == "s1"
    [event] = response.json["events"]
    assert event["type"] == "session_interrupted" and event["id"].startswith("aev_")
    assert set(event) == {"id", "session_key", "type", "created_at"}
    assert all_events(client, full) == [said, event]
    assert client.get(f"{EVENTS}/{event['id']}", headers=full).json == event
    assert all_events(client, full, type="session_interrupted") == [event]
    streamed = client.post(EVENTS, json={**INTERRUPT, "stream_response": True}, headers=full)
    assert streamed.status_code == 201 and streamed.mimetype == "text/event-stream"
    frames = streamed.get_data(as_text=True).split("\n\n")
    assert json.loads(frames[0][len("data: ") :])["type"] == "session_interrupted"
    assert frames[1:] == ['data: {"type":"end"}', ""]
    # The user interrupts (events:create); the runtime's key alone may not.
    user = keys.headers((AGENT, ("events:create",)))
    runtime = keys.headers((AGENT, ("events:append",)))
    assert client.post(EVENTS, json=INTERRUPT, headers=user).status_code == 201
    assert_error(client.post(EVENTS, json=INTERRUPT, headers=runtime), 403, "forbidden")
    # A compaction by default keeps the last input and what follows it.
    compacted = client.post(EVENTS, json={"type": "compact", "summary_text": "s"}, headers=full)
    assert compacted.json["events"][0]["events_compacted"] == 0
    client.patch(S1, json={"enabled": False}, headers=full)
    assert_error(client.post(EVENTS, json=INTERRUPT, headers=full), 409, "session_disabled")
    assert len(all_events(client, full, type="session_interrupted")) == 3


# Not found, scopes


def test_not_found(client, full, session):
    assert_error(client.get(f"{SESSIONS}/nope/events", headers=full), 404, "session_not_found")
    assert_error(
        client.get("/v2/agents/ghost/sessions/s1/events", headers=full), 404, "agent_not_found"
    )
    assert_error(
        batch(client, full, TEXT, url=f"{SESSIONS}/nope/events/batch"), 404, "session_not_found"
    )
    # 404 before 400: a bad body for a missing session is still a 404.
    assert_error(
        batch(client, full, {"type": "x"}, url=f"{SESSIONS}/nope/events/batch"),
        404,
        "session_not_found",
    )
    assert_error(
        client.post(f"{SESSIONS}/nope/events", json={}, headers=full), 404, "session_not_found"
    )
    assert_error(
        client.get(f"{SESSIONS}/nope/events?limit=0", headers=full), 404, "session_not_found"
    )
    for method, suffix in (("get", ""), ("post", "/hide"), ("post", "/unhide"), ("delete", "")):
        response = getattr(client, method)(f"{EVENTS}/aev_missing{suffix}", headers=full)
        assert_error(response, 404, "event_not_found")
        response = getattr(client, method)(
            f"{SESSIONS}/nope/events/aev_missing{suffix}", headers=full
        )
        assert_error(response, 404, "session_not_found")
    assert_error(client.put(EVENTS, headers=full), 405, "method_not_allowed")


def test_scopes(client, keys, full, session):
    event_id = batch(client, full, TEXT).json["events"][0]["id"]
    user = keys.headers((AGENT, ("events:create",)))
    runtime = keys.headers((AGENT, ("events:append",)))
    reader = keys.headers((AGENT, ("sessions:read",)))
    elsewhere = keys.headers(("other-bot", EVERYTHING))
    compact = {"type": "compact", "summary_text": "s"}

    assert client.post(EVENTS, json=TEXT, headers=user).status_code == 201
    assert_error(client.post(EVENTS, json=compact, headers=user), 403, "forbidden")
    assert_error(batch(client, user, TEXT), 403, "forbidden")
    assert_error(client.post(EVENTS, json=TEXT, headers=runtime), 403, "forbidden")
    assert batch(client, runtime, TEXT).status_code == 201
    assert client.post(EVENTS, json=compact, headers=runtime).status_code == 201
    for headers in (reader, elsewhere):
        assert_error(client.post(EVENTS, json=TEXT, headers=headers), 403, "forbidden")
        assert_error(batch(client, headers, TEXT), 403, "forbidden")
    assert_error(client.get(EVENTS, headers=user), 403, "forbidden")
    assert client.get(EVENTS, headers=reader).status_code == 200
    assert client.get(f"{EVENTS}/{event_id}", headers=reader).status_code == 200
    assert_error(client.post(f"{EVENTS}/{event_id}/hide", headers=reader), 403, "forbidden")
    assert_error(client.delete(f"{EVENTS}/{event_id}", headers=reader), 403, "forbidden")
    assert (
        client.post(
            f"{EVENTS}/{event_id}/hide", headers=keys.headers((AGENT, ("sessions:update",)))
        ).status_code
        == 200
    )
    assert (
        client.delete(
            f"{EVENTS}/{event_id}", headers=keys.headers((AGENT, ("sessions:delete",)))
        ).status_code
        == 204
    )
    # 403 whether or not the session or agent exists, and before a 400.
    for url in (f"{SESSIONS}/nope/events", "/v2/agents/ghost/sessions/s1/events"):
        assert_error(
            client.post(url, json=TEXT, headers=runtime if "ghost" not in url else elsewhere),
            403,
            "forbidden",
        )
        assert_error(client.post(url + "/batch", json={"bad": 1}, headers=user), 403, "forbidden")
    assert_error(client.post(EVENTS, json=compact, headers=user), 403, "forbidden")
    assert_error(client.get(EVENTS, headers={"x-api-key": "ak_0000.nope"}), 401, "unauthorized")


def test_event_scopes_through_the_admin_api(client, admin, agent):
    grant = {"agent": AGENT, "scopes": ["events:append", "sessions:read"]}
    response = client.post(
        "/v2/api_keys", json={"name": "runtime", "grants": [grant]}, headers=admin
    )
    assert response.status_code == 201
    assert response.json["grants"] == [grant]
    bad = {"name": "x", "grants": [{"agent": AGENT, "scopes": ["events:delete"]}]}
    assert_error(
        client.post("/v2/api_keys", json=bad, headers=admin),
        400,
        "invalid_request",
        "grants.0.scopes.0",
    )


@pytest.mark.parametrize("app_config", [{"DEFAULT_LIMIT": "3/minute"}])
def test_event_writes_count_under_the_default_limit(client, keys, agent, admin):
    headers = keys.headers(("*", EVERYTHING), create_limit="100/minute")
    client.post(SESSIONS, json={"key": "s1", "name": "n"}, headers=headers)  # the creation limit
    assert batch(client, headers, TEXT).status_code == 201
    assert client.post(EVENTS, json=TEXT, headers=headers).status_code == 201
    assert client.get(EVENTS, headers=headers).headers["X-RateLimit-Remaining"] == "0"
    response = batch(client, headers, TEXT)
    assert_error(response, 429, "rate_limit_exceeded")
    assert "Retry-After" in response.headers


# Fork


def test_fork(client, full, session):
    written = batch(client, full, TEXT, {"type": "agent_output", "content": "a"}, TEXT).json[
        "events"
    ]
    ids = [e["id"] for e in written]
    client.post(f"{EVENTS}/{ids[1]}/hide", headers=full)

    plain = client.post(
        SESSIONS,
        json={"key": "f1", "name": "F", "from_session": {"session_key": "s1"}},
        headers=full,
    )
    assert plain.status_code == 201, plain.json
    assert plain.json["forked_from"] == {
        "agent_key": AGENT,
        "session_key": "s1",
        "event_id": ids[2],
    }
    copied = all_events(client, full, url=f"{SESSIONS}/f1/events", include_hidden="true")
    assert [(e["id"], e["created_at"]) for e in copied] == [
        (written[i]["id"], written[i]["created_at"]) for i in (0, 2)
    ]
    assert all(e["session_key"] == "f1" for e in copied)
    assert (
        client.get(f"{SESSIONS}/f1", headers=full).json["forked_from"] == plain.json["forked_from"]
    )
    assert "forked_from" not in client.get(S1, headers=full).json

    upto = {"session_key": "s1", "include_up_to_event_id": ids[0]}
    response = client.post(SESSIONS, json={"name": "Fork two", "from_session": upto}, headers=full)
    assert response.status_code == 201 and response.headers["Location"].endswith("/fork-two")
    assert response.json["forked_from"]["event_id"] == ids[0]
    assert [e["id"] for e in all_events(client, full, url=f"{SESSIONS}/fork-two/events")] == ids[:1]

    compact = {
        "agent_key": AGENT,
        "session_key": "s1",
        "compact_up_to_event_id": ids[0],
        "summary_text": "hi",
    }
    response = client.post(
        SESSIONS, json={"key": "f3", "name": "F", "from_session": compact}, headers=full
    )
    assert response.status_code == 201
    events = all_events(client, full, url=f"{SESSIONS}/f3/events", include_hidden="true")
    assert [e.get("hide_reason") for e in events] == ["compaction", None, None]
    assert events[-1]["type"] == "compaction" and events[-1]["summary_text"] == "hi"

    empty = client.post(SESSIONS, json={"key": "e0", "name": "E"}, headers=full)
    assert empty.status_code == 201
    response = client.post(
        SESSIONS,
        json={"key": "f4", "name": "F", "from_session": {"session_key": "e0"}},
        headers=full,
    )
    assert response.json["forked_from"] == {"agent_key": AGENT, "session_key": "e0"}


@pytest.mark.parametrize(
    ("source", "status", "code", "field"),
    [
        (
            {
                "session_key": "s1",
                "include_up_to_event_id": "aev_a",
                "compact_up_to_event_id": "aev_b",
                "summary_text": "s",
            },
            400,
            "invalid_request",
            "from_session.compact_up_to_event_id",
        ),
        (
            {"session_key": "s1", "compact_up_to_event_id": "aev_a"},
            400,
            "invalid_request",
            "from_session.summary_text",
        ),
        (
            {"session_key": "s1", "summary_text": "s"},
            400,
            "invalid_request",
            "from_session.summary_text",
        ),
        ({}, 400, "invalid_request", "from_session.session_key"),
        ({"session_key": "bad key"}, 400, "invalid_request", "from_session.session_key"),
        (
            {"session_key": "s1", "include_up_to_event_id": "nope"},
            400,
            "invalid_request",
            "from_session.include_up_to_event_id",
        ),
        ({"session_key": "s1", "extra": 1}, 400, "invalid_request", "from_session.extra"),
        ("s1", 400, "invalid_request", "from_session"),
        ({"session_key": "missing"}, 404, "session_not_found", None),
        (
            {"session_key": "s1", "include_up_to_event_id": "aev_missing"},
            404,
            "event_not_found",
            None,
        ),
        (
            {"session_key": "s1", "compact_up_to_event_id": "aev_missing", "summary_text": "s"},
            404,
            "event_not_found",
            None,
        ),
    ],
)
def test_bad_forks(client, full, session, source, status, code, field):
    response = client.post(
        SESSIONS, json={"key": "f", "name": "F", "from_session": source}, headers=full
    )
    assert_error(response, status, code, field)
    assert_error(client.get(f"{SESSIONS}/f", headers=full), 404, "session_not_found")


def test_fork_permissions(client, keys, full, admin, session):
    client.post("/v2/agents", json={"key": "other-bot", "name": "Other"}, headers=admin)
    batch(client, full, TEXT)
    creator = keys.headers(("other-bot", ("sessions:create", "sessions:read")))
    body = {"key": "f", "name": "F", "from_session": {"agent_key": AGENT, "session_key": "s1"}}
    other = "/v2/agents/other-bot/sessions"
    # The source's agent is not readable: 403, whether or not the source exists.
    assert_error(client.post(other, json=body, headers=creator), 403, "forbidden")
    missing = {**body, "from_session": {"agent_key": AGENT, "session_key": "missing"}}
    assert_error(client.post(other, json=missing, headers=creator), 403, "forbidden")
    ghost = {**body, "from_session": {"agent_key": "ghost", "session_key": "s1"}}
    assert_error(client.post(other, json=ghost, headers=creator), 403, "forbidden")
    # Read on the source without create on the new agent: 403.
    reader = keys.headers(("*", ("sessions:read",)))
    assert_error(client.post(other, json=body, headers=reader), 403, "forbidden")
    both = keys.headers(("other-bot", ("sessions:create",)), (AGENT, ("sessions:read",)))
    response = client.post(other, json=body, headers=both)
    assert response.status_code == 201, response.json
    assert response.json["forked_from"]["agent_key"] == AGENT
    assert len(all_events(client, full, url=f"{other}/f/events")) == 1
    # A source agent the key may read but that does not exist: 404.
    anywhere = keys.headers(("*", ("sessions:create", "sessions:read")))
    response = client.post(other, json={**ghost, "key": "g"}, headers=anywhere)
    assert response.status_code == 404
