"""Idempotency-Key under a live gunicorn with 4 workers, on a SQLite file and on PostgreSQL.

- 50 identical creates at once with one key: one session; every answer is its
  201 (first-hand or replayed, byte for byte) or a 409 ``idempotency_key_in_use``
  with ``Retry-After``, and a retry of each 409 is the replay. (On SQLite a
  claim waits for the writers' turn, which the request in flight holds until
  it has answered, so the others mostly wait and replay rather than 409.)
- A batch of events sent again and again, concurrently, with its key: its
  events are in the history once. The key with another body (or path) is a 422
  ``idempotency_key_mismatch`` that writes nothing. A refusal is remembered too,
  and its replay's ``request_id`` is the retry's ``X-Request-ID``.
- Workers SIGKILLed while creates with keys run, their claims' lock one second:
  a retry of every key ends in its 201 with exactly one session, and a retry
  finds the session already there only when it replays the answer (never the
  write without the record of its answer, nor the record without the write).
- PostgreSQL, a request held by the test between its claim and its write: once
  its lock ends a retry takes the claim over, and the first's write is undone.
- The official ``vectara`` client sends the header through ``request_options``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import postgres_schema, require_server
from tests.servers import Server, bootstrap, serving

AGENT = "support-bot"
GRANTS = f"{AGENT}=sessions:create,sessions:read,sessions:delete,events:append"
SESSIONS = f"/v2/agents/{AGENT}/sessions"
UNLIMITED = {
    "AGENT_SESSIONS_SESSION_CREATE_LIMIT": "1000000/minute",
    "AGENT_SESSIONS_DEFAULT_LIMIT": "1000000/minute",
}


@contextlib.contextmanager
def store(backend: str, tmp: Path) -> Iterator[str]:
    """A fresh, empty SQLite file or PostgreSQL schema, as a STORAGE_URL."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp}/sessions.db"
    else:
        require_server("PostgreSQL", "127.0.0.1", 5432)
        with postgres_schema() as url:
            yield url


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def live(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """A gunicorn with 4 workers and the default settings; its API key's token."""
    tmp = tmp_path_factory.mktemp(f"idempotency-{backend}")
    with store(backend, tmp) as url:
        env = {"AGENT_SESSIONS_STORAGE_URL": url, **UNLIMITED}
        token = bootstrap(env, grants=GRANTS)
        with serving(env, tmp, workers=4) as server:
            yield server, token


def client(token: str) -> requests.Session:
    http = requests.Session()
    http.headers["x-api-key"] = token
    return http


def wait_for_workers(server: Server, timeout: float = 30) -> None:
    """Until the master has all its workers again (after SIGKILLs)."""
    deadline = time.monotonic() + timeout
    while len(server.worker_pids()) < server.workers:
        assert time.monotonic() < deadline, "gunicorn did not replace its workers"
        time.sleep(0.1)


def all_sessions(server: Server, token: str) -> list[dict]:
    """Every session of the agent, through the list's pages."""
    found: list[dict] = []
    params: dict = {"limit": 100}
    with client(token) as http:
        for _ in range(1000):
            response = http.get(server.url + SESSIONS, params=params, timeout=10)
            assert response.status_code == 200, response.text
            body = response.json()
            found += body["sessions"]
            page_key = body["metadata"].get("page_key")
            if page_key is None:
                return found
            params["page_key"] = page_key
    raise AssertionError("the list's pages did not end")


def history(events: str, token: str) -> list[dict]:
    """Every event of the session, hidden ones included, oldest first."""
    response = requests.get(
        events,
        params={"limit": 100, "include_hidden": "true"},
        headers={"x-api-key": token},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.json()["metadata"].get("page_key") is None
    return response.json()["events"]


def replayed(response: requests.Response) -> bool:
    return response.headers.get("Idempotent-Replayed") == "true"


def assert_in_use(response: requests.Response) -> None:
    assert response.status_code == 409, (response.status_code, response.text)
    assert response.json()["error"] == "idempotency_key_in_use", response.text
    assert response.headers.get("Retry-After"), response.headers


def new_session(server: Server, token: str, key: str) -> str:
    """A session created without an Idempotency-Key; the URL of its events."""
    response = requests.post(
        server.url + SESSIONS,
        json={"key": key, "name": key},
        headers={"x-api-key": token},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return f"{server.url}{SESSIONS}/{key}/events"


def test_concurrent_identical_creates_make_one_session(live: tuple[Server, str]) -> None:
    server, token = live
    wait_for_workers(server)
    threads = 50
    start = threading.Barrier(threads)
    headers = {"Idempotency-Key": "same-create"}

    def create(_: int) -> requests.Response:
        with client(token) as http:
            start.wait()
            return http.post(
                server.url + SESSIONS, json={"name": "Same name"}, headers=headers, timeout=30
            )

    before = {s["key"] for s in all_sessions(server, token)}
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(create, range(threads)))

    created = [r for r in answers if r.status_code == 201]
    first_hand = [r for r in created if not replayed(r)]
    busy = [r for r in answers if r.status_code != 201]
    for response in busy:
        assert_in_use(response)
    # Every request that was told to retry is answered; the one in flight is done.
    retries = [
        requests.post(
            server.url + SESSIONS,
            json={"name": "Same name"},
            timeout=10,
            headers={**headers, "x-api-key": token},
        )
        for _ in busy
    ]
    counts = (
        f"{threads} identical creates: {len(first_hand)} 201 first-hand, "
        f"{len(created) - len(first_hand)} 201 replayed, {len(busy)} 409 in use "
        f"(each retried: {sorted({(r.status_code, replayed(r)) for r in retries})})"
    )
    print("\n" + counts)

    sessions = [s for s in all_sessions(server, token) if s["key"] not in before]
    assert len(sessions) == 1, (counts, sessions)
    assert len(first_hand) == 1, counts
    (session,) = sessions
    original = first_hand[0]
    assert original.json() == session and session["name"] == "Same name", counts
    for response in [r for r in created if r is not original] + retries:
        assert response.status_code == 201 and replayed(response), (counts, response.text)
    for response in created + retries:
        assert response.content == original.content, counts
        assert response.headers["Content-Type"] == original.headers["Content-Type"]
        assert response.headers["ETag"] == original.headers["ETag"]
        assert response.headers["Location"] == f"{SESSIONS}/{session['key']}"


def test_replayed_batches_write_their_events_once(live: tuple[Server, str]) -> None:
    server, token = live
    wait_for_workers(server)
    events = new_session(server, token, "replayed-batch")
    batch = {"events": [{"type": "agent_output", "content": f"said {n}"} for n in range(3)]}
    threads, sends = 8, 5
    start = threading.Barrier(threads)

    def send(_: int) -> list[requests.Response]:
        with client(token) as http:
            start.wait()
            return [
                http.post(
                    events + "/batch",
                    json=batch,
                    headers={"Idempotency-Key": "batch-once"},
                    timeout=30,
                )
                for _ in range(sends)
            ]

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        answers = [r for part in pool.map(send, range(threads)) for r in part]
    created = [r for r in answers if r.status_code == 201]
    for response in answers:
        if response.status_code != 201:
            assert_in_use(response)
    with client(token) as http:
        last = http.post(
            events + "/batch", json=batch, headers={"Idempotency-Key": "batch-once"}, timeout=10
        )
    print(
        f"\n{len(answers)} sends of one batch: {sum(not replayed(r) for r in created)} "
        f"201 first-hand, {sum(map(replayed, created))} replayed, "
        f"{len(answers) - len(created)} 409 in use"
    )
    assert last.status_code == 201 and replayed(last), last.text
    assert sum(not replayed(r) for r in created) == 1
    assert all(r.content == last.content for r in created)

    stored = history(events, token)
    written = last.json()["events"]
    assert [e["content"] for e in written] == ["said 0", "said 1", "said 2"]
    assert stored == written, "the history is not exactly the batch, once"


def test_a_key_used_again_for_another_request_is_422_and_writes_nothing(
    live: tuple[Server, str],
) -> None:
    server, token = live
    events = new_session(server, token, "mismatched-batch")
    other = new_session(server, token, "mismatched-other")
    batch = {"events": [{"type": "agent_output", "content": "once"}]}

    def post(url: str, body: dict, key: str) -> requests.Response:
        return requests.post(
            url, json=body, headers={"x-api-key": token, "Idempotency-Key": key}, timeout=10
        )

    first = post(events + "/batch", batch, "mismatch-batch")
    assert first.status_code == 201 and not replayed(first), first.text
    written = history(events, token)
    refused = [
        post(
            events + "/batch",
            {"events": [{"type": "agent_output", "content": "twice"}]},
            "mismatch-batch",
        ),
        post(other + "/batch", batch, "mismatch-batch"),  # the same body, another path
    ]
    for response in refused:
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "idempotency_key_mismatch", response.text
        assert not replayed(response)
    assert history(events, token) == written
    assert history(other, token) == []
    # The same body with its members in another order is the same request.
    again = post(
        events + "/batch",
        {"events": [{"content": "once", "type": "agent_output"}]},
        "mismatch-batch",
    )
    assert again.status_code == 201 and replayed(again) and again.content == first.content

    create = post(server.url + SESSIONS, {"key": "mismatch-a", "name": "A"}, "mismatch-create")
    assert create.status_code == 201, create.text
    before = all_sessions(server, token)
    other_create = post(
        server.url + SESSIONS, {"key": "mismatch-b", "name": "B"}, "mismatch-create"
    )
    assert other_create.status_code == 422, other_create.text
    assert other_create.json()["error"] == "idempotency_key_mismatch"
    assert all_sessions(server, token) == before
    missing = requests.get(
        f"{server.url}{SESSIONS}/mismatch-b", headers={"x-api-key": token}, timeout=10
    )
    assert missing.status_code == 404, missing.text


def test_a_refusal_is_remembered_and_its_replay_names_the_retry(
    live: tuple[Server, str],
) -> None:
    """A 4xx is remembered like a 201 (the session created since does not change it),
    and its replay's ``request_id`` is the retry's own ``X-Request-ID``, as every
    error's is: not the first request's."""
    server, token = live
    new_session(server, token, "refused-create")

    def post(request_id: str) -> requests.Response:
        return requests.post(
            server.url + SESSIONS,
            json={"key": "refused-create", "name": "Again"},
            headers={"x-api-key": token, "Idempotency-Key": "refused", "X-Request-ID": request_id},
            timeout=10,
        )

    first = post("first-request")
    requests.delete(
        f"{server.url}{SESSIONS}/refused-create", headers={"x-api-key": token}, timeout=10
    )
    again = post("the-retry")
    assert first.status_code == again.status_code == 409, (first.text, again.text)
    assert not replayed(first) and replayed(again)
    assert first.json()["request_id"] == first.headers["X-Request-ID"] == "first-request"
    assert again.json()["request_id"] == again.headers["X-Request-ID"] == "the-retry"
    assert {**again.json(), "request_id": "first-request"} == first.json()
    assert again.content.replace(b"the-retry", b"first-request") == first.content
    missing = requests.get(
        f"{server.url}{SESSIONS}/refused-create", headers={"x-api-key": token}, timeout=10
    )
    assert missing.status_code == 404, "the replay wrote something"


@pytest.mark.slow
def test_sigkill_between_the_write_and_the_answer_never_writes_without_the_record(
    backend: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    writers, kills = 4, 6
    stop = threading.Event()
    with store(backend, tmp_path) as url:
        env = {
            "AGENT_SESSIONS_STORAGE_URL": url,
            "AGENT_SESSIONS_IDEMPOTENCY_KEY_LOCK_SECONDS": "1",
            **UNLIMITED,
        }
        token = bootstrap(env, grants=GRANTS)
        with serving(env, tmp_path, workers=4) as server:

            def write(w: int) -> list[tuple[str, object]]:
                """Creates with keys until told to stop; (key, first answer) for each."""
                http = client(token)
                sent: list[tuple[str, object]] = []
                n = 0
                while not stop.is_set():
                    key = f"crash-{w}-{n}"
                    n += 1
                    try:
                        response = keyed_create(http, server, key, timeout=30)
                    except requests.RequestException:
                        sent.append((key, None))  # its worker died with it
                        http.close()
                        http = client(token)
                        continue
                    sent.append((key, response))
                http.close()
                return sent

            with concurrent.futures.ThreadPoolExecutor(writers) as pool:
                futures = [pool.submit(write, w) for w in range(writers)]
                killed = 0
                for _ in range(kills):
                    time.sleep(rnd.uniform(0.2, 0.5))
                    workers = sorted(server.worker_pids())
                    if workers:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(rnd.choice(workers), signal.SIGKILL)
                            killed += 1
                time.sleep(0.3)
                stop.set()
                sent = [pair for future in futures for pair in future.result()]
            wait_for_workers(server)
            time.sleep(1.2)  # past every dead claim's lock

            unexpected = [
                (key, first.status_code, first.text[:200])
                for key, first in sent
                if first is not None and first.status_code not in (201, 503)
            ]
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                outcomes = collections.Counter(
                    pool.map(lambda pair: recovered(server, token, *pair), sent)
                )
            stored = [s["key"] for s in all_sessions(server, token)]
    print(
        f"\nSIGKILL (seed {seed}): {killed} workers killed, {len(sent)} keyed creates: "
        + ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
    )
    assert not unexpected, unexpected[:5]
    assert killed and sent
    assert sorted(stored) == sorted(key for key, _ in sent), "a session missing or twice"


def recovered(server: Server, token: str, key: str, first: requests.Response | None) -> str:
    """Retry the create for ``key`` to its 201, checking that the session was there
    before the retry exactly when the retry replays; what happened, in words."""
    with client(token) as http:
        existed = http.get(f"{server.url}{SESSIONS}/{key}", timeout=10).status_code
        assert existed in (200, 404), (key, existed)
        retry = retried(http, server, key)
    assert retry.status_code == 201, (key, retry.status_code, retry.text)
    assert retry.json()["key"] == key
    # Never the write without the record of its answer, nor the record without the write.
    assert replayed(retry) == (existed == 200), (key, first, existed, retry.headers)
    if first is None:
        return "died unanswered, " + ("replayed" if replayed(retry) else "written on retry")
    if first.status_code == 201:
        assert replayed(retry) and retry.content == first.content, key
        return "answered 201, replayed"
    return f"answered {first.status_code}, " + (
        "replayed" if replayed(retry) else "written on retry"
    )


def keyed_create(
    http: requests.Session, server: Server, key: str, timeout: float
) -> requests.Response:
    """Create session ``key`` under the Idempotency-Key ``idem-<key>``."""
    return http.post(
        server.url + SESSIONS,
        json={"key": key, "name": key},
        headers={"Idempotency-Key": f"idem-{key}"},
        timeout=timeout,
    )


def retried(http: requests.Session, server: Server, key: str) -> requests.Response:
    """The create for ``key`` again, retried while busy, unavailable or unreachable."""
    deadline = time.monotonic() + 15
    while True:
        try:
            response = keyed_create(http, server, key, timeout=10)
        except requests.RequestException:
            response = None
        if response is not None and response.status_code not in (409, 503):
            return response
        if response is not None and response.status_code == 409:
            assert_in_use(response)
        assert time.monotonic() < deadline, (key, response and response.text)
        time.sleep(0.3)


def test_vectara_client_sends_the_key_through_request_options(live: tuple[Server, str]) -> None:
    import httpx
    import vectara
    from vectara.environment import VectaraEnvironment

    server, token = live
    before = {s["key"] for s in all_sessions(server, token)}
    with httpx.Client(timeout=60) as http:
        vec = vectara.Vectara(
            api_key=token,
            environment=VectaraEnvironment(default=server.url, auth=server.url),
            httpx_client=http,
        )
        options = {"additional_headers": {"Idempotency-Key": "vectara-once"}, "max_retries": 0}
        first = vec.agent_sessions.create(AGENT, name="Via Vectara", request_options=options)
        again = vec.agent_sessions.create(AGENT, name="Via Vectara", request_options=options)
    assert first.key and again.key == first.key
    assert again.created_at == first.created_at and again.name == "Via Vectara"
    assert [s["key"] for s in all_sessions(server, token) if s["key"] not in before] == [first.key]


@pytest.mark.slow
def test_a_claim_taken_over_undoes_the_first_requests_write(tmp_path: Path) -> None:
    """PostgreSQL, where a request can be held between its claim and its write: the
    sessions table locked by the test, the first request claims its key and waits; once
    its lock ends, a retry takes the claim over and waits too. Let go, the first no
    longer holds the key: its write is undone and it answers 409; the retry's is the one
    session."""
    import psycopg

    require_server("PostgreSQL", "127.0.0.1", 5432)
    with postgres_schema() as url:
        env = {
            "AGENT_SESSIONS_STORAGE_URL": url,
            "AGENT_SESSIONS_IDEMPOTENCY_KEY_LOCK_SECONDS": "1",
            # The requests wait on the test's lock for as long as it takes, not 5 s.
            "AGENT_SESSIONS_POSTGRES_TIMEOUT": "60",
            "AGENT_SESSIONS_POSTGRES_STATEMENT_TIMEOUT_MS": "60000",
            **UNLIMITED,
        }
        token = bootstrap(env, grants=GRANTS)
        with (
            serving(env, tmp_path, workers=2) as server,
            psycopg.connect(url, autocommit=True) as watch,
            psycopg.connect(url) as holder,
            concurrent.futures.ThreadPoolExecutor(2) as pool,
        ):

            def claim() -> tuple[str, bool] | None:
                """The key's claim: its token, and whether its lock has ended."""
                return watch.execute(
                    "SELECT token, locked_until <= clock_timestamp() FROM idempotency_keys "
                    "WHERE key = 'taken-over' AND status IS NULL"
                ).fetchone()

            def until(condition: Callable[[], object]) -> None:
                for _ in range(200):
                    if condition():
                        return
                    time.sleep(0.05)
                raise AssertionError("the requests did not get there")

            def create() -> requests.Response:
                return requests.post(
                    server.url + SESSIONS,
                    json={"key": "taken-over", "name": "Taken over"},
                    headers={"x-api-key": token, "Idempotency-Key": "taken-over"},
                    timeout=30,
                )

            holder.execute("LOCK TABLE sessions IN SHARE ROW EXCLUSIVE MODE")
            first = pool.submit(create)
            until(lambda: claim() and claim()[1])
            first_token = claim()[0]
            second = pool.submit(create)
            until(lambda: claim() and claim()[0] != first_token)
            holder.commit()
            first_answer, second_answer = first.result(), second.result()
            again = create()
            sessions = all_sessions(server, token)
    assert_in_use(first_answer)
    assert second_answer.status_code == 201 and not replayed(second_answer), second_answer.text
    assert again.status_code == 201 and replayed(again) and again.content == second_answer.content
    assert [s["key"] for s in sessions] == ["taken-over"]
