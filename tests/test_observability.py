"""Metrics and JSON logs against a live gunicorn with 4 workers, and in process.

One server run (module fixture) answers a known mix of requests: a 503 (the
SQLite write lock held past the busy timeout), creations up to a 429 (the
creation limit, counted exactly in Redis), a 500 (a stored row the storage
cannot decode), a 401 with a wrong secret, and N reads spread over the
workers on fresh connections. Its /metrics page and every line it logged
are then checked.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlite_utils.utils import sqlite3

from sessions_app import create_app
from sessions_app.observability.metrics import SCRAPE_CACHE_SECONDS
from tests.conftest import REDIS_URL, Keys, assert_error, require_server
from tests.servers import bootstrap, serving

AGENT = "support-bot"
SESSIONS = f"/v2/agents/{AGENT}/sessions"
SESSIONS_RULE = "/v2/agents/<record_key:agent_key>/sessions"
SESSION_RULE = "/v2/agents/<record_key:agent_key>/sessions/<record_key:session_key>"
READS = 120
METRICS_TOKEN = "metrics-token-0123456789"
SCRAPE = {"Authorization": f"Bearer {METRICS_TOKEN}"}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a page, parsed by prometheus_client's own parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_server("Redis", "127.0.0.1", 6379)
    tmp = tmp_path_factory.mktemp("observability")
    db = tmp / "sessions.db"
    prom = tmp / "prometheus"
    prom.mkdir()
    (prom / "counter_999999.db").write_bytes(b"stale")  # a previous run's: removed at start
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{db}",
        "AGENT_SESSIONS_SQLITE_BUSY_TIMEOUT_MS": "100",
        "AGENT_SESSIONS_RATELIMIT_STORAGE_URI": REDIS_URL,
        "AGENT_SESSIONS_RATELIMIT_KEY_PREFIX": f"obs-{uuid.uuid4().hex}",
        "AGENT_SESSIONS_SESSION_CREATE_LIMIT": "4/minute",
        "AGENT_SESSIONS_LOG_FORMAT": "json",
        "PROMETHEUS_MULTIPROC_DIR": str(prom),
        "AGENT_SESSIONS_METRICS_TOKEN": METRICS_TOKEN,
    }
    token = bootstrap(env, AGENT)
    headers = {"x-api-key": token}
    seen: list[requests.Response] = []
    with serving(env, tmp, workers=4) as server:
        assert not (prom / "counter_999999.db").exists()

        def call(method: str, path: str, **kwargs: Any) -> requests.Response:
            kwargs.setdefault("headers", headers)
            # A new connection each time: the kernel spreads them over the workers.
            response = requests.request(method, server.url + path, timeout=30, **kwargs)
            seen.append(response)
            return response

        # Creations up to the limit, then 429.
        for key in ("kept", "explode", "third", "fourth"):
            assert call("POST", SESSIONS, json={"key": key, "name": key}).status_code == 201
        assert call("POST", SESSIONS, json={"name": "One too many"}).status_code == 429
        # 503: another process holds the write lock past the 100 ms busy timeout.
        blocker = sqlite3.connect(db, timeout=0, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            assert call("PATCH", f"{SESSIONS}/kept", json={"name": "Busy"}).status_code == 503
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        # 500: a stored row the storage cannot decode.
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE sessions SET metadata = '{broken' WHERE key = 'explode'")
        assert call("GET", f"{SESSIONS}/explode").status_code == 500
        # 401: a wrong secret of the right key id.
        key_id = token.partition(".")[0]
        wrong = f"{key_id}.{'x' * 43}"
        assert call("GET", SESSIONS, headers={"x-api-key": wrong}).status_code == 401
        # N reads, spread over the workers.
        for _ in range(READS):
            assert call("GET", f"{SESSIONS}/kept").status_code == 200
        workers = server.worker_pids()
        writers = {int(p.stem.rsplit("_", 1)[1]) for p in prom.glob("counter_*.db")} & workers
        page = requests.get(server.url + "/metrics", headers=SCRAPE, timeout=30)
        # A worker killed outright leaves no live gauge behind: child_exit removes it.
        victim = sorted(workers)[0]
        assert (prom / f"gauge_livesum_{victim}.db").exists()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (prom / f"gauge_livesum_{victim}.db").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        gauge_left = (prom / f"gauge_livesum_{victim}.db").exists()
        time.sleep(SCRAPE_CACHE_SECONDS)  # a page of its own, not the one scraped above
        after_kill = requests.get(server.url + "/metrics", headers=SCRAPE, timeout=30).text
    return {
        "page": page,
        "after_kill": after_kill,
        "gauge_left": gauge_left,
        "writers": writers,
        "logs": server.logs(),
        "seen": seen,
        "secrets": [token, token.partition(".")[2], wrong, wrong.partition(".")[2]],
    }


@pytest.mark.slow
@pytest.mark.redis
def test_metrics_sum_the_workers_exactly(run):
    page = run["page"]
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert len(run["writers"]) >= 2, "the reads should have reached several workers"
    found = samples(page.text)

    def requests_total(route: str, method: str, status: str) -> float:
        return value(
            found, "agent_sessions_http_requests_total", route=route, method=method, status=status
        )

    assert requests_total(SESSION_RULE, "GET", "200") == READS
    assert requests_total(SESSION_RULE, "GET", "500") == 1
    # The histogram's count is that of the counter, per route and method.
    count = value(
        found,
        "agent_sessions_http_request_duration_seconds_count",
        route=SESSION_RULE,
        method="GET",
    )
    assert count == READS + 1
    inf = value(
        found,
        "agent_sessions_http_request_duration_seconds_bucket",
        route=SESSION_RULE,
        method="GET",
        le="+Inf",
    )
    assert inf == count
    assert requests_total(SESSIONS_RULE, "POST", "201") == 4
    assert requests_total(SESSIONS_RULE, "POST", "429") == 1
    assert requests_total(SESSION_RULE, "PATCH", "503") == 1
    assert requests_total(SESSIONS_RULE, "GET", "401") == 1
    decisions = "agent_sessions_rate_limit_decisions_total"
    assert value(found, decisions, limit="session_create", decision="limited") == 1
    assert value(found, decisions, limit="session_create", decision="allowed") == 4
    # The reads and the 500 count; the PATCH too, unless its worker opened its first
    # connection under the lock (a 503 at authentication, before any limit).
    assert READS + 1 <= value(found, decisions, limit="default", decision="allowed") <= READS + 2
    storage_errors = "agent_sessions_storage_errors_total"
    assert value(found, storage_errors, backend="sqlite", status="503") == 1
    assert value(found, storage_errors, backend="sqlite", status="500") == 1
    assert value(found, "agent_sessions_unavailable_total", backend="sqlite") == 1
    assert value(found, "agent_sessions_sessions_created_total") == 4
    assert value(found, "agent_sessions_auth_failures_total", reason="wrong_secret") == 1
    # The key that used up its creation limit is near it (the 429 and the creation before).
    key_id = run["secrets"][0].partition(".")[0]
    near = value(
        found, "agent_sessions_rate_limit_near_total", limit="session_create", key_id=key_id
    )
    assert near == 2
    # Only this scrape is in progress; route templates only, never a path.
    assert value(found, "agent_sessions_http_requests_in_progress") == 1
    assert "kept" not in page.text and "explode" not in page.text


@pytest.mark.slow
@pytest.mark.redis
def test_a_dead_worker_leaves_no_gauge_and_its_counts_stay(run):
    assert not run["gauge_left"]
    found = samples(run["after_kill"])
    assert value(found, "agent_sessions_http_requests_in_progress") == 1
    total = value(
        found, "agent_sessions_http_requests_total", route=SESSION_RULE, method="GET", status="200"
    )
    assert total == READS


@pytest.mark.slow
@pytest.mark.redis
def test_every_log_line_is_json_with_the_request_id_and_no_secret(run):
    lines = [line for line in run["logs"].splitlines() if line.strip()]
    assert lines
    records = [json.loads(line) for line in lines]  # every line, or this raises
    for line in lines:
        for secret in run["secrets"]:
            assert secret not in line
    for record in records:
        assert {"time", "level", "message"} <= set(record)
    access = {r["request_id"]: r for r in records if r.get("logger") == "gunicorn.access"}
    for response in run["seen"]:
        record = access[response.headers["X-Request-ID"]]
        assert record["status"] == response.status_code
        assert record["method"] == response.request.method
        assert record["duration_ms"] >= 0
    by_status = {r["status"]: r for r in access.values()}
    assert by_status[429]["route"] == SESSIONS_RULE
    assert by_status[429]["agent_key"] == AGENT
    assert by_status[429]["key_id"] == run["secrets"][0].partition(".")[0]
    assert "key_id" not in by_status[401]
    # The 500's own error line carries the same request id, its traceback inside the object.
    failed = by_status[500]["request_id"]
    errors = [r for r in records if r.get("level") == "ERROR" and r.get("request_id") == failed]
    assert errors and "JSONDecodeError" in errors[0]["exc_info"]
    assert errors[0]["route"] == SESSION_RULE


# In process: one registry per app, no directory needed.


def test_in_process_metrics_need_no_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    config = {"TESTING": True, "STORAGE_URL": f"sqlite:///{tmp_path}/s.db"}
    app = create_app(config | {"METRICS_TOKEN": METRICS_TOKEN})
    client = app.test_client()
    keys = Keys(app)
    admin = keys.headers(admin=True)
    assert client.post("/v2/agents", json={"key": AGENT, "name": "S"}, headers=admin).status_code
    assert client.post(SESSIONS, json={"key": "abc", "name": "x"}, headers=admin).status_code == 201
    client.get("/v2/no/such/path")
    client.open(SESSIONS, method="BREW")
    client.get(SESSIONS, headers={"x-api-key": "not-a-key"})
    client.get(SESSIONS)
    page = client.get("/metrics", headers=SCRAPE)
    assert page.status_code == 200
    found = samples(page.get_data(as_text=True))
    total = "agent_sessions_http_requests_total"
    assert value(found, total, route=SESSIONS_RULE, method="POST", status="201") == 1
    assert value(found, total, route="unmatched", method="GET", status="404") == 1
    # No rule matched the method either: the fixed label, and no series per made-up method.
    assert value(found, total, route="unmatched", method="other", status="405") == 1
    assert value(found, "agent_sessions_auth_failures_total", reason="malformed") == 1
    assert value(found, "agent_sessions_auth_failures_total", reason="missing") == 1
    assert value(found, "agent_sessions_sessions_created_total") == 1
    assert "abc" not in page.get_data(as_text=True)
    # A second app in the same process counts on its own.
    other = create_app(
        {"TESTING": True, "STORAGE_URL": "memory://", "METRICS_TOKEN": METRICS_TOKEN}
    )
    found = samples(other.test_client().get("/metrics", headers=SCRAPE).get_data(as_text=True))
    assert value(found, "agent_sessions_sessions_created_total") == 0


class Escaped(BaseException):
    """Not an Exception: no error handler takes it, and no after-request hook runs."""


def test_a_request_no_handler_answered_is_a_500_and_not_left_in_progress():
    app = create_app({"TESTING": True, "STORAGE_URL": "memory://", "METRICS_TOKEN": METRICS_TOKEN})

    def escape() -> None:
        raise Escaped

    app.add_url_rule("/escape", "escape", escape)
    client = app.test_client()
    with pytest.raises(Escaped):
        client.get("/escape")
    assert client.get("/healthz").status_code == 200
    found = samples(client.get("/metrics", headers=SCRAPE).get_data(as_text=True))
    total = "agent_sessions_http_requests_total"
    assert value(found, total, route="/escape", method="GET", status="500") == 1
    assert value(found, total, route="/healthz", method="GET", status="200") == 1
    # Only the scrape itself is in progress: the escaped request was closed by the teardown.
    assert value(found, "agent_sessions_http_requests_in_progress") == 1


def test_metrics_off_serves_no_page_and_counts_nothing(tmp_path):
    app = create_app({"TESTING": True, "STORAGE_URL": "memory://", "METRICS_ENABLED": "false"})
    assert app.extensions["agent_sessions"].metrics is None
    response = app.test_client().get("/metrics")
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"


def test_embedded_blueprint_has_no_metrics_unless_asked():
    from flask import Flask

    from sessions_app import init_app

    host = Flask("host")
    host.config["STORAGE_URL"] = "memory://"
    init_app(host)
    assert host.extensions["agent_sessions"].metrics is None
    assert host.test_client().get("/metrics").status_code == 404
    asked = Flask("asked")
    asked.config.update(STORAGE_URL="memory://", METRICS_ENABLED=True, METRICS_TOKEN=METRICS_TOKEN)
    init_app(asked)
    assert asked.test_client().get("/metrics").status_code == 401
    assert asked.test_client().get("/metrics", headers=SCRAPE).status_code == 200


def test_events_written_counts_what_the_caller_wrote():
    from sessions_app.observability import metrics

    app = create_app({"TESTING": True, "STORAGE_URL": "memory://", "METRICS_TOKEN": METRICS_TOKEN})
    with app.test_request_context():
        metrics.events_written(3)
        metrics.events_written(0)
    found = samples(app.test_client().get("/metrics", headers=SCRAPE).get_data(as_text=True))
    assert value(found, "agent_sessions_events_written_total") == 3


@pytest.mark.parametrize(
    ("setting", "value_"),
    [
        ("METRICS_BIND", "nohost"),
        ("METRICS_BIND", "127.0.0.1:99999"),
        ("METRICS_TOKEN", "short"),
        ("METRICS_TOKEN", "a token with spaces in it"),
        ("LOG_FORMAT", "xml"),
    ],
)
def test_bad_observability_settings_stop_the_app(setting, value_):
    from sessions_app import ConfigError

    with pytest.raises(ConfigError, match=setting):
        create_app({"TESTING": True, "STORAGE_URL": "memory://", setting: value_})


@pytest.mark.slow
def test_metrics_bind_serves_the_page_on_its_own_address(tmp_path):
    from tests.servers import free_port

    port = free_port()
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/s.db",
        "AGENT_SESSIONS_METRICS_BIND": f"127.0.0.1:{port}",
    }
    with serving(env, tmp_path, workers=2) as server:
        for _ in range(5):
            assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
        assert requests.get(server.url + "/metrics", timeout=10).status_code == 404
        page = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    found = samples(page.text)
    healthz = value(
        found, "agent_sessions_http_requests_total", route="/healthz", method="GET", status="200"
    )
    assert healthz >= 5  # the start-up check's own calls too


def test_bad_log_format_stops_gunicorn_with_one_line(tmp_path):
    import subprocess

    from tests.servers import BIN, ROOT

    result = subprocess.run(
        [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py"), "--check-config", "wsgi:app"],
        env={**os.environ, "AGENT_SESSIONS_LOG_FORMAT": "xml"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 4
    assert result.stderr.strip().splitlines() == [
        "agent-sessions: configuration error: "
        "AGENT_SESSIONS_LOG_FORMAT='xml': expected text or json"
    ]


def test_multiproc_dir_is_fresh_and_removed(tmp_path):
    """Without PROMETHEUS_MULTIPROC_DIR, the master makes one and removes it at exit."""
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/s.db",
        "AGENT_SESSIONS_METRICS_TOKEN": METRICS_TOKEN,
    }
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("agent-sessions-metrics-*"))
    with serving(env, tmp_path, workers=1) as server:
        assert requests.get(server.url + "/metrics", headers=SCRAPE, timeout=10).status_code == 200
        during = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("agent-sessions-metrics-*"))
        assert during - before
    after = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("agent-sessions-metrics-*"))
    assert not (during - before) & after


@pytest.mark.parametrize(
    ("configured", "authorization", "words"),
    [
        (None, None, "not served without a token"),
        (None, f"Bearer {METRICS_TOKEN}", "not served without a token"),
        (METRICS_TOKEN, None, "needs the bearer token"),
        (METRICS_TOKEN, f"Bearer {METRICS_TOKEN}x", "needs the bearer token"),
        (METRICS_TOKEN, f"Bearer {METRICS_TOKEN[:-1]}", "needs the bearer token"),
        (METRICS_TOKEN, f"Basic {METRICS_TOKEN}", "needs the bearer token"),
        (METRICS_TOKEN, METRICS_TOKEN, "needs the bearer token"),
        (METRICS_TOKEN, "Bearer", "needs the bearer token"),
    ],
)
def test_the_page_needs_its_bearer_token(configured, authorization, words):
    config = {"TESTING": True, "STORAGE_URL": "memory://"}
    if configured is not None:
        config["METRICS_TOKEN"] = configured
    client = create_app(config).test_client()
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = client.get("/metrics", headers=headers)
    body = assert_error(response, 401, "unauthorized")
    assert words in body["messages"][0]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "agent_sessions" not in response.get_data(as_text=True)
    if configured is not None:
        assert (
            client.get("/metrics", headers={"Authorization": f"bearer {configured}"}).status_code
            == 200
        )


@pytest.mark.slow
def test_killed_workers_leave_a_bounded_directory_and_every_count(tmp_path):
    # Each worker killed leaves a counter and a histogram file; folded into one merged
    # file of each kind at its exit, the directory holds the live processes' files
    # and those two, and the page still counts every request ever answered.
    prom = tmp_path / "prometheus"
    prom.mkdir()
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/s.db",
        "PROMETHEUS_MULTIPROC_DIR": str(prom),
        "AGENT_SESSIONS_METRICS_TOKEN": METRICS_TOKEN,
    }
    workers = 2
    bound = (workers + 1) * 3 + 2  # three files a process (the master's too), two merged

    def healthz_counts() -> tuple[float, float]:
        time.sleep(SCRAPE_CACHE_SECONDS)  # a page of its own
        page = requests.get(server.url + "/metrics", headers=SCRAPE, timeout=30)
        assert page.status_code == 200
        found = samples(page.text)
        labels = {"route": "/healthz", "method": "GET"}
        total = value(found, "agent_sessions_http_requests_total", status="200", **labels)
        count = value(found, "agent_sessions_http_request_duration_seconds_count", **labels)
        return total, count

    with serving(env, tmp_path, workers=workers) as server:
        start, _ = healthz_counts()  # the server's start-up checks called it too
        sent = 0
        for _ in range(8):
            for _ in range(10):  # new connections: spread over the workers
                assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
                sent += 1
            victim = min(server.worker_pids())
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while victim in server.worker_pids() or len(server.worker_pids()) < workers:
                assert time.monotonic() < deadline, "the worker was not replaced"
                time.sleep(0.1)
            while list(prom.glob(f"*_{victim}.db")):
                assert time.monotonic() < deadline, "the dead worker's files stayed"
                time.sleep(0.1)
            files = sorted(path.name for path in prom.glob("*.db"))
            assert len(files) <= bound, files
        assert {"counter_merged.db", "histogram_merged.db"} <= set(files)
        total, count = healthz_counts()
        logs = server.logs()
    assert total == start + sent
    assert count == total
    assert "Traceback" not in logs


@pytest.mark.slow
def test_concurrent_scrapers_share_one_page_a_second(tmp_path):
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/s.db",
        "AGENT_SESSIONS_METRICS_TOKEN": METRICS_TOKEN,
    }
    with serving(env, tmp_path, workers=2) as server:
        url = server.url + "/metrics"
        first = requests.get(url, headers=SCRAPE, timeout=10).text
        for _ in range(5):
            assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
        # Within the second, every scraper, on either worker, gets the page rendered then.
        again = [requests.get(url, headers=SCRAPE, timeout=10).text for _ in range(6)]
        assert set(again) == {first}
        time.sleep(SCRAPE_CACHE_SECONDS)
        later = requests.get(url, headers=SCRAPE, timeout=10).text
    healthz = {"route": "/healthz", "method": "GET", "status": "200"}
    counted = value(samples(later), "agent_sessions_http_requests_total", **healthz)
    assert counted == value(samples(first), "agent_sessions_http_requests_total", **healthz) + 5
