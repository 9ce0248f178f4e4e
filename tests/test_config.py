"""Settings are checked once, at start-up: a bad one is one line and no server, never a 500."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sessions_app import ConfigError, create_app
from tests.servers import BIN, ROOT, cli

# (environment variable, value as an operator would type it, words the message names)
BAD_SETTINGS = [
    ("METADATA_MAX_KEYS", "sixty-four", "METADATA_MAX_KEYS"),
    ("METADATA_MAX_BYTES", "16KiB", "METADATA_MAX_BYTES"),
    ("METADATA_MAX_DEPTH", "8levels", "METADATA_MAX_DEPTH"),
    ("METADATA_MAX_KEY_LENGTH", "0", "METADATA_MAX_KEY_LENGTH"),
    ("FILTER_MAX_LENGTH", "256chars", "FILTER_MAX_LENGTH"),
    ("MAX_CONTENT_LENGTH", "64KiB", "MAX_CONTENT_LENGTH"),
    ("MAX_CONTENT_LENGTH", "-1", "MAX_CONTENT_LENGTH"),
    ("PROXY_COUNT", "one", "PROXY_COUNT"),
    ("PROXY_COUNT", "-1", "PROXY_COUNT"),
    ("PROXY_COUNT", "true", "PROXY_COUNT"),
    ("SQLITE_BUSY_TIMEOUT_MS", "5s", "SQLITE_BUSY_TIMEOUT_MS"),
    ("SQLITE_SYNCHRONOUS", "SOMETIMES", "SQLITE_SYNCHRONOUS"),
    ("RATELIMIT_TIMEOUT", "fast", "RATELIMIT_TIMEOUT"),
    ("RATELIMIT_TIMEOUT", "0", "RATELIMIT_TIMEOUT"),
    ("RATELIMIT_FAILURE_BACKOFF", "-1", "RATELIMIT_FAILURE_BACKOFF"),
    ("RATELIMIT_REQUIRE_SHARED", "perhaps", "RATELIMIT_REQUIRE_SHARED"),
    ("RATELIMIT_STORAGE_OPTIONS", "[1]", "RATELIMIT_STORAGE_OPTIONS"),
    ("FILTER_SCAN_ROWS", "many", "FILTER_SCAN_ROWS"),
    ("FILTER_SCAN_SECONDS", "0", "FILTER_SCAN_SECONDS"),
    ("POSTGRES_POOL_MAX", "four", "POSTGRES_POOL_MAX"),
    ("POSTGRES_POOL_MIN", "9", "POSTGRES_POOL_MIN"),
    ("POSTGRES_TIMEOUT", "5s", "POSTGRES_TIMEOUT"),
    ("POSTGRES_STATEMENT_TIMEOUT_MS", "-5", "POSTGRES_STATEMENT_TIMEOUT_MS"),
    ("EVENT_MAX_BYTES", "256KiB", "EVENT_MAX_BYTES"),
    ("EVENT_MAX_BYTES", "10", "EVENT_MAX_BYTES"),
    ("EVENTS_MAX_CONTENT_LENGTH", "4MiB", "EVENTS_MAX_CONTENT_LENGTH"),
    ("EVENTS_MAX_CONTENT_LENGTH", "-1", "EVENTS_MAX_CONTENT_LENGTH"),
    ("EVENT_MAX_DEPTH", "0", "EVENT_MAX_DEPTH"),
    ("EVENTS_BATCH_MAX", "0", "EVENTS_BATCH_MAX"),
    ("EVENTS_BATCH_MAX", "many", "EVENTS_BATCH_MAX"),
    ("EVENT_MAX_DEPTH", "deep", "EVENT_MAX_DEPTH"),
    ("EVENTS_PAGE_MAX_BYTES", "1MiB", "EVENTS_PAGE_MAX_BYTES"),
    ("EVENTS_PAGE_MAX_BYTES", "0", "EVENTS_PAGE_MAX_BYTES"),
    ("SEND_TIMEOUT", "10s", "SEND_TIMEOUT"),
    ("SEND_TIMEOUT", "0", "SEND_TIMEOUT"),
    ("CONSOLE_ENABLED", "perhaps", "CONSOLE_ENABLED"),
    ("CONSOLE_SESSION_MINUTES", "8h", "CONSOLE_SESSION_MINUTES"),
    ("CONSOLE_SESSION_MINUTES", "0", "CONSOLE_SESSION_MINUTES"),
]


def parsed(value: str) -> Any:
    """The value as Flask's from_prefixed_env gives it: JSON when it parses, else the text."""
    import json

    try:
        return json.loads(value)
    except ValueError:
        return value


@pytest.mark.parametrize(("name", "value", "words"), BAD_SETTINGS)
def test_a_bad_setting_refuses_to_build_the_app(name: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as raised:
        create_app({"TESTING": True, "STORAGE_URL": "memory://", name: parsed(value)})
    assert "\n" not in str(raised.value)


def test_settings_are_normalized_once(tmp_path: Path) -> None:
    app = create_app(
        {
            "STORAGE_URL": "memory://",
            "RATELIMIT_REQUIRE_SHARED": "no",
            "SQLITE_SYNCHRONOUS": "full",
            "RATELIMIT_TIMEOUT": 1,
        }
    )
    assert app.config["RATELIMIT_REQUIRE_SHARED"] is False
    assert app.config["SQLITE_SYNCHRONOUS"] == "FULL"
    assert app.config["RATELIMIT_TIMEOUT"] == 1.0


@pytest.mark.parametrize(
    ("name", "value", "words"), [row for row in BAD_SETTINGS if row[0] != "PROXY_COUNT"][:3]
)
def test_the_cli_says_one_line(tmp_path: Path, name: str, value: str, words: str) -> None:
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/c.db",
        f"AGENT_SESSIONS_{name}": value,
    }
    result = cli("agents", "list", env=env, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr


@pytest.mark.parametrize("value", ["one", "-1"])
def test_the_wsgi_entry_point_says_one_line(tmp_path: Path, value: str) -> None:
    """What gunicorn imports: one line and exit status 4, not a traceback per worker."""
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/w.db",
        "AGENT_SESSIONS_PROXY_COUNT": value,
        "PATH": str(BIN),
    }
    result = subprocess.run(
        [sys.executable, "-c", "import wsgi"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if "PROXY_COUNT" in line
    ]
