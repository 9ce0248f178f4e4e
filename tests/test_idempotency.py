"""Idempotency-Key on the creates, and the storage records behind it, on every backend.

The storage part runs the contract of ``claim_idempotency_key`` and its
companions over each backend; the HTTP part runs in-process, once per backend
(the ``client`` fixture). The concurrent and crash cases against a live
gunicorn are in ``test_idempotency_server.py``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

import sessions_app.corridor.idempotency
from sessions_app.corridor.idempotency import fingerprint
from storage_backends import Agent, Answer, IdempotencyKeyLost, Session, Unavailable
from tests.conftest import ALL_SCOPES, assert_error

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
LOCK = dt.timedelta(seconds=30)
DAY = dt.timedelta(days=1)
SESSIONS = "/v2/agents/support-bot/sessions"
EVENTS = f"{SESSIONS}/s1/events"
EVERY_SCOPE = (*ALL_SCOPES, "events:create", "events:append")
MESSAGE = {"type": "input_message", "messages": [{"type": "text", "content": "hello"}]}


def claim(storage: Any, token: str, *, key: str = "k1", fp: str = "f1", now=T0) -> Any:
    return storage.claim_idempotency_key(
        scope="ak_1",
        key=key,
        fingerprint=fp,
        token=token,
        now=now,
        locked_until=now + LOCK,
        expires_at=now + DAY,
    )


ANSWER = Answer(201, (("Content-Type", "application/json"), ("Location", "/x")), b'{"a":1}\n')


# The storage contract


def test_a_first_claim_holds_the_key_and_a_second_sees_it_in_flight(storage):
    first = claim(storage, "t1")
    assert (first.fingerprint, first.token, first.answer) == ("f1", "t1", None)
    second = claim(storage, "t2")
    assert (second.token, second.answer) == ("t1", None)
    other = claim(storage, "t3", fp="f2")
    assert (other.fingerprint, other.token) == ("f1", "t1")
    # Keys are scoped: another key, or the same key of another scope, is free.
    assert claim(storage, "t4", key="k2").token == "t4"
    scoped = storage.claim_idempotency_key(
        scope="ak_2",
        key="k1",
        fingerprint="f1",
        token="t5",
        now=T0,
        locked_until=T0 + LOCK,
        expires_at=T0 + DAY,
    )
    assert scoped.token == "t5"


def test_an_answer_is_remembered_by_its_claim_only(storage):
    claim(storage, "t1")
    with pytest.raises(IdempotencyKeyLost):
        storage.finish_idempotency_key(scope="ak_1", key="k1", token="other", answer=ANSWER)
    storage.finish_idempotency_key(scope="ak_1", key="k1", token="t1", answer=ANSWER)
    record = claim(storage, "t2")
    assert record.answer == ANSWER and record.token == "t1"
    assert isinstance(record.answer.body, bytes)
    # Answered once: a second finish, even by the claim's token, is refused.
    with pytest.raises(IdempotencyKeyLost):
        storage.finish_idempotency_key(scope="ak_1", key="k1", token="t1", answer=ANSWER)
    # An answered key is kept past its lock, until it expires.
    assert claim(storage, "t3", now=T0 + LOCK * 2).answer == ANSWER


def test_a_claim_whose_lock_ended_is_taken_over_by_the_same_request_only(storage):
    claim(storage, "t1")
    late = T0 + LOCK
    assert claim(storage, "t2", fp="f2", now=late).token == "t1"  # another request: no
    assert claim(storage, "t3", now=late).token == "t3"
    # The first holder lost it: its answer is refused, the new holder's kept.
    with pytest.raises(IdempotencyKeyLost):
        storage.finish_idempotency_key(scope="ak_1", key="k1", token="t1", answer=ANSWER)
    storage.finish_idempotency_key(scope="ak_1", key="k1", token="t3", answer=ANSWER)
    assert claim(storage, "t4", now=late).answer == ANSWER


def test_an_expired_record_gives_way_and_is_purged(storage):
    claim(storage, "t1")
    storage.finish_idempotency_key(scope="ak_1", key="k1", token="t1", answer=ANSWER)
    claim(storage, "t2", key="k2")
    assert storage.purge_expired_idempotency_keys(now=T0 + DAY - dt.timedelta(seconds=1)) == 0
    assert claim(storage, "t3", fp="f9", now=T0 + DAY).token == "t3"  # expired: replaced
    # k2 expired too: the purge removes it, if that claim did not already (memory's do).
    assert storage.purge_expired_idempotency_keys(now=T0 + DAY) in (0, 1)
    assert claim(storage, "t4", key="k2", fp="f9", now=T0 + DAY).token == "t4"
    assert storage.purge_expired_idempotency_keys(now=T0 + DAY * 2) == 2  # k1 (t3), k2 (t4)
    assert claim(storage, "t5", now=T0 + DAY * 2).token == "t5"


@pytest.mark.parametrize("storage_url", ["memory"], indirect=True)
def test_the_memory_backend_lets_go_of_expired_records(storage):
    ttl = dt.timedelta(seconds=1)

    def claim_new(n: int, now: dt.datetime) -> None:
        storage.claim_idempotency_key(
            scope="ak_1",
            key=f"k{n}",
            fingerprint="f",
            token=f"t{n}",
            now=now,
            locked_until=now + ttl,
            expires_at=now + ttl,
        )

    def held() -> int:
        return len(storage._idempotency)

    for n in range(300):
        claim_new(n, T0)
    assert held() == 300
    # Claims after they expired drop them, a few at each claim.
    for n in range(300, 340):
        claim_new(n, T0 + ttl)
    assert held() == 40
    # A steady flow of claims holds about one TTL's worth, however long it runs.
    for n in range(400, 5400):
        claim_new(n, T0 + ttl + ttl * (n // 100) / 2)
        assert held() <= 300
    assert held() == 200
    assert storage.purge_expired_idempotency_keys(now=T0 + ttl * 50) == 200
    assert held() == 0 and not storage._idempotency_expiry
    # A record replaced or released goes once, at its own expiry.
    claim_new(1, T0 + ttl * 60)
    storage.release_idempotency_key(scope="ak_1", key="k1", token="t1")
    claim_new(1, T0 + ttl * 60)
    assert held() == 1 and len(storage._idempotency_expiry) == 2
    assert storage.purge_expired_idempotency_keys(now=T0 + ttl * 61) == 1
    assert held() == 0 and not storage._idempotency_expiry


def test_a_released_claim_frees_the_key_for_its_holder_only(storage):
    claim(storage, "t1")
    storage.release_idempotency_key(scope="ak_1", key="k1", token="other")
    assert claim(storage, "t2").token == "t1"
    storage.release_idempotency_key(scope="ak_1", key="k1", token="t1")
    assert claim(storage, "t3").token == "t3"
    storage.finish_idempotency_key(scope="ak_1", key="k1", token="t3", answer=ANSWER)
    storage.release_idempotency_key(scope="ak_1", key="k1", token="t3")  # answered: kept
    assert claim(storage, "t4").answer == ANSWER


def new_session(key: str) -> Session:
    return Session(key=key, agent_key="bot", name=key, created_at=T0, updated_at=T0)


@pytest.mark.parametrize("storage_url", ["sqlite", "postgres"], indirect=True)
def test_a_unit_of_work_commits_the_write_and_its_answer_together(storage):
    storage.create_agent(agent=Agent(key="bot", name="bot", created_at=T0, updated_at=T0))
    claim(storage, "t1")
    with pytest.raises(RuntimeError), storage.atomic():
        storage.create_session(session=new_session("s1"))
        storage.finish_idempotency_key(scope="ak_1", key="k1", token="t1", answer=ANSWER)
        raise RuntimeError("the answer never went out")
    assert storage.list_sessions(agent_key="bot", limit=10, now=T0).items == []
    assert claim(storage, "t2").answer is None  # neither the write nor its record
    with storage.atomic():
        # A call that fails inside the unit undoes only itself.
        storage.create_session(session=new_session("s1"))
        with pytest.raises(Exception, match="s1"):
            storage.create_session(session=new_session("s1"))
        with storage.atomic():  # nested: a savepoint
            storage.create_session(session=new_session("s2"))
        storage.finish_idempotency_key(scope="ak_1", key="k1", token="t1", answer=ANSWER)
    keys = [s.key for s in storage.list_sessions(agent_key="bot", limit=10, now=T0).items]
    assert keys == ["s1", "s2"]
    assert claim(storage, "t3").answer == ANSWER


# The HTTP API


@pytest.fixture
def writer(keys, agent) -> dict[str, str]:
    return keys.headers(("*", EVERY_SCOPE))


def post(client, path: str, body: Any, headers: dict[str, str], key: str | None = "k-1") -> Any:
    if key is not None:
        headers = {**headers, "Idempotency-Key": key}
    return client.post(path, json=body, headers=headers)


def session_keys(client, headers) -> list[str]:
    return [s["key"] for s in client.get(SESSIONS, headers=headers).get_json()["sessions"]]


def test_a_retried_create_gets_the_first_answer_and_makes_no_second_session(client, writer):
    first = post(client, SESSIONS, {"name": "Hello there"}, writer)
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    again = post(client, SESSIONS, {"name": "Hello there"}, writer)
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_data() == first.get_data()
    for header in ("Location", "ETag", "Content-Type"):
        assert again.headers[header] == first.headers[header]
    assert again.headers["X-Request-ID"] != first.headers["X-Request-ID"]
    assert session_keys(client, writer) == ["hello-there"]
    # The body is compared as parsed: key order and spacing are not a new request.
    reordered = client.post(
        SESSIONS,
        data='{ "name" :  "Hello there" }',
        content_type="application/json",
        headers={**writer, "Idempotency-Key": "k-1"},
    )
    assert reordered.headers["Idempotent-Replayed"] == "true"
    # Without the header, the same body is a new session.
    assert post(client, SESSIONS, {"name": "Hello there"}, writer, key=None).status_code == 201
    made = session_keys(client, writer)
    assert len(made) == 2 and made[0] == "hello-there" and made[1].startswith("hello-there-")


def test_the_same_key_for_another_request_is_422_and_does_nothing(client, writer):
    assert post(client, SESSIONS, {"name": "One"}, writer).status_code == 201
    assert_error(post(client, SESSIONS, {"name": "Two"}, writer), 422, "idempotency_key_mismatch")
    # Another path (the agents' collection) with the key is another request too.
    assert_error(
        post(client, "/v2/agents/other-bot/sessions", {"name": "One"}, writer),
        422,
        "idempotency_key_mismatch",
    )
    assert session_keys(client, writer) == ["one"]


def test_keys_are_scoped_to_the_api_key_that_sends_them(client, keys, writer):
    other = keys.headers(("*", EVERY_SCOPE))
    assert post(client, SESSIONS, {"name": "Mine"}, writer).status_code == 201
    theirs = post(client, SESSIONS, {"name": "Theirs"}, other)
    assert theirs.status_code == 201 and "Idempotent-Replayed" not in theirs.headers
    assert session_keys(client, writer) == ["mine", "theirs"]


def hold_claim(app, body: dict[str, Any], token: str, lock: dt.timedelta) -> dt.datetime:
    """Claim key k-1 of the (one) non-admin key for POST SESSIONS with ``body``, as another
    worker would; return the claim's time."""
    storage = app.extensions["agent_sessions"].storage
    key_id = next(k.id for k in storage.list_api_keys(limit=100).items if not k.admin)
    now = sessions_app.corridor.idempotency.utcnow()
    storage.claim_idempotency_key(
        scope=key_id,
        key="k-1",
        fingerprint=fingerprint("POST", SESSIONS, body),
        token=token,
        now=now,
        locked_until=now + lock,
        expires_at=now + DAY,
    )
    return now


