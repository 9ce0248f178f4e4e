"""Large histories forked, compacted, deleted and purged under a live gunicorn with 4 workers,
on SQLite and PostgreSQL, while another agent appends and reads.

One key forks a 20,000-event session from 4 clients, compacts it, deletes every
fork and the source, and ``purge-expired`` removes another 20,000-event session.
Meanwhile the victim, another agent with a key of its own, appends one event at a
time and reads its history back. What cannot be noise is asserted: no 5xx for
anyone, no ``WORKER TIMEOUT`` in the log, every removed event row freed (no note
left), and on SQLite a file that grew by the copies the forks made and nothing
else. The timings are printed (``-s``); bench/histories.py measures them.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import os
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from storage_backends import Event, Session, storage_from_url
from storage_backends.sqlite import JOURNAL_SIZE_LIMIT, REQUEST_AUTOCHECKPOINT_PAGES
from tests.servers import Server, cli, serving_store

pytestmark = pytest.mark.slow

AGENT = "support-bot"
GRANTS = f"{AGENT}=sessions:create,sessions:read,sessions:delete,events:append"
EVENTS = 20_000
CONTENT = 500  # characters of each event's content
FORKERS, FORKS_EACH = 4, 2


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, str, str, str]]:
    """The server, the attacker's key, the victim's key and the storage URL."""
    tmp = tmp_path_factory.mktemp(f"noisy-{request.param}")
    limits = {
        "AGENT_SESSIONS_SESSION_CREATE_LIMIT": "1000000/minute",
        "AGENT_SESSIONS_DEFAULT_LIMIT": "1000000/minute",
    }
    with serving_store(request.param, tmp, limits, grants=GRANTS) as (server, token, url):
        env = {"AGENT_SESSIONS_STORAGE_URL": url}
        cli("agents", "create", "victim", "--name", "victim", env=env)
        grant = "victim=sessions:create,sessions:read,events:append"
        out = cli("keys", "create", "--name", "victim", "--grant", grant, env=env).stdout
        yield server, token, out.strip().splitlines()[-1], url


def load(url: str, key: str, *, expired: bool = False) -> None:
    """A session of EVENTS events of the attacker's agent, written straight to storage."""
    storage = storage_from_url(url, options={})
    at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2 if expired else 0)
    try:
        storage.create_session(
            session=Session(
                key=key,
                agent_key=AGENT,
                name=key,
                tti_minutes=1 if expired else 0,
                created_at=at,
                updated_at=at,
            )
        )
        storage.load_events(
            agent_key=AGENT,
            session_key=key,
            events=(
                Event(
                    id=f"aev_{i}",
                    session_key=key,
                    type="input_message" if i % 10 == 0 else "agent_output",
                    fields=(
                        {"messages": [{"type": "text", "content": "q" * CONTENT}]}
                        if i % 10 == 0
                        else {"content": "a" * CONTENT}
                    ),
                    created_at=at,
                )
                for i in range(EVENTS)
            ),
        )
    finally:
        storage.close()


def table_rows(url: str, query: str) -> int:
    storage = storage_from_url(url, options={})
    try:
        with storage._reading() as conn:
            return conn.execute(query).fetchone()[0]
    finally:
        storage.close()


class Victim:
    """Another agent's appends and reads, one at a time, until stopped."""

    def __init__(self, server: Server, token: str):
        self.http = requests.Session()
        self.http.headers["x-api-key"] = token
        self.base = f"{server.url}/v2/agents/victim/sessions"
        response = self.http.post(self.base, json={"name": "victim"}, timeout=30)
        assert response.status_code == 201, response.text
        self.events = f"{self.base}/{response.json()['key']}/events"
        self.statuses: list[int] = []
        self.seconds: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            started = time.monotonic()
            response = self.http.post(
                f"{self.events}/batch",
                json={"events": [{"type": "agent_output", "content": f"victim {n}"}]},
                timeout=60,
            )
            self.statuses.append(response.status_code)
            response = self.http.get(self.events, params={"limit": 10, "order": "desc"}, timeout=60)
            self.statuses.append(response.status_code)
            self.seconds.append(time.monotonic() - started)

    def __enter__(self) -> Victim:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=120)


