"""Large histories: the cost of a fork by the source's size, and the longest writer hold of
the operations on a large session.

Usage: ``bench/histories.py [--events N] [--hold-events M] [--content C]
[--backends sqlite,postgresql] [--repeat R] [--check]``.

- Fork: a session of N events (default 100,000) and an empty one, in one store
  (bulk-loaded through ``load_events``); each is forked R times in turn, each
  fork deleted before the next, and the median costs and their ratio are printed.
  Target: at most 1.25x. The SQL backends copy the visible events (SQLite in
  chunks from a snapshot, sql/forks.py), so the ratio grows with N; the printed
  note says so.
- Writer hold: on sessions of M events (default 20,000) of C characters each
  (default 4,000: the 80 MB session of issue 27), one run each of a compaction,
  a fork, a DELETE and a ``purge-expired``, through the storage calls the API and
  the CLI make. Each transaction or single write statement of the call is timed
  from the moment it holds the writer (SQLite's writers' turn; on PostgreSQL a
  pooled connection in its transaction) to its commit: the longest one and how
  many there were are printed, with the call's total. Target: at most 50 ms.
  ``--check`` exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stores import drop_pg_databases, fresh_url  # noqa: E402

from storage_backends import Agent, Event, Session, storage_from_url  # noqa: E402
from storage_backends.codec import utcnow  # noqa: E402

AGENT = "bench"
FORK_BOUND = 1.25
HOLD_BOUND = 0.050


def events(key: str, count: int, content: int, at: dt.datetime) -> Iterator[Event]:
    """``count`` events, one input message in ten, the rest agent outputs."""
    for n in range(count):
        if n % 10 == 0:
            fields = {"messages": [{"type": "text", "content": "q" * content}]}
            kind = "input_message"
        else:
            fields, kind = {"content": "a" * content}, "agent_output"
        yield Event(id=f"aev_{n}", session_key=key, type=kind, fields=fields, created_at=at)


def session(storage, key: str, count: int, content: int, *, expired: bool = False) -> None:
    at = utcnow() - dt.timedelta(hours=2 if expired else 0)
    storage.create_session(
        session=Session(
            key=key,
            agent_key=AGENT,
            name=key,
            tti_minutes=1 if expired else 0,
            created_at=at,
            updated_at=at,
        )
    )
    if count:
        storage.load_events(
            agent_key=AGENT, session_key=key, events=events(key, count, content, at)
        )


def fork(storage, source: str, key: str, **kwargs) -> float:
    now = utcnow()
    started = time.perf_counter()
    storage.fork_session(
        session=Session(key=key, agent_key=AGENT, name=key, created_at=now, updated_at=now),
        source_agent_key=AGENT,
        source_session_key=source,
        **kwargs,
    )
    return time.perf_counter() - started


@contextlib.contextmanager
def holds(storage) -> Iterator[list[float]]:
    """Every writer hold of the storage's calls in the block, in seconds."""
    seen: list[float] = []
    originals = {name: getattr(storage, name) for name in ("_transaction", "_writing")}

    def timed(inner):
        @contextlib.contextmanager
        def hold():
            with inner() as conn:
                started = time.perf_counter()
                yield conn
            seen.append(time.perf_counter() - started)

        return hold

    for name, inner in originals.items():
        setattr(storage, name, timed(inner))
    try:
        yield seen
    finally:
        for name in originals:
            delattr(storage, name)


def fork_costs(backend: str, workdir: Path, count: int, content: int, repeat: int) -> tuple:
    storage = storage_from_url(fresh_url(backend, workdir, "histories_fork"), {})
    now = utcnow()
    storage.create_agent(agent=Agent(key=AGENT, name=AGENT, created_at=now, updated_at=now))
    started = time.monotonic()
    session(storage, "big", count, content)
    session(storage, "empty", 0, content)
    print(f"{backend}: loaded {count:,} events in {time.monotonic() - started:.1f} s", flush=True)
    costs: dict[str, list[float]] = {"empty": [], "big": []}
    for n in range(repeat):
        for source in costs:
            costs[source].append(fork(storage, source, f"f-{source}-{n}"))
            storage.delete_session(agent_key=AGENT, session_key=f"f-{source}-{n}", now=utcnow())
    storage.close()
    median = {source: statistics.median(values) for source, values in costs.items()}
    return median["empty"], median["big"], median["big"] / median["empty"]


def hold_costs(backend: str, workdir: Path, count: int, content: int) -> list[tuple]:
    storage = storage_from_url(fresh_url(backend, workdir, "histories_hold"), {})
    now = utcnow()
    storage.create_agent(agent=Agent(key=AGENT, name=AGENT, created_at=now, updated_at=now))
    for key in ("compacted", "forked", "deleted"):
        session(storage, key, count, content)
    session(storage, "idle", count, content, expired=True)
    summary = Event(
        id="aev_summary",
        session_key="compacted",
        type="compaction",
        fields={"summary_text": "the story so far", "summary_key": "s"},
        created_at=now,
    )
    calls = {
        "compact": lambda: storage.compact_events(
            agent_key=AGENT,
            session_key="compacted",
            up_to_event_id=None,
            compaction=summary,
            now=utcnow(),
        ),
        "fork": lambda: fork(storage, "forked", "fork-of-forked"),
        "delete": lambda: storage.delete_session(
            agent_key=AGENT, session_key="deleted", now=utcnow()
        ),
        "purge-expired": lambda: storage.purge_expired_sessions(now=utcnow()),
    }
    rows = []
    for name, call in calls.items():
        with holds(storage) as seen:
            started = time.perf_counter()
            call()
            total = time.perf_counter() - started
        rows.append((name, max(seen), len(seen), total))
    storage.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--hold-events", type=int, default=20_000)
    parser.add_argument("--content", type=int, default=4_000)
    parser.add_argument("--fork-content", type=int, default=500)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    missed = False
    forks, held = [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for backend in args.backends.split(","):
                costs = fork_costs(backend, Path(tmp), args.events, args.fork_content, args.repeat)
                forks.append((backend, *costs))
                missed |= costs[2] > FORK_BOUND
                for row in hold_costs(backend, Path(tmp), args.hold_events, args.content):
                    held.append((backend, *row))
                    missed |= row[1] > HOLD_BOUND
    finally:
        drop_pg_databases()
    print()
    print(f"| backend | fork of an empty session | fork of {args.events:,} events | ratio |")
    print("|---|---|---|---|")
    for backend, empty, big, ratio in forks:
        print(f"| {backend} | {empty * 1e3:.1f} ms | {big * 1e3:.1f} ms | {ratio:.1f} |")
    print("(the SQL backends copy a fork's events: the ratio grows with the source)")
    print()
    print(
        f"| backend | call on {args.hold_events:,} events of {args.content:,} characters | "
        "longest writer hold | holds | call |"
    )
    print("|---|---|---|---|---|")
    for backend, name, longest, count, total in held:
        print(f"| {backend} | {name} | {longest * 1e3:.1f} ms | {count} | {total:.2f} s |")
    if args.check and missed:
        print("a target was missed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
