"""The Google ADK adapter against ADK's own session services, side by side in one run.

Usage: ``bench/adk.py [--appends N] [--rounds R] [--events E] [--reads R] [--check]``
(needs the client's ``adk`` extra and ADK's ``db`` extra: ``pip install './client[adk]'
'google-adk[db]==2.13.0'``).

- ``append_event``: the adapter on this service (gunicorn, 2 workers, a SQLite file
  with ``SQLITE_SYNCHRONOUS=FULL``) against ADK's ``DatabaseSessionService``
  (``sqlite+aiosqlite``) and ``SqliteSessionService`` on a SQLite file of their own,
  all of them durable (SQLite's default ``synchronous=FULL`` for ADK's). Each appends
  one model text event with a session-state change to one session, N per round,
  the services in turn for R rounds; the median per append of each. The ratio is the
  faster ADK service's time over the adapter's: at least 1.0 is the bound.
- ``get_session`` of an E-event session (2,000 by default) on the adapter and on
  ``SqliteSessionService``: the median of R reads each, in turn, and the HTTP
  requests the adapter made for one read. Bounds: at most 2 requests, and at most
  2.0 times ``SqliteSessionService``'s time.

Prints the times and the ratios; ``--check`` exits 1 when one passes its bound.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import BIN, Gunicorn  # noqa: E402

try:
    from google.adk.events.event import Event
    from google.adk.events.event_actions import EventActions
    from google.adk.sessions.database_session_service import DatabaseSessionService
    from google.adk.sessions.sqlite_session_service import SqliteSessionService
    from google.genai import types

    from agent_sessions_client import AgentSessions
    from agent_sessions_client.adk import (
        AgentSessionsService,
        agent_key,
        session_key,
        to_service_event,
    )
except ImportError as err:  # pragma: no cover - a missing extra
    sys.exit(f"bench/adk.py: {err}; install './client[adk]' and 'google-adk[db]==2.13.0'")

APP = "bench_app"
USER = "u-1"
APPEND_BOUND = 1.0
READ_BOUND = 2.0
READ_REQUESTS = 2
SETTINGS = {
    "AGENT_SESSIONS_SQLITE_SYNCHRONOUS": "FULL",
    "AGENT_SESSIONS_METADATA_MAX_BYTES": "1048576",
    "AGENT_SESSIONS_METADATA_MAX_KEYS": "1024",
    "AGENT_SESSIONS_MAX_CONTENT_LENGTH": "2097152",
    "AGENT_SESSIONS_DEFAULT_LIMIT": "1000000/minute",
    "AGENT_SESSIONS_ADMIN_LIMIT": "1000000/minute",
    "AGENT_SESSIONS_SESSION_CREATE_LIMIT": "1000000/minute",
}


def model_event(n: int, stamp: float | None = None) -> Event:
    text = f"Answer {n}: the invoice INV-{n} was sent on Monday."
    return Event(
        invocation_id=f"inv-{n}",
        author="support_agent",
        content=types.Content(role="model", parts=[types.Part(text=text)]),
        actions=EventActions(state_delta={"turns": n, "last_invoice": f"INV-{n}"}),
        **({} if stamp is None else {"timestamp": stamp}),
    )


async def time_appends(service: Any, session: Any, start: int, count: int) -> list[float]:
    spent = []
    for n in range(start, start + count):
        event = model_event(n)
        began = time.perf_counter()
        await service.append_event(session, event)
        spent.append(time.perf_counter() - began)
    return spent


async def appends(services: dict[str, Any], count: int, rounds: int) -> dict[str, float]:
    sessions = {
        name: await service.create_session(app_name=APP, user_id=USER, session_id=f"a-{name}")
        for name, service in services.items()
    }
    spent: dict[str, list[float]] = {name: [] for name in services}
    for _ in range(2):  # warm-up: connections, schema, caches
        for name, service in services.items():
            await time_appends(service, sessions[name], len(spent[name]) + 10_000, 5)
    for r in range(rounds):
        for name, service in services.items():
            spent[name] += await time_appends(service, sessions[name], r * count, count)
    return {name: statistics.median(times) for name, times in spent.items()}


async def reads(
    adapter: AgentSessionsService,
    sqlite: SqliteSessionService,
    admin: AgentSessions,
    events: int,
    repeat: int,
) -> tuple[dict[str, float], int]:
    session_id = "long"
    history = [model_event(n, stamp=1_000_000.0 + n) for n in range(events)]
    await adapter.create_session(app_name=APP, user_id=USER, session_id=session_id)
    agent, key = agent_key(APP), session_key(USER, session_id)
    for start in range(0, events, 1000):  # loaded as batches: this is set-up, not measured
        admin.events.append(
            agent, key, [to_service_event(e) for e in history[start : start + 1000]]
        )
    theirs = await sqlite.create_session(app_name=APP, user_id=USER, session_id=session_id)
    for event in history:
        await sqlite.append_event(theirs, event.model_copy(deep=True))

    client = adapter._client
    send = client._http.send
    sent: list[str] = []

    async def counting(request: Any, **kwargs: Any) -> Any:
        sent.append(request.url.path)
        return await send(request, **kwargs)

    client._http.send = counting
    got = await adapter.get_session(app_name=APP, user_id=USER, session_id=session_id)
    client._http.send = send
    assert len(got.events) == events, len(got.events)
    spent: dict[str, list[float]] = {"adapter": [], "sqlite": []}
    targets = {"adapter": adapter, "sqlite": sqlite}
    for _ in range(repeat + 1):
        for name, service in targets.items():
            began = time.perf_counter()
            read = await service.get_session(app_name=APP, user_id=USER, session_id=session_id)
            spent[name].append(time.perf_counter() - began)
            assert len(read.events) == events
    return {name: statistics.median(times[1:]) for name, times in spent.items()}, len(sent)


def admin_key(env: dict[str, str]) -> str:
    out = subprocess.run(
        [str(BIN / "agent-sessions"), "keys", "create", "--name", "bench", "--admin"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip().splitlines()[-1]


async def run(args: argparse.Namespace, workdir: Path, url: str, admin: str) -> int:
    adapter = AgentSessionsService(url, admin)
    database = DatabaseSessionService(f"sqlite+aiosqlite:///{workdir}/adk-database.db")
    sqlite = SqliteSessionService(str(workdir / "adk-sqlite.db"))
    services = {"adapter": adapter, "database": database, "sqlite": sqlite}
    failed = 0
    try:
        medians = await appends(services, args.appends, args.rounds)
        faster = min(medians["database"], medians["sqlite"])
        ratio = faster / medians["adapter"]
        print(f"append_event, median of {args.appends * args.rounds} each:")
        for name, seconds in medians.items():
            print(f"  {name:9s} {seconds * 1000:7.3f} ms")
        print(
            f"  ratio, the faster ADK service / the adapter: {ratio:.2f} (bound >= {APPEND_BOUND})"
        )
        failed += ratio < APPEND_BOUND
        with AgentSessions(url, admin) as client:
            times, requests = await reads(adapter, sqlite, client, args.events, args.reads)
        read_ratio = times["adapter"] / times["sqlite"]
        print(f"get_session of {args.events} events, median of {args.reads} each:")
        for name, seconds in times.items():
            print(f"  {name:9s} {seconds * 1000:7.3f} ms")
        print(f"  HTTP requests of the adapter's read: {requests} (bound <= {READ_REQUESTS})")
        print(
            f"  ratio, the adapter / SqliteSessionService: {read_ratio:.2f} (bound <= {READ_BOUND})"
        )
        failed += requests > READ_REQUESTS or read_ratio > READ_BOUND
    finally:
        await adapter.close()
        await database.close()
        await sqlite.close()
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--appends", type=int, default=50, help="appends per service a round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--events", type=int, default=2000, help="events of the session read")
    parser.add_argument("--reads", type=int, default=15)
    parser.add_argument("--check", action="store_true", help="exit 1 past a bound")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-adk-") as tmp:
        workdir = Path(tmp)
        env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{workdir}/sessions.db", **SETTINGS}
        admin = admin_key(env)
        with Gunicorn(f"adk-{uuid.uuid4().hex[:6]}", "wsgi:app", env, workdir) as server:
            failed = asyncio.run(run(args, workdir, server.url, admin))
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
