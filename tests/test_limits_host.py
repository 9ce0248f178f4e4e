"""Rate limits on memory:// counted across the processes of one host (host_counters)."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import shutil
import signal
import stat
import time
from pathlib import Path
from typing import Any

import limits
import pytest
from limits.strategies import FixedWindowRateLimiter
from sqlite_utils.utils import sqlite3

from sessions_app import create_app
from sessions_app.corridor.rate_limits import COUNTERS_ENV
from sessions_app.serving import host_counters
from sessions_app.serving.host_counters import SCHEME, HostCounters
from storage_backends import Agent
from storage_backends.codec import utcnow
from tests.conftest import ALL_SCOPES, Keys, assert_error
from tests.servers import serving
from tests.test_limits_redis import create, creates_at_once, make_key, setup_agents

AGENT = "support-bot"
SESSIONS = f"/v2/agents/{AGENT}/sessions"


def counters(path: Path, **options: Any) -> HostCounters:
    return HostCounters(f"{SCHEME}://{path}", **options)


def test_window_counts_resets_and_reports_its_end(tmp_path: Path) -> None:
    store = counters(tmp_path / "c.db")
    before = time.time()
    assert store.incr_with_reset("k", 1)[0] == 1
    count, end = store.incr_with_reset("k", 1, amount=2)
    assert count == 3 and before + 1 <= end <= time.time() + 1
    assert store.get("k") == 3 and store.get_expiry("k") == end
    assert store.incr_with_reset("other", 60)[0] == 1  # keys are counted apart
    time.sleep(end - time.time() + 0.05)
    assert store.get("k") == 0  # an ended window reads as empty
    count, new_end = store.incr_with_reset("k", 1)
    assert count == 1 and new_end > end  # and the next hit opens a new one
    assert sorted(store.keys()) == ["k", "other"]


def test_ended_windows_are_swept(tmp_path: Path) -> None:
    store = counters(tmp_path / "c.db")
    store.SWEEP_EVERY = 50
    for i in range(20):
        store.incr_with_reset(f"short{i}", 1)
    store.incr_with_reset("long", 60)
    time.sleep(1.05)
    for _ in range(29):  # the 50th hit sweeps
        store.incr_with_reset("long", 60)
    with sqlite3.connect(tmp_path / "c.db") as db:
        rows = db.execute("SELECT key, count FROM counters").fetchall()
    assert rows == [("long", 30)]
    assert store.sweep() == 0


def test_limits_own_interface_and_strategy(tmp_path: Path) -> None:
    store = limits.storage.storage_from_string(f"{SCHEME}://{tmp_path}/c.db")
    assert isinstance(store, HostCounters) and store.check()
    strategy = FixedWindowRateLimiter(store)
    item = limits.parse("2/minute")
    assert [strategy.hit(item, "a") for _ in range(3)] == [True, True, False]
    reset, remaining = strategy.get_window_stats(item, "a")
    assert remaining == 0 and time.time() < reset <= time.time() + 60
    assert strategy.test(item, "b")
    strategy.clear(item, "a")
    assert strategy.hit(item, "a")
    strategy.hit(item, "b")
    assert store.reset() == 2 and store.keys() == []


def test_a_relative_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="absolute path"):
        HostCounters(f"{SCHEME}://counters.db")


def _hammer(path: str, hits: int, start: Any, out: Any) -> None:
    store = counters(Path(path))
    start.wait()
    out.put([store.incr_with_reset("shared", 60)[0] for _ in range(hits)])


def test_concurrent_processes_count_exactly(tmp_path: Path) -> None:
    processes, hits = 4, 400
    context = multiprocessing.get_context("spawn")
    start, out = context.Event(), context.Queue()
    workers = [
        context.Process(target=_hammer, args=(str(tmp_path / "c.db"), hits, start, out))
        for _ in range(processes)
    ]
    counters(tmp_path / "c.db").check()  # the file exists before they race
    for worker in workers:
        worker.start()
    start.set()
    seen = [count for _ in workers for count in out.get(timeout=60)]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    # Every hit got a count of its own: none lost, none counted twice.
    assert sorted(seen) == list(range(1, processes * hits + 1))
    assert counters(tmp_path / "c.db").get("shared") == processes * hits


def test_a_process_killed_mid_count_leaves_the_file_consistent(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    start, out = context.Event(), context.Queue()
    worker = context.Process(target=_hammer, args=(str(tmp_path / "c.db"), 10**7, start, out))
    counters(tmp_path / "c.db").check()
    worker.start()
    start.set()
    watcher = counters(tmp_path / "c.db")
    deadline = time.monotonic() + 30
    while watcher.get("shared") < 1000:  # killed while it counts
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=10)
    store = counters(tmp_path / "c.db")
    counted = store.get("shared")
    assert counted > 0
    assert store.incr_with_reset("shared", 60)[0] == counted + 1
    with sqlite3.connect(tmp_path / "c.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def garble(path: Path) -> None:
    """Overwrite the file in place (same inode) with bytes that are no database."""
    with open(path, "r+b") as file:
        file.write(b"\x5a" * max(8192, path.stat().st_size))


def garble_all(path: Path) -> None:
    """The file and what SQLite could still read its pages from (its WAL and WAL index)."""
    for suffix in ("", "-wal", "-shm"):
        garble(Path(f"{path}{suffix}"))


def test_a_corrupt_file_is_replaced_once_and_every_process_counts_in_the_new_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.db"
    first, second = counters(path), counters(path)  # two processes' connections
    assert [first.incr_with_reset("k", 60)[0], second.incr_with_reset("k", 60)[0]] == [1, 2]
    garble_all(path)
    with caplog.at_level("WARNING", logger="sessions_app.host_counters"):
        assert first.incr_with_reset("k", 60)[0] == 1  # a new file: counting again
        assert second.incr_with_reset("k", 60)[0] == 2  # the other moved to it
        assert first.get("k") == 2 and first.check()
        garble_all(path)  # again, found this time by a thread that opens its first connection
        assert counters(path).incr_with_reset("k", 60)[0] == 1
        assert [first.incr_with_reset("k", 60)[0], second.incr_with_reset("k", 60)[0]] == [2, 3]
    replaced = [r for r in caplog.records if "was corrupt" in r.getMessage()]
    assert len(replaced) == 2, caplog.text  # once each time
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_removed_directory_is_made_again_and_every_process_moves_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every call compares, not once a second.
    monkeypatch.setattr(host_counters, "CHECK_EVERY_S", 0.0, raising=False)
    path = tmp_path / "limits" / "c.db"
    path.parent.mkdir(mode=0o700)
    old, older = counters(path), counters(path)
    assert [old.incr_with_reset("k", 60)[0], older.incr_with_reset("k", 60)[0]] == [1, 2]
    shutil.rmtree(path.parent)
    new = counters(path)  # a worker started since: it makes the directory again
    assert new.incr_with_reset("k", 60)[0] == 1
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # The old connections notice the file at the path is another one, and count there.
    assert [old.incr_with_reset("k", 60)[0], older.incr_with_reset("k", 60)[0]] == [2, 3]
    assert new.get("k") == 3


def test_a_file_replaced_while_open_is_followed_within_the_check_interval(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    old, new = counters(path), counters(path)
    assert old.incr_with_reset("k", 60)[0] == 1
    for suffix in ("", "-wal", "-shm"):  # replaced by hand: no error tells the old one
        os.unlink(f"{path}{suffix}")
    assert [new.incr_with_reset("k", 60)[0] for _ in range(2)] == [1, 2]
    old._local.check_at = 0  # its second is up
    assert old.incr_with_reset("k", 60)[0] == 3  # not 2, in the file that is gone


# In one process, with the counters file the workers of gunicorn get


def service(monkeypatch: pytest.MonkeyPatch, path: Path, **config: Any) -> Any:
    monkeypatch.setenv(COUNTERS_ENV, str(path))
    app = create_app({"TESTING": True, "STORAGE_URL": "memory://", **config})
    now = utcnow()
    storage = app.extensions["agent_sessions"].storage
    storage.create_agent(agent=Agent(key=AGENT, name=AGENT, created_at=now, updated_at=now))
    return app


def test_memory_counts_in_the_file_when_given_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    app = service(monkeypatch, tmp_path / "c.db", DEFAULT_LIMIT="3/minute")
    limits_ = app.extensions["agent_sessions"].limits
    assert isinstance(limits_.storage, HostCounters) and not limits_.per_process
    _, token = Keys(app).create(("*", ALL_SCOPES))
    client = app.test_client()
    statuses = [client.get(SESSIONS, headers={"x-api-key": token}).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    # A second app on the same file (another worker) sees the same counts.
    other = service(monkeypatch, tmp_path / "c.db", DEFAULT_LIMIT="3/minute")
    other.extensions["agent_sessions"].storage = app.extensions["agent_sessions"].storage
    assert_error(
        other.test_client().get(SESSIONS, headers={"x-api-key": token}), 429, "rate_limit_exceeded"
    )


def test_other_strategies_stay_in_the_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    app = service(monkeypatch, tmp_path / "c.db", RATELIMIT_STRATEGY="moving-window")
    assert app.extensions["agent_sessions"].limits.per_process


def lock_the_file(path: Path) -> sqlite3.Connection:
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


class TakeTheTurn:
    """Another writer holding the writers' turn (as a stopped or traced worker would)."""

    def __init__(self, path: Path):
        self.fd = os.open(f"{path}-writer", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def rollback(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.parametrize("policy", ["open", "closed"])
@pytest.mark.parametrize("failure", ["locked", "turn taken", "directory others may write"])
def test_a_failing_file_follows_the_failure_policy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, policy: str, failure: str
) -> None:
    path = tmp_path / "c.db"
    if failure == "directory others may write":
        (tmp_path / "shared").mkdir(mode=0o777)
        (tmp_path / "shared").chmod(0o777)
        path = tmp_path / "shared/c.db"
    app = service(monkeypatch, path, RATELIMIT_FAILURE_POLICY=policy, RATELIMIT_FAILURE_BACKOFF=0.2)
    _, token = Keys(app).create(("*", ALL_SCOPES))
    client = app.test_client()
    holder = None
    if failure != "directory others may write":
        assert client.get(SESSIONS, headers={"x-api-key": token}).status_code == 200
        holder = lock_the_file(path) if failure == "locked" else TakeTheTurn(path)
    try:
        for _ in range(3):
            started = time.monotonic()
            response = client.get(SESSIONS, headers={"x-api-key": token})
            assert time.monotonic() - started < 1.0
            if policy == "closed":
                assert_error(response, 503, "unavailable")
                assert int(response.headers["Retry-After"]) >= 1
            else:
                assert response.status_code == 200, response.get_json()
                assert "X-RateLimit-Limit" not in response.headers
        ready = client.get("/readyz")
        assert ready.get_json()["rate_limit"] == "degraded"
    finally:
        if holder is not None:
            holder.rollback()
            holder.close()
    if holder is not None:
        time.sleep(0.25)  # past the backoff: counted again
        response = client.get(SESSIONS, headers={"x-api-key": token})
        assert response.status_code == 200 and "X-RateLimit-Limit" in response.headers


# A real gunicorn server on the default configuration: no Redis


@pytest.mark.slow
def test_limit_is_exact_across_four_workers_without_redis(tmp_path: Path) -> None:
    n = 20
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/sessions.db",
        "AGENT_SESSIONS_SESSION_CREATE_LIMIT": f"{n}/minute",
        "TMPDIR": str(tmp_path),  # where the server makes its counters directory
    }
    env.pop("AGENT_SESSIONS_RATELIMIT_STORAGE_URI", None)
    setup_agents(env)
    token, other_token = make_key(env), make_key(env)
    with serving(env, tmp_path, workers=4) as server:
        creates_at_once([server.url], token, n, "4 workers, memory://")
        assert list(tmp_path.glob("agent-sessions-limits-*/counters.db"))
        # A worker killed outright: its replacement counts on from the same file.
        victim = min(server.worker_pids())
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while len(server.worker_pids() - {victim}) < 4:
            assert time.monotonic() < deadline, "the worker was not replaced"
            time.sleep(0.1)
        for _ in range(8):  # reaches every worker
            assert create(server.url, token).status_code == 429
        remaining = [
            create(server.url, other_token).headers["X-RateLimit-Remaining"] for _ in range(4)
        ]
        assert remaining == [str(n - i) for i in range(1, 5)]
        logs = server.logs()
    assert "RATE LIMITS ARE PER WORKER" not in logs
    assert "Traceback" not in logs
    assert not list(tmp_path.glob("agent-sessions-limits-*")), "counters left behind"


