"""Real gunicorn, four workers, one SQLite file: races, sustained load, fork safety, revocation."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

from tests.servers import BIN, ROOT, Server, bootstrap, cli, free_port, serving

pytestmark = pytest.mark.slow

T = TypeVar("T")

WORKERS = 4
KEY = re.compile(r"^[0-9a-zA-Z_-]{1,64}$")
# The worker's pid on every access-log line, to tell which worker answered.
ACCESS_FORMAT = '%(p)s "%(r)s" %(s)s'
ACCESS_LINE = re.compile(r'^<(\d+)> "(\S+) (\S+) [^"]*" (\d{3})$', re.MULTILINE)
# Generous limits: these tests are about storage and processes, not rate limiting
# (memory:// counts per worker, so the default limits would bite unevenly).
UNLIMITED = {
    f"AGENT_SESSIONS_{name}": "1000000/minute"
    for name in ("SESSION_CREATE_LIMIT", "DEFAULT_LIMIT", "ADMIN_LIMIT", "AUTH_FAILURE_LIMIT")
}


def assert_error(response: requests.Response, status: int, code: str) -> dict:
    """The one error shape, for ``requests`` responses."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["error"] == code, body
    assert isinstance(body["messages"], list) and body["messages"], body
    assert all(isinstance(m, str) for m in body["messages"]), body
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert "Traceback" not in response.text
    return body


def together(calls: list[Callable[[], T]], threads: int = 32) -> list[T]:
    """Run ``calls`` on ``threads`` threads that all start at once (a barrier)."""
    threads = min(threads, len(calls))
    barrier = threading.Barrier(threads)
    chunks = [calls[i::threads] for i in range(threads)]

    def work(chunk: list[Callable[[], T]]) -> list[T]:
        barrier.wait(timeout=30)
        return [call() for call in chunk]

    with ThreadPoolExecutor(threads) as pool:
        return [result for chunk in pool.map(work, chunks) for result in chunk]


def access_log(server: Server) -> list[tuple[int, str, str, int]]:
    """(worker pid, method, path, status) of every request the server logged."""
    return [
        (int(pid), method, path, int(status))
        for pid, method, path, status in ACCESS_LINE.findall(server.logs())
    ]


def workers_that_served(server: Server, marker: str) -> set[int]:
    return {pid for pid, _, path, _ in access_log(server) if marker in path}