def database_bytes(url: str, suffix: str = "") -> int:
    """The size of the SQLite file (``suffix`` "-wal": of its write-ahead log)."""
    path = url.removeprefix("sqlite:///") + suffix
    return os.path.getsize(path) if os.path.exists(path) else 0


def test_forks_compaction_deletion_and_purge_of_large_histories_spare_the_other_agent(live):
    server, token, victim_token, url = live
    load(url, "big")
    load(url, "idle", expired=True)
    sqlite = url.startswith("sqlite:")
    before = database_bytes(url) if sqlite else 0
    http = requests.Session()
    http.headers["x-api-key"] = token
    sessions = f"{server.url}/v2/agents/{AGENT}/sessions"
    statuses: list[int] = []
    timings: dict[str, float] = {}

    def fork(n: int) -> str:
        response = http.post(
            sessions,
            json={"key": f"fork-{n}", "name": "fork", "from_session": {"session_key": "big"}},
            timeout=120,
        )
        statuses.append(response.status_code)
        assert response.status_code == 201, response.text
        return response.json()["key"]

    with (
        Victim(server, victim_token) as victim,
        concurrent.futures.ThreadPoolExecutor(FORKERS) as pool,
    ):
        time.sleep(0.5)  # the victim alone first
        started = time.monotonic()
        keys = list(pool.map(fork, range(FORKERS * FORKS_EACH)))
        timings["forks"] = time.monotonic() - started
        grown = database_bytes(url) - before if sqlite else 0
        wal = database_bytes(url, "-wal") if sqlite else 0

        started = time.monotonic()
        response = http.post(
            f"{sessions}/big/events",
            json={"type": "compact", "summary_text": "the story so far"},
            timeout=120,
        )
        timings["compact"] = time.monotonic() - started
        statuses.append(response.status_code)
        assert response.status_code == 201, response.text
        assert response.json()["events"][0]["events_compacted"] == EVENTS - 10

        started = time.monotonic()
        for status in pool.map(
            lambda key: http.delete(f"{sessions}/{key}", timeout=120).status_code,
            [*keys, "big"],
        ):
            statuses.append(status)
        timings["delete"] = time.monotonic() - started

        started = time.monotonic()
        purged = cli("sessions", "purge-expired", env={"AGENT_SESSIONS_STORAGE_URL": url})
        timings["purge"] = time.monotonic() - started
        assert "removed 1 expired sessions" in purged.stdout

    final_wal = database_bytes(url, "-wal") if sqlite else 0
    seconds = sorted(victim.seconds)
    print(
        f"\n{url.split(':')[0]}: victim {len(seconds)} rounds, "
        f"p50 {seconds[len(seconds) // 2]:.3f} s, max {seconds[-1]:.3f} s; "
        + ", ".join(f"{name} {value:.2f} s" for name, value in timings.items())
        + (
            f"; the file grew {grown / 2**20:.0f} MiB, WAL {wal / 2**20:.0f} MiB, "
            f"{final_wal / 2**20:.0f} MiB at the end"
            if sqlite
            else ""
        )
    )
    assert statuses.count(204) == len(keys) + 1
    assert all(status < 500 for status in statuses), statuses
    assert victim.statuses and all(status < 500 for status in victim.statuses), victim.statuses
    assert "WORKER TIMEOUT" not in server.logs(), server.logs()[-3000:]
    # Every removed history freed: what is left is the victim's.
    assert table_rows(url, "SELECT count(*) FROM released_sessions") == 0
    victim_events = len(victim.seconds) + 2  # and a round the stop may have cut short
    assert table_rows(url, "SELECT count(*) FROM events") <= victim_events
    if sqlite:
        # The forks copied the source's visible events (20,000 rows a fork); nothing more.
        copy = EVENTS * (CONTENT + 600)
        assert grown <= len(keys) * copy, grown
        # Forks in flight hold snapshots, which keep the WAL from starting over: it holds
        # the copies' pages at most, and is cut back once the last snapshot closes.
        assert wal <= len(keys) * copy + JOURNAL_SIZE_LIMIT, wal
        assert final_wal <= JOURNAL_SIZE_LIMIT + REQUEST_AUTOCHECKPOINT_PAGES * 4096 * 2, final_wal