def test_a_request_in_flight_is_409_with_retry_after(client, app, writer):
    body = {"name": "Slow"}
    # Another worker holds the claim of this very request.
    hold_claim(app, body, "elsewhere", LOCK)
    busy = post(client, SESSIONS, body, writer)
    assert_error(busy, 409, "idempotency_key_in_use")
    assert busy.headers["Retry-After"] == "1"
    assert session_keys(client, writer) == []
    # The same key with another body is a mismatch, in flight or not.
    assert_error(post(client, SESSIONS, {"name": "x"}, writer), 422, "idempotency_key_mismatch")


def test_a_claim_left_by_a_dead_request_is_taken_over_once_its_lock_ends(
    client, app, writer, monkeypatch
):
    app.config["IDEMPOTENCY_KEY_LOCK_SECONDS"] = 5
    body = {"name": "Orphan"}
    now = hold_claim(app, body, "dead", dt.timedelta(seconds=5))
    assert_error(post(client, SESSIONS, body, writer), 409, "idempotency_key_in_use")
    monkeypatch.setattr(
        sessions_app.corridor.idempotency, "utcnow", lambda: now + dt.timedelta(seconds=6)
    )
    taken = post(client, SESSIONS, body, writer)
    assert taken.status_code == 201 and "Idempotent-Replayed" not in taken.headers
    assert post(client, SESSIONS, body, writer).headers["Idempotent-Replayed"] == "true"


