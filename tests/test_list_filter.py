"""The list filter: RE2 never writes to the error log, and a filtered list's work is bounded."""

from __future__ import annotations

import datetime as dt
import random
import string
import time

import pytest
import requests

from storage_backends import Agent, Session, storage_from_url

from .servers import bootstrap, serving

T0 = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
# Valid, but its DFA does not fit in RE2's memory budget: matching falls back to
# a mode that costs milliseconds a string (and, with RE2's logging on, writes a
# "DFA out of memory" line to stderr for each).
DFA_BUSTER = r"[\p{L}\p{N}]{50}9"


def texts(count: int, length: int) -> list[str]:
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits + "éßø"
    return ["".join(rng.choices(alphabet, k=length)) for _ in range(count)]


def test_re2_writes_nothing_to_the_servers_error_log(tmp_path):
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/sessions.db",
        "AGENT_SESSIONS_SESSION_CREATE_LIMIT": "1000/minute",
        "AGENT_SESSIONS_DEFAULT_LIMIT": "1000/minute",
    }
    token = bootstrap(env)
    with serving(env, tmp_path, workers=1) as server:
        headers = {"x-api-key": token}
        url = f"{server.url}/v2/agents/support-bot/sessions"
        for n, description in enumerate(texts(30, 2000)):
            response = requests.post(
                url,
                json={"key": f"s{n}", "name": "n", "description": description},
                headers=headers,
                timeout=10,
            )
            assert response.status_code == 201, response.text
        forged = "(\n2026-12-01 00:00:00 [CRITICAL] forged line"
        response = requests.get(url, params={"filter": forged}, headers=headers, timeout=10)
        assert response.status_code == 400, response.text
        response = requests.get(url, params={"filter": DFA_BUSTER}, headers=headers, timeout=10)
        assert response.status_code == 200, response.text
        logs = server.logs()
    assert "forged" not in logs
    assert "DFA out of memory" not in logs
    assert "re2.cc" not in logs  # where RE2 logs from


def load(storage, count: int) -> None:
    descriptions = texts(100, 200)
    storage.create_agent(agent=Agent(key="bot", name="bot", created_at=T0, updated_at=T0))
    stored = storage.load_sessions(
        Session(
            key=f"s{n:06d}",
            agent_key="bot",
            name=f"session {n}",
            description=descriptions[n % 100] + ("needle" if n == count - 1 else ""),
            created_at=T0,
            updated_at=T0,
        )
        for n in range(count)
    )
    assert stored == count


@pytest.mark.slow
@pytest.mark.parametrize("storage_url", ["sqlite", "postgres"], indirect=True)
def test_every_filtered_list_takes_under_a_second_at_100000_sessions(storage_url):
    from storage_backends.codec import compile_filter

    storage = storage_from_url(storage_url, {})
    try:
        load(storage, 100_000)
        timings = {}
        for pattern in ("nothing-matches-this", DFA_BUSTER, "needle", "(?i)SESSION 9999"):
            matches = compile_filter(pattern, 256)
            started = time.monotonic()
            page = storage.list_sessions(agent_key="bot", limit=10, now=T0, matches=matches)
            timings[pattern] = time.monotonic() - started
            # A page that ended early says where to go on.
            assert page.items or page.next_cursor is not None
        assert max(timings.values()) < 1.0, timings
        # Walking on finds what the budget left for later pages.
        after, found = None, []
        matches = compile_filter("needle", 256)
        while True:
            page = storage.list_sessions(
                agent_key="bot", limit=10, now=T0, matches=matches, after=after
            )
            found += [s.key for s in page.items]
            if page.next_cursor is None:
                break
            after = page.next_cursor
        assert found == ["s099999"]
    finally:
        storage.close()
