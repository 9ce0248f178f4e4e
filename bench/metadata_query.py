"""The session list's ``metadata.KEY=VALUE`` page: its cost at N sessions against 1,000.

Usage: ``bench/metadata_query.py [--sessions N] [--full] [--backends sqlite,postgresql]
[--repeat R] [--check]``. Builds, per backend, a store of 1,000 sessions and one of
N (default 100,000; ``--full`` is the contract's 1,000,000) in one agent, 1% of them
with ``{"user_id": "u-hot"}`` and the rest with a user id of their own, through the
storage's bulk loader (the metadata index is filled as it loads, as every write
fills it). Then it times the storage call that serves
``GET .../sessions?metadata.user_id=u-hot&limit=10``: the first page in each store,
and in the big one a page from the middle of the matches (its page key), the stores'
calls in turn, median of R each. Prints the costs and their ratios; ``--check``
exits 1 when a ratio passes 1.25.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stores import drop_pg_databases, fresh_url  # noqa: E402

from storage_backends import Agent, Session, storage_from_url  # noqa: E402
from storage_backends.codec import utcnow  # noqa: E402

AGENT = "bench"
QUERY = {"user_id": "u-hot"}
LIMIT = 10
SMALL = 1_000
BOUND = 1.25


def sessions(count: int, start: dt.datetime) -> Iterator[Session]:
    """``count`` sessions, one in a hundred with the hot user id, spread evenly."""
    for n in range(count):
        created = start + dt.timedelta(milliseconds=n)
        user = "u-hot" if n % 100 == 50 else f"u-{n}"
        yield Session(
            agent_key=AGENT,
            key=f"s{n:07d}",
            name=f"Session {n}",
            metadata={"user_id": user, "channel": "web", "turns": n % 50},
            created_at=created,
            updated_at=created,
        )


def build(backend: str, workdir: Path, count: int) -> tuple[object, float]:
    """A store of ``count`` sessions, and the seconds it took to load."""
    url = fresh_url(backend, workdir, f"metadata_{count}")
    storage = storage_from_url(url, {})
    now = utcnow()
    started = time.monotonic()
    storage.create_agent(agent=Agent(key=AGENT, name=AGENT, created_at=now, updated_at=now))
    rows = sessions(count, now - dt.timedelta(days=1))
    if backend == "memory":
        for session in rows:
            storage.create_session(session=session)
    else:
        storage.load_sessions(rows, batch=50_000)
        with storage._reading() as conn:
            conn.execute("ANALYZE")
    return storage, time.monotonic() - started


def timer(storage: object, after: int | None) -> Callable[[], float]:
    def once() -> float:
        started = time.perf_counter()
        page = storage.list_sessions(
            agent_key=AGENT, limit=LIMIT, now=utcnow(), after=after, metadata=QUERY
        )
        elapsed = time.perf_counter() - started
        assert len(page.items) == LIMIT and all(
            s.metadata["user_id"] == "u-hot" for s in page.items
        ), page
        return elapsed

    return once


def middle(storage: object, count: int) -> int:
    """The page key halfway through the big store's matches."""
    after, pages = None, count // 100 // LIMIT // 2
    for _ in range(pages):
        after = storage.list_sessions(
            agent_key=AGENT, limit=LIMIT, now=utcnow(), after=after, metadata=QUERY
        ).next_cursor
    return after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--full", action="store_true", help="1,000,000 sessions")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    count = 1_000_000 if args.full else args.sessions
    worst = 0.0
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for backend in args.backends.split(","):
                small, small_load = build(backend, Path(tmp), SMALL)
                large, large_load = build(backend, Path(tmp), count)
                print(
                    f"{backend}: loaded {SMALL:,} sessions in {small_load:.1f} s, "
                    f"{count:,} in {large_load:.1f} s",
                    flush=True,
                )
                timers = {
                    "small": timer(small, None),
                    "large": timer(large, None),
                    "deep": timer(large, middle(large, count)),
                }
                for once in timers.values():  # warm: caches, statements, plans
                    for _ in range(20):
                        once()
                times: dict[str, list[float]] = {name: [] for name in timers}
                for _ in range(args.repeat):
                    for name, once in timers.items():
                        times[name].append(once())
                median = {name: statistics.median(values) for name, values in times.items()}
                ratios = (median["large"] / median["small"], median["deep"] / median["large"])
                worst = max(worst, *ratios)
                rows.append((backend, median, ratios))
                for store in (small, large):
                    store.close()
    finally:
        drop_pg_databases()
    print()
    print(
        f"| backend | first page, {SMALL:,} | first page, {count:,} | ratio | "
        f"middle page, {count:,} | ratio to first |"
    )
    print("|---|---|---|---|---|---|")
    for backend, median, (size, depth) in rows:
        print(
            f"| {backend} | {median['small'] * 1e3:.3f} ms | {median['large'] * 1e3:.3f} ms | "
            f"{size:.2f} | {median['deep'] * 1e3:.3f} ms | {depth:.2f} |"
        )
    if args.check and worst > BOUND:
        print(f"a ratio passed {BOUND}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
