"""Writers of one session's history under a live gunicorn with 4 workers, on SQLite and PostgreSQL.

- 8 writers append one event at a time with ``if_last_event_id``, re-reading
  the last event and retrying on 409: every acknowledged event is in the
  history exactly once, each right after the event its writer named (the
  history is the chain of acknowledgements), and nothing else is there.
- 100 batches sent at once without it all land, each batch's events
  together and in their order.
- Workers SIGKILLed while 8 writers append batches: every acknowledged batch
  is there whole, every batch left without an answer is there whole or not at
  all, and nothing else is there.

Event ids are the clients' own (the contract allows them for idempotent
imports), so a batch whose answer was lost can be looked for afterwards.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from sqlite_utils.utils import sqlite3

from tests.servers import Server, serving_store

pytestmark = pytest.mark.slow

AGENT = "support-bot"
GRANTS = f"{AGENT}=sessions:create,sessions:read,events:append"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, str, str]]:
    """A gunicorn with 4 workers on a fresh SQLite file or PostgreSQL schema; its key and URL."""
    tmp = tmp_path_factory.mktemp(f"races-{request.param}")
    limits = {
        "AGENT_SESSIONS_SESSION_CREATE_LIMIT": "1000000/minute",
        "AGENT_SESSIONS_DEFAULT_LIMIT": "1000000/minute",
    }
    with serving_store(request.param, tmp, limits, grants=GRANTS) as (server, token, url):
        yield server, token, url


@pytest.fixture
def session(live: tuple[Server, str, str], request: pytest.FixtureRequest) -> str:
    """A new session on the live server, named after the test; the URL of its events."""
    server, token, _ = live
    wait_for_workers(server)
    key = request.node.originalname.replace("_", "-")[:60]
    response = requests.post(
        f"{server.url}/v2/agents/{AGENT}/sessions",
        json={"key": key, "name": "Race"},
        headers={"x-api-key": token},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return f"{server.url}/v2/agents/{AGENT}/sessions/{key}/events"


def wait_for_workers(server: Server, timeout: float = 30) -> None:
    """Until the master has its 4 workers again (a test before may have killed some)."""
    deadline = time.monotonic() + timeout
    while len(server.worker_pids()) < server.workers:
        assert time.monotonic() < deadline, "gunicorn did not replace its workers"
        time.sleep(0.1)


def history(events: str, token: str) -> list[str]:
    """The ids of every event of the session, hidden ones included, oldest first."""
    ids: list[str] = []
    page_key = None
    for _ in range(10_000):
        params = {"limit": 100, "include_hidden": "true"} | (
            {"page_key": page_key} if page_key else {}
        )
        response = requests.get(events, params=params, headers={"x-api-key": token}, timeout=10)
        assert response.status_code == 200, response.text
        body = response.json()
        ids += [event["id"] for event in body["events"]]
        page_key = body["metadata"].get("page_key")
        if page_key is None:
            return ids
    raise AssertionError("the history's pages did not end")


def event(event_id: str) -> dict:
    return {"type": "agent_output", "id": event_id, "content": f"said {event_id}"}


def client(token: str) -> requests.Session:
    http = requests.Session()
    http.headers["x-api-key"] = token
    return http


def last_event_id(http: requests.Session, events: str) -> str | None:
    response = http.get(
        events, params={"order": "desc", "limit": 1, "include_hidden": "true"}, timeout=10
    )
    assert response.status_code == 200, response.text
    found = response.json()["events"]
    return found[0]["id"] if found else None


def test_writers_with_if_last_event_id_lose_and_duplicate_nothing(
    live: tuple[Server, str, str], session: str
) -> None:
    writers, appends = 8, 12
    token = live[1]
    start = threading.Barrier(writers)

    def write(w: int) -> tuple[list[tuple[str, str | None]], int]:
        """Append ``appends`` events; (event id, the id it was written after) per ack, and 409s."""
        http = client(token)
        acked: list[tuple[str, str | None]] = []
        conflicts = 0
        start.wait()
        for n in range(appends):
            event_id = f"aev_w{w}n{n}"
            for _ in range(1000):
                previous = last_event_id(http, session)
                response = http.post(
                    session + "/batch",
                    json={"events": [event(event_id)], "if_last_event_id": previous},
                    timeout=10,
                )
                if response.status_code == 409:
                    assert response.json()["error"] == "conflict", response.text
                    conflicts += 1
                    continue
                assert response.status_code == 201, response.text
                assert [e["id"] for e in response.json()["events"]] == [event_id]
                acked.append((event_id, previous))
                break
            else:
                raise AssertionError(f"writer {w} never got its turn")
        http.close()
        return acked, conflicts

    with concurrent.futures.ThreadPoolExecutor(writers) as pool:
        results = list(pool.map(write, range(writers)))
    stored = history(session, token)

    acked = [pair for pairs, _ in results for pair in pairs]
    conflicts = sum(count for _, count in results)
    print(f"\n{writers} writers: {len(acked)} events acknowledged, {conflicts} 409s retried")
    assert len(acked) == writers * appends
    assert len(stored) == len(set(stored)), "an event is in the history twice"
    assert sorted(stored) == sorted(event_id for event_id, _ in acked)
    # Each event sits right after the one its writer saw last: the history is
    # exactly the chain of acknowledgements, and each writer's own in its order.
    after = dict(acked)
    assert [after[event_id] for event_id in stored] == [None, *stored[:-1]]
    for pairs, _ in results:
        mine = [event_id for event_id, _ in pairs]
        assert [e for e in stored if e in set(mine)] == mine


def test_concurrent_batches_without_if_last_event_id_all_land(
    live: tuple[Server, str, str], session: str
) -> None:
    batches, size, threads = 100, 3, 25
    token = live[1]
    ids = [[f"aev_b{b}e{e}" for e in range(size)] for b in range(batches)]
    start = threading.Barrier(threads)

    def send(chunk: list[list[str]]) -> list[int]:
        http = client(token)
        start.wait()
        statuses = []
        for batch in chunk:
            response = http.post(
                session + "/batch",
                json={"events": [event(event_id) for event_id in batch]},
                timeout=10,
            )
            statuses.append(response.status_code)
            if response.status_code == 201:
                assert [e["id"] for e in response.json()["events"]] == batch
        http.close()
        return statuses

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        parts = pool.map(send, [ids[t::threads] for t in range(threads)])
        statuses = [status for part in parts for status in part]
    stored = history(session, token)

    print(f"\n{batches} concurrent batches: statuses {sorted(set(statuses))}, {len(stored)} events")
    assert statuses == [201] * batches
    assert sorted(stored) == sorted(event_id for batch in ids for event_id in batch)
    assert_whole_batches(stored, ids)


def assert_whole_batches(stored: list[str], batches: list[list[str]]) -> None:
    """Each batch's events are in the history together and in order, or not at all."""
    position = {event_id: n for n, event_id in enumerate(stored)}
    for batch in batches:
        found = [event_id in position for event_id in batch]
        assert all(found) or not any(found), f"half a batch: {batch} {found}"
        if all(found):
            first = position[batch[0]]
            assert [position[event_id] for event_id in batch] == list(
                range(first, first + len(batch))
            ), f"batch {batch} split"


