"""Two gunicorn instances ("hosts") sharing one PostgreSQL schema.

What one instance writes, the other reads; create races across instances have
one winner; a revoked key is refused everywhere; a PostgreSQL restart under
traffic costs 503s with ``Retry-After`` (never a 500) and service resumes
without restarting anything.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import IN_CI, postgres_schema, require_server
from tests.servers import Server, bootstrap, cli

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

AGENT = "support-bot"
SESSIONS = f"/v2/agents/{AGENT}/sessions"


class Hosts:
    def __init__(self, env: dict[str, str], token: str, a: Server, b: Server):
        self.env = env
        self.token = token
        self.a = a
        self.b = b
        self.headers = {"x-api-key": token}


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    """Two instances of two workers each on one fresh schema; B preloads the app."""
    require_server("PostgreSQL", "127.0.0.1", 5432)
    with postgres_schema() as url:
        env = {
            "AGENT_SESSIONS_STORAGE_URL": url,
            # Rate limits are not under test here; memory:// counts per worker.
            "AGENT_SESSIONS_RATELIMIT_STORAGE_URI": "memory://",
            "AGENT_SESSIONS_SESSION_CREATE_LIMIT": "100000/minute",
            "AGENT_SESSIONS_DEFAULT_LIMIT": "100000/minute",
            "AGENT_SESSIONS_AUTH_FAILURE_LIMIT": "100000/minute",
            # A short checkout timeout, so that an outage shows as 503s quickly.
            "AGENT_SESSIONS_POSTGRES_TIMEOUT": "2",
        }
        a = Server(env, workers=2, log_path=tmp_path / "a.log")
        b = Server(env, workers=2, log_path=tmp_path / "b.log", extra=["--preload"])
        try:
            # Both start while the CLI bootstraps (nothing connects before a request).
            with ThreadPoolExecutor(max_workers=3) as pool:
                started = [pool.submit(a.start), pool.submit(b.start)]
                token = pool.submit(bootstrap, env, AGENT).result()
                for future in started:
                    future.result()
            yield Hosts(env, token, a, b)
        finally:
            a.stop()
            b.stop()


def test_a_session_written_on_one_host_is_served_by_the_other(hosts: Hosts) -> None:
    a, b, headers = hosts.a.url, hosts.b.url, hosts.headers
    body = {"key": "shared", "name": "Shared", "metadata": {"lang": "fr"}, "tti_minutes": 5}
    created = requests.post(a + SESSIONS, json=body, headers=headers, timeout=10)
    assert created.status_code == 201, created.text

    read = requests.get(f"{b}{SESSIONS}/shared", headers=headers, timeout=10)
    assert read.status_code == 200, read.text
    assert read.json() == created.json()

    patch = {"name": "Renamed", "metadata": {"lang": "de"}}
    updated = requests.patch(f"{b}{SESSIONS}/shared", json=patch, headers=headers, timeout=10)
    assert updated.status_code == 200, updated.text
    again = requests.get(f"{a}{SESSIONS}/shared", headers=headers, timeout=10).json()
    assert (again["name"], again["metadata"]) == ("Renamed", {"lang": "de"})
    assert again == updated.json()

    listed = requests.get(a + SESSIONS, headers=headers, timeout=10).json()
    assert [s["key"] for s in listed["sessions"]] == ["shared"]

    deleted = requests.delete(f"{b}{SESSIONS}/shared", headers=headers, timeout=10)
    assert deleted.status_code == 204, deleted.text
    gone = requests.get(f"{a}{SESSIONS}/shared", headers=headers, timeout=10)
    assert (gone.status_code, gone.json()["error"]) == (404, "session_not_found")


def test_concurrent_creates_of_one_key_across_hosts_have_one_winner(hosts: Hosts) -> None:
    targets = itertools.cycle([hosts.a.url, hosts.b.url])
    urls = [next(targets) + SESSIONS for _ in range(200)]
    barrier = threading.Barrier(50)

    def create(i: int) -> int:
        if i < 50:  # the first wave leaves together
            barrier.wait()
        body = {"key": "race", "name": f"racer {i}"}
        return requests.post(urls[i], json=body, headers=hosts.headers, timeout=30).status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = Counter(pool.map(create, range(200)))
    assert statuses == {201: 1, 409: 199}, statuses

    winners = [
        requests.get(f"{url}{SESSIONS}/race", headers=hosts.headers, timeout=10).json()
        for url in (hosts.a.url, hosts.b.url)
    ]
    assert winners[0] == winners[1] and winners[0]["name"].startswith("racer ")


def test_a_key_revoked_through_the_cli_is_refused_by_every_host(hosts: Hosts) -> None:
    out = cli(
        "keys", "create", "--name", "doomed", "--grant", f"{AGENT}=sessions:read", env=hosts.env
    ).stdout
    token = out.strip().splitlines()[-1]
    key_id = token.partition(".")[0]
    headers = {"x-api-key": token}
    for url in (hosts.a.url, hosts.b.url):
        assert requests.get(url + SESSIONS, headers=headers, timeout=10).status_code == 200

    cli("keys", "revoke", key_id, env=hosts.env)
    revoked_at = time.monotonic()
    # API.md allows a per-worker cache of key lookups for up to one second.
    seen = []
    while time.monotonic() - revoked_at < 1.5:
        response = requests.get(hosts.b.url + SESSIONS, headers=headers, timeout=10)
        seen.append((time.monotonic() - revoked_at, response.status_code))
        time.sleep(0.05)
    print("after revocation (seconds, status):", seen[:3], "...")
    assert all(status == 401 for at, status in seen if at >= 1.0), seen
    for url in (hosts.a.url, hosts.b.url):
        for _ in range(4):  # reach both workers of each host
            assert requests.get(url + SESSIONS, headers=headers, timeout=10).status_code == 401


def pg_cluster(action: str) -> subprocess.CompletedProcess:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    return subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_for_postgres(deadline_s: float = 30) -> None:
    import psycopg

    from tests.conftest import POSTGRES_URL

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            with psycopg.connect(POSTGRES_URL, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def restart_postgres(down_for: float) -> None:
    """Stop the local cluster, keep it down, start it again; always leave it running."""
    try:
        stopped = pg_cluster("stop")
        assert stopped.returncode == 0, stopped.stderr
        time.sleep(down_for)
    finally:
        if pg_cluster("status").returncode != 0:
            started = pg_cluster("start")
            assert started.returncode == 0, started.stderr
        wait_for_postgres()


def test_postgres_restart_under_traffic_gives_503_then_recovers(hosts: Hosts) -> None:
    if shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir():
        message = "needs a local PostgreSQL cluster managed by pg_ctlcluster"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    phase = "before"
    results: list[tuple[str, int, str | None, float]] = []
    stop = threading.Event()
    counter = itertools.count()

    def client(url: str) -> None:
        while not stop.is_set():
            n, started_in = next(counter), phase
            try:
                if n % 2:
                    r = requests.post(
                        url + SESSIONS, json={"name": f"s{n}"}, headers=hosts.headers, timeout=15
                    )
                else:
                    r = requests.get(url + SESSIONS, headers=hosts.headers, timeout=15)
            except requests.RequestException as err:  # a hung or dropped request is a failure
                results.append((started_in, 0, repr(err), time.monotonic()))
                continue
            retry_after = r.headers.get("Retry-After")
            results.append((started_in, r.status_code, retry_after, time.monotonic()))

    threads = [
        threading.Thread(target=client, args=(url,), daemon=True)
        for url in (hosts.a.url, hosts.b.url) * 3
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        phase = "outage"
        restart_postgres(down_for=4)
        back = time.monotonic()
        # No restart of the service: its pools reconnect by themselves. Recovered
        # means the last requests of every client thread succeeded.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            tail = results[-4 * len(threads) :]
            if len(tail) == 4 * len(threads) and all(r[1] in (200, 201) for r in tail):
                break
            time.sleep(0.1)
        phase = "after"
        time.sleep(3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)

    counts = Counter((p, s) for p, s, _, _ in results)
    last_503 = max((t for _, s, _, t in results if s == 503), default=back) - back
    print(f"restart under traffic: {dict(sorted(counts.items()))}; last 503 {last_503:.1f}s")
    assert all(s in (200, 201, 503) for _, s, _, _ in results), counts
    assert all(ra is not None and ra.isdigit() for _, s, ra, _ in results if s == 503)
    assert counts[("before", 200)] and counts[("before", 201)], counts
    assert counts[("outage", 503)] > 0, counts  # the outage was seen, as 503s
    after = [s for p, s, _, _ in results if p == "after"]
    assert len(after) > 20 and set(after) <= {200, 201}, counts
