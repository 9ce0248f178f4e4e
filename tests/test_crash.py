"""Crashes, kills and locks on SQLite: what was acknowledged survives, nothing wedges.

- Crash durability: creates, updates and deletes from several client threads
  against four gunicorn workers; the master and every worker are SIGKILLed at a
  random moment; restarted on the same file, every acknowledged write is there
  exactly as answered, every acknowledged delete is gone, and SQLite's
  integrity check passes. Several rounds on one file.
- No "database is locked" under sustained multi-worker write load, with and
  without ``--preload``; write transactions that read first begin IMMEDIATE.
- A worker killed by gunicorn's timeout in the middle of a write transaction
  does not wedge the database for the others.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlite_utils.utils import sqlite3

from storage_backends import Agent, Session, Unavailable, storage_from_url
from storage_backends.codec import utcnow
from tests.conftest import sqlite_integrity
from tests.servers import Server, bootstrap, serving

AGENT = "support-bot"
SESSIONS = f"/v2/agents/{AGENT}/sessions"


def server_env(path: Path, **extra: str) -> dict[str, str]:
    """SQLite at ``path``, with rate limits out of the way of a load test."""
    return {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{path}",
        "AGENT_SESSIONS_SESSION_CREATE_LIMIT": "1000000/minute",
        "AGENT_SESSIONS_DEFAULT_LIMIT": "1000000/minute",
        **extra,
    }


def list_all(base: str, token: str) -> dict[str, dict]:
    """Every session of the agent, walking the pages."""
    found: dict[str, dict] = {}
    page_key = None
    for _ in range(10_000):
        params = {"limit": 100} | ({"page_key": page_key} if page_key else {})
        response = requests.get(
            base + SESSIONS, params=params, headers={"x-api-key": token}, timeout=10
        )
        assert response.status_code == 200, response.text
        body = response.json()
        for session in body["sessions"]:
            assert session["key"] not in found, session["key"]
            found[session["key"]] = session
        page_key = body["metadata"].get("page_key")  # absent on the last page
        if page_key is None:
            return found
    raise AssertionError("the listing did not end")


# Crash durability


@dataclasses.dataclass
class Ledger:
    """What the clients were told. Each key has exactly one writer thread."""

    alive: dict[str, dict] = dataclasses.field(default_factory=dict)  # key -> last body acked
    deleted: set[str] = dataclasses.field(default_factory=set)  # 204 acked
    # key -> the states it may be in after a request that got no answer: None is
    # "absent", a dict is the fields the stored session must have.
    unsure: dict[str, list[dict | None]] = dataclasses.field(default_factory=dict)
    acked: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    unexpected: list[tuple] = dataclasses.field(default_factory=list)

    def merge(self, other: Ledger) -> None:
        assert not set(self.alive) & set(other.alive)
        self.alive.update(other.alive)
        self.deleted |= other.deleted
        self.unsure.update(other.unsure)
        self.acked.update(other.acked)
        self.unexpected += other.unexpected


def without_times(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "updated_at"}


def drive(base: str, token: str, round_no: int, thread_no: int, seed: int, stop: Any) -> Ledger:
    """One client thread: create, update and delete its own sessions until the server dies."""
    rnd = random.Random(seed)
    ledger = Ledger()
    http = requests.Session()
    http.headers["x-api-key"] = token
    for n in range(5000):
        if stop.is_set():
            break
        roll = rnd.random()
        if len(ledger.alive) < 2 or roll < 0.5:
            key = f"r{round_no}-t{thread_no}-{n}"
            body = {
                "key": key,
                "name": f"Session {key}",
                "description": f"round {round_no}, thread {thread_no}",
                "metadata": {"n": n, "tags": ["crash", str(round_no)], "nested": {"t": thread_no}},
                "enabled": rnd.random() < 0.5,
            }
            method, url, ok = "POST", base + SESSIONS, 201
            outcomes: list[dict | None] = [None, body | {"agent_key": AGENT}]
        elif roll < 0.85:
            key = rnd.choice(sorted(ledger.alive))
            body = {"name": f"Updated {n}", "metadata": {"n": n}, "enabled": rnd.random() < 0.5}
            method, url, ok = "PATCH", f"{base}{SESSIONS}/{key}", 200
            before = ledger.alive[key]
            outcomes = [before, without_times(before) | body]
        else:
            key = rnd.choice(sorted(ledger.alive))
            body = None
            method, url, ok = "DELETE", f"{base}{SESSIONS}/{key}", 204
            outcomes = [ledger.alive[key], None]
        try:
            response = http.request(method, url, json=body, timeout=10)
        except requests.RequestException:
            # No answer: the write may or may not have happened. This thread stops,
            # so at most one key per thread is in doubt.
            ledger.alive.pop(key, None)
            ledger.unsure[key] = outcomes
            break
        if response.status_code != ok:
            ledger.unexpected.append((method, key, response.status_code, response.text[:300]))
            ledger.alive.pop(key, None)
            ledger.unsure[key] = outcomes
            break
        ledger.acked[method] += 1
        if method == "DELETE":
            del ledger.alive[key]
            ledger.deleted.add(key)
        else:
            answered = response.json()
            if not matches(answered, outcomes[1]):
                ledger.unexpected.append((method, key, "answered", answered))
            ledger.alive[key] = answered
    http.close()
    return ledger


def matches(stored: dict | None, expected: dict | None) -> bool:
    if expected is None or stored is None:
        return stored is expected
    return all(stored.get(field) == value for field, value in expected.items())


def check_survivors(base: str, token: str, ledger: Ledger) -> None:
    """Acknowledged writes are there exactly as answered; acknowledged deletes are gone."""
    stored = list_all(base, token)
    for key, body in ledger.alive.items():
        assert stored.get(key) == body, (key, body, stored.get(key))
    for key in ledger.deleted:
        assert key not in stored, key
    for key, outcomes in ledger.unsure.items():
        assert any(matches(stored.get(key), o) for o in outcomes), (key, outcomes, stored.get(key))
    unknown = set(stored) - set(ledger.alive) - set(ledger.unsure)
    assert not unknown, unknown
    # What was in doubt is now known, for the next rounds.
    for key in list(ledger.unsure):
        if key in stored:
            ledger.alive[key] = stored[key]
        else:
            ledger.deleted.add(key)
    ledger.unsure.clear()


@pytest.mark.slow
def test_acknowledged_writes_survive_sigkill_of_master_and_workers(tmp_path):
    rounds, threads = 4, 8
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    print(f"\ncrash test: seed {seed}, {rounds} rounds, {threads} client threads, 4 workers")
    db = tmp_path / "sessions.db"
    env = server_env(db)
    token = bootstrap(env)
    ledger = Ledger()
    started = time.monotonic()
    for round_no in range(rounds):
        server = Server(env, workers=4, log_path=tmp_path / f"round-{round_no}.log").start()
        try:
            check_survivors(server.url, token, ledger)  # what the last crash left
            stop = threading.Event()
            seeds = [rnd.randrange(1 << 30) for _ in range(threads)]
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                futures = [
                    pool.submit(drive, server.url, token, round_no, t, seeds[t], stop)
                    for t in range(threads)
                ]
                kill_after = rnd.uniform(0.8, 2.5)
                time.sleep(kill_after)
                server.kill()  # SIGKILL to the master and every worker at once
                stop.set()
                results = [future.result(timeout=30) for future in futures]
        finally:
            server.kill()
        assert len(results) == threads
        this_round = Ledger()
        for result in results:
            this_round.merge(result)
        assert not this_round.unexpected, this_round.unexpected[:5]
        assert sqlite_integrity(db) == "ok"
        print(
            f"round {round_no + 1}: killed after {kill_after:.2f}s; acknowledged "
            f"{this_round.acked['POST']} creates, {this_round.acked['PATCH']} updates, "
            f"{this_round.acked['DELETE']} deletes; {len(this_round.unsure)} in doubt"
        )
        assert this_round.acked["POST"] > 0
        ledger.merge(this_round)
    with serving(env, tmp_path, workers=2) as server:
        check_survivors(server.url, token, ledger)
        final = len(list_all(server.url, token))
    elapsed = time.monotonic() - started
    print(
        f"after {rounds} crashes: {len(ledger.alive)} sessions alive as acknowledged, "
        f"{len(ledger.deleted)} deleted; {final} stored; integrity ok; {elapsed:.1f}s"
    )
    assert elapsed < 90


# Locks and forks


def hammer(base: str, token: str, threads: int, total: int, seconds: float) -> collections.Counter:
    """``threads`` clients creating, updating and deleting, ``total`` requests at most."""
    statuses: collections.Counter = collections.Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    budget = iter(range(total))

    def client(thread_no: int) -> None:
        http = requests.Session()
        http.headers["x-api-key"] = token
        mine: list[str] = []
        while time.monotonic() < deadline:
            with lock:
                n = next(budget, None)
            if n is None:
                break
            if mine and n % 3 == 1:
                response = http.patch(
                    f"{base}{SESSIONS}/{mine[-1]}", json={"metadata": {"n": n}}, timeout=30
                )
            elif mine and n % 7 == 2:
                response = http.delete(f"{base}{SESSIONS}/{mine.pop()}", timeout=30)
            else:
                # Generated keys from one shared name: the busiest write path.
                response = http.post(base + SESSIONS, json={"name": "Load test"}, timeout=30)
                if response.status_code == 201:
                    mine.append(response.json()["key"])
            with lock:
                statuses[response.status_code] += 1
        http.close()

    pool = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=seconds + 60)
        assert not thread.is_alive()
    return statuses


@pytest.mark.slow
@pytest.mark.parametrize("preload", [False, True], ids=["fork-then-load", "preload"])
def test_sustained_write_load_has_no_lock_errors(tmp_path, preload):
    env = server_env(tmp_path / "sessions.db")
    token = bootstrap(env)
    extra = ["--preload"] if preload else []
    with serving(env, tmp_path, workers=4, extra=extra) as server:
        statuses = hammer(server.url, token, threads=16, total=2400, seconds=25)
        logs = server.logs()
    print(f"\nload ({'preload' if preload else 'no preload'}): {dict(statuses)}")
    assert sum(statuses.values()) >= 1000, statuses
    assert set(statuses) <= {200, 201, 204}, statuses
    assert "locked" not in logs.lower()
    assert "Traceback" not in logs
    assert sqlite_integrity(tmp_path / "sessions.db") == "ok"


@pytest.fixture
def sqlite_store(tmp_path):
    store = storage_from_url(f"sqlite:///{tmp_path}/sessions.db", {})
    now = utcnow()
    store.create_agent(agent=Agent(key=AGENT, name="Support", created_at=now, updated_at=now))
    store.create_session(
        session=Session(agent_key=AGENT, key="s", name="S", created_at=now, updated_at=now)
    )
    yield store
    store.close()


def test_write_transactions_that_read_first_begin_immediate(sqlite_store):
    statements: list[str] = []
    sqlite_store.db.conn.set_trace_callback(statements.append)
    sqlite_store.update_session(agent_key=AGENT, session_key="s", changes={}, now=utcnow())
    sqlite_store.delete_agent(agent_key=AGENT)
    begins = [i for i, s in enumerate(statements) if s.upper().startswith("BEGIN")]
    assert len(begins) == 2, statements
    for i in begins:
        assert statements[i].upper() == "BEGIN IMMEDIATE", statements
    # Nothing ran outside those transactions (no deferred read before the write lock).
    assert begins[0] == 0, statements


def test_interleaved_read_then_write_transactions_never_fail(sqlite_store):
    """Two connections updating one session: each waits for the other, neither fails.

    A pause between the read and the write of each update leaves the other
    connection time to commit in between; a DEFERRED transaction would then fail
    at once with "database is locked", whatever the busy timeout.
    """
    errors: list[Exception] = []
    done = collections.Counter()
    start = threading.Barrier(2)

    def pause_before_writes(statement: str) -> None:
        if statement.startswith("UPDATE sessions"):
            time.sleep(0.002)

    def updater(thread_no: int) -> None:
        sqlite_store.db.conn.set_trace_callback(pause_before_writes)
        start.wait()
        for n in range(150):
            try:
                sqlite_store.update_session(
                    agent_key=AGENT,
                    session_key="s",
                    changes={"metadata": {"thread": thread_no, "n": n}},
                    now=utcnow(),
                )
                done[thread_no] += 1
            except (Unavailable, sqlite3.Error) as err:
                errors.append(err)

    pool = [threading.Thread(target=updater, args=(t,)) for t in range(2)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=60)
    assert not errors, errors[:3]
    assert done == {0: 150, 1: 150}


# A worker killed by gunicorn's timeout mid-transaction


def hanging_app() -> Any:
    """The service plus a test-only route that writes in a transaction and then hangs.

    The hanging worker blocks SIGABRT, gunicorn's first signal on a timeout, so
    only the SIGKILL that follows ends it: the write lock is held until then.
    """
    from flask import current_app

    from sessions_app import create_app

    app = create_app()

    @app.post("/test/hang")
    def hang() -> Any:
        storage = current_app.extensions["agent_sessions"].storage
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGABRT})
        now = utcnow()
        session = Session(
            agent_key=AGENT, key="never-committed", name="x", created_at=now, updated_at=now
        )
        with storage._transaction() as conn:  # BEGIN IMMEDIATE, never committed
            storage._insert_session(conn, session)
            Path(os.environ["HANG_MARKER"]).write_text(str(os.getpid()))
            time.sleep(120)
        return {}

    return app


@pytest.mark.slow
def test_worker_killed_by_timeout_mid_transaction_does_not_wedge_the_database(tmp_path):
    db = tmp_path / "sessions.db"
    marker = tmp_path / "hanging-pid"
    env = server_env(db, AGENT_SESSIONS_SQLITE_BUSY_TIMEOUT_MS="1000", HANG_MARKER=str(marker))
    token = bootstrap(env)
    headers = {"x-api-key": token}
    server = Server(
        env,
        workers=2,
        log_path=tmp_path / "gunicorn.log",
        extra=["--timeout", "2"],
        app="tests.test_crash:hanging_app()",
    )
    with server:

        def hang() -> None:
            with contextlib.suppress(requests.RequestException):
                requests.post(server.url + "/test/hang", timeout=60)

        hanging = threading.Thread(target=hang)
        hanging.start()
        deadline = time.monotonic() + 15
        while not marker.exists():
            assert time.monotonic() < deadline, server.logs()[-2000:]
            time.sleep(0.05)
        hung_pid = int(marker.read_text())
        # The write lock is held: another writer cannot get it.
        probe = sqlite3.connect(db, timeout=0.1, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            probe.execute("BEGIN IMMEDIATE")
        probe.close()
        # A write sent meanwhile waits out its busy timeout (kept below gunicorn's
        # timeout, or the waiting worker would be killed too): a 503 to retry, never
        # a 500; or a 201 if the kill came first.
        response = requests.post(
            server.url + SESSIONS,
            json={"key": "during", "name": "During"},
            headers=headers,
            timeout=60,
        )
        assert response.status_code in (201, 503), response.text
        if response.status_code == 503:
            assert response.json()["error"] == "unavailable"
            assert response.headers["Retry-After"].isdigit()
        hanging.join(timeout=30)
        assert not hanging.is_alive()
        deadline = time.monotonic() + 15
        while hung_pid in server.worker_pids():
            assert time.monotonic() < deadline, "the hung worker was not killed"
            time.sleep(0.1)
        # The others and the replacement worker keep writing, at full speed.
        for i in range(40):
            started_one = time.monotonic()
            response = requests.post(
                server.url + SESSIONS,
                json={"key": f"after-{i}", "name": "After"},
                headers=headers,
                timeout=10,
            )
            assert response.status_code == 201, response.text
            assert time.monotonic() - started_one < 2
        gone = requests.get(f"{server.url}{SESSIONS}/never-committed", headers=headers, timeout=10)
        assert gone.status_code == 404  # the hung transaction was rolled back
        logs = server.logs()
    assert "Traceback" not in logs
    assert logs.count("WORKER TIMEOUT") == 1, logs  # only the hung worker
    assert sqlite_integrity(db) == "ok"
