"""Does keeping an agent's usage make appends to its different sessions wait on each other?

On PostgreSQL, THREADS writers each append single events to a session of their
own, for SECONDS, in three layouts: every session under one agent with the
quotas on (the case the sharded usage rows are for), every session under an
agent of its own with the quotas on (no usage row shared), and one agent with
both quotas off (0: usage is still counted, nothing is checked). Each writer
holds a storage connection of its own, as gunicorn's threads do. Printed:
appends per second and each append's p50 and p99, and the ratios of the first
layout to the others (1.0: no serialization).

    .venv/bin/python bench/quota_contention.py [--threads 8] [--seconds 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from storage_backends import Agent, Event, Session, storage_from_url  # noqa: E402

BASE = "postgresql://postgres@127.0.0.1:5432/test"


def layout(name: str, threads: int, seconds: float, agents: int, quotas: dict) -> dict:
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(BASE, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{BASE}?options=-csearch_path%3D{schema}"
    options = {"POSTGRES_POOL_MAX": threads + 2, **quotas}
    store = storage_from_url(url, options)
    try:
        now = dt.datetime.now(dt.UTC)
        for a in range(agents):
            store.create_agent(agent=Agent(key=f"a{a}", name="a", created_at=now, updated_at=now))
        for t in range(threads):
            session = Session(
                agent_key=f"a{t % agents}", key=f"s{t}", name="s", created_at=now, updated_at=now
            )
            store.create_session(session=session)
        latencies: list[list[float]] = [[] for _ in range(threads)]
        stop = time.monotonic() + seconds
        start = threading.Barrier(threads)

        def writer(t: int) -> None:
            agent, key, n = f"a{t % agents}", f"s{t}", 0
            start.wait()
            while time.monotonic() < stop:
                n += 1
                event = Event(
                    id=f"aev_{t}x{n}", session_key=key, type="agent_output",
                    fields={"content": "x" * 200}, created_at=dt.datetime.now(dt.UTC),
                )  # fmt: skip
                began = time.perf_counter()
                store.append_events(
                    agent_key=agent, session_key=key, events=[event], now=event.created_at
                )
                latencies[t].append(time.perf_counter() - began)

        workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        every = sorted(x for each in latencies for x in each)
        return {
            "layout": name,
            "appends_per_s": len(every) / seconds,
            "p50_ms": 1000 * statistics.median(every),
            "p99_ms": 1000 * every[int(0.99 * (len(every) - 1))],
        }
    finally:
        store.close()
        with psycopg.connect(BASE, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    on = {"AGENT_MAX_BYTES": 1 << 30, "SESSION_MAX_EVENTS": 100_000}
    off = {"AGENT_MAX_BYTES": 0, "SESSION_MAX_EVENTS": 0}
    rows = [
        layout("one agent, quotas on", args.threads, args.seconds, 1, on),
        layout("an agent per session, quotas on", args.threads, args.seconds, args.threads, on),
        layout("one agent, quotas off", args.threads, args.seconds, 1, off),
    ]
    print(f"{'layout':34} {'appends/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for row in rows:
        print(
            f"{row['layout']:34} {row['appends_per_s']:10.0f} {row['p50_ms']:8.2f} "
            f"{row['p99_ms']:8.2f}"
        )
    for other in rows[1:]:
        ratio = rows[0]["appends_per_s"] / other["appends_per_s"]
        print(f"throughput, one agent quotas on / {other['layout']}: {ratio:.2f}")


if __name__ == "__main__":
    main()