def test_client_errors_are_remembered_and_server_errors_are_not(client, app, writer, monkeypatch):
    refused = post(client, SESSIONS, {"name": ""}, writer, key="k-400")
    assert_error(refused, 400, "invalid_request", "name")
    replayed = post(client, SESSIONS, {"name": ""}, writer, key="k-400")
    assert replayed.status_code == 400 and replayed.headers["Idempotent-Replayed"] == "true"
    # The same error; its request_id names the retry, as its X-Request-ID does.
    assert_error(replayed, 400, "invalid_request", "name")
    first, again = refused.get_json(), replayed.get_json()
    assert again.pop("request_id") != first.pop("request_id") and again == first
    # A 404 of the path is the operation's answer too.
    missing = post(client, "/v2/agents/nobody/sessions", {"name": "x"}, writer, key="k-404")
    assert_error(missing, 404, "agent_not_found")
    again = post(client, "/v2/agents/nobody/sessions", {"name": "x"}, writer, key="k-404")
    assert again.status_code == 404 and again.headers["Idempotent-Replayed"] == "true"
    # A 503 is released: the retry is processed for real.
    storage = app.extensions["agent_sessions"].storage
    real = storage.create_session

    def down(**kwargs: Any) -> Any:
        raise Unavailable("storage down")

    monkeypatch.setattr(storage, "create_session", down)
    assert_error(post(client, SESSIONS, {"name": "Later"}, writer, key="k-503"), 503, "unavailable")
    monkeypatch.setattr(storage, "create_session", real)
    later = post(client, SESSIONS, {"name": "Later"}, writer, key="k-503")
    assert later.status_code == 201 and "Idempotent-Replayed" not in later.headers