def test_sigkill_of_workers_during_appends_loses_no_acknowledged_batch(
    live: tuple[Server, str, str], session: str
) -> None:
    writers, kills = 8, 6
    server, token, url = live
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    stop = threading.Event()

    def write(w: int) -> tuple[list[list[str]], list[list[str]], list]:
        """Batches of 1 to 8 events until told to stop; (acknowledged, unanswered, unexpected)."""
        local = random.Random(seed + w)
        http = client(token)
        acked: list[list[str]] = []
        unsure: list[list[str]] = []
        unexpected: list = []
        n = 0
        while not stop.is_set():
            batch = [f"aev_k{w}n{n}e{e}" for e in range(local.randint(1, 8))]
            n += 1
            try:
                response = http.post(
                    session + "/batch",
                    json={"events": [event(event_id) for event_id in batch]},
                    timeout=10,
                )
            except requests.RequestException:
                unsure.append(batch)  # its worker died with it: written or not
                http.close()
                http = client(token)
                continue
            if response.status_code == 201:
                acked.append(batch)
            elif response.status_code == 503:  # storage unavailable: all or nothing written
                unsure.append(batch)
            else:
                unexpected.append((batch, response.status_code, response.text[:300]))
        http.close()
        return acked, unsure, unexpected

    with concurrent.futures.ThreadPoolExecutor(writers) as pool:
        futures = [pool.submit(write, w) for w in range(writers)]
        killed = 0
        for _ in range(kills):
            time.sleep(rnd.uniform(0.2, 0.6))
            workers = sorted(server.worker_pids())
            if workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rnd.choice(workers), signal.SIGKILL)
                    killed += 1
        time.sleep(0.5)
        stop.set()
        results = [future.result() for future in futures]
    stored = history(session, token)

    acked = [batch for done, _, _ in results for batch in done]
    unsure = [batch for _, lost, _ in results for batch in lost]
    unexpected = [item for _, _, odd in results for item in odd]
    present = set(stored)
    landed = sum(1 for batch in unsure if batch[0] in present)
    print(
        f"\nSIGKILL (seed {seed}): {killed} workers killed, {len(acked)} batches acknowledged "
        f"({sum(map(len, acked))} events), {len(unsure)} unanswered of which {landed} landed, "
        f"{len(stored)} events stored"
    )
    assert not unexpected, unexpected[:5]
    assert killed and acked
    assert len(stored) == len(present), "an event is in the history twice"
    for batch in acked:
        assert present >= set(batch), f"acknowledged batch lost: {batch}"
    assert_whole_batches(stored, acked + unsure)
    known = {event_id for batch in acked + unsure for event_id in batch}
    assert present <= known, sorted(present - known)[:5]
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(url[len("sqlite:///") :])
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()
