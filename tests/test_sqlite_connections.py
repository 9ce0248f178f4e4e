"""SQLite connections: one per thread, closed with the thread or by close()."""

from __future__ import annotations

import datetime as dt
import os
import threading
from pathlib import Path

import pytest
from sqlite_utils.utils import sqlite3

from storage_backends import Agent, Session
from storage_backends.sqlite import SQLiteStorage

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
