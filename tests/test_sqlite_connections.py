"""SQLite connections: one per thread, closed with the thread or by close(); one SQLite
library, without the WAL-reset bug; checkpoints in a thread of their own."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import re
import threading
import time
from pathlib import Path

import pytest
from sqlite_utils.utils import sqlite3

from sessions_app.ops import maintenance
from storage_backends import Agent, Session, Unavailable
from storage_backends import sqlite as sqlite_backend
from storage_backends.sqlite import (
    CHECKPOINT_INTERVAL_S,
    REQUEST_AUTOCHECKPOINT_PAGES,
    WAL_RESET_FIXED,
    SQLiteStorage,
)

T0 = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def descriptors_to(path: Path) -> int:
    """How many of this process's file descriptors are open on the database's files."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            count += 1
    return count


@pytest.fixture
def storage(tmp_path: Path):
    storage = SQLiteStorage(str(tmp_path / "s.db"))
    storage.create_agent(agent=Agent(key="bot", name="bot", created_at=T0, updated_at=T0))
    yield storage
    storage.close()


def test_short_threads_leave_no_descriptor_behind(storage, tmp_path):
    def work(n: int) -> None:
        storage.create_session(
            session=Session(key=f"s{n}", agent_key="bot", name="n", created_at=T0, updated_at=T0)
        )
        storage.get_session(agent_key="bot", session_key=f"s{n}", now=T0)

    before = len(os.listdir("/proc/self/fd"))
    for batch in range(20):
        threads = [threading.Thread(target=work, args=(batch * 10 + n,)) for n in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    # 200 threads, 10 at a time. While another connection of the process holds
    # a lock on the file, SQLite keeps a closed connection's descriptor for the
    # next one to reuse (POSIX locks are per process): what stays open is
    # bounded by the threads alive at once, not by the threads that ever ran.
    assert len(os.listdir("/proc/self/fd")) - before < 20
    assert len(walk_keys(storage)) == 200


def walk_keys(storage) -> list[str]:
    keys, after = [], None
    while True:
        page = storage.list_sessions(agent_key="bot", limit=100, now=T0, after=after)
        keys += [s.key for s in page.items]
        if page.next_cursor is None:
            return keys
        after = page.next_cursor


def test_close_closes_every_threads_connection(storage, tmp_path):
    opened, release = threading.Barrier(4), threading.Event()

    def hold() -> None:
        storage.get_agent(agent_key="bot")
        opened.wait()
        release.wait()

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for thread in threads:
        thread.start()
    opened.wait()
    assert descriptors_to(tmp_path / "s.db") > 0
    storage.close()
    try:
        assert descriptors_to(tmp_path / "s.db") == 0
    finally:
        release.set()
        for thread in threads:
            thread.join()
    # The storage opens anew on the next call.
    assert storage.get_agent(agent_key="bot").name == "bot"


def test_a_failed_commit_is_rolled_back(storage):
    conn = storage.db.conn
    refused = []

    def no_commit(action, arg1, *_):
        if action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT" and not refused:
            refused.append(arg1)
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    conn.set_authorizer(no_commit)
    with pytest.raises(sqlite3.DatabaseError):
        storage.delete_agent(agent_key="bot")
    conn.set_authorizer(None)
    assert refused == ["COMMIT"]
    # The connection is out of the transaction, and what it held was undone.
    assert not conn.in_transaction
    assert storage.get_agent(agent_key="bot").name == "bot"


# The SQLite library: one, and without the WAL-reset bug


def test_the_backend_runs_a_sqlite_without_the_wal_reset_bug(storage):
    # Asked of the backend's own connection, not of a module: what serves requests.
    version = storage.db.execute("SELECT sqlite_version()").fetchone()[0]
    assert tuple(int(part) for part in version.split(".")) >= WAL_RESET_FIXED, version


def test_every_connection_to_a_database_comes_from_one_sqlite_library(storage, tmp_path):
    # Two SQLite libraries in one process on one file do not see each other's
    # POSIX locks: closing a descriptor in one drops the other's locks.
    backup = maintenance.sqlite_connect(str(tmp_path / "s.db"), readonly=True)
    try:
        assert type(backup) is type(storage.db.conn)
    finally:
        backup.close()
    assert type(storage.db.conn).__module__.startswith(sqlite3.__name__)


def test_no_project_file_imports_the_stdlib_sqlite3_itself():
    root = Path(__file__).resolve().parent.parent
    direct = re.compile(r"^\s*(import sqlite3\b|from sqlite3\b)", re.M)
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if not {".venv", ".git", "build"} & set(path.relative_to(root).parts)
        and direct.search(path.read_text())
    ]
    assert offenders == [], "use `from sqlite_utils.utils import sqlite3`"


# Checkpoints: a thread of their own, not the requests


def test_a_thread_checkpoints_what_requests_write(storage, tmp_path):
    db = tmp_path / "s.db"
    for n in range(50):  # about 50 pages: far below any request connection's threshold
        storage.create_session(
            session=Session(key=f"s{n}", agent_key="bot", name="n", created_at=T0, updated_at=T0)
        )
    assert storage.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == (
        REQUEST_AUTOCHECKPOINT_PAGES
    )
    pages = storage.db.execute("PRAGMA page_count").fetchone()[0]
    deadline = time.monotonic() + 3 * CHECKPOINT_INTERVAL_S + 2
    while db.stat().st_size < pages * 4096 and time.monotonic() < deadline:
        time.sleep(0.05)
    # Written back into the database file, without a request checkpointing.
    assert db.stat().st_size >= pages * 4096
    threads = [t for t in threading.enumerate() if t.name == "sqlite-checkpointer"]
    assert threads
    storage.close()
    assert not any(t.is_alive() for t in threads)
    assert not (tmp_path / "s.db-wal").exists()  # the last connection closed


def test_a_writers_turn_held_elsewhere_is_unavailable_within_the_busy_timeout(tmp_path):
    """A writer that stalls holding its turn (stopped, traced) costs others a 503, not a hang."""
    storage = SQLiteStorage(str(tmp_path / "s.db"), busy_timeout_ms=300)
    storage.create_agent(agent=Agent(key="bot", name="bot", created_at=T0, updated_at=T0))
    holder = os.open(str(tmp_path / "s.db-writer"), os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="writers' turn"):
            storage.create_session(
                session=Session(key="s", agent_key="bot", name="n", created_at=T0, updated_at=T0)
            )
        assert 0.3 <= time.monotonic() - started < 2.0
        assert storage.get_agent(agent_key="bot").key == "bot"  # reads go on
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    # Released: the next write takes the turn at once.
    storage.create_session(
        session=Session(key="s", agent_key="bot", name="n", created_at=T0, updated_at=T0)
    )
    storage.close()


def test_an_sqlite_with_the_wal_reset_bug_checkpoints_only_inside_writers_turns(
    tmp_path, monkeypatch
):
    """No checkpointer thread beside the writers; SQLite's own autocheckpoint, in the turn."""
    monkeypatch.setattr(sqlite_backend, "WAL_RESET_BUG", True)
    before = {t.ident for t in threading.enumerate() if t.name == "sqlite-checkpointer"}
    storage = SQLiteStorage(str(tmp_path / "s.db"))
    storage.create_agent(agent=Agent(key="bot", name="bot", created_at=T0, updated_at=T0))
    started = {t.ident for t in threading.enumerate() if t.name == "sqlite-checkpointer"}
    assert started <= before
    assert storage.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    storage.close()