def assert_clean_log(server: Server) -> None:
    logs = server.logs()
    assert "database is locked" not in logs
    assert "Traceback" not in logs
    assert not [entry for entry in access_log(server) if entry[3] >= 500]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    path = tmp_path_factory.mktemp("gunicorn") / "sessions.db"
    return {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{path}", **UNLIMITED}


@pytest.fixture(scope="module")
def server(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module; each test works on an agent of its own."""
    extra = ["--access-logformat", ACCESS_FORMAT]
    with serving(env, tmp_path_factory.mktemp("logs"), workers=WORKERS, extra=extra) as server:
        yield server


def test_one_key_many_creates_one_winner(server: Server, env: dict[str, str]) -> None:
    token = bootstrap(env, agent="race-key")
    url = f"{server.url}/v2/agents/race-key/sessions"
    headers = {"x-api-key": token}

    def attempt(i: int) -> Callable[[], tuple[int, requests.Response]]:
        body = {"key": "the-one", "name": f"attempt {i}", "metadata": {"attempt": i}}
        return lambda: (i, requests.post(url, json=body, headers=headers, timeout=30))

    results = together([attempt(i) for i in range(100)])
    statuses = Counter(response.status_code for _, response in results)
    assert statuses == {201: 1, 409: 99}, statuses
    for _, response in results:
        if response.status_code == 409:
            assert_error(response, 409, "conflict")
    ((winner, created),) = [(i, r) for i, r in results if r.status_code == 201]
    assert created.json()["metadata"] == {"attempt": winner}
    assert created.headers["Location"] == "/v2/agents/race-key/sessions/the-one"

    fetched = requests.get(f"{url}/the-one", headers=headers, timeout=10)
    assert fetched.status_code == 200
    assert fetched.content == created.content
    assert_clean_log(server)


def test_one_name_many_creates_distinct_keys(server: Server, env: dict[str, str]) -> None:
    token = bootstrap(env, agent="race-name")
    url = f"{server.url}/v2/agents/race-name/sessions"
    headers = {"x-api-key": token}
    name = "Réunion d'équipe: Ärger über Straße"
    slug = "reunion-d-equipe-arger-uber-strasse"

    def attempt() -> requests.Response:
        return requests.post(url, json={"name": name}, headers=headers, timeout=30)

    results = together([attempt for _ in range(100)])
    assert Counter(r.status_code for r in results) == {201: 100}
    keys = [r.json()["key"] for r in results]
    assert len(set(keys)) == 100
    assert all(KEY.match(key) for key in keys), keys
    assert keys.count(slug) == 1, keys
    suffixed = [key for key in keys if key != slug]
    assert all(re.fullmatch(re.escape(slug) + r"-[0-9a-f]+", key) for key in suffixed), keys
    assert all(r.json()["name"] == name for r in results)

    listed: list[str] = []
    page_key = None
    for _ in range(20):
        params: dict[str, Any] = {"limit": 30}
        if page_key:
            params["page_key"] = page_key
        page = requests.get(url, params=params, headers=headers, timeout=10)
        assert page.status_code == 200, page.text
        listed += [s["key"] for s in page.json()["sessions"]]
        page_key = page.json()["metadata"].get("page_key")  # absent on the last page
        if page_key is None:
            break
    assert page_key is None
    assert sorted(listed) == sorted(keys)
    assert_clean_log(server)


def test_sustained_write_load(server: Server, env: dict[str, str]) -> None:
    """4 workers x 16 client threads, 2,000 creates: explicit, duplicate and generated keys."""
    token = bootstrap(env, agent="load")
    url = f"{server.url}/v2/agents/load/sessions"
    headers = {"x-api-key": token}
    threads, per_thread = 16, 125

    def body(t: int, i: int) -> dict[str, Any]:
        kind = i % 4
        if kind == 0:
            return {"key": f"t{t}-{i}", "name": f"Explicit {t} {i}"}
        if kind == 1:
            return {"key": f"shared-{i % 7}", "name": "Contended key"}
        if kind == 2:
            return {"name": "Load test", "metadata": {"thread": t, "i": i}}
        return {"name": f"Thread {t}", "tti_minutes": 30}

    def client(t: int) -> Callable[[], list[tuple[dict[str, Any], int]]]:
        def run() -> list[tuple[dict[str, Any], int]]:
            with requests.Session() as http:
                out = []
                for i in range(per_thread):
                    data = body(t, i)
                    response = http.post(url, json=data, headers=headers, timeout=30)
                    out.append((data, response.status_code))
                return out

        return run

    started = time.monotonic()
    results = [r for chunk in together([client(t) for t in range(threads)]) for r in chunk]
    elapsed = time.monotonic() - started
    statuses = Counter(status for _, status in results)
    print(f"sustained load: {len(results)} creates in {elapsed:.1f}s: {dict(statuses)}")
    assert len(results) == threads * per_thread == 2000
    assert all(200 <= status < 500 for status in statuses), statuses
    # Exactly the expected split: each explicit key wins once, every generated key is new.
    explicit = [data["key"] for data, _ in results if "key" in data]
    conflicts = len(explicit) - len(set(explicit))
    assert conflicts > 400
    assert statuses == {201: 2000 - conflicts, 409: conflicts}, statuses
    assert_clean_log(server)


def test_revocation_through_the_cli_reaches_every_worker_within_one_second(
    server: Server, env: dict[str, str]
) -> None:
    token = bootstrap(env, agent="revoke")
    headers = {"x-api-key": token}
    base = f"{server.url}/v2/agents/revoke/sessions"

    def probe_all_workers(marker: str, expect: int, code: str) -> None:
        """Concurrent bursts until every worker has answered ``expect`` to this key."""
        deadline = time.monotonic() + 30
        burst = 0
        while len(workers_that_served(server, marker)) < WORKERS:
            assert time.monotonic() < deadline, workers_that_served(server, marker)
            burst += 1
            urls = [f"{base}/{marker}-{burst}-{n}" for n in range(16)]
            calls = [lambda u=u: requests.get(u, headers=headers, timeout=10) for u in urls]
            for response in together(calls, threads=16):
                assert_error(response, expect, code)

    # Every worker has used the key before it is revoked.
    probe_all_workers("before", 404, "session_not_found")

    key_id = token.partition(".")[0]
    cli("keys", "revoke", key_id, env=env)
    # Each worker may keep the key it found for under a second (API.md), no longer.
    revoked = time.monotonic()
    time.sleep(max(0.0, revoked + 1.0 - time.monotonic()))
    for n in range(20):
        response = requests.get(f"{base}/after-{n}", headers=headers, timeout=10)
        assert_error(response, 401, "unauthorized")
    probe_all_workers("after", 401, "unauthorized")
    assert len(workers_that_served(server, "after")) == WORKERS
    assert_clean_log(server)


def test_preload_opens_no_connection_before_fork(tmp_path: Path) -> None:
    env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/preload.db", **UNLIMITED}
    token = bootstrap(env)
    extra = ["--preload", "--access-logformat", ACCESS_FORMAT]
    with serving(env, tmp_path, workers=WORKERS, extra=extra) as server:
        url = f"{server.url}/v2/agents/support-bot/sessions"
        headers = {"x-api-key": token}
        created: list[str] = []
        deadline = time.monotonic() + 30
        while len(workers_that_served(server, "/sessions")) < WORKERS:
            assert time.monotonic() < deadline, workers_that_served(server, "/sessions")
            calls = [
                lambda: requests.post(url, json={"name": "Preloaded"}, headers=headers, timeout=30)
                for _ in range(16)
            ]
            for response in together(calls, threads=16):
                assert response.status_code == 201, response.text
                created.append(response.json()["key"])
        assert len(set(created)) == len(created)
        for key in created[:5]:
            fetched = requests.get(f"{url}/{key}", headers=headers, timeout=10)
            assert fetched.status_code == 200
        assert_clean_log(server)


@pytest.mark.parametrize("extra", [[], ["--preload"]], ids=["workers", "preload"])
def test_unknown_storage_scheme_stops_gunicorn_with_one_line(extra: list[str]) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [
            str(BIN / "gunicorn"),
            "-c",
            str(ROOT / "gunicorn.conf.py"),
            "--workers",
            str(WORKERS),
            "--bind",
            f"127.0.0.1:{free_port()}",
            *extra,
            "wsgi:app",
        ],
        cwd=ROOT,
        env={**os.environ, "AGENT_SESSIONS_STORAGE_URL": "foo://x"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=30,
    )
    elapsed = time.monotonic() - started
    output = result.stdout
    assert result.returncode != 0, output
    assert elapsed < 15, (elapsed, output)
    assert "Traceback" not in output, output
    mentions = [line for line in output.splitlines() if "foo" in line]
    assert len(mentions) == 1, output
    assert "scheme" in mentions[0] and "'foo'" in mentions[0], mentions
    assert "Booting worker" not in output, output
