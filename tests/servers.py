"""Real gunicorn servers for process-level tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from tests.conftest import postgres_schema, require_server

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    """Run the real ``agent-sessions`` console script."""
    result = subprocess.run(
        [str(BIN / "agent-sessions"), *args],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"agent-sessions {args} failed: {result.stderr}")
    return result


class Server:
    """A gunicorn master serving ``app`` (by default ``wsgi:app``) with the given environment."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        workers: int = 4,
        log_path: Path,
        extra=(),
        app: str = "wsgi:app",
        wrap=(),
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.workers = workers
        self.log_path = log_path
        self.extra = list(extra)
        self.app = app
        self.wrap = list(wrap)  # a command that execs gunicorn's (it keeps the master's pid)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> Server:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                *self.wrap,
                str(BIN / "gunicorn"),
                "-c",
                str(ROOT / "gunicorn.conf.py"),
                "--workers",
                str(self.workers),
                "--bind",
                f"127.0.0.1:{self.port}",
                *self.extra,
                self.app,
            ],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.logs()[-2000:]}")
            with contextlib.suppress(requests.RequestException):
                # Up only once every worker has forked: tests compare worker pids.
                healthy = requests.get(self.url + "/healthz", timeout=1).status_code == 200
                if healthy and len(self.worker_pids()) >= self.workers:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not come up: {self.logs()[-2000:]}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_pids(self) -> set[int]:
        """The process ids of the master's children: its workers."""
        assert self.process is not None
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.process.pid)],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return {int(pid) for pid in out.split()}

    def kill(self) -> None:
        """SIGKILL the master and every worker (the whole process group)."""
        if self.process and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self._close_log()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._close_log()

    def _close_log(self) -> None:
        log = getattr(self, "log", None)
        if log is not None and not log.closed:
            log.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serving(env: dict[str, str], tmp_path: Path, **kwargs) -> Iterator[Server]:
    with Server(env, log_path=tmp_path / f"gunicorn-{free_port()}.log", **kwargs) as server:
        yield server


@contextlib.contextmanager
def serving_store(
    backend: str, tmp_path: Path, settings: dict[str, str], grants: str | None = None
) -> Iterator[tuple[Server, str, str]]:
    """A gunicorn with 4 workers on a fresh ``sqlite`` file or ``postgres`` schema.

    ``settings`` are added to the environment; the agent support-bot and a key
    with ``grants`` (see ``bootstrap``) are made through the CLI before the
    server starts. Yields the server, the key's token and the storage URL.
    """
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path}/sessions.db"
        else:
            require_server("PostgreSQL", "127.0.0.1", 5432)
            url = stack.enter_context(postgres_schema())
        env = {"AGENT_SESSIONS_STORAGE_URL": url, **settings}
        token = bootstrap(env, grants=grants)
        server = stack.enter_context(serving(env, tmp_path, workers=4))
        yield server, token, url


def bootstrap(env: dict[str, str], agent: str = "support-bot", grants: str | None = None) -> str:
    """Create an agent and a key through the CLI; return the key's token."""
    cli("agents", "create", agent, "--name", agent, env=env)
    grant = grants or f"{agent}=sessions:create,sessions:read,sessions:update,sessions:delete"
    out = cli("keys", "create", "--name", "test", "--grant", grant, env=env).stdout
    return out.strip().splitlines()[-1]
