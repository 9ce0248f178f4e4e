"""Strict inputs: unknown query parameters, unknown settings, memory:// under several workers."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests

from sessions_app import unknown_environment_names
from tests.conftest import assert_error
from tests.servers import BIN, ROOT, cli, free_port, serving

SESSIONS = "/v2/agents/{agent}/sessions"


@pytest.fixture
def session(client, full, agent) -> str:
    response = client.post(SESSIONS.format(agent=agent), json={"name": "s"}, headers=full)
    assert response.status_code == 201
    return response.get_json()["key"]


@pytest.mark.parametrize(
    ("path", "query", "unknown"),
    [
        (SESSIONS, "filtr=zzz&limt=1", ("filtr", "limt")),
        (SESSIONS, "limit=2&Limit=3", ("Limit",)),
        (SESSIONS + "/{session}", "verbose=1", ("verbose",)),
        ("/v2/agents", "pagekey=x", ("pagekey",)),
        ("/v2/agents/{agent}", "x=", ("x",)),
        ("/v2/api_keys", "limit=5&all=true", ("all",)),
    ],
)
def test_unknown_query_parameters_are_400_naming_them(
    client, admin, agent, session, path, query, unknown
):
    url = path.format(agent=agent, session=session) + "?" + query
    body = assert_error(client.get(url, headers=admin), 400, "invalid_request")
    for name in unknown:
        assert name in body["field_errors"], body
        assert any(name in message for message in body["messages"]), body
    assert set(body["field_errors"]) == set(unknown)


@pytest.mark.parametrize(
    ("path", "query", "repeated"),
    [
        (SESSIONS, "limit=10&limit=20", "limit"),
        (SESSIONS, "filter=a&filter=b", "filter"),
        (SESSIONS, "page_key=x&limit=1&page_key=y", "page_key"),
        ("/v2/agents", "limit=1&limit=1", "limit"),  # even the same value
        ("/v2/api_keys", "limit=5&limit=6", "limit"),
        (SESSIONS + "/{session}/events", "order=desc&order=asc", "order"),
        (
            SESSIONS + "/{session}/events",
            "include_hidden=true&include_hidden=false",
            "include_hidden",
        ),
        (SESSIONS + "/{session}/events", "type=agent_output&type=input_message", "type"),
    ],
)
def test_a_repeated_query_parameter_is_400_naming_it(
    client, admin, agent, session, path, query, repeated
):
    url = path.format(agent=agent, session=session) + "?" + query
    body = assert_error(client.get(url, headers=admin), 400, "invalid_request", repeated)
    assert set(body["field_errors"]) == {repeated}, body
    assert body["messages"] == [f"{repeated}: Given more than once; give it once."], body


def test_a_repeated_unknown_query_parameter_is_named_as_unknown(client, admin, agent):
    url = SESSIONS.format(agent=agent) + "?limt=1&limt=2"
    body = assert_error(client.get(url, headers=admin), 400, "invalid_request", "limt")
    assert body["field_errors"]["limt"] == "Unknown field.", body


def test_a_list_of_types_is_one_comma_separated_parameter(client, full, agent, session):
    url = SESSIONS.format(agent=agent) + f"/{session}/events?type=agent_output,input_message"
    response = client.get(url, headers=full)
    assert response.status_code == 200, response.get_json()


def test_known_query_parameters_still_work(client, full, agent, session):
    response = client.get(SESSIONS.format(agent=agent) + "?limit=1&filter=s", headers=full)
    assert response.status_code == 200
    assert len(response.get_json()["sessions"]) == 1


def test_unknown_query_parameter_of_a_missing_agent_is_its_404(client, admin):
    response = client.get(SESSIONS.format(agent="nobody") + "?limt=1", headers=admin)
    assert_error(response, 404, "agent_not_found")


def test_unknown_settings_are_named_with_the_closest_known_one():
    environ = {
        "AGENT_SESSIONS_STORAGE_URLL": "x",
        "AGENT_SESSIONS_STORAGE_URL": "sqlite:///x.db",
        "AGENT_SESSIONS_WORKERS": "2",
        "AGENT_SESSIONS_ZZZZZZZZ": "1",
        "HOME": "/root",
    }
    messages = unknown_environment_names(environ)
    assert messages == [
        "unknown setting AGENT_SESSIONS_STORAGE_URLL is ignored; "
        "did you mean AGENT_SESSIONS_STORAGE_URL?",
        "unknown setting AGENT_SESSIONS_ZZZZZZZZ is ignored",
    ]


def test_the_cli_warns_of_an_unknown_setting_once(tmp_path: Path):
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/x.db",
        "AGENT_SESSIONS_SESION_CREATE_LIMIT": "5/minute",
    }
    cli("db", "upgrade", env={"AGENT_SESSIONS_STORAGE_URL": env["AGENT_SESSIONS_STORAGE_URL"]})
    result = cli("agents", "list", env=env)
    assert result.stderr.splitlines() == [
        "Warning: unknown setting AGENT_SESSIONS_SESION_CREATE_LIMIT is ignored; "
        "did you mean AGENT_SESSIONS_SESSION_CREATE_LIMIT?"
    ]


def test_gunicorn_warns_of_an_unknown_setting_once(tmp_path: Path):
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/x.db",
        "AGENT_SESSIONS_PROXY_CUONT": "1",
    }
    with serving(env, tmp_path, workers=2) as server:
        assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
        logs = server.logs()
    lines = [line for line in logs.splitlines() if "AGENT_SESSIONS_PROXY_CUONT" in line]
    assert len(lines) == 1, logs
    assert "did you mean AGENT_SESSIONS_PROXY_COUNT?" in lines[0]


def gunicorn(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{free_port()}"]
        + list(args)
        + ["wsgi:app"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "env",
    [
        {"AGENT_SESSIONS_WORKERS": "2"},
        {"WEB_CONCURRENCY": "3"},
    ],
)
def test_memory_storage_with_several_workers_refuses_to_start(env: dict[str, str]):
    result = gunicorn({"AGENT_SESSIONS_STORAGE_URL": "memory://", **env})
    assert result.returncode == 4, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "memory://" in line]
    assert len(lines) == 1, result.stderr
    assert "one worker" in lines[0] and "Traceback" not in result.stderr


def test_memory_storage_with_one_worker_serves(tmp_path: Path):
    with serving({"AGENT_SESSIONS_STORAGE_URL": "memory://"}, tmp_path, workers=1) as server:
        assert requests.get(server.url + "/readyz", timeout=5).status_code == 200


def test_index_links_the_docs_and_the_openapi_document(client):
    response = client.get("/")
    assert response.status_code == 200
    links = response.get_json()["links"]
    assert links["docs"] == "/v2/docs" and links["openapi"] == "/v2/openapi.json"
    for path in links.values():
        assert client.get(path).status_code == 200, path


def test_access_log_has_the_request_id_and_the_duration(tmp_path: Path):
    with serving(
        {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/x.db"}, tmp_path, workers=1
    ) as server:
        requests.get(server.url + "/readyz", headers={"X-Request-ID": "trace-abc-123"}, timeout=5)
        generated = requests.get(server.url + "/nowhere", timeout=5).headers["X-Request-ID"]
        deadline = time.monotonic() + 10
        while "/nowhere" not in server.logs() and time.monotonic() < deadline:
            time.sleep(0.1)
        logs = server.logs()
    line = next(line for line in logs.splitlines() if '"GET /readyz' in line)
    assert re.search(r" request_id=trace-abc-123 duration=\d+\.\d{6}s$", line), line
    line = next(line for line in logs.splitlines() if '"GET /nowhere' in line)
    assert f"request_id={generated} " in line and " 404 " in line, line


def test_scripts_serve_refuses_memory_storage():
    result = subprocess.run(
        [str(ROOT / "scripts" / "serve")],
        env={**os.environ, "AGENT_SESSIONS_STORAGE_URL": "memory://"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3
    assert "memory://" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "path",
    [
        SESSIONS + "%2F{session}",
        SESSIONS + "/{session}%2fevents",
        "/v2/agents%2F{agent}/sessions",
    ],
)
def test_an_encoded_slash_is_no_path_separator(client, full, agent, session, path):
    # WSGI decodes %2F to "/" in PATH_INFO; the path as sent names no route.
    url = path.format(agent=agent, session=session)
    assert_error(client.get(url, headers=full), 404, "not_found")
    # The same path with a real slash is served.
    assert client.get(url.replace("%2F", "/").replace("%2f", "/"), headers=full).status_code == 200


def test_a_first_start_on_the_defaults_warns_of_no_setting(tmp_path: Path):
    # The settings gunicorn.conf.py passes to its workers are none of the operator's.
    env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/x.db"}
    with serving(env, tmp_path, workers=2) as server:
        assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
        logs = server.logs()
    assert "unknown setting" not in logs, logs
