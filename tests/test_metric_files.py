"""Metrics files on a full filesystem: no SIGBUS, in process and under gunicorn.

prometheus_client writes its multiprocess files through a memory map; on a
full filesystem a write to a page without a block is a SIGBUS. The gunicorn
tests run the server in a mount namespace of its own (``unshare``) with a
small tmpfs, as a full ``$TMPDIR`` would be.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.mmap_dict import MmapedDict

from sessions_app.observability import metric_files
from sessions_app.observability.metric_files import INITIAL_SIZE, AllocatedMmapedDict
from tests.servers import Server, serving


def no_room(*args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(autouse=True)
def warn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metric_files, "_warned_pid", None)  # once per process, and per test


def test_a_new_file_is_allocated_whole(tmp_path: Path) -> None:
    path = tmp_path / "counter_1.db"
    values = AllocatedMmapedDict(str(path))
    values.write_value("a", 1.0, 0.0)
    info = path.stat()
    assert info.st_size == INITIAL_SIZE and info.st_blocks * 512 >= INITIAL_SIZE  # not sparse
    values.close()
    assert list(MmapedDict.read_all_values_from_file(str(path))) == [("a", 1.0, 0.0, 16)]


def test_growing_allocates_what_it_writes(tmp_path: Path) -> None:
    path = tmp_path / "counter_1.db"
    values = AllocatedMmapedDict(str(path))
    for i in range(1000):  # past the first 64 KiB
        values.write_value(f"key {i:04} " + "x" * 100, float(i), 0.0)
    assert path.stat().st_size > INITIAL_SIZE
    assert path.stat().st_blocks * 512 >= values._used
    values.close()
    read = {k: v for k, v, _, _ in MmapedDict.read_all_values_from_file(str(path))}
    assert len(read) == 1000 and read["key 0999 " + "x" * 100] == 999.0


def test_no_room_for_a_new_file_counts_in_memory_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(os, "posix_fallocate", no_room)
    path = tmp_path / "counter_1.db"
    with caplog.at_level("WARNING", logger="sessions_app.metric_files"):
        values = AllocatedMmapedDict(str(path))
        for i in range(2000):  # grows in memory too
            values.write_value(f"key {i}", float(i), 0.0)
        again = AllocatedMmapedDict(str(tmp_path / "histogram_1.db"))
    assert values.read_value("key 1999") == (1999.0, 0.0)
    assert again.read_value("k") == (0.0, 0.0)
    assert list(tmp_path.iterdir()) == []  # nothing half made for a scrape to choke on
    assert caplog.text.count("no room for") == 1  # once per process
    values.close()
    again.close()


def test_no_room_to_grow_keeps_the_file_and_counts_on_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "counter_1.db"
    values = AllocatedMmapedDict(str(path))
    values.write_value("before", 5.0, 0.0)
    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with caplog.at_level("WARNING", logger="sessions_app.metric_files"):
        for i in range(1000):
            values.write_value(f"key {i:04} " + "x" * 100, float(i), 0.0)
        values.write_value("before", 6.0, 0.0)
    assert values.read_value("before") == (6.0, 0.0)
    assert values.read_value("key 0999 " + "x" * 100) == (999.0, 0.0)
    # The file keeps what it had: a scrape reads it whole.
    assert list(MmapedDict.read_all_values_from_file(str(path))) == [("before", 5.0, 0.0, 24)]
    assert caplog.text.count("no room for") == 1
    values.close()


def test_the_library_makes_its_files_with_the_allocating_class() -> None:
    from prometheus_client import values

    assert values.MmapedDict is AllocatedMmapedDict


# A real gunicorn in a mount namespace of its own, on a tmpfs of 1 MiB.


def small_tmpfs(mount: Path, free_kib: int) -> list[str]:
    """A wrapper command: gunicorn runs with a 1 MiB tmpfs at ``mount`` with ``free_kib`` free."""
    mount.mkdir(exist_ok=True)
    script = (
        'mount -t tmpfs -o size=1M tmpfs "$0" && '
        f'head -c {1024 - free_kib}K /dev/zero > "$0/fill"; exec "$@"'
    )
    # -r: a user namespace, so that this needs no root; -m: mounts of its own.
    return ["unshare", "-r", "-m", "--propagation", "private", "sh", "-c", script, str(mount)]


@pytest.mark.slow
def test_a_full_tmpdir_at_start_is_one_line_and_exit_status_1(tmp_path: Path) -> None:
    mount = tmp_path / "tmp"
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/sessions.db",
        "TMPDIR": str(mount),  # where gunicorn.conf.py makes the metrics directory
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    server = Server(env, workers=2, log_path=tmp_path / "gunicorn.log", wrap=small_tmpfs(mount, 8))
    with pytest.raises(RuntimeError, match="gunicorn exited"):
        server.start(timeout=30)
    server.stop()
    assert server.process.returncode == 1, server.logs()
    logs = server.logs()
    lines = [line for line in logs.splitlines() if "no room" in line]
    assert len(lines) == 1 and lines[0].startswith("agent-sessions: cannot start: no room"), logs
    assert "AGENT_SESSIONS_METRICS_ENABLED=false" in lines[0]
    assert "SIGBUS" not in logs and "Bus error" not in logs and "Traceback" not in logs


@pytest.mark.slow
def test_a_worker_started_once_the_disk_is_full_serves_without_its_metrics(
    tmp_path: Path,
) -> None:
    mount = tmp_path / "tmp"
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/sessions.db",
        "TMPDIR": str(tmp_path),
        "PROMETHEUS_MULTIPROC_DIR": str(mount / "prometheus"),
        "AGENT_SESSIONS_METRICS_TOKEN": "metrics-token-0123456789",
    }
    with serving(env, tmp_path, workers=2, wrap=small_tmpfs(mount, 768)) as server:
        # The server's tmpfs, seen through its root in /proc.
        seen = Path(f"/proc/{server.process.pid}/root") / str(mount).lstrip("/")
        deadline = time.monotonic() + 20
        while not all(
            (seen / f"prometheus/counter_{pid}.db").exists() for pid in server.worker_pids()
        ):
            assert time.monotonic() < deadline, "the workers made no metrics files"
            time.sleep(0.1)  # a worker counted as started may still be making them
        with open(seen / "more", "wb") as file:  # filled to the last byte
            with pytest.raises(OSError) as full:
                while True:
                    file.write(b"\0" * 65536)
                    file.flush()
        assert full.value.errno == errno.ENOSPC
        before = server.worker_pids()
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while len(server.worker_pids() - {victim}) < 2:
            assert time.monotonic() < deadline, "the worker was not replaced"
            time.sleep(0.1)
        workers = server.worker_pids()
        statuses = [
            requests.get(f"{server.url}/v2/agents/support-bot/sessions", timeout=10).status_code
            for _ in range(20)
        ]
        assert statuses == [401] * 20  # answered by both workers, the new one included
        scrape = {"Authorization": "Bearer metrics-token-0123456789"}
        page = requests.get(f"{server.url}/metrics", headers=scrape, timeout=10)
        assert page.status_code == 200 and "agent_sessions_http_requests_total" in page.text
        assert server.worker_pids() == workers  # no worker died since: no crash loop
        logs = server.logs()
    assert "SIGBUS" not in logs and "Traceback" not in logs
    # The new worker says so, once; the old one too if it made a file since.
    warned = [int(pid) for pid in re.findall(r"\[(\d+)\] \[WARNING\] metrics: no room for", logs)]
    assert len(warned) == len(set(warned)) and (workers - before) <= set(warned), logs
