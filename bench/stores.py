"""Stores for the benchmark: a fresh one per backend, its API key, and bulk loading.

The bulk loader writes sessions through the SQL layer's own batch insert
(SQLite) or a plain connection to the same database (PostgreSQL, with COPY into
the columns ``storage_backends.sql`` defines), bypassing the HTTP layer and the
per-row storage calls: a million creates through the API would take longer than
the whole benchmark.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import os
import secrets
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from harness import BIN, ROOT

from sessions_app.corridor.auth import KEY_ID_PREFIX
from storage_backends import Agent, Event, Session, Storage, storage_from_url
from storage_backends.codec import dump_json, utcnow
from storage_backends.sql import SESSION_INSERT_COLUMNS

BACKENDS = ("sqlite", "memory", "postgresql")
PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_URL = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"

AGENT = "bench-agent"
GET_KEY = "bench-get"
# Limits stay on, counted and reported in headers, but never reached.
HIGH_LIMIT = "100000000/minute"
SCOPES = "sessions:create,sessions:read,events:create,events:append"
# Events: compare's appends go to a random one of APPEND_SESSIONS sessions
# (bench-append-0, ...), as agent runtimes write many conversations at once;
# newest-20 lists read another session's history.
APPEND_KEY = "bench-append"
APPEND_SESSIONS = 64
HISTORY_KEY = "bench-history"
HISTORY_EVENTS = 100

BULK_KEY_PREFIX = "s"  # bulk keys are s0000000, s0000001, ... within each agent
BULK_BATCH = 50_000


@dataclasses.dataclass
class Store:
    """A store ready to serve: the gunicorn app to run on it, its environment, the API key."""

    backend: str
    url: str
    app: str
    env: dict[str, str]
    token: str


def prepare(backend: str, workdir: Path, name: str, settings: dict[str, str]) -> Store:
    """A fresh, empty store holding the benchmark agent, an API key and one session to read.

    SQLite and PostgreSQL are set up through the operator CLI, as an operator
    would; memory stores live inside each worker, so ``bench/memory_app.py``
    seeds them there.
    """
    url = fresh_url(backend, workdir, name)
    env = {
        "AGENT_SESSIONS_STORAGE_URL": url,
        "AGENT_SESSIONS_SESSION_CREATE_LIMIT": HIGH_LIMIT,
        "AGENT_SESSIONS_DEFAULT_LIMIT": HIGH_LIMIT,
        **settings,
    }
    if backend == "memory":
        token = f"{KEY_ID_PREFIX}{secrets.token_hex(8)}.{secrets.token_urlsafe(32)}"
        env |= {"BENCH_API_TOKEN": token, "BENCH_AGENT": AGENT, "BENCH_SESSION": GET_KEY}
        # Every worker seeds its own store alike: several workers on memory:// are meant.
        env["AGENT_SESSIONS_MEMORY_PER_WORKER"] = "true"
        return Store(backend, url, "bench.memory_app:app", env, token)
    cli(env, "agents", "create", AGENT, "--name", "Benchmark agent")
    out = cli(env, "keys", "create", "--name", "benchmark", "--grant", f"{AGENT}={SCOPES}")
    token = out.strip().splitlines()[-1]
    storage = storage_from_url(url)
    now = utcnow()
    storage.create_session(
        session=Session(
            key=GET_KEY,
            agent_key=AGENT,
            name="Benchmark session",
            metadata={"customer": "c-17", "channel": "web"},
            created_at=now,
            updated_at=now,
        )
    )
    seed_events(storage)
    storage.close()
    return Store(backend, url, "wsgi:app", env, token)


def seed_events(storage: Storage, agent_key: str = AGENT) -> None:
    """The session appends go to, and one with a history of ``HISTORY_EVENTS`` events to list."""
    now = utcnow()
    for key in (APPEND_KEY, HISTORY_KEY, *(f"{APPEND_KEY}-{n}" for n in range(APPEND_SESSIONS))):
        storage.create_session(
            session=Session(
                key=key, agent_key=agent_key, name=key, metadata={}, created_at=now, updated_at=now
            )
        )
    storage.append_events(
        agent_key=agent_key,
        session_key=HISTORY_KEY,
        events=list(_events(HISTORY_EVENTS, now)),
        now=now,
    )


def fresh_url(backend: str, workdir: Path, name: str) -> str:
    if backend == "sqlite":
        return f"sqlite:///{workdir / name}.db"  # workdir is absolute: four slashes
    if backend == "memory":
        return "memory://"
    if backend == "postgresql":
        database = "bench" if name in ("compare", "empty") else f"bench_{name}"
        recreate_pg_database(database)
        return f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{database}"
    raise ValueError(f"unknown backend {backend!r}")


_pg_databases: set[str] = set()


def recreate_pg_database(name: str) -> None:
    drop_pg_database(name)
    _pg_admin("CREATE DATABASE {}", name)
    _pg_databases.add(name)


def drop_pg_database(name: str) -> None:
    _pg_admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)


def drop_pg_databases() -> None:
    """Drop the scratch databases this run created (a loaded one holds a million rows)."""
    while _pg_databases:
        drop_pg_database(_pg_databases.pop())


def _pg_admin(statement: str, database: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL(statement).format(sql.Identifier(database)))


def cli(env: dict[str, str], *args: str) -> str:
    """Run the ``agent-sessions`` console script; its standard output."""
    result = subprocess.run(
        [str(BIN / "agent-sessions"), *args],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"agent-sessions {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


# Bulk loading


def agents_for(count: int) -> list[str]:
    """The benchmark agent first, then more, so the sessions spread over ``count`` agents."""
    return [AGENT] + [f"{AGENT}-{n}" for n in range(2, count + 1)]


def bulk_load(url: str, *, sessions: int, agents: int) -> float:
    """Add ``sessions`` sessions spread round-robin over ``agents`` agents; return the seconds.

    Agent ``i`` gets the keys s0000000, s0000001, ... so that a reader can pick
    any of them at random; rows of different agents interleave, as they would
    when agents are busy at the same time.
    """
    started = time.monotonic()
    storage = storage_from_url(url)
    now = utcnow()
    for key in agents_for(agents)[1:]:
        storage.create_agent(agent=Agent(key=key, name=key, created_at=now, updated_at=now))
    rows = _sessions(sessions, agents_for(agents), now - dt.timedelta(days=1))
    if url.startswith("sqlite:"):
        storage.load_sessions(rows, batch=BULK_BATCH)
        storage.db.execute("ANALYZE")
    elif url.startswith("postgresql:"):
        with storage._reading() as conn:
            before = conn.execute("SELECT coalesce(max(id), 0) FROM sessions").fetchone()[0]
        storage.close()
        _load_postgres(url, rows)
        # COPY writes the sessions' rows only: their metadata index as every write keeps it.
        storage = storage_from_url(url)
        with storage._transaction() as conn:
            storage._index_sessions_after(conn, before)
    else:
        raise ValueError(f"no bulk loader for {url}")
    storage.close()
    return time.monotonic() - started


EVENT_BATCH = 10_000  # rows per executemany (and transaction) of the events loader
EVENT_KINDS = ("input_message", "agent_output", "tool_input", "tool_output", "thinking")


def bulk_load_events(url: str, *, agent_key: str, session_key: str, count: int) -> float:
    """Append ``count`` events to an existing session through ``load_events``; return seconds.

    Ids are aev_b0000000, aev_b0000001, ...; the types cycle through five
    kinds, so a type filter selects one event in five.
    """
    started = time.monotonic()
    storage = storage_from_url(url)
    try:
        storage.load_events(
            agent_key=agent_key,
            session_key=session_key,
            events=_events(count, utcnow() - dt.timedelta(days=1)),
            batch=EVENT_BATCH,
        )
        if url.startswith("sqlite:"):
            storage.db.execute("ANALYZE")
        else:
            with storage._connection() as conn:
                conn.execute("ANALYZE events")
    finally:
        storage.close()
    return time.monotonic() - started


def bulk_load_history(url: str, *, session_key: str, events: int, store_events: int) -> float:
    """``events`` events in a new session ``session_key``, ``store_events`` in the store; seconds.

    The rest go to four more sessions, and the five are loaded a batch of
    each in turn, so their rows interleave as busy sessions' rows do. SQLite's
    WAL is checkpointed and truncated afterwards (its size before is printed).
    """
    started = time.monotonic()
    others = [f"{session_key}-other-{n}" for n in range(1, 5)]
    counts = {session_key: events} | {key: (store_events - events) // len(others) for key in others}
    storage = storage_from_url(url)
    now = utcnow()
    try:
        for key in counts:
            storage.create_session(
                session=Session(
                    key=key, agent_key=AGENT, name=key, metadata={}, created_at=now, updated_at=now
                )
            )
        start = now - dt.timedelta(days=1)
        for first in range(0, max(counts.values()), EVENT_BATCH):
            for key, count in counts.items():
                if first < count:
                    storage.load_events(
                        agent_key=AGENT,
                        session_key=key,
                        events=_events(min(EVENT_BATCH, count - first), start, first),
                        batch=EVENT_BATCH,
                    )
        if url.startswith("sqlite:"):
            storage.db.execute("ANALYZE")
            wal = Path(storage.path + "-wal")
            size = wal.stat().st_size if wal.exists() else 0
            busy, frames, done = storage.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            print(
                f"  WAL after the load: {size / 2**20:,.0f} MiB, {frames} frames; "
                f"checkpointed {done}, busy {busy}"
            )
        else:
            with storage._connection() as conn:
                conn.execute("ANALYZE events")
    finally:
        storage.close()
    return time.monotonic() - started


def _events(count: int, start: dt.datetime, first: int = 0) -> Iterator[Event]:
    for n in range(first, first + count):
        kind = EVENT_KINDS[n % len(EVENT_KINDS)]
        if kind == "input_message":
            fields: dict = {"messages": [{"type": "text", "content": f"question {n}"}]}
        elif kind in ("tool_input", "tool_output"):
            fields = {
                "tool_call_id": f"c{n}",
                "tool_configuration_name": "search",
                "tool_name": "search",
                kind: {"query": f"q {n}"},
            }
            if kind == "tool_output":
                fields["error"] = False
        else:
            fields = {"content": f"answer {n}"}
        yield Event(
            id=f"aev_b{n:07d}",
            session_key="",
            type=kind,
            fields=fields,
            created_at=start + dt.timedelta(milliseconds=n),
        )


def _sessions(count: int, agents: list[str], start: dt.datetime) -> Iterator[Session]:
    for n in range(count):
        created = start + dt.timedelta(milliseconds=n)
        yield Session(
            agent_key=agents[n % len(agents)],
            key=f"{BULK_KEY_PREFIX}{n // len(agents):07d}",
            name=f"Bulk session {n}",
            metadata={"customer": f"c-{n % 1000}", "channel": "web"},
            created_at=created,
            updated_at=created,
        )


def _batches(rows: Iterable[Session], size: int) -> Iterator[list[Session]]:
    rows = iter(rows)
    while batch := list(itertools.islice(rows, size)):
        yield batch


def _load_postgres(url: str, rows: Iterator[Session]) -> None:
    """COPY in one transaction per batch (the schema exists: the CLI created the agent)."""
    import psycopg

    columns = ", ".join(SESSION_INSERT_COLUMNS)
    with psycopg.connect(url) as conn:
        for batch in _batches(rows, BULK_BATCH):
            with conn.cursor().copy(f"COPY sessions ({columns}) FROM STDIN") as copy:
                for session in batch:
                    copy.write_row(
                        [
                            dump_json(session.metadata)
                            if column == "metadata"
                            else getattr(session, column)
                            for column in SESSION_INSERT_COLUMNS
                        ]
                    )
            conn.commit()
        conn.execute("ANALYZE sessions")
        conn.commit()