@pytest.mark.parametrize("storage_url", ["sqlite", "postgres"], indirect=True)
def test_a_write_whose_answer_cannot_be_remembered_is_undone(client, app, writer, monkeypatch):
    """Never the write without its record: a failure to remember rolls the write back."""
    storage = app.extensions["agent_sessions"].storage
    real = storage.finish_idempotency_key

    def lost(**kwargs: Any) -> None:
        raise Unavailable("storage went away before the commit")

    monkeypatch.setattr(storage, "finish_idempotency_key", lost)
    assert_error(
        post(client, SESSIONS, {"name": "Ghost", "key": "ghost"}, writer), 503, "unavailable"
    )
    assert session_keys(client, writer) == []
    monkeypatch.setattr(storage, "finish_idempotency_key", real)
    retried = post(client, SESSIONS, {"name": "Ghost", "key": "ghost"}, writer)
    assert retried.status_code == 201 and "Idempotent-Replayed" not in retried.headers
    assert session_keys(client, writer) == ["ghost"]


def test_refusals_before_the_body_is_read_are_not_remembered(client, keys, writer):
    reader = keys.headers(("*", ("sessions:read",)))
    assert_error(post(client, SESSIONS, {"name": "x"}, reader), 403, "forbidden")
    assert_error(
        client.post(
            SESSIONS,
            data="{",
            content_type="application/json",
            headers={**writer, "Idempotency-Key": "k-1"},
        ),
        400,
        "invalid_request",
    )
    created = post(client, SESSIONS, {"name": "x"}, writer)
    assert created.status_code == 201 and "Idempotent-Replayed" not in created.headers


@pytest.mark.parametrize(
    "value", ["", " ", "x" * 256, "caf\u00e9", "tab\there", "two,keys", "k1, k2"]
)
def test_a_malformed_key_is_400(client, writer, value):
    response = client.post(
        SESSIONS, json={"name": "x"}, headers={**writer, "Idempotency-Key": value}
    )
    assert_error(response, 400, "invalid_request")
    assert "Idempotency-Key" in response.get_json()["messages"][0]
    assert session_keys(client, writer) == []


def test_the_longest_key_and_every_printable_character_are_taken(client, writer):
    assert post(client, SESSIONS, {"name": "a"}, writer, key="k" * 255).status_code == 201
    printable = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != ",")
    assert post(client, SESSIONS, {"name": "b"}, writer, key=printable).status_code == 201
    assert (
        post(client, SESSIONS, {"name": "b"}, writer, key=printable).headers["Idempotent-Replayed"]
        == "true"
    )