def gunicorn_env(tmp_path: Path, n: int, **extra: str) -> dict[str, str]:
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/sessions.db",
        "AGENT_SESSIONS_SESSION_CREATE_LIMIT": f"{n}/minute",
        "TMPDIR": str(tmp_path),  # where the server makes its counters directory
        **extra,
    }
    env.pop("AGENT_SESSIONS_RATELIMIT_STORAGE_URI", None)
    setup_agents(env)
    return env


def remaining(url: str, token: str, count: int) -> list[str | int]:
    """``X-RateLimit-Remaining`` of ``count`` creates (any worker), or the status if not 201."""
    answers = [create(url, token) for _ in range(count)]
    return [
        a.headers.get("X-RateLimit-Remaining", "none") if a.status_code == 201 else a.status_code
        for a in answers
    ]


@pytest.mark.slow
def test_a_corrupt_counters_file_is_replaced_and_limits_count_again_under_gunicorn(
    tmp_path: Path,
) -> None:
    n = 6
    env = gunicorn_env(tmp_path, n, AGENT_SESSIONS_RATELIMIT_FAILURE_POLICY="closed")
    token = make_key(env)
    with serving(env, tmp_path, workers=2) as server:
        assert remaining(server.url, token, 2) == [str(n - 1), str(n - 2)]
        (path,) = tmp_path.glob("agent-sessions-limits-*/counters.db")
        garble_all(path)
        # The first worker to see it replaces it; the counts start again.
        assert remaining(server.url, token, 1) == [str(n - 1)], server.logs()
        time.sleep(host_counters.CHECK_EVERY_S + 0.2)  # every thread compares the file again
        assert remaining(server.url, token, n) == [str(n - i) for i in range(2, n + 1)] + [429]
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        logs = server.logs()
    assert logs.count("was corrupt") == 1, logs
    assert "unreachable" not in logs and "Traceback" not in logs


@pytest.mark.slow
def test_a_removed_counters_directory_is_made_again_under_gunicorn(tmp_path: Path) -> None:
    n = 6
    env = gunicorn_env(tmp_path, n)
    token = make_key(env)
    with serving(env, tmp_path, workers=2) as server:
        assert remaining(server.url, token, 1) == [str(n - 1)], server.logs()
        (directory,) = tmp_path.glob("agent-sessions-limits-*")
        shutil.rmtree(directory)
        victim = min(server.worker_pids())
        os.kill(victim, signal.SIGKILL)  # a new worker starts without the directory
        deadline = time.monotonic() + 20
        while len(server.worker_pids() - {victim}) < 2:
            assert time.monotonic() < deadline, "the worker was not replaced"
            time.sleep(0.1)
        time.sleep(host_counters.CHECK_EVERY_S + 0.2)  # the old worker's threads compare too
        # One file again, made by whichever came first: exact across both workers.
        assert remaining(server.url, token, n + 1) == [str(n - i) for i in range(1, n + 1)] + [429]
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        logs = server.logs()
    assert "was gone: made it again" in logs
    assert "unreachable" not in logs and "Traceback" not in logs
