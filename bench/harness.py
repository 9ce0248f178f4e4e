"""Processes for the benchmark: gunicorn servers, wrk runs, and small HTTP calls."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BIN = Path(sys.executable).parent

WORKERS = 2
WRK_THREADS = 2
WRK_CONNECTIONS = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reachable(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def require_wrk() -> None:
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is not installed; install it with: apt-get install wrk")


class Gunicorn:
    """A gunicorn master serving ``app`` with the project's gunicorn.conf.py and 2 workers.

    The service and the baseline are started through this one class, so they
    differ only in the application and its environment.
    """

    def __init__(
        self,
        name: str,
        app: str,
        env: dict[str, str],
        workdir: Path,
        wrapper: list[str] | None = None,
        options: list[str] | None = None,
    ):
        self.name = name
        self.wrapper = wrapper or []  # a command the master runs under (valgrind)
        self.options = options or []  # more gunicorn options
        self.app = app
        self.env = {**os.environ, **env}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Gunicorn:
        """Start the master; return once every worker is up and /healthz answers."""
        command = [
            *self.wrapper,
            str(BIN / "gunicorn"),
            "-c",
            str(ROOT / "gunicorn.conf.py"),
            "-w",
            str(WORKERS),
            "--bind",
            f"127.0.0.1:{self.port}",
            *self.options,
            self.app,
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(
        self, timeout: float, replaced: frozenset[int] = frozenset(), workers: int = WORKERS
    ) -> list[int]:
        """Wait for ``workers`` workers, none of ``replaced``, and a 200 from /healthz."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name}: gunicorn exited:\n{self.log_tail()}")
            pids = self.worker_pids()
            if (
                len(pids) == workers
                and not replaced.intersection(pids)
                and call("GET", self.url + "/healthz")[0] == 200
            ):
                return pids
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name}: gunicorn did not come up:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> Gunicorn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def worker_pids(self) -> list[int]:
        """The master's children, read from /proc."""
        if self.process is None:
            return []
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                # The command name (in parentheses) may hold spaces: split after it.
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.process.pid:
                    pids.append(int(stat.parent.name))
        return sorted(pids)

    def rss_kib(self) -> dict[int, int]:
        """VmRSS of each worker, in KiB."""
        rss = {}
        for pid in self.worker_pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss[pid] = int(line.split()[1])
        return rss


@dataclasses.dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    statuses: dict[str, int]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk(
    url: str, script: str, args: list[str], seconds: float, during: Callable[[], Any] | None = None
) -> WrkResult:
    """One wrk run (-t2 -c16) of ``bench/<script>.lua``; its done() hook prints the numbers.

    ``during``, when given, is called once wrk has started (to attach a profiler).
    """
    command = [
        "wrk",
        f"-t{WRK_THREADS}",
        f"-c{WRK_CONNECTIONS}",
        f"-d{seconds:g}s",
        "-s",
        str(BENCH / f"{script}.lua"),
        url,
        "--",
        *args,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if during is not None:
        during()
    stdout, stderr = proc.communicate(timeout=seconds + 120)
    for line in stdout.splitlines():
        if line.startswith("BENCH "):
            data = json.loads(line[len("BENCH ") :])
            return WrkResult(
                requests=data["requests"],
                seconds=data["duration_us"] / 1e6,
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                non2xx=data["non2xx"],
                socket_errors=data["socket_errors"],
                statuses=data["statuses"],
            )
    raise RuntimeError(f"wrk printed no result:\n{stdout}\n{stderr}")


@dataclasses.dataclass
class Summary:
    """The median of several runs of one operation on one server."""

    runs: list[WrkResult]

    @property
    def rps(self) -> float:
        return statistics.median(r.rps for r in self.runs)

    @property
    def p50_ms(self) -> float:
        return statistics.median(r.p50_ms for r in self.runs)

    @property
    def p99_ms(self) -> float:
        return statistics.median(r.p99_ms for r in self.runs)

    @property
    def non2xx(self) -> int:
        return sum(r.non2xx + r.socket_errors for r in self.runs)

    @property
    def statuses(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for run in self.runs:
            for status, count in run.statuses.items():
                total[status] = total.get(status, 0) + count
        return total


def call(method: str, url: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
    """One HTTP request; (status, parsed JSON body or None). (0, None) when nothing answers."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["x-api-key"] = token
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except OSError:
        return 0, None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None