def test_event_writes_are_written_once(client, writer):
    assert post(client, SESSIONS, {"name": "s", "key": "s1"}, writer, key=None).status_code == 201
    first = post(client, EVENTS, MESSAGE, writer, key="e-1")
    assert post(client, EVENTS, MESSAGE, writer, key="e-1").get_data() == first.get_data()
    stream = {**MESSAGE, "stream_response": True}
    streamed = post(client, EVENTS, stream, writer, key="e-2")
    replayed = post(client, EVENTS, stream, writer, key="e-2")
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.mimetype == streamed.mimetype == "text/event-stream"
    assert replayed.get_data() == streamed.get_data()
    batch = {"events": [{"type": "agent_output", "content": "hi"}], "if_last_event_id": None}
    # if_last_event_id no longer holds: 409 conflict, remembered as it is.
    conflict = post(client, f"{EVENTS}/batch", batch, writer, key="b-1")
    assert_error(conflict, 409, "conflict")
    assert post(client, f"{EVENTS}/batch", batch, writer, key="b-1").status_code == 409
    del batch["if_last_event_id"]
    written = post(client, f"{EVENTS}/batch", batch, writer, key="b-2")
    assert written.status_code == 201
    for _ in range(3):
        assert post(client, f"{EVENTS}/batch", batch, writer, key="b-2").status_code == 201
    history = client.get(f"{EVENTS}?limit=100", headers=writer).get_json()["events"]
    assert [e["type"] for e in history] == ["input_message", "input_message", "agent_output"]


def test_a_fork_and_an_agent_are_created_once(client, admin, writer):
    assert post(client, SESSIONS, {"name": "s", "key": "s1"}, writer, key=None).status_code == 201
    assert post(client, EVENTS, MESSAGE, writer, key=None).status_code == 201
    fork = {"name": "Fork", "from_session": {"session_key": "s1"}}
    first = post(client, SESSIONS, fork, writer, key="f-1")
    again = post(client, SESSIONS, fork, writer, key="f-1")
    assert first.status_code == 201 and again.get_data() == first.get_data()
    assert session_keys(client, writer) == ["s1", "fork"]
    agent = {"key": "second-bot", "name": "Second"}
    assert post(client, "/v2/agents", agent, admin, key="a-1").status_code == 201
    replay = post(client, "/v2/agents", agent, admin, key="a-1")
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"


def test_api_keys_refuse_the_header(client, admin):
    body = {"name": "runtime", "grants": [{"agent": "*", "scopes": ["sessions:read"]}]}
    refused = post(client, "/v2/api_keys", body, admin)
    assert_error(refused, 400, "invalid_request")
    assert "Idempotency-Key" in refused.get_json()["messages"][0]
    names = [k["name"] for k in client.get("/v2/api_keys", headers=admin).get_json()["api_keys"]]
    assert "runtime" not in names


def test_a_remembered_answer_lasts_its_ttl(client, writer, monkeypatch):
    assert post(client, SESSIONS, {"name": "Once"}, writer).status_code == 201
    now = sessions_app.corridor.idempotency.utcnow()
    monkeypatch.setattr(
        sessions_app.corridor.idempotency,
        "utcnow",
        lambda: now + dt.timedelta(hours=23, minutes=59),
    )
    assert post(client, SESSIONS, {"name": "Once"}, writer).headers["Idempotent-Replayed"] == "true"
    monkeypatch.setattr(
        sessions_app.corridor.idempotency, "utcnow", lambda: now + dt.timedelta(hours=24)
    )
    fresh = post(client, SESSIONS, {"name": "Once"}, writer)
    assert fresh.status_code == 201 and "Idempotent-Replayed" not in fresh.headers
    assert len(session_keys(client, writer)) == 2


@pytest.mark.parametrize("storage_url", ["sqlite"], indirect=True)
def test_a_body_nested_to_the_parsers_limit_is_never_a_500_with_a_key(client, keys, agent):
    """The parser takes a body nested to a few frames short of the recursion limit;
    the fingerprint, which encodes it again a few frames deeper, answers 400 too."""
    writer = keys.headers(("*", EVERY_SCOPE), create_limit="1000000/minute")
    seen: dict[int, int] = {}
    for depth in range(900, 1060):
        body = '{"name": "d", "x": ' + "[" * depth + "]" * depth + "}"
        response = client.post(
            SESSIONS,
            data=body,
            content_type="application/json",
            headers={**writer, "Idempotency-Key": f"deep-{depth}"},
        )
        seen.setdefault(response.status_code, depth)
    assert set(seen) == {400}, seen
