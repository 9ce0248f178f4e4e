"""The OpenAI Agents SDK session over the service against the SDK's own SQLiteSession.

Usage: ``.venv/bin/python bench/openai_agents.py [--rounds R] [--calls N]
[--backends sqlite,postgresql] [--synchronous FULL|NORMAL]`` (needs the client's
``openai-agents`` extra).

Side by side in one run, taking turns round by round: ``AgentSessionsSession``
against the service under gunicorn (``gunicorn.conf.py``, 2 workers; SQLite with
``SQLITE_SYNCHRONOUS``, FULL by default so that every write is durable, as the
SDK's WAL file with SQLite's default ``synchronous=FULL`` is; or PostgreSQL) and
``agents.SQLiteSession`` on a file of the same directory. Two operations, each
``N`` calls a round, one at a time from one asyncio loop:

- ``add_items`` of one turn (a user message and an assistant answer, as
  ``Runner.run`` writes them), each to a session of its own, the first write of
  it (the service creates the session in the same request);
- ``get_items(limit=20)`` of a session of 100 items.

Prints each side's median microseconds per call over the rounds, and the ratio
(the adapter's time over SQLiteSession's: above 1 the adapter is slower).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Gunicorn  # noqa: E402
from stores import HIGH_LIMIT, cli, drop_pg_databases, fresh_url  # noqa: E402

try:
    from agents import SQLiteSession
except ImportError:
    sys.exit(
        "bench/openai_agents.py needs the OpenAI Agents SDK: pip install './client[openai-agents]'"
    )

from agent_sessions_client import AgentSessions  # noqa: E402
from agent_sessions_client.openai_agents import AgentSessionsSession  # noqa: E402

AGENT = "agents-sdk-bench"
SCOPES = "sessions:create,sessions:read,sessions:delete,events:append"
HISTORY = 100
LIMIT = 20


def turn(n: int) -> list[dict]:
    """One turn's items, as Runner.run stores them."""
    return [
        {"content": f"Question {n}: where is my invoice?", "role": "user"},
        {
            "id": f"msg_{n}",
            "content": [
                {
                    "annotations": [],
                    "text": f"Answer {n}: sent on Monday.",
                    "type": "output_text",
                    "logprobs": [],
                }
            ],
            "role": "assistant",
            "status": "completed",
            "type": "message",
        },
    ]


async def per_call(calls: int, make: Callable[[int], Awaitable[object]]) -> float:
    """Microseconds per call of ``calls`` calls, one at a time."""
    started = time.perf_counter()
    for n in range(calls):
        await make(n)
    return (time.perf_counter() - started) / calls * 1e6


async def bench(backend: str, workdir: Path, rounds: int, calls: int, synchronous: str) -> dict:
    url = fresh_url(backend, workdir, "openai_agents")
    env = {
        "AGENT_SESSIONS_STORAGE_URL": url,
        "AGENT_SESSIONS_DEFAULT_LIMIT": HIGH_LIMIT,
        "AGENT_SESSIONS_SESSION_CREATE_LIMIT": HIGH_LIMIT,
        "AGENT_SESSIONS_SQLITE_SYNCHRONOUS": synchronous,
    }
    cli(env, "agents", "create", AGENT, "--name", "Agents SDK benchmark")
    token = cli(env, "keys", "create", "--name", "bench", "--grant", f"{AGENT}={SCOPES}")
    token = token.strip().splitlines()[-1]
    db = workdir / "sdk_sessions.db"
    times: dict[str, list[float]] = {
        name: [] for name in ("add adapter", "add sdk", "get adapter", "get sdk")
    }
    with Gunicorn("service", "wsgi:app", env, workdir) as server:
        client = AgentSessions(server.url, token)

        def adapter(session_id: str) -> AgentSessionsSession:
            return AgentSessionsSession(
                session_id, base_url=server.url, api_key=token, agent_key=AGENT, client=client
            )

        read_adapter = adapter("history")
        read_sdk = SQLiteSession("history", db)
        for n in range(HISTORY // 2):
            await read_adapter.add_items(turn(n))
            await read_sdk.add_items(turn(n))
        assert await read_adapter.get_items(limit=LIMIT) == await read_sdk.get_items(limit=LIMIT)
        await per_call(20, lambda n: read_adapter.get_items(limit=LIMIT))  # warm-up
        for _ in range(rounds):
            run = uuid.uuid4().hex[:8]
            ours = [adapter(f"{run}-{n}") for n in range(calls)]
            theirs = [SQLiteSession(f"{run}-{n}", db) for n in range(calls)]
            times["add adapter"].append(
                await per_call(calls, lambda n, ours=ours: ours[n].add_items(turn(n)))
            )
            times["add sdk"].append(
                await per_call(calls, lambda n, theirs=theirs: theirs[n].add_items(turn(n)))
            )
            times["get adapter"].append(
                await per_call(calls, lambda n: read_adapter.get_items(limit=LIMIT))
            )
            times["get sdk"].append(
                await per_call(calls, lambda n: read_sdk.get_items(limit=LIMIT))
            )
            for session in theirs:
                session.close()
        read_sdk.close()
        client.close()
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--backends", default="sqlite")
    parser.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"])
    args = parser.parse_args()
    print(
        f"{args.rounds} rounds of {args.calls} calls; the service's SQLite synchronous="
        f"{args.synchronous}; SQLiteSession on a WAL file, synchronous=FULL (SQLite's default)"
    )
    print(
        f"{'backend':<11} {'operation':<22} {'adapter µs':>11} {'SQLiteSession µs':>17} "
        f"{'ratio':>6}"
    )
    try:
        for backend in args.backends.split(","):
            with tempfile.TemporaryDirectory(prefix="bench-openai-agents-") as tmp:
                costs = asyncio.run(
                    bench(backend, Path(tmp), args.rounds, args.calls, args.synchronous)
                )
            for op, label in (("add", "add_items (one turn)"), ("get", "get_items(limit=20)")):
                ours, theirs = costs[f"{op} adapter"], costs[f"{op} sdk"]
                print(
                    f"{backend:<11} {label:<22} {ours:>11.0f} {theirs:>17.0f} {ours / theirs:>6.2f}"
                )
    finally:
        if "postgresql" in args.backends:
            drop_pg_databases()


if __name__ == "__main__":
    main()
