"""The service on ``memory://`` storage, with every worker's store seeded for the benchmark.

Each gunicorn worker holds its own memory store, which the operator CLI cannot
reach. Without ``--preload`` gunicorn imports this module once in every worker,
so every worker seeds its own store here, identically, through the storage
interface: the benchmark agent, one API key whose token ``bench/run.py``
passes in ``BENCH_API_TOKEN``, the session the ``get`` script reads, and the
sessions of the events operations (``stores.seed_events``).
Everything else (creates, lists) then runs as on any other backend, each
request answered by whichever worker accepted its connection.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s modules, as run.py has

from stores import SCOPES, seed_events  # noqa: E402

from sessions_app import create_app  # noqa: E402
from sessions_app.corridor.auth import hash_secret  # noqa: E402
from storage_backends import Agent, ApiKey, Grant, Session  # noqa: E402
from storage_backends.codec import utcnow  # noqa: E402

app = create_app()


def seed(storage, *, token: str, agent_key: str, session_key: str) -> None:
    now = utcnow()
    key_id, _, secret = token.partition(".")
    storage.create_agent(agent=Agent(key=agent_key, name=agent_key, created_at=now, updated_at=now))
    storage.create_api_key(
        api_key=ApiKey(
            id=key_id,
            name="benchmark",
            secret_hash=hash_secret(secret),
            grants=[Grant(agent_key, tuple(SCOPES.split(",")))],
            created_at=now,
        )
    )
    storage.create_session(
        session=Session(
            key=session_key,
            agent_key=agent_key,
            name="Benchmark session",
            metadata={"customer": "c-17", "channel": "web"},
            created_at=now,
            updated_at=now,
        )
    )
    seed_events(storage, agent_key)


seed(
    app.extensions["agent_sessions"].storage,
    token=os.environ["BENCH_API_TOKEN"],
    agent_key=os.environ["BENCH_AGENT"],
    session_key=os.environ["BENCH_SESSION"],
)
